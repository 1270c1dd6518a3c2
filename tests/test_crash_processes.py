"""
Crash tests with real processes: a sender and a receiver in separate OS
processes, each with its own SQLite store, SIGKILLed at random moments and
restarted (:mod:`tests.crash_soak`, :mod:`tests.crash_node`); and the
checker of their logs, proven on logs that show each kind of failure.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ilm import InboundRecord
from ilm.backends._sqlite import OutboxReport, StoreReport

from . import crash_node
from .crash_soak import (
    NODE_SCRIPT,
    CheckFailed,
    Tally,
    _problems,
    check_logs,
    kill_plan,
    run_crashes,
)

SEED = int(os.environ.get("ILM_CRASH_SEED", "20261127"))
KILLS = int(os.environ.get("ILM_CRASH_KILLS", "24"))

log = Logger()

SENDER_LOG = """\
start pid 10 next 1
running incarnation A
accepted 1 position 1 incarnation A
accepted 2 position 2 incarnation A
accepted 3 position 3 incarnation A
start pid 11 next 4
running incarnation A
accepted 4 position 6 incarnation A
accepted 5 position 7 incarnation A
accepted 6 position 8 incarnation A
outbox-full 7
accepted 7 position 9 incarnation A
finishing next 8
finished
"""

RECEIVER_LOG = """\
start pid 20 marks -
running
delivered A 1 1
delivered A 2 2
delivered A 3 3
delivered A 4 4
start pid 21 marks A:2
running
delivered A 3 3
delivered A 4 4
delivered A 5 5
delivered A 6 4
delivered A 7 5
delivered A 8 6
delivered A 9 7
stopped
"""


def sender_store(
    acked: int = 9, last: int = 9, pending_bytes: int = 0, oldest: float | None = None
) -> StoreReport:
    return StoreReport(
        "sender.sqlite",
        1,
        "A",
        (OutboxReport(2, acked, last, pending_bytes, oldest),),
        (),
    )


def receiver_store(mark: int = 9) -> StoreReport:
    return StoreReport(
        "receiver.sqlite", 1, "R", (), (InboundRecord(1, "A", mark, False),)
    )


def edit(text: str, old: str, new: str) -> list[str]:
    assert old in text, old
    return text.replace(old, new, 1).splitlines()


class CheckerTests(SynchronousTestCase):
    """
    The checker accepts a run that kept every guarantee, counts its
    at-least-once repeats and application resends apart, and refuses each
    kind of violation.
    """

    def check(
        self,
        sender: list[str] | None = None,
        receiver: list[str] | None = None,
        **stores: StoreReport,
    ) -> Tally:
        return check_logs(
            sender if sender is not None else SENDER_LOG.splitlines(),
            receiver if receiver is not None else RECEIVER_LOG.splitlines(),
            stores.get("sender_store", sender_store()),
            stores.get("receiver_store", receiver_store()),
        )

    def refused(self, fragment: str, **kwargs: object) -> None:
        error = self.assertRaises(CheckFailed, self.check, **kwargs)
        self.assertIn(fragment, str(error))

    def test_good_run(self) -> None:
        """
        A run with a receiver restart (positions 3 and 4 delivered again
        above the mark 2) and a sender restart (positions 4 and 5 stored but
        not logged, numbers 4 and 5 sent again at 6 and 7) passes, and the
        counts say so.
        """
        tally = self.check()
        self.assertEqual(
            (
                tally.positions,
                tally.numbers,
                tally.deliveries,
                tally.repeats,
                tally.repeats_per_restart,
                tally.unlogged,
                tally.resends,
                tally.outbox_full,
                tally.sender_starts,
                tally.receiver_starts,
            ),
            (9, 7, 11, 2, [2], 2, 2, 1, 2, 2),
        )

    def test_gap(self) -> None:
        """
        A position skipped by the receiver is a gap.
        """
        self.refused("a gap", receiver=edit(RECEIVER_LOG, "delivered A 5 5\n", ""))

    def test_out_of_order(self) -> None:
        """
        Two positions delivered in the wrong order are refused.
        """
        swapped = RECEIVER_LOG.replace(
            "delivered A 6 4\ndelivered A 7 5", "delivered A 7 5\ndelivered A 6 4"
        )
        self.refused("a gap", receiver=swapped.splitlines())

    def test_repeat_without_receiver_restart(self) -> None:
        """
        A position delivered twice by one receiver process (no kill in
        between) is not an at-least-once repeat: refused.
        """
        self.refused(
            "out of order or twice",
            receiver=edit(RECEIVER_LOG, "delivered A 8 6\n", "delivered A 8 6\n" * 2),
        )

    def test_repeat_at_or_below_the_mark(self) -> None:
        """
        A restarted receiver that delivers a position its durable mark
        covers is refused.
        """
        self.refused(
            "out of order or twice",
            receiver=edit(
                RECEIVER_LOG,
                "marks A:2\nrunning\n",
                "marks A:2\nrunning\ndelivered A 2 2\n",
            ),
        )

    def test_mark_ahead_of_deliveries(self) -> None:
        """
        A receiver resuming from a mark above what was ever delivered has
        skipped messages: refused.
        """
        self.refused(
            "only 4 were ever delivered",
            receiver=edit(RECEIVER_LOG, "marks A:2", "marks A:5"),
        )

    def test_mark_went_back(self) -> None:
        """
        A receiver resuming from a mark below the one an earlier process
        resumed from has lost a durable mark: refused.
        """
        receiver = edit(
            RECEIVER_LOG,
            "stopped\n",
            "start pid 22 marks A:1\nrunning\ndelivered A 2 2\n",
        )
        self.refused("a durable mark went back", receiver=receiver)

    def test_repeats_beyond_the_window(self) -> None:
        """
        More repeats after one restart than the window allows are refused.
        """
        error = self.assertRaises(
            CheckFailed,
            check_logs,
            SENDER_LOG.splitlines(),
            RECEIVER_LOG.splitlines(),
            sender_store(),
            receiver_store(),
            window=1,
        )
        self.assertIn("more than the window", str(error))

    def test_repeat_with_other_contents(self) -> None:
        """
        A repeated position must carry the contents of its first delivery.
        """
        self.refused(
            "delivered again with 9",
            receiver=edit(
                RECEIVER_LOG, "running\ndelivered A 3 3", "running\ndelivered A 3 9"
            ),
        )

    def test_accepted_never_delivered(self) -> None:
        """
        A number the sender logged as accepted must be delivered.
        """
        sender = edit(
            SENDER_LOG,
            "finishing next 8",
            "accepted 8 position 10 incarnation A\nfinishing next 9",
        )
        self.refused("was never delivered", sender=sender)

    def test_delivered_other_contents(self) -> None:
        """
        A logged position delivered with other contents is refused.
        """
        self.refused(
            "accepted with 7 but delivered with 8",
            receiver=edit(RECEIVER_LOG, "delivered A 9 7", "delivered A 9 8"),
        )

    def test_unlogged_position_holds_wrong_number(self) -> None:
        """
        A position stored but not logged before a sender kill must hold the
        next number after the last one logged.
        """
        receiver = RECEIVER_LOG.replace("delivered A 5 5", "delivered A 5 6")
        self.refused("holds 6, expected 5", receiver=receiver.splitlines())

    def test_unlogged_positions_without_a_kill(self) -> None:
        """
        A sender process that skips positions with no kill in between is
        refused (ILM never skips a position).
        """
        sender = edit(
            SENDER_LOG,
            "accepted 3 position 3 incarnation A\n",
            "accepted 3 position 4 incarnation A\n",
        )
        self.refused("no kill in between", sender=sender)

    def test_unexplained_delivered_position(self) -> None:
        """
        Delivered positions beyond everything the sender logged, with no
        kill of the sender after its last logged acceptance, are refused.
        """
        receiver = edit(
            RECEIVER_LOG, "delivered A 9 7\n", "delivered A 9 7\ndelivered A 10 8\n"
        )
        self.refused(
            "no kill explains",
            receiver=receiver,
            sender_store=sender_store(10, 10),
            receiver_store=receiver_store(10),
        )

    def test_position_reused(self) -> None:
        """
        A sender position logged twice is refused.
        """
        sender = edit(
            SENDER_LOG,
            "accepted 4 position 6 incarnation A",
            "accepted 4 position 3 incarnation A",
        )
        self.refused("position 3 reused", sender=sender)

    def test_sender_resumes_wrongly(self) -> None:
        """
        A sender process that does not resume after its last logged number
        is refused.
        """
        self.refused(
            "restarted at 3", sender=edit(SENDER_LOG, "pid 11 next 4", "pid 11 next 3")
        )

    def test_outbox_not_empty(self) -> None:
        """
        A sender store with messages left in its outbox is refused.
        """
        self.refused(
            "did not end empty", sender_store=sender_store(9, 9, 10, 1700000000.0)
        )
        self.refused("did not end empty", sender_store=sender_store(8, 9, 0))

    def test_receiver_mark_short(self) -> None:
        """
        A receiver store whose final mark is short of the stream is refused.
        """
        self.refused("mark for A is 8", receiver_store=receiver_store(8))

    def test_torn_lines_skipped(self) -> None:
        """
        A line cut short by a kill (marked torn by the next process) is
        counted and skipped: the delivery it recorded counts as not made.
        """
        receiver = edit(
            RECEIVER_LOG,
            "delivered A 4 4\nstart",
            "delivered A 4 4\ndelivered A 5 !torn\nstart",
        )
        self.assertEqual(self.check(receiver=receiver).torn, 1)


class NodeLogTests(SynchronousTestCase):
    """
    The node's log: what a restarted sender resumes from, and torn lines.
    """

    def test_resume_skips_torn_line(self) -> None:
        """
        A restarted sender resumes after the last whole ``accepted`` line,
        not after one a kill cut short, even far back in a long log.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("start pid 1 next 1\nrunning incarnation A\n")
            for n in range(1, 20001):
                f.write(f"accepted {n} position {n} incarnation A\n")
            f.write("outbox-full 20001\n" * 10000)
            f.write("accepted 20001 position 20001 incarn")
        self.assertEqual(crash_node.last_accepted(path), 20000)
        self.assertEqual(crash_node.last_accepted(path + ".missing"), 0)

    def test_resume_skips_marked_torn_line(self) -> None:
        """
        A line cut short by a kill and marked torn on the next start is not
        taken for a whole ``accepted`` line, even when the cut left it with
        as many words as one ("accepted 7 position 7 incarn !torn").
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("start pid 1 next 1\n")
            f.write("accepted 6 position 6 incarnation A\n")
            f.write("accepted 7 position 7 incarn")
        log = crash_node.LineLog(path)
        log.write("start pid 2 next 7")
        log.close()
        with open(path) as f:
            self.assertIn("accepted 7 position 7 incarn !torn\n", f.read())
        self.assertEqual(crash_node.last_accepted(path), 6)

    def test_torn_line_marked(self) -> None:
        """
        A log reopened after a kill that cut a line short marks that line
        torn and starts the next one on its own.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("running\ndelivered A 5 1")
        crash_node.LineLog(path).write("start pid 2 marks -")
        with open(path) as f:
            self.assertEqual(
                f.read().splitlines(),
                ["running", "delivered A 5 1 !torn", "start pid 2 marks -"],
            )

    def test_errors_in_output_found(self) -> None:
        """
        Error and critical log events and tracebacks in a node's output are
        found; info events are not.
        """
        path = self.mktemp()
        lines = [
            "2026-11-27T00:00:00+0000 [ilm#info] ILM node 2 running",
            "2026-11-27T00:00:00+0000 [ilm#critical] peer 1 no longer has ...",
            "2026-11-27T00:00:00+0000 [ilm.network.stream#error] closing ...",
            "Traceback (most recent call last):",
            "2026-11-27T00:00:00+0000 [-] Unhandled error in Deferred:",
        ]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.assertEqual(_problems(path), lines[1:])

    def test_kill_plan(self) -> None:
        """
        The kill plan SIGKILLs each role about as often as the other, both
        together sometimes, and is the same for the same seed.
        """
        plan = kill_plan(SEED, 24)
        self.assertEqual(plan, kill_plan(SEED, 24))
        victims = [victim for victim, _, _ in plan]
        sender = victims.count("sender") + victims.count("both")
        receiver = victims.count("receiver") + victims.count("both")
        self.assertEqual((sender, receiver), (12, 12))
        self.assertEqual(victims.count("both"), 2)


class PortTakenTests(SynchronousTestCase):
    """
    The driver restarts a receiver whose port was taken; the node must say
    so by its exit status.
    """

    def test_receiver_exits_when_port_taken(self) -> None:
        """
        A receiver whose port is already listened on exits with status 75
        and logs ``address-in-use`` (the driver then starts it again).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = subprocess.run(
                [
                    sys.executable,
                    NODE_SCRIPT,
                    "receiver",
                    "--store",
                    os.path.join(directory, "receiver.sqlite"),
                    "--log",
                    os.path.join(directory, "receiver.log"),
                    "--port",
                    str(port),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        self.assertEqual(done.returncode, crash_node.EXIT_ADDRESS_IN_USE, done.stdout)
        with open(os.path.join(directory, "receiver.log")) as f:
            self.assertEqual(f.read().splitlines()[-1], "address-in-use")


class CrashProcessTests(TestCase):
    """
    Real processes, real SIGKILLs, real SQLite files, real TCP.
    """

    timeout = 300

    async def test_sigkills(self) -> None:
        """
        A sender and a receiver process, SIGKILLed 24 times at random
        moments while the stream flows (each several times, sometimes both
        together) and up to twice more while the sender drains at the end,
        and restarted on their stores: the receiver got every message in order with no
        gap, repeats only inside the at-least-once window after its own
        kills, every number the sender logged as accepted, and the sender's
        outbox ended empty.  The seed is in the failure message;
        ILM_CRASH_SEED replays the kill plan.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        report = await run_crashes(reactor, directory, SEED, KILLS)
        log.info("crash run: {summary}", summary=report.summary())
        if os.environ.get("ILM_CRASH_VERBOSE"):
            print(report.summary())
        self.assertGreaterEqual(sum(report.kills.values()), min(KILLS, 20))
        self.assertGreaterEqual(min(report.kills.values()), KILLS // 3)
        self.assertGreater(report.tally.positions, 0)
