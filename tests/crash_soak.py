"""
Crash test with real processes and real SIGKILLs.

A sender and a receiver (``tests/crash_node.py``) run in separate OS
processes, each with its own SQLite store, linked over loopback TCP.  The
sender streams the numbers 1, 2, 3, ... to the receiver.  The driver
SIGKILLs the sender, the receiver or both at random moments (seeded),
restarts them on the same stores and logs, and repeats; then it lets the
sender finish (it stops sending and shuts down, which waits until every
message is acknowledged; two more kills come while it drains, unless it
finishes first), stops the receiver, and checks from the two logs and the
two stores (:func:`check_logs`):

- per sender incarnation, the receiver delivered positions 1..M in order,
  with no gap; a position delivered again is allowed only at the start of a
  receiver process, above the mark that process resumed from and at or
  below what earlier processes had delivered (the at-least-once window of
  docs/durability.md), and within the window (``Config().window``); these
  repeats are
  counted;
- every number the sender logged as accepted was delivered at its logged
  position with its logged contents; a position delivered but never logged
  (the store accepted it, then the sender was killed before logging it)
  lies where a kill explains it and holds the next number after the last
  one logged, which the next sender process sends again as a new message
  at a new position: these application resends are counted apart from ILM
  repeats;
- every number from 1 to the last one logged was delivered;
- the sender's outbox ends empty (acknowledged up to M, no rows left) and
  the receiver's mark for the sender's incarnation is M;
- neither node logged an error, a critical event or a traceback.

Used by ``tests/test_crash_processes.py`` (the default suite) and as a soak
command::

    python -m tests.crash_soak --kills 200 [--seed S] [--keep] [--verbose]
        [--max-delay SECONDS] [--window N] [--outbox N] [--burst N]

Kill moments depend on the seed and on timing: a seed replays the same
kill plan (roles, kinds and delays), not the same interleaving.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import attr

from ilm import Config
from ilm.backends._sqlite import StoreReport, inspect_store

from .crash_node import EXIT_ADDRESS_IN_USE, RECEIVER, SENDER, TORN

NODE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_node.py")
WINDOW = Config().window  # the most a receiver crash can repeat


class CheckFailed(AssertionError):
    """
    The logs or stores show a lost, reordered, repeated or corrupted message.
    """


class CrashTestFailed(AssertionError):
    """
    A crash run failed (a check, a node that died on its own, a deadline).
    """


# -- checking the logs ----------------------------------------------------------


@attr.s(auto_attribs=True)
class Tally:
    """
    What the logs of one run show.

    - ``positions``: the stream's last position M (one sender incarnation).
    - ``numbers``: the last number; every number 1..``numbers`` was delivered.
    - ``deliveries``: ``delivered`` lines in the receiver's log.
    - ``repeats``: deliveries of a position already delivered by an earlier
      receiver process (the at-least-once window), and
      ``repeats_per_restart`` the count at each receiver start.
    - ``unlogged``: positions the store accepted but the sender did not log
      before it was killed (each delivered, holding the next number).
    - ``resends``: of those, numbers the sender sent again at a new position
      (application resends: each number delivered at two positions).
    - ``outbox_full``: sends refused with OutboxFull.
    - ``sender_starts`` / ``receiver_starts``: processes started.
    - ``torn``: log lines a kill cut short.
    """

    positions: int = 0
    numbers: int = 0
    deliveries: int = 0
    repeats: int = 0
    repeats_per_restart: list[int] = attr.ib(factory=list)
    unlogged: int = 0
    resends: int = 0
    outbox_full: int = 0
    sender_starts: int = 0
    receiver_starts: int = 0
    torn: int = 0


@attr.s(auto_attribs=True)
class _ReceiverLife:
    line: int
    marks: dict[str, int]
    deliveries: list[tuple[str, int, int, int]] = attr.ib(factory=list)


@attr.s(auto_attribs=True)
class _SenderLife:
    line: int
    next_number: int
    incarnation: str | None = None
    accepted: list[tuple[int, int, int]] = attr.ib(factory=list)


def _fail(message: str) -> CheckFailed:
    return CheckFailed(message)


def _parse_receiver(lines: Iterable[str], tally: Tally) -> list[_ReceiverLife]:
    lives: list[_ReceiverLife] = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if words and words[-1] == TORN:
            tally.torn += 1
        elif len(words) == 4 and words[0] == "delivered":
            if not lives:
                raise _fail(f"receiver log line {number}: delivery before any start")
            lives[-1].deliveries.append(
                (words[1], int(words[2]), int(words[3]), number)
            )
        elif len(words) == 5 and words[0] == "start" and words[3] == "marks":
            marks: dict[str, int] = {}
            if words[4] != "-":
                for item in words[4].split(","):
                    incarnation, _, delivered = item.partition(":")
                    marks[incarnation] = int(delivered)
            lives.append(_ReceiverLife(number, marks))
        elif line not in ("running", "stopped", "address-in-use"):
            raise _fail(f"receiver log line {number}: unexpected {line!r}")
    return lives


def _parse_sender(lines: Iterable[str], tally: Tally) -> list[_SenderLife]:
    lives: list[_SenderLife] = []
    for number, line in enumerate(lines, 1):
        words = line.split()
        if words and words[-1] == TORN:
            tally.torn += 1
            continue
        if len(words) == 5 and words[0] == "start" and words[3] == "next":
            lives.append(_SenderLife(number, int(words[4])))
            continue
        if not lives:
            raise _fail(f"sender log line {number}: {line!r} before any start")
        life = lives[-1]
        if len(words) == 6 and words[0] == "accepted":
            if words[5] != life.incarnation:
                raise _fail(
                    f"sender log line {number}: accepted in incarnation "
                    f"{words[5]} by a process running {life.incarnation}"
                )
            life.accepted.append((int(words[1]), int(words[3]), number))
        elif len(words) == 3 and words[:2] == ["running", "incarnation"]:
            life.incarnation = words[2]
        elif len(words) == 2 and words[0] == "outbox-full":
            tally.outbox_full += 1
        elif not (line == "finished" or (len(words) == 3 and words[0] == "finishing")):
            raise _fail(f"sender log line {number}: unexpected {line!r}")
    return lives


def check_logs(
    sender_lines: Iterable[str],
    receiver_lines: Iterable[str],
    sender_store: StoreReport,
    receiver_store: StoreReport,
    window: int = WINDOW,
) -> Tally:
    """
    Check one run's logs and final stores (see the module docstring).

    :raises CheckFailed: saying what went wrong, and where.
    :return: the counts.
    """
    tally = Tally()
    receiver = _parse_receiver(receiver_lines, tally)
    sender = _parse_sender(sender_lines, tally)
    tally.receiver_starts = len(receiver)
    tally.sender_starts = len(sender)

    # The receiver: in order, no gap, repeats only in the window.
    highest: dict[str, int] = {}
    contents: dict[tuple[str, int], int] = {}
    resumed: dict[str, int] = {}
    for life in receiver:
        for incarnation, mark in life.marks.items():
            before = highest.get(incarnation, 0)
            if mark > before:
                raise _fail(
                    f"receiver log line {life.line}: resumed from mark {mark} of "
                    f"{incarnation} but only {before} were ever delivered"
                )
            if mark < resumed.get(incarnation, 0):
                raise _fail(
                    f"receiver log line {life.line}: resumed from mark {mark} of "
                    f"{incarnation}, below the {resumed[incarnation]} of an "
                    "earlier start: a durable mark went back"
                )
            resumed[incarnation] = mark
        for incarnation, before in highest.items():
            mark = life.marks.get(incarnation, 0)
            if before - mark > window:
                raise _fail(
                    f"receiver log line {life.line}: resumed from mark {mark} of "
                    f"{incarnation} though {before} were delivered: more than the "
                    f"window ({window}) would be delivered again"
                )
        repeats = 0
        at: dict[str, int] = {}
        for incarnation, position, value, line in life.deliveries:
            expected = at.get(incarnation, life.marks.get(incarnation, 0)) + 1
            if position != expected:
                raise _fail(
                    f"receiver log line {line}: position {position} of "
                    f"{incarnation} delivered where {expected} was due "
                    f"({'a gap' if position > expected else 'out of order or twice'})"
                )
            at[incarnation] = position
            key = (incarnation, position)
            if position <= highest.get(incarnation, 0):
                repeats += 1
                if contents[key] != value:
                    raise _fail(
                        f"receiver log line {line}: position {position} delivered "
                        f"again with {value}, first with {contents[key]}"
                    )
            else:
                highest[incarnation] = position
                contents[key] = value
        tally.deliveries += len(life.deliveries)
        tally.repeats += repeats
        if life is not receiver[0]:
            tally.repeats_per_restart.append(repeats)

    # The sender: what it logged as accepted.
    logged: dict[tuple[str, int], int] = {}
    last_number = 0
    last_position: dict[str, int] = {}
    gaps: list[tuple[str, int, int, int]] = []  # incarnation, after, before, number
    for life in sender:
        if life.next_number != last_number + 1:
            raise _fail(
                f"sender log line {life.line}: restarted at {life.next_number}, "
                f"the last number logged was {last_number}"
            )
        if life.incarnation is None:
            continue  # killed before its store was open
        incarnation = life.incarnation
        previous = last_position.get(incarnation, 0)
        for value, position, line in life.accepted:
            if value != last_number + 1:
                raise _fail(
                    f"sender log line {line}: accepted {value} after {last_number}"
                )
            if position <= previous:
                raise _fail(
                    f"sender log line {line}: position {position} reused "
                    f"(already at {previous})"
                )
            if position != previous + 1:
                if life is sender[0] or (value, position, line) != life.accepted[0]:
                    raise _fail(
                        f"sender log line {line}: position {position} after "
                        f"{previous} with no kill in between"
                    )
                # Accepted by the store, not logged before the last kill.
                gaps.append((incarnation, previous, position, last_number))
            logged[(incarnation, position)] = value
            last_number = value
            previous = position
        last_position[incarnation] = previous
    tally.numbers = last_number
    logging = [life for life in sender if life.accepted]
    if logging and logging[-1] is not sender[-1]:
        # The last process that logged an acceptance was killed: what it
        # stored after that may be the end of the stream.
        incarnation = logging[-1].incarnation or ""
        end = highest.get(incarnation, 0) + 1
        gaps.append((incarnation, last_position[incarnation], end, last_number))

    # Cross-check: every logged acceptance delivered, as logged.
    for (incarnation, position), value in logged.items():
        if (incarnation, position) not in contents:
            raise _fail(
                f"number {value}, accepted at position {position} of "
                f"{incarnation}, was never delivered"
            )
        if contents[(incarnation, position)] != value:
            raise _fail(
                f"position {position} of {incarnation} was accepted with "
                f"{value} but delivered with {contents[(incarnation, position)]}"
            )
    # Positions delivered but not logged: only in the gaps a kill left, each
    # holding the next number after the last one logged before the kill.
    # The next process sent those numbers again (logged at new positions),
    # unless it was killed, or told to finish, before it got that far.
    unlogged = {key for key in contents if key not in logged}
    logged_numbers = set(logged.values())
    for incarnation, after, before, number in gaps:
        for position in range(after + 1, before):
            key = (incarnation, position)
            if key not in contents:
                raise _fail(
                    f"position {position} of {incarnation} (stored, not logged) "
                    "was never delivered"
                )
            unlogged.discard(key)
            number += 1
            if contents[key] != number:
                raise _fail(
                    f"position {position} of {incarnation} (stored, not logged) "
                    f"holds {contents[key]}, expected {number}"
                )
            tally.unlogged += 1
            if number in logged_numbers:
                tally.resends += 1
    if unlogged:
        incarnation, position = min(unlogged)
        raise _fail(
            f"{len(unlogged)} delivered position(s) the sender never logged and "
            f"no kill explains, first {position} of {incarnation}"
        )
    # So every number 1..last was delivered: each was logged (in order, as
    # checked above) and each logged one was delivered.

    # The stores: the sender's outbox is empty, the receiver's mark is at M.
    if len(highest) != 1:
        raise _fail(f"expected one sender incarnation, saw {sorted(highest)}")
    ((incarnation, positions),) = highest.items()
    tally.positions = positions
    if sender_store.incarnation != incarnation:
        raise _fail(
            f"the sender's store is incarnation {sender_store.incarnation}, the "
            f"receiver got {incarnation}"
        )
    outboxes = [o for o in sender_store.outbound if o.peer_id == RECEIVER]
    if len(outboxes) != 1:
        raise _fail(f"the sender's store has no outbound stream: {sender_store!r}")
    (outbox,) = outboxes
    if (outbox.acked, outbox.last_position) != (positions, positions) or (
        outbox.pending_bytes,
        outbox.oldest_stored_at,
    ) != (0, None):
        raise _fail(
            f"the sender's outbox did not end empty at position {positions}: {outbox!r}"
        )
    marks = {
        record.incarnation: record.delivered
        for record in receiver_store.inbound
        if record.peer_id == SENDER
    }
    if marks.get(incarnation) != positions:
        raise _fail(
            f"the receiver's mark for {incarnation} is {marks.get(incarnation)}, "
            f"not {positions}"
        )
    return tally


# -- running the processes ----------------------------------------------------


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def _tail(path: str, lines: int = 15) -> str:
    text = "\n".join(_read_lines(path)[-lines:]) if os.path.exists(path) else ""
    return text or "(nothing)"


_PROBLEMS = ("#error]", "#critical]", "Traceback", "Unhandled")


def _problems(path: str) -> list[str]:
    """
    Lines of a node's output that report an error: a kill explains none
    (it loses connections, not frames, and never breaks a store).
    """
    return [line for line in _read_lines(path) if any(p in line for p in _PROBLEMS)]


class Node:
    """
    One node's process, restarted on the same store and log.
    """

    def __init__(
        self, role: str, directory: str, port: int, extra: list[str] | None = None
    ) -> None:
        self.role = role
        self.store = os.path.join(directory, f"{role}.sqlite")
        self.log = os.path.join(directory, f"{role}.log")
        self.output = os.path.join(directory, f"{role}.out")
        self.arguments = [
            sys.executable,
            NODE_SCRIPT,
            role,
            "--store",
            self.store,
            "--log",
            self.log,
            "--port",
            str(port),
            *(extra or []),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.address_retries = 0
        self._offset = 0
        self._running = False

    def spawn(self) -> None:
        self._offset = self.size()
        self._running = False
        with open(self.output, "ab") as output:
            self.process = subprocess.Popen(
                self.arguments, stdout=output, stderr=subprocess.STDOUT
            )

    def size(self) -> int:
        try:
            return os.path.getsize(self.log)
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def running(self) -> bool:
        """
        Whether the current process has logged ``running``.
        """
        if not self._running and os.path.exists(self.log):
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                self._running = any(
                    line.startswith(b"running") for line in f.read().split(b"\n")
                )
        return self._running

    def describe(self) -> str:
        return (
            f"--- {self.role} log (last lines) ---\n{_tail(self.log)}\n"
            f"--- {self.role} output (last lines) ---\n{_tail(self.output)}"
        )


@attr.s(auto_attribs=True)
class CrashReport:
    """
    The figures of one crash run.
    """

    seed: int
    kills: dict[str, int]
    draining: dict[str, int]
    tally: Tally
    seconds: float
    address_retries: int
    directory: str

    def summary(self) -> str:
        t = self.tally
        restarts = t.repeats_per_restart
        return (
            f"seed {self.seed}: {sum(self.kills.values())} SIGKILLs (sender "
            f"{self.kills['sender']}, receiver {self.kills['receiver']}; of these "
            f"{sum(self.draining.values())} while the sender drained); "
            f"{t.positions:,} messages delivered in order, numbers 1..{t.numbers:,} "
            f"all delivered; {t.deliveries:,} deliveries of which {t.repeats:,} "
            f"at-least-once repeats ({sum(1 for n in restarts if n)} of "
            f"{len(restarts)} restarted receiver processes repeated some, at most "
            f"{max(restarts, default=0):,} at once); {t.unlogged:,} positions "
            f"stored but not logged by a killed sender, {t.resends:,} of them "
            f"sent again (application resends); {t.outbox_full} OutboxFull "
            f"refusals; {t.sender_starts} sender and {t.receiver_starts} receiver "
            f"processes logged a start; {t.torn} torn log lines; "
            f"{self.address_retries} address-in-use retries; {self.seconds:.1f} s"
        )


def drain_plan(seed: int, kills: int, max_delay: float) -> list[tuple[str, float]]:
    """
    The kills while the sender drains at the end: ``(victim, delay)``, each
    ``delay`` seconds after the victim is seen running (short: a drain can
    take only a fraction of a second).
    """
    rng = random.Random(seed + 1)
    return [
        (rng.choice(("sender", "receiver")), rng.uniform(0.0, max_delay / 5))
        for _ in range(kills)
    ]


def kill_plan(
    seed: int, kills: int, max_delay: float = 0.5
) -> list[tuple[str, str, float]]:
    """
    The kills of a run: ``(victims, moment, delay)``, where ``victims`` is
    ``sender``, ``receiver`` or ``both`` (``both`` counts as two SIGKILLs)
    and the kill comes ``delay`` seconds after the stream is seen flowing
    again (``moment == "flowing"``) or after the last restart, while the
    nodes may still be starting, opening their stores or shaking hands
    (``"early"``).
    """
    rng = random.Random(seed)
    both = kills // 10
    rest = kills - 2 * both
    victims = ["sender"] * (rest // 2) + ["receiver"] * (rest - rest // 2)
    victims += ["both"] * both
    rng.shuffle(victims)
    return [
        (
            victim,
            "early" if rng.random() < 0.2 else "flowing",
            rng.uniform(0.0, max_delay),
        )
        for victim in victims
    ]


async def run_crashes(
    reactor: Any,
    directory: str,
    seed: int,
    kills: int,
    *,
    step_timeout: float = 60.0,
    drain_timeout: float = 120.0,
    max_delay: float = 0.5,
    drain_kills: int = 2,
    window: int = WINDOW,
    sender_options: tuple[str, ...] = (),
    progress: Callable[[str], None] | None = None,
) -> CrashReport:
    """
    Run one crash test in ``directory`` (see the module docstring).

    :param kills: how many SIGKILLs while the stream flows, split between
        sender and receiver.
    :param step_timeout: how long the stream may take to flow again after a
        restart.
    :param drain_timeout: how long the sender may take to have everything
        acknowledged at the end.
    :param max_delay: kills come up to this many seconds after their moment.
    :param drain_kills: at most this many more kills while the sender drains
        its outbox at the end (fewer if it finishes first).
    :param window: both nodes' ``Config.window``.
    :param sender_options: more arguments for the sender (``--outbox N``,
        ``--burst N``).
    :raises CrashTestFailed: with the seed, how to replay and the logs' tails.
    """
    from twisted.internet.task import deferLater

    from .test_stream_sockets import free_port

    started = time.monotonic()
    port = free_port()
    stop = os.path.join(directory, "stop")
    common = ["--window", str(window)]
    sender = Node("sender", directory, port, [*common, "--stop", stop, *sender_options])
    receiver = Node("receiver", directory, port, common)
    nodes = {"sender": sender, "receiver": receiver}
    watched = {sender, receiver}
    killed = {"sender": 0, "receiver": 0}
    draining = {"sender": 0, "receiver": 0}
    replay = " ".join(
        [
            f"python -m tests.crash_soak --kills {kills} --seed {seed}",
            *([f"--max-delay {max_delay}"] if max_delay != 0.5 else []),
            *([f"--drain-kills {drain_kills}"] if drain_kills != 2 else []),
            *([f"--window {window}"] if window != WINDOW else []),
            *sender_options,
        ]
    )

    def failed(reason: str) -> CrashTestFailed:
        return CrashTestFailed(
            f"{reason}\nseed {seed} (replay the kill plan: {replay}, or "
            f"ILM_CRASH_SEED={seed} for the trial test); logs in {directory}\n"
            + "\n".join(node.describe() for node in nodes.values())
        )

    def watch() -> None:
        """
        Raise if a node died on its own; restart a receiver whose port was
        taken.
        """
        for node in watched:
            code = node.exited()
            if code is None:
                continue
            if node is receiver and code == EXIT_ADDRESS_IN_USE:
                node.address_retries += 1
                if node.address_retries > 50:
                    raise failed(f"port {port} stayed in use")
                node.spawn()
                continue
            raise failed(f"the {node.role} exited on its own with status {code}")

    async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            watch()
            if condition():
                return
            if time.monotonic() > deadline:
                raise failed(f"timed out after {timeout:.0f} s waiting for {what}")
            await deferLater(reactor, 0.02)

    async def flowing() -> None:
        await until(
            lambda: sender.running() and receiver.running(),
            step_timeout,
            "both nodes to run",
        )
        sent, delivered = sender.size(), receiver.size()
        await until(
            lambda: sender.size() > sent and receiver.size() > delivered,
            step_timeout,
            "the stream to flow",
        )

    async def dead(node: Node) -> None:
        deadline = time.monotonic() + step_timeout
        while node.exited() is None:
            if time.monotonic() > deadline:
                raise failed(f"the {node.role} did not die of SIGKILL")
            await deferLater(reactor, 0.005)

    try:
        receiver.spawn()
        await until(receiver.running, step_timeout, "the receiver to listen")
        sender.spawn()
        plan = kill_plan(seed, kills, max_delay)
        for number, (victim, moment, delay) in enumerate(plan):
            if moment == "flowing":
                await flowing()
            await deferLater(reactor, delay)
            watch()
            victims = [sender, receiver] if victim == "both" else [nodes[victim]]
            for node in victims:
                node.kill()
                killed[node.role] += 1
            for node in victims:
                await dead(node)
            # The receiver first: a sender dials it.
            for node in sorted(victims, key=lambda n: n.role != "receiver"):
                node.spawn()
            if progress is not None:
                progress(f"kill {number + 1}: {victim} ({moment}, {delay:.2f} s)")
        await flowing()
        with open(stop, "w"):
            pass
        # The sender may exit now (after "finished"); the receiver may not.
        watched.discard(sender)
        for victim, delay in drain_plan(seed, drain_kills, max_delay):
            node = nodes[victim]
            await until(
                lambda node=node: node.running() or sender.exited() is not None,
                step_timeout,
                f"the {victim} to run",
            )
            await deferLater(reactor, delay)
            watch()
            if sender.exited() is not None:
                break
            node.kill()
            killed[victim] += 1
            draining[victim] += 1
            await dead(node)
            node.spawn()
            if progress is not None:
                progress(f"kill while draining: {victim} ({delay:.2f} s)")
        await until(
            lambda: sender.exited() is not None, drain_timeout, "the sender to finish"
        )
        if sender.exited() != 0 or _read_lines(sender.log)[-1:] != ["finished"]:
            raise failed(f"the sender did not finish (status {sender.exited()})")
        # A receiver respawned by the last drain kill (the sender may have
        # finished just before it) handles SIGTERM only once it runs.
        await until(receiver.running, step_timeout, "the receiver to run")
        assert receiver.process is not None
        receiver.process.send_signal(signal.SIGTERM)
        watched.discard(receiver)
        await until(
            lambda: receiver.exited() is not None, step_timeout, "the receiver to stop"
        )
        if receiver.exited() != 0 or _read_lines(receiver.log)[-1:] != ["stopped"]:
            raise failed(f"the receiver did not stop cleanly ({receiver.exited()})")
        try:
            tally = check_logs(
                _read_lines(sender.log),
                _read_lines(receiver.log),
                inspect_store(sender.store),
                inspect_store(receiver.store),
                window,
            )
        except CheckFailed as e:
            raise failed(f"check failed: {e}") from e
        for node in (sender, receiver):
            problems = _problems(node.output)
            if problems:
                raise failed(
                    f"the {node.role} logged {len(problems)} error(s):\n"
                    + "\n".join(problems[:10])
                )
    finally:
        for node in (sender, receiver):
            if node.exited() is None and node.process is not None:
                node.process.kill()
                node.process.wait()
    return CrashReport(
        seed,
        killed,
        draining,
        tally,
        time.monotonic() - started,
        receiver.address_retries,
        directory,
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description="Crash test with real processes and real SIGKILLs (a soak)."
    )
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs in all")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the logs")
    parser.add_argument(
        "--max-delay", type=float, default=0.5, help="kill delays: 0 to this (s)"
    )
    parser.add_argument(
        "--drain-kills", type=int, default=2, help="kills while the sender drains"
    )
    parser.add_argument("--window", type=int, default=WINDOW, help="Config.window")
    parser.add_argument("--outbox", type=int, help="sender: max_outbox_messages")
    parser.add_argument("--burst", type=int, help="sender: sends per burst")
    parser.add_argument("--verbose", action="store_true", help="print each kill")
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    extra = []
    for name in ("outbox", "burst"):
        if getattr(options, name) is not None:
            extra += [f"--{name}", str(getattr(options, name))]
    directory = tempfile.mkdtemp(prefix="ilm-crash-")
    print(f"seed {seed}, {options.kills} kills, logs in {directory}", flush=True)

    async def run(reactor: Any) -> None:
        report = await run_crashes(
            reactor,
            directory,
            seed,
            options.kills,
            max_delay=options.max_delay,
            drain_kills=options.drain_kills,
            window=options.window,
            sender_options=tuple(extra),
            progress=(lambda s: print(s, flush=True)) if options.verbose else None,
        )
        print(report.summary())

    from twisted.internet import defer, task

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code == 0 and not options.keep:
            shutil.rmtree(directory)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
