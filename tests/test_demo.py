"""
``ilm demo``: its verifier catches every kind of failure and fails the run;
its sender resumes after a crash without losing or repeating anything, even
what the store accepted unbeknownst to it; its records, fault plan, relay
and progress lines do what they say; and the real thing (two node
processes, link cuts, SIGKILLs) verifies, and cleans up after itself, also
when interrupted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ilm import ILM, CommitResult, Message, PeerId, StoreBatch, StoredState
from ilm._demo._http import (
    STREAM,
    HttpLegError,
    HttpSender,
    WebhookReceiver,
    leg_evidence,
)
from ilm._demo._node import DeliveryRecorder, DemoSender
from ilm._demo._plan import CUT, Fault, FaultSchedule, credit, fault_plan, lead
from ilm._demo._progress import (
    Progress,
    ProgressView,
    RateMeter,
    StreamProgress,
    bar,
    plain_line,
    terminal_lines,
)
from ilm._demo._records import (
    MESSAGE_SIZE,
    RECORD,
    RecordWriter,
    decode,
    encode,
    parse_records,
)
from ilm._demo._relay import Relay
from ilm._demo._verify import (
    ReceiverLife,
    StreamEvidence,
    exit_status,
    percentile,
    summarize,
    summary_json,
    summary_table,
    verify_stream,
)
from ilm.interfaces import IBackend
from ilm.testing import (
    InMemoryBackend,
    InMemoryNetwork,
    InMemoryStorage,
    advance_until,
    crash,
)

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_KEYS = {
    "sent",
    "accepted",
    "delivered",
    "missing",
    "out_of_order",
    "repeats",
    "repeats_outside_window",
    "link_cuts",
    "kills",
    "reconnects",
    "msgs_per_s",
    "p50_ms",
    "p99_ms",
    "seconds",
}


def deliveries(*numbers: int, sent: int = 0) -> tuple[tuple[int, int, int, int], ...]:
    """
    Deliveries of ``numbers`` (each at its own position), sent at ``sent``
    ns and each delivered 1 ms after the previous.
    """
    return tuple(
        (n, n, sent, sent + (i + 1) * 1_000_000) for i, n in enumerate(numbers)
    )


def stream(
    accepted: int, *lives: ReceiverLife, sent: int | None = None
) -> StreamEvidence:
    return StreamEvidence(
        "a -> b", accepted if sent is None else sent, accepted, tuple(lives)
    )


class VerifierTests(SynchronousTestCase):
    """
    The verifier, fed deliveries directly.
    """

    def test_clean_run_with_repeats_in_the_window(self) -> None:
        """
        A receiver killed after delivering 1..6 whose next process delivers
        4..6 again (its mark was 3), then 7..10, passes: three repeats inside
        the window, nothing else.
        """
        result = verify_stream(
            stream(
                10,
                ReceiverLife(deliveries(*range(1, 7)), killed=True),
                ReceiverLife(deliveries(4, 5, 6, 7, 8, 9, 10)),
            ),
            window=4,
        )
        self.assertTrue(result.ok, result.problems)
        self.assertEqual(
            (
                result.delivered,
                result.deliveries,
                result.missing,
                result.out_of_order,
                result.repeats,
                result.largest_repeat_run,
                result.repeats_outside_window,
                result.corrupt,
                result.never_accepted,
            ),
            (10, 13, 0, 0, 3, 3, 0, 0, 0),
        )

    def test_missing(self) -> None:
        """
        An accepted number never delivered is missing, and fails the stream;
        the problem names it.
        """
        result = verify_stream(stream(5, ReceiverLife(deliveries(1, 2, 4, 5))), 4096)
        self.assertEqual((result.missing, result.delivered), (1, 4))
        self.assertFalse(result.ok)
        self.assertEqual(
            result.problems, ("a -> b: missing: 3 accepted, never delivered",)
        )

    def test_accepted_beyond_the_last_delivery_is_missing(self) -> None:
        """
        Numbers the sender's store accepted count even if nothing after them
        was delivered: the tail is missing.
        """
        result = verify_stream(stream(5, ReceiverLife(deliveries(1, 2, 3))), 4096)
        self.assertEqual(result.missing, 2)
        self.assertFalse(result.ok)

    def test_reordered(self) -> None:
        """
        A number delivered for the first time after a higher one is out of
        order (and nothing is missing once it came).
        """
        result = verify_stream(stream(4, ReceiverLife(deliveries(1, 3, 2, 4))), 4096)
        self.assertEqual((result.out_of_order, result.missing), (1, 0))
        self.assertFalse(result.ok)
        self.assertIn("2 delivered after 3", result.problems[0])

    def test_repeat_in_the_same_process(self) -> None:
        """
        A number delivered twice by one process (no kill in between) is a
        repeat outside the window.
        """
        result = verify_stream(stream(3, ReceiverLife(deliveries(1, 2, 2, 3))), 4096)
        self.assertEqual((result.repeats, result.repeats_outside_window), (0, 1))
        self.assertFalse(result.ok)

    def test_repeat_after_a_clean_stop(self) -> None:
        """
        A process that follows a clean stop (not a kill) must not repeat:
        its predecessor's marks were all committed.
        """
        result = verify_stream(
            stream(
                4,
                ReceiverLife(deliveries(1, 2, 3), killed=False),
                ReceiverLife(deliveries(3, 4)),
            ),
            4096,
        )
        self.assertEqual(result.repeats_outside_window, 1)
        self.assertIn("no kill before it", result.problems[0])

    def test_repeat_reaching_back_beyond_the_window(self) -> None:
        """
        After a kill, a repeat run starting further back than the window is
        outside it.
        """
        result = verify_stream(
            stream(
                8,
                ReceiverLife(deliveries(*range(1, 7)), killed=True),
                ReceiverLife(deliveries(2, 3, 4, 5, 6, 7, 8)),
            ),
            window=4,
        )
        # Once outside, the rest of that run is outside too.
        self.assertEqual((result.repeats, result.repeats_outside_window), (0, 5))
        self.assertFalse(result.ok)

    def test_repeat_run_not_contiguous(self) -> None:
        """
        After a kill, repeats must come as one ascending contiguous run
        before anything new: a jump, or a repeat after a new number, is
        outside the window.
        """
        jump = verify_stream(
            stream(
                8,
                ReceiverLife(deliveries(*range(1, 7)), killed=True),
                ReceiverLife(deliveries(4, 6, 7, 8)),
            ),
            window=4,
        )
        self.assertEqual((jump.repeats, jump.repeats_outside_window), (1, 1))
        late = verify_stream(
            stream(
                8,
                ReceiverLife(deliveries(*range(1, 7)), killed=True),
                ReceiverLife(deliveries(5, 6, 7, 6, 8)),
            ),
            window=4,
        )
        self.assertEqual((late.repeats, late.repeats_outside_window), (2, 1))

    def test_killed_again_while_repeating(self) -> None:
        """
        A process killed in the middle of its repeat run, followed by one
        that repeats from the same mark, stays inside the window.
        """
        result = verify_stream(
            stream(
                8,
                ReceiverLife(deliveries(*range(1, 7)), killed=True),
                ReceiverLife(deliveries(4, 5), killed=True),
                ReceiverLife(deliveries(4, 5, 6, 7, 8)),
            ),
            window=4,
        )
        self.assertTrue(result.ok, result.problems)
        self.assertEqual(result.repeats, 5)

    def test_webhook_ids(self) -> None:
        """
        A stream whose deliveries carry a ``webhook-id`` passes when each
        repeat carries its first delivery's id; a repeat with another id, or
        two numbers with one id, is a mismatch that fails the stream.
        """
        first = ReceiverLife(deliveries(1, 2, 3), killed=True, ids=("a", "b", "c"))
        good = verify_stream(
            stream(4, first, ReceiverLife(deliveries(3, 4), ids=("c", "d"))), 4096
        )
        self.assertTrue(good.ok, good.problems)
        self.assertEqual(
            (good.repeats, good.id_mismatches, good.checks_ids), (1, 0, True)
        )
        mismatched = stream(4, first, ReceiverLife(deliveries(3, 4), ids=("x", "d")))
        other = verify_stream(mismatched, 4096)
        self.assertEqual((other.repeats, other.id_mismatches), (1, 1))
        self.assertFalse(other.ok)
        self.assertIn("3 delivered with x, first delivered with c", other.problems[0])
        shared = verify_stream(
            stream(4, first, ReceiverLife(deliveries(4), ids=("a",))), 4096
        )
        self.assertEqual(shared.id_mismatches, 1)
        self.assertIn("the id of 1", shared.problems[0])
        summary = summarize(
            [stream(1, ReceiverLife(deliveries(1))), mismatched],
            window=4096,
            link_cuts=0,
            kills={},
            reconnects=0,
            seconds=1.0,
            notes=["in over HTTP, out over a webhook"],
        )
        table = summary_table(summary)
        self.assertIn("repeats with another webhook-id", table)
        self.assertIn("in over HTTP, out over a webhook", table)
        self.assertIn("FAILED", table)
        self.assertEqual(summary_json(summary)["id_mismatches"], 1)
        self.assertEqual(exit_status(summary), 1)

    def test_corrupt(self) -> None:
        """
        Contents that failed their checksum, or a number at another position
        (the sender repeated or skipped a number), are corrupt.
        """
        result = verify_stream(
            stream(
                3,
                ReceiverLife(
                    ((1, 1, 0, 1), (2, None, 0, 2), (2, 2, 0, 3), (3, 4, 0, 4))
                ),
            ),
            4096,
        )
        self.assertEqual((result.corrupt, result.missing), (2, 1))
        self.assertFalse(result.ok)

    def test_delivered_but_never_accepted(self) -> None:
        """
        A number delivered beyond what the sender's store accepted means the
        accepted count is wrong: it fails the stream.
        """
        result = verify_stream(stream(2, ReceiverLife(deliveries(1, 2, 3))), 4096)
        self.assertEqual((result.never_accepted, result.delivered), (1, 2))
        self.assertFalse(result.ok)

    def test_latency_and_throughput(self) -> None:
        """
        Latency is send to first delivery (repeats do not count); the
        percentiles are nearest-rank; throughput is distinct deliveries over
        first send to the last first delivery.
        """
        lives = [
            ReceiverLife(((1, 1, 0, 10_000_000), (2, 2, 0, 20_000_000)), killed=True),
            ReceiverLife(((2, 2, 0, 90_000_000), (3, 3, 0, 40_000_000))),
        ]
        result = verify_stream(stream(3, *lives), 4096)
        self.assertEqual(result.latencies_ns, (10_000_000, 20_000_000, 40_000_000))
        self.assertEqual(percentile(result.latencies_ns, 0.5), 20_000_000)
        self.assertEqual(percentile(result.latencies_ns, 0.99), 40_000_000)
        self.assertEqual(percentile((), 0.5), 0)
        self.assertAlmostEqual(result.msgs_per_s, 3 / 0.04)

    def test_summary(self) -> None:
        """
        The JSON summary has every documented key, with totals over both
        streams; the table shows the verdict.
        """
        good = stream(3, ReceiverLife(deliveries(1, 2, 3)))
        summary = summarize(
            [good, good],
            window=4096,
            link_cuts=2,
            kills={"node 1": 1, "node 2": 2},
            reconnects=4,
            seconds=1.5,
            seed=7,
        )
        data = summary_json(summary)
        self.assertLessEqual(SUMMARY_KEYS, set(data))
        self.assertEqual(
            {key: data[key] for key in ("sent", "delivered", "kills", "link_cuts")},
            {"sent": 6, "delivered": 6, "kills": 3, "link_cuts": 2},
        )
        self.assertEqual((data["ok"], data["seed"], data["window"]), (True, 7, 4096))
        self.assertEqual(exit_status(summary), 0)
        self.assertIn("VERIFIED", summary_table(summary))

    def test_each_fault_fails_the_run(self) -> None:
        """
        A missing message, a reordered one, a repeat outside the window, or a
        failure reported by the driver each make the exit status 1, and the
        table says FAILED and why.
        """
        good = stream(3, ReceiverLife(deliveries(1, 2, 3)))
        bad = {
            "missing": stream(3, ReceiverLife(deliveries(1, 3))),
            "out of order": stream(3, ReceiverLife(deliveries(2, 1, 3))),
            "repeat outside the window": stream(
                3, ReceiverLife(deliveries(1, 2, 2, 3))
            ),
        }
        for kind, evidence in bad.items():
            summary = summarize(
                [good, evidence],
                window=4096,
                link_cuts=0,
                kills={},
                reconnects=0,
                seconds=1.0,
            )
            self.assertEqual(exit_status(summary), 1, kind)
            table = summary_table(summary)
            self.assertIn("FAILED", table)
            self.assertIn(kind, table)
        stalled = summarize(
            [good],
            window=1,
            link_cuts=0,
            kills={},
            reconnects=0,
            seconds=1.0,
            failures=["stalled"],
        )
        self.assertEqual(exit_status(stalled), 1)


class RecordsTests(SynchronousTestCase):
    """
    Message contents and the receivers' record files.
    """

    def test_contents_round_trip(self) -> None:
        """
        Contents carry the number and the send time, in 64 bytes, and any
        changed byte or length is detected.
        """
        contents = encode(123_456, 987_654_321)
        self.assertEqual(len(contents), MESSAGE_SIZE)
        self.assertEqual(MESSAGE_SIZE, 64)
        self.assertEqual(decode(contents), (123_456, 987_654_321))
        for i in range(len(contents)):
            damaged = bytearray(contents)
            damaged[i] ^= 0x01
            self.assertIsNone(decode(bytes(damaged)), i)
        self.assertIsNone(decode(contents[:-1]))
        self.assertIsNone(decode(contents + b"x"))

    def test_record_file_across_processes(self) -> None:
        """
        Each process starts its records with a start record and learns the
        highest number its predecessors recorded; a record torn by a kill is
        cut off when the next process opens the file, and a torn one at the
        very end is left out when reading.
        """
        path = self.mktemp()
        first = RecordWriter(path, 100, 1)
        first.delivered(1, 1, 10, 20)
        first.delivered(2, None, 0, 30)
        first.close()
        with open(path, "ab") as f:
            f.write(RECORD.pack(3, 3, 0, 0)[:7])  # a kill in mid-write
        second = RecordWriter(path, 101, 2)
        self.assertEqual(first.highest, 0)
        self.assertEqual(second.highest, 1)  # the torn record does not count
        second.delivered(2, 2, 11, 40)
        second.close()
        with open(path, "ab") as f:
            f.write(b"torn")
        with open(path, "rb") as f:
            processes = parse_records(f.read())
        self.assertEqual(
            [(p.pid, p.torn_bytes, p.deliveries) for p in processes],
            [
                (100, 0, ((1, 1, 10, 20), (2, None, 0, 30))),
                (101, 7, ((2, 2, 11, 40),)),
            ],
        )
        self.assertRaises(ValueError, parse_records, RECORD.pack(1, 1, 0, 0))


class PlanTests(SynchronousTestCase):
    """
    The seeded fault schedule and the senders' credit.
    """

    def test_same_seed_same_plan(self) -> None:
        """
        The same seed gives the same schedule; another seed another one.
        """
        nodes = ("node 1", "node 2")
        self.assertEqual(
            fault_plan(5, 100_000, 5, 2, nodes), fault_plan(5, 100_000, 5, 2, nodes)
        )
        self.assertNotEqual(
            fault_plan(5, 100_000, 5, 2, nodes), fault_plan(6, 100_000, 5, 2, nodes)
        )

    def test_plan_contents(self) -> None:
        """
        The plan holds the requested cuts and kills of each node, at
        thresholds in order between 5 % and 90 % of the stream.
        """
        for seed in range(50):
            plan = fault_plan(seed, 1000, 3, 2, ("x", "y"))
            kinds = [fault.kind for fault in plan]
            self.assertEqual(
                (kinds.count(CUT), kinds.count("x"), kinds.count("y")), (3, 2, 2)
            )
            thresholds = [fault.at for fault in plan]
            self.assertEqual(thresholds, sorted(thresholds))
            self.assertTrue(all(50 <= at <= 900 for at in thresholds), thresholds)
        self.assertEqual(fault_plan(1, 10, 0, 0, ("x",)), ())
        self.assertTrue(all(f.at >= 1 for f in fault_plan(1, 2, 3, 3, ("x",))))

    def test_credit(self) -> None:
        """
        Senders may run 5 % of the stream past the next fault's threshold,
        never past the end; with no fault left, to the end.
        """
        plan = fault_plan(3, 1000, 2, 0, ("x",))
        self.assertEqual(lead(1000), 50)
        self.assertEqual(credit(1000, plan), plan[0].at + 50)
        self.assertEqual(credit(1000, ()), 1000)
        self.assertEqual(credit(1000, (Fault(CUT, 990),)), 1000)

    def test_schedule(self) -> None:
        """
        A run's schedule hands out its faults in order; the credit follows
        the next one; a fault is reached at its threshold (or at the end of
        a stream shorter than it); the planned faults are counted by kind.
        """
        plan = (Fault(CUT, 100), Fault("node 1", 300), Fault(CUT, 2000))
        schedule = FaultSchedule(plan, 1000)
        self.assertEqual((schedule.planned(CUT), schedule.planned("node 1")), (2, 1))
        self.assertEqual(schedule.next(), plan[0])
        self.assertEqual(schedule.credit(), 150)
        self.assertFalse(schedule.reached(99, plan[0]))
        self.assertTrue(schedule.reached(100, plan[0]))
        self.assertEqual(schedule.take(), plan[0])
        self.assertEqual((schedule.next(), schedule.credit()), (plan[1], 350))
        schedule.take()
        self.assertTrue(schedule.reached(1000, plan[2]))
        self.assertEqual(schedule.credit(), 1000)
        schedule.take()
        self.assertIsNone(schedule.next())
        self.assertEqual(schedule.planned(CUT), 2)


@implementer(IBackend)
class HeldCommits:
    """
    An in-memory store whose commits are durable at once but, once
    ``holding``, whose commits of messages are never confirmed: a crash then
    leaves messages stored that their sender never heard were accepted.
    """

    def __init__(self, storage: InMemoryStorage) -> None:
        self.backend = InMemoryBackend(storage)
        self.held: list[tuple[Deferred[CommitResult], CommitResult]] = []
        self.holding = False

    def open(self) -> Deferred[StoredState]:
        return self.backend.open()

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        result = self.backend.storage.apply(batch)
        if not (self.holding and batch.messages):
            return succeed(result)
        d: Deferred[CommitResult] = Deferred()
        self.held.append((d, result))
        return d

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        return self.backend.read_outbound(peer_id, after, limit, max_bytes)

    def close(self) -> Deferred[None]:
        return self.backend.close()


class SenderTests(SynchronousTestCase):
    """
    The demo's sender and receiving application, on a Clock with in-memory
    stores: restart-safe, and checked by the verifier.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.network = InMemoryNetwork(self.clock)
        self.storage = InMemoryStorage()
        self.records = self.mktemp()
        self.now = 0

    def now_ns(self) -> int:
        self.now += 1000
        return self.now

    def start_receiver(self) -> ILM:
        writer = RecordWriter(self.records, 2, 0)
        self.addCleanup(writer.close)
        recorder = DeliveryRecorder(writer, 1, now_ns=self.now_ns)
        d = ILM.create(
            InMemoryBackend(),
            recorder,
            self.network.add_peer(2),
            clock=self.clock,
        )
        advance_until(self.clock, lambda: d.called)
        return self.successResultOf(d)

    def start_sender(
        self, messages: int, credit: int
    ) -> tuple[ILM, DemoSender, HeldCommits]:
        backend = HeldCommits(self.storage)
        d = ILM.create(
            backend, lambda m: None, self.network.add_peer(1), clock=self.clock
        )
        advance_until(self.clock, lambda: d.called)
        node = self.successResultOf(d)
        sender = DemoSender(
            node, 2, messages, credit, burst=50, in_flight=200, now_ns=self.now_ns
        )
        return node, sender, backend

    def verify(self, messages: int) -> Any:
        with open(self.records, "rb") as f:
            processes = parse_records(f.read())
        lives = [ReceiverLife(p.deliveries) for p in processes]
        return verify_stream(StreamEvidence("1 -> 2", messages, messages, lives), 4096)

    def test_restart_after_unconfirmed_store(self) -> None:
        """
        A sender killed while the store had accepted a burst of messages
        whose acceptance nobody had heard of (the commit was durable, its
        confirmation had not come) resumes after the store's
        ``last_message_id``, which counts that burst: every number is
        delivered once, in order, at its own position, none lost or sent
        twice; and the credit stops it where the driver says.
        """
        messages = 2000
        self.start_receiver()
        node, sender, backend = self.start_sender(messages, credit=1500)
        verifyObject(IBackend, backend)
        run = Deferred.fromCoroutine(sender.run())
        advance_until(self.clock, lambda: sender.sent >= 600)
        backend.holding = True
        advance_until(self.clock, lambda: backend.held)
        heard = node.last_message_id(2)
        crash(node, self.network)
        self.assertNoResult(run)  # its process is gone
        node, sender, backend = self.start_sender(messages, credit=1500)
        # The store holds more than the killed process knew it had stored.
        stored = node.last_message_id(2)
        self.assertGreater(stored, heard)
        self.assertEqual(sender.sent, stored)
        run = Deferred.fromCoroutine(sender.run())
        advance_until(
            self.clock,
            lambda: run.called or (sender.sent == 1500 and not node.pending_outbound()),
        )
        self.assertNoResult(run)  # waiting for credit (or failed: shown)
        sender.set_credit(messages)
        advance_until(self.clock, lambda: run.called and not node.pending_outbound())
        self.successResultOf(run)
        result = self.verify(messages)
        self.assertTrue(result.ok, result.problems)
        self.assertEqual((result.delivered, result.deliveries), (messages, messages))

    def test_flow_control(self) -> None:
        """
        The sender never has more than its in-flight limit (plus one burst)
        awaiting acknowledgement.
        """
        self.start_receiver()
        node, sender, _ = self.start_sender(3000, credit=3000)
        run = Deferred.fromCoroutine(sender.run())
        most = 0

        def done() -> bool:
            nonlocal most
            most = max(most, node.pending_outbound().get(2, 0))
            return run.called

        advance_until(self.clock, done)
        self.successResultOf(run)
        self.assertLessEqual(most, 200 + 50)
        self.assertGreater(most, 0)

    def test_recorder_records_bad_contents(self) -> None:
        """
        The receiving application records contents that fail their checksum
        as such (the verifier counts them corrupt) instead of refusing them.
        """
        self.start_receiver()
        d = ILM.create(
            InMemoryBackend(self.storage),
            lambda m: None,
            self.network.add_peer(1),
            clock=self.clock,
        )
        advance_until(self.clock, lambda: d.called)
        node = self.successResultOf(d)
        node.send_to(2, b"not a demo message")
        node.send_to(2, encode(2, 5))
        advance_until(self.clock, lambda: not node.pending_outbound())
        result = self.verify(2)
        self.assertEqual((result.corrupt, result.delivered), (1, 1))


_DONE = Failure(ConnectionDone())


class _Response:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body

    def content(self) -> Deferred[bytes]:
        return succeed(self._body)


class _Api:
    """
    Daemon A's API as the sender sees it: answers each POST from a script
    (per number, the answers before it is stored: an exception or a status
    and body), then ``202`` with the next message id.
    """

    def __init__(self, script: dict[int, list[Any]]) -> None:
        self.script = script
        self.posts: list[tuple[int, str]] = []  # number, Idempotency-Key
        self.stored = 0

    def post(
        self, url: str, *, data: bytes, headers: dict[str, str], timeout: float
    ) -> Deferred[_Response]:
        decoded = decode(data)
        assert decoded is not None
        number = decoded[0]
        self.posts.append((number, headers["Idempotency-Key"]))
        answers = self.script.get(number, [])
        if answers:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                return fail(answer)
            return succeed(_Response(*answer))
        self.stored += 1
        body = json.dumps({"peer": "B", "message_id": self.stored}).encode()
        return succeed(_Response(202, body))


class HttpLegTests(TestCase):
    """
    The HTTP leg's parts: the sender that POSTs to daemon A, the webhook
    receiver that daemon B delivers to, and the evidence they give the
    verifier.
    """

    def test_sender_retries_with_the_same_key(self) -> None:
        """
        A POST that got no answer, or ``429``/``503``, is sent again with
        the same ``Idempotency-Key``; each number has its own key; the
        sender never goes past its credit, and records the position A
        answered for each number.
        """
        clock = Clock()
        api = _Api(
            {
                1: [ConnectionRefusedError()],
                2: [(429, b"{}"), (503, b"{}")],
            }
        )
        sender = HttpSender(
            clock, api, "http://a/v1/peers/B/messages", "token", 3, 2, "run",
            concurrency=2, retry_delay=0.1,
        )  # fmt: skip
        done = Deferred.fromCoroutine(sender.run())
        clock.advance(0.1)
        clock.advance(0.1)
        self.assertNoResult(done)
        self.assertEqual((sender.sent, sender.answered), (2, 2))
        sender.set_credit(3)
        self.successResultOf(done)
        self.assertEqual(sender.stored_at, {1: 1, 2: 2, 3: 3})
        self.assertEqual(sender.retries, 3)
        keys: dict[int, set[str]] = {}
        for number, key in api.posts:
            keys.setdefault(number, set()).add(key)
        self.assertEqual([len(keys[n]) for n in (1, 2, 3)], [1, 1, 1])
        self.assertEqual(len(set().union(*keys.values())), 3)
        self.assertEqual([n for n, _ in api.posts].count(2), 3)

    def test_sender_stops_on_a_refusal(self) -> None:
        """
        Any other answer (here ``400``) fails the sender with
        :class:`HttpLegError`, saying what A answered.
        """
        api = _Api({1: [(400, b'{"error": {"code": "bad_request"}}')]})
        sender = HttpSender(
            Clock(), api, "http://a/v1/peers/B/messages", "t", 5, 5, "r",
            concurrency=1,
        )  # fmt: skip
        failure = self.failureResultOf(
            Deferred.fromCoroutine(sender.run()), HttpLegError
        )
        self.assertIn("answered 400", failure.getErrorMessage())
        self.assertIn("bad_request", failure.getErrorMessage())

    async def test_webhook_receiver(self) -> None:
        """
        The receiver takes what :class:`ilm.WebhookDelivery` (daemon B's
        delivery) POSTs: each signature checked, each delivery recorded in
        the life its URL names, with its ``webhook-id``, and in the record
        file.  A bad or stale signature, or another source, is recorded as
        corrupt (and answered 200: the run fails, it does not stall); an
        unknown life's URL is refused.
        """
        from ilm import WebhookDelivery
        from ilm._webhook import WebhookFailed, webhook_id

        key = os.urandom(32)
        skew = [0.0]
        receiver = WebhookReceiver(key, wall=lambda: time.time() + skew[0])
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        records = os.path.join(directory, "1.records")
        receiver.open_life(1, records, 111)
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/hook/"

        def delivery(life: int, secret: bytes) -> WebhookDelivery:
            d = WebhookDelivery(url + str(life), reactor, secret=secret)
            self.addCleanup(d.close)
            return d

        good = delivery(1, key)
        message = Message("A", "B", 1, encode(1, 123), "inc")
        await good.deliver(message)
        await good.deliver(message)  # a repeat
        await delivery(1, os.urandom(32)).deliver(
            Message("A", "B", 2, encode(2, 0), "inc")
        )
        await good.deliver(Message("C", "B", 3, encode(3, 0), "inc"))
        skew[0] = 400.0
        await good.deliver(Message("A", "B", 4, encode(4, 0), "inc"))
        await self.assertFailure(delivery(2, key).deliver(message), WebhookFailed)
        self.assertEqual([d[:3] for d in receiver.lives[1]], [
            (1, 1, 123), (1, 1, 123), (2, None, 0), (3, None, 0), (4, None, 0),
        ])  # fmt: skip
        self.assertEqual(receiver.ids[1][:2], [webhook_id(message)] * 2)
        self.assertEqual(receiver.positions, {1})
        self.assertEqual((receiver.requests, receiver.bad_signatures), (6, 2))
        receiver.close()
        with open(records, "rb") as f:
            [life] = parse_records(f.read())
        self.assertEqual(life.pid, 111)
        self.assertEqual(list(life.deliveries), receiver.lives[1])

    def test_evidence(self) -> None:
        """
        Each webhook delivery's number is replaced by the position A
        answered for it, so messages A stored in another order than their
        numbers (concurrent POSTs) verify; a number A never answered for is
        corrupt; lives follow daemon B's processes and their kills.
        """
        receiver = WebhookReceiver(b"k" * 32)
        receiver.lives = {
            1: [(1, 2, 0, 5), (2, 1, 0, 6)],
            2: [(2, 1, 0, 7), (3, 3, 0, 8)],
        }
        receiver.ids = {1: ["x", "y"], 2: ["y", "z"]}
        pids = [(11, True), (12, False)]
        stored_at = {2: 1, 1: 2, 3: 3}
        evidence = leg_evidence(receiver, pids, stored_at, sent=3, accepted=3)
        self.assertEqual(evidence.name, STREAM)
        self.assertEqual(
            [life.deliveries for life in evidence.lives],
            [((1, 1, 0, 5), (2, 2, 0, 6)), ((2, 2, 0, 7), (3, 3, 0, 8))],
        )
        self.assertEqual([life.killed for life in evidence.lives], [True, False])
        result = verify_stream(evidence, 4096)
        self.assertTrue(result.ok, result.problems)
        self.assertEqual((result.delivered, result.repeats), (3, 1))
        receiver.lives[2].append((4, 9, 0, 9))
        receiver.ids[2].append("w")
        result = verify_stream(
            leg_evidence(receiver, pids, stored_at, sent=4, accepted=4), 4096
        )
        self.assertEqual((result.corrupt, result.missing), (1, 1))
        self.assertFalse(result.ok)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.made: Deferred[None] = Deferred()
        self.waiting: tuple[int, Deferred[None]] | None = None

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.waiting is not None and len(self.data) >= self.waiting[0]:
            _, d = self.waiting
            self.waiting = None
            d.callback(None)

    def until(self, size: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.data) >= size:
            d.callback(None)
        else:
            self.waiting = (size, d)
        return d

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.reason = reason
        self.lost.callback(None)


class RelayTests(TestCase):
    """
    The relay, on real loopback sockets.
    """

    async def test_relays_and_cuts(self) -> None:
        """
        Bytes cross the relay both ways; a cut aborts both connections (each
        end sees a reset, not a clean close) and is counted; with no target
        the relay refuses connections.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        servers: list[_Collect] = []
        first: Deferred[None] = Deferred()

        def server() -> _Collect:
            servers.append(_Collect())
            if len(servers) == 1:
                servers[0].made.chainDeferred(first)
            return servers[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relay = Relay(reactor)
        self.addCleanup(relay.close)
        relay.target = port.getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port)
        client = _Collect()
        await connectProtocol(endpoint, client)
        client.transport.write(b"hello " * 1000)
        await first  # the relay connected to the server
        await servers[0].until(6000)
        servers[0].transport.write(b"back")
        await client.until(4)
        self.assertEqual(relay.linked(), 1)
        self.assertEqual(relay.cut(), 1)
        await client.lost
        await servers[0].lost
        for side in (client, servers[0]):
            assert side.reason is not None
            self.assertFalse(side.reason.check(ConnectionDone))
        self.assertEqual(servers[0].data, b"hello " * 1000)
        self.assertEqual(client.data, b"back")

        relay.target = None
        refused = _Collect()
        await connectProtocol(endpoint, refused)
        await refused.lost
        self.assertEqual(len(servers), 1)
        self.assertEqual(relay.linked(), 0)

    async def test_hold(self) -> None:
        """
        A relay that holds keeps a connection made while its node is down
        waiting, unread, and relays it once :meth:`Relay.retarget` names
        the node's port.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        servers: list[_Collect] = []
        made: Deferred[None] = Deferred()

        def server() -> _Collect:
            servers.append(_Collect())
            servers[-1].made.chainDeferred(made)
            return servers[-1]

        port = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        relay = Relay(reactor, hold=True)
        self.addCleanup(relay.close)
        client = _Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port)
        await connectProtocol(endpoint, client)
        client.transport.write(b"early")
        await deferLater(reactor, 0.1)
        self.assertEqual((servers, relay.linked(), client.reason), ([], 0, None))
        relay.retarget(port.getHost().port)
        await made
        await servers[0].until(5)
        self.assertEqual(servers[0].data, b"early")
        self.assertEqual(relay.linked(), 1)


class ProgressTests(SynchronousTestCase):
    """
    The progress lines.
    """

    def test_rate(self) -> None:
        """
        A rate is over the samples of about the last second: none before
        two samples, older ones dropped as new ones come.
        """
        meter = RateMeter()
        self.assertEqual(meter.rate(), 0.0)
        meter.sample(10.0, 0)
        self.assertEqual(meter.rate(), 0.0)
        meter.sample(10.5, 500)
        self.assertEqual(meter.rate(), 1000.0)
        meter.sample(11.0, 600)
        self.assertEqual(meter.rate(), 600.0)
        meter.sample(11.6, 1200)
        # The oldest sample goes once the next one is a second old: the
        # rate is from 10.5 on.
        self.assertAlmostEqual(meter.rate(), 700 / 1.1)

    progress = Progress(
        streams=(
            StreamProgress("node 1 -> node 2", 25_000, 100_000, 12_345.6, 4096),
            StreamProgress("node 2 -> node 1", 100_000, 100_000, 0.0, 0),
        ),
        cuts=2,
        cuts_planned=5,
        kills=(("node 1", 1, 2), ("node 2", 0, 2)),
        reconnects=3,
        seconds=4.25,
    )

    def test_lines(self) -> None:
        """
        Each stream's line has its bar, delivered of total, rate and pending;
        the faults line has cuts, kills per node, reconnects and time.
        """
        self.assertEqual(bar(0.25, 8), "##......")
        self.assertEqual(bar(2.0, 4), "####")
        lines = terminal_lines(self.progress)
        self.assertEqual(len(lines), 3)
        self.assertIn("[######..................]", lines[0])
        self.assertIn("25,000/100,000", lines[0])
        self.assertIn("12,346 msg/s", lines[0])
        self.assertIn("pending  4,096", lines[0])
        self.assertIn("100%", lines[1])
        self.assertEqual(
            lines[2],
            "link cuts 2/5  kills node 1 1/2, node 2 0/2  reconnects 3  4.2 s",
        )
        plain = plain_line(self.progress)
        self.assertIn(
            "node 1 -> node 2: 25,000/100,000 (12,346 msg/s, pending 4,096)", plain
        )
        self.assertIn("reconnects 3", plain)

    def test_terminal_redraw(self) -> None:
        """
        On a terminal the lines are redrawn in place each tenth of a second;
        an event prints above them and stays.
        """
        out = io.StringIO()
        clock = Clock()
        view = ProgressView(out, lambda: self.progress, terminal=True, clock=clock)
        view.start()
        clock.advance(0.1)
        first = out.getvalue()
        self.assertNotIn("\x1b[", first)
        self.assertEqual(first.count("\n"), 3)
        clock.advance(0.1)
        self.assertIn("\x1b[3F\x1b[J", out.getvalue()[len(first) :])
        view.event("SIGKILL node 1")
        self.assertIn("\x1b[3F\x1b[JSIGKILL node 1\n", out.getvalue())
        view.stop()
        self.assertFalse(clock.getDelayedCalls())

    def test_plain_lines(self) -> None:
        """
        Elsewhere, one plain line a second and events as they come, with no
        escape codes.
        """
        out = io.StringIO()
        clock = Clock()
        view = ProgressView(out, lambda: self.progress, terminal=False, clock=clock)
        view.start()
        clock.advance(0.5)
        self.assertEqual(out.getvalue(), "")
        clock.advance(0.5)
        view.event("link cut 1")
        clock.advance(1.0)
        view.stop()
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[0].startswith("progress: "))
        self.assertEqual(lines[1], "link cut 1")
        self.assertNotIn("\x1b", out.getvalue())


class _DemoProcess(ProcessProtocol):
    """
    An ``ilm demo`` process: its output, and Deferreds for a line of output
    and for its exit.
    """

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int] = Deferred()
        self._wanted: tuple[bytes, Deferred[None]] | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def _check(self) -> None:
        if self._wanted is not None and self._wanted[0] in self.out + self.err:
            d = self._wanted[1]
            self._wanted = None
            d.callback(None)

    def printed(self, text: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._wanted = (text, d)
        self._check()
        return d

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(-1 if code is None else code)


class DemoProcessTests(TestCase):
    """
    ``ilm demo`` as a user runs it: a process that runs two node processes.
    """

    timeout = 180

    def spawn(self, *args: str) -> tuple[_DemoProcess, str]:
        """
        Start ``python -m ilm demo ARGS`` with a temporary directory of its
        own (to check that it is left empty).
        """
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TMPDIR=tmp)
        process = _DemoProcess()
        reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, "-m", "ilm", "demo", *args],
            env=env,
            path=str(ROOT),
        )
        return process, tmp

    def assertCleanedUp(self, tmp: str) -> None:
        """
        The demo's temporary directory is gone and no node or daemon process
        of it is left (none names it or runs in it).
        """
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(_processes_in(tmp), [])

    async def run_demo(self, *args: str) -> tuple[int, dict[str, Any], str]:
        process, tmp = self.spawn(*args, "--json")
        code = await process.ended
        text = process.out.decode()
        err = process.err.decode()
        summary = json.loads(text.splitlines()[-1])
        self.assertCleanedUp(tmp)
        return code, summary, err

    async def test_demo_verifies(self) -> None:
        """
        ``ilm demo --messages 5000 --json``: two node processes stream 5,000
        messages each way while the link is cut and each node is SIGKILLed
        and restarted, and 1,000 messages posted over HTTP to one twistd
        daemon reach a webhook from another, SIGKILLed and restarted on the
        way; everything accepted was delivered, in order, with repeats only
        inside the window (over the webhook, each with its first delivery's
        webhook-id); the last line is the JSON summary, the exit status 0,
        and nothing is left behind.
        """
        code, summary, err = await self.run_demo("--messages", "5000", "--seed", "14")
        self.assertEqual(code, 0, err)
        self.assertLessEqual(SUMMARY_KEYS, set(summary))
        self.assertEqual(
            {key: summary[key] for key in ("sent", "accepted", "delivered")},
            {"sent": 11_000, "accepted": 11_000, "delivered": 11_000},
        )
        # The HTTP leg: in over HTTP, out over a webhook, verified alike.
        [http] = [s for s in summary["streams"] if s["name"] == STREAM]
        self.assertEqual(
            {key: http[key] for key in ("sent", "accepted", "delivered")},
            {"sent": 1_000, "accepted": 1_000, "delivered": 1_000},
        )
        self.assertEqual(
            (
                http["missing"],
                http["out_of_order"],
                http["repeats_outside_window"],
                http["corrupt"],
                http["id_mismatches"],
            ),
            (0, 0, 0, 0, 0),
        )
        self.assertGreaterEqual(summary["kills_by_node"]["daemon B"], 1)
        leg = summary["http"]
        self.assertEqual((leg["answered_202"], leg["bad_signatures"]), (1_000, 0))
        self.assertGreaterEqual(leg["webhook_requests"], 1_000)
        self.assertIn("in over HTTP", err)
        self.assertIn("out over a webhook", err)
        self.assertEqual(
            (
                summary["missing"],
                summary["out_of_order"],
                summary["repeats_outside_window"],
            ),
            (0, 0, 0),
        )
        self.assertTrue(summary["ok"], err)
        self.assertGreaterEqual(summary["kills_by_node"]["node 1"], 1)
        self.assertGreaterEqual(summary["kills_by_node"]["node 2"], 1)
        self.assertGreaterEqual(summary["link_cuts"], 1)
        # Each cut and each kill took the link down; it came back each time.
        self.assertGreaterEqual(
            summary["reconnects"], summary["link_cuts"] + summary["kills"]
        )
        self.assertGreater(summary["msgs_per_s"], 0)
        self.assertGreater(summary["p99_ms"], 0)
        self.assertIn("VERIFIED", err)

    async def test_each_fault_fails_the_demo(self) -> None:
        """
        The verifier fed a missing message, a reordered one, or a repeat
        outside the window (``--tamper``) catches it, and the demo process
        exits with status 1 after saying so.
        """
        expected = {
            "missing": "missing",
            "reorder": "out_of_order",
            "repeat": "repeats_outside_window",
        }
        for tamper, key in expected.items():
            code, summary, err = await self.run_demo(
                *("--messages", "1000", "--cuts", "1", "--kills", "1", "--seed", "3"),
                *("--tamper", tamper, "--no-http"),
            )
            self.assertEqual(code, 1, tamper)
            self.assertEqual((summary["http"], len(summary["streams"])), (None, 2))
            self.assertEqual(summary[key], 1, (tamper, summary))
            self.assertFalse(summary["ok"])
            self.assertIn("FAILED", err)

    async def interrupt(self, signum: int) -> None:
        process, tmp = self.spawn("--messages", "5000000")
        await process.printed(b"progress: ")
        os.kill(process.transport.pid, signum)  # type: ignore[union-attr]
        code = await process.ended
        self.assertEqual(code, 128 + signum, process.err.decode())
        self.assertIn(b"interrupted", process.out)
        self.assertCleanedUp(tmp)

    async def test_driver_killed(self) -> None:
        """
        If the driver itself is SIGKILLed, nothing of it outlives it for
        long: the node processes see their standard input end, stop and
        remove the directory, and the twistd daemons see theirs end and
        exit.
        """
        process, tmp = self.spawn("--messages", "5000000")
        await process.printed(b"progress: ")
        self.assertNotEqual(_processes_in(tmp), [])
        os.kill(process.transport.pid, signal.SIGKILL)  # type: ignore[union-attr]
        killed = time.monotonic()
        self.assertEqual(await process.ended, -1)
        # Clean twice in a row: a process that is exiting may hide from one
        # look at /proc.
        clean = 0
        while clean < 2 and time.monotonic() < killed + 60:
            await deferLater(reactor, 0.1)
            clean = clean + 1 if not (_processes_in(tmp) or os.listdir(tmp)) else 0
        self.assertEqual(os.listdir(tmp), [])
        left = _processes_in(tmp)
        self.assertEqual(
            left,
            [],
            f"{time.monotonic() - killed:.1f} s after the driver's kill: "
            + "; ".join(_describe(pid) for pid in left),
        )

    async def test_sigint(self) -> None:
        """
        Ctrl-C (SIGINT) while the streams flow: the demo stops its node
        processes, removes its files and exits with status 130.
        """
        await self.interrupt(signal.SIGINT)

    async def test_sigterm(self) -> None:
        """
        SIGTERM while the streams flow: the same, with status 143.
        """
        await self.interrupt(signal.SIGTERM)


def _describe(pid: str) -> str:
    """A process as /proc shows it: command line, state, parent, stdin."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        stdin = os.readlink(f"/proc/{pid}/fd/0")
    except OSError as e:
        return f"{pid}: {e}"
    state, parent = fields[0], fields[1]
    return f"{pid}: {command[:300]!r}, state {state}, parent {parent}, stdin {stdin}"


def _processes_in(directory: str) -> list[str]:
    """
    The processes whose command line names ``directory`` or that run in it
    (on systems with ``/proc``).
    """
    if not os.path.isdir("/proc"):
        return []
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = directory.encode() in f.read()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if named or cwd.startswith(directory):
            found.append(pid)
    return found
