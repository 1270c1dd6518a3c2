"""
Tests for :class:`ilm._deliverer.PeerDeliverer`'s straight line for new
messages (``take_run``: one message, or the run of one read) and for how
long delivery marks wait for their commit, on a ``Clock`` with a recording
committer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ilm._backoff import Backoff
from ilm._committer import GroupCommitter
from ilm._deliverer import MARK_DELAY_PER_PEER, PeerDeliverer
from ilm._message import Message
from ilm._session import InboundStream
from ilm._status import DELIVERY_SECONDS_BOUNDS, HistogramCounter
from ilm._store import StoreBatch

INCARNATION = "a" * 32
OLD_INCARNATION = "b" * 32
MARK_DELAY = 0.002


class RecordingCommitter:
    """The committer's side a deliverer uses: bookkeeping and deadlines."""

    def __init__(self) -> None:
        self.bookkeeping = StoreBatch()
        self.last_marks = 0
        self.delays: list[float] = []

    def schedule(self, delay: float = 0) -> None:
        self.delays.append(delay)


class Host:
    """The node around the deliverer: delivering allowed, errors recorded."""

    deliveries_allowed = True

    def __init__(self) -> None:
        self.errors: list[Any] = []

    def delivery_settled(self) -> None:
        pass

    def guard(self, function: Any, *args: object) -> None:
        function(*args)

    def limited(self, *args: object, **kwargs: object) -> None:
        pass

    def unexpected(self, reason: Failure, doing: str) -> None:
        self.errors.append(reason)


class Fixture:
    def __init__(self, target: Any) -> None:
        self.clock = Clock()
        self.committer = RecordingCommitter()
        self.host = Host()
        self.latency = HistogramCounter(DELIVERY_SECONDS_BOUNDS)
        self.streams = [self.stream(INCARNATION)]
        #: Whether :meth:`arrive` tries ``take_run`` (else always queues).
        self.straight = True
        self.deliverer = PeerDeliverer(
            7,
            0,
            target=target,
            streams=lambda: self.streams,
            ready=lambda: True,
            acknowledge=lambda: None,
            unstarve=lambda stream: None,
            committer=self.committer,  # type: ignore[arg-type]
            host=self.host,
            clock=self.clock,
            later=self.clock.callLater,
            backoff=Backoff(jitter=0),
            ack_delay=0.1,
            mark_delay=MARK_DELAY,
            latency=self.latency,
        )

    @staticmethod
    def stream(incarnation: str) -> InboundStream:
        return InboundStream(
            incarnation, 0, window=64, window_bytes=10_000, max_frame_size=1000
        )

    def arrive(self, *contents: bytes) -> bool:
        """
        Messages arrive on the current stream, as one run, as the router
        takes them.

        :return: whether they went straight through ``take_run``.
        """
        stream = self.streams[-1]
        first = stream.received + 1
        if self.straight and self.deliverer.take_run(
            stream, self.streams, first, list(contents)
        ):
            return True
        accepted, _, _ = stream.on_data(first, list(contents))
        assert accepted == len(contents)
        self.deliverer.arrived(stream, accepted)
        self.deliverer.deliver()
        return False


class Target:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.result: Any = None

    def deliver(self, message: Message) -> Any:
        self.messages.append(message)
        result = self.result
        if isinstance(result, list):
            # One result per delivery, in turn, then None.
            result = result.pop(0) if result else None
        if isinstance(result, Exception):
            raise result
        return result


class TakeRunTests(SynchronousTestCase):
    def test_delivered_marked_timed(self) -> None:
        """
        A lone new message is delivered at once, with its position and its
        sender's incarnation; its mark waits for the next commit (asked for
        within ``mark_delay``), and its latency is counted once.
        """
        target = Target()
        f = Fixture(target)
        f.arrive(b"one")
        f.arrive(b"two")
        self.assertEqual(
            target.messages,
            [
                Message(7, 0, 1, b"one", INCARNATION),
                Message(7, 0, 2, b"two", INCARNATION),
            ],
        )
        stream = f.streams[0]
        self.assertEqual((stream.delivered, len(stream.queue)), (2, 0))
        self.assertEqual(stream.held.messages, 0)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 2})
        self.assertEqual(f.committer.delays, [MARK_DELAY, MARK_DELAY])
        self.assertEqual((f.latency.count, f.deliverer.delivered), (2, 2))

    def test_run_delivered_marked_timed(self) -> None:
        """
        A run of new messages (the frames of one read) is delivered at
        once, in order; it asks for one commit, its mark is the run's last
        position, and its latency is counted once per message.
        """
        target = Target()
        f = Fixture(target)
        self.assertTrue(f.arrive(b"one", b"two", b"three"))
        self.assertEqual(
            [(m.message_id, m.contents) for m in target.messages],
            [(1, b"one"), (2, b"two"), (3, b"three")],
        )
        stream = f.streams[0]
        self.assertEqual((stream.delivered, len(stream.queue)), (3, 0))
        self.assertEqual((stream.held.messages, stream.held.bytes), (0, 0))
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 3})
        self.assertEqual(f.committer.delays, [MARK_DELAY])
        self.assertEqual((f.latency.count, f.deliverer.delivered), (3, 3))

    def test_run_failure_midway(self) -> None:
        """
        A target that raises on the second message of a run: the first is
        delivered and counted, the second and third are held and retried
        after the backoff, in order; the mark covers only what was taken.
        """
        target = Target()
        target.result = [None, ValueError("not now")]
        f = Fixture(target)
        f.arrive(b"one", b"two", b"three")
        self.assertEqual([m.message_id for m in target.messages], [1, 2])
        self.assertTrue(f.deliverer.held)
        self.assertEqual(f.deliverer.delivered, 1)
        self.assertEqual(len(f.streams[0].queue), 2)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 1})
        self.assertEqual(f.latency.count, 1)
        f.clock.advance(10)
        self.assertEqual([m.message_id for m in target.messages], [1, 2, 2, 3])
        self.assertFalse(f.deliverer.held)
        self.assertEqual(f.deliverer.delivered, 3)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 3})
        self.assertEqual(f.latency.count, 3)

    def test_run_deferred_midway(self) -> None:
        """
        A target whose Deferred for the second message of a run has not
        fired: the rest of the run waits for it, then goes in order.
        """
        target = Target()
        pending: Deferred[None] = Deferred()
        target.result = [None, pending]
        f = Fixture(target)
        f.arrive(b"one", b"two", b"three")
        self.assertEqual([m.message_id for m in target.messages], [1, 2])
        self.assertEqual(f.deliverer.delivered, 1)
        pending.callback(None)
        self.assertEqual([m.message_id for m in target.messages], [1, 2, 3])
        self.assertEqual(f.deliverer.delivered, 3)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 3})
        self.assertEqual(f.latency.count, 3)
        self.assertEqual(f.host.errors, [])

    def test_run_fired_deferred_midway(self) -> None:
        """
        A target that returns an already fired Deferred for the second
        message of a run: the rest of the run is delivered at once, each
        message exactly once, in order.
        """
        target = Target()
        target.result = [None, succeed(None)]
        f = Fixture(target)
        f.arrive(b"one", b"two", b"three")
        self.assertEqual([m.message_id for m in target.messages], [1, 2, 3])
        self.assertEqual(f.deliverer.delivered, 3)
        self.assertEqual(len(f.streams[0].queue), 0)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 3})
        self.assertEqual(f.latency.count, 3)

    def test_run_async_target(self) -> None:
        """
        An ``async def`` target that finishes without waiting (its
        coroutine's Deferred has fired when it returns) gets a whole run at
        once, in order.
        """
        delivered: list[int] = []

        class AsyncTarget:
            async def deliver(self, message: Message) -> None:
                delivered.append(message.message_id)

        f = Fixture(AsyncTarget())
        f.arrive(b"one", b"two", b"three", b"four")
        self.assertEqual(delivered, [1, 2, 3, 4])
        self.assertEqual(f.deliverer.delivered, 4)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 4})

    def test_marks_spaced_by_busy_peers(self) -> None:
        """
        After a commit that carried the marks of many peers, a new mark may
        wait ``MARK_DELAY_PER_PEER`` per such peer (0.1 s after a commit
        for 1,000 peers); after one for a few, ``mark_delay``.
        """
        f = Fixture(Target())
        f.committer.last_marks = 1000
        f.arrive(b"one")
        f.committer.last_marks = 3
        f.arrive(b"two")
        self.assertEqual(f.committer.delays, [1000 * MARK_DELAY_PER_PEER, MARK_DELAY])
        self.assertAlmostEqual(1000 * MARK_DELAY_PER_PEER, 0.1)

    def test_deferred_settles_later(self) -> None:
        """
        A target's Deferred holds the message (and the next) until it
        fires; then both are delivered in order, marked and timed.
        """
        target = Target()
        pending: Deferred[None] = Deferred()
        target.result = pending
        f = Fixture(target)
        self.assertTrue(f.arrive(b"one"))
        target.result = None
        # Behind a delivery in progress: queued, not straight.
        self.assertFalse(f.arrive(b"two"))
        self.assertEqual([m.message_id for m in target.messages], [1])
        self.assertEqual(f.committer.bookkeeping.delivered, {})
        f.clock.advance(0.5)
        pending.callback(None)
        self.assertEqual([m.message_id for m in target.messages], [1, 2])
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 2})
        self.assertEqual(f.latency.count, 2)
        self.assertEqual(f.host.errors, [])

    def test_failure_holds_and_retries(self) -> None:
        """
        A target that raises holds the message (and every later one) and
        is retried after the backoff; nothing is marked before it takes it.
        """
        target = Target()
        target.result = ValueError("not now")
        f = Fixture(target)
        f.arrive(b"one")
        f.arrive(b"two")
        self.assertEqual([m.message_id for m in target.messages], [1])
        self.assertTrue(f.deliverer.held)
        self.assertEqual(len(f.streams[0].queue), 2)
        self.assertEqual(f.committer.bookkeeping.delivered, {})
        target.result = None
        f.clock.advance(10)
        self.assertEqual([m.message_id for m in target.messages], [1, 1, 2])
        self.assertFalse(f.deliverer.held)
        self.assertEqual(f.committer.bookkeeping.delivered, {(7, INCARNATION): 2})

    def test_older_incarnation_first(self) -> None:
        """
        While an older incarnation's stream still holds messages, a new
        message of the current stream waits for them: delivery stays in
        order across incarnations.
        """
        target = Target()
        f = Fixture(target)
        old = f.stream(OLD_INCARNATION)
        old.on_data(1, [b"old"])
        f.streams.insert(0, old)
        f.arrive(b"new")
        self.assertEqual(
            [(m.source_incarnation, m.contents) for m in target.messages],
            [(OLD_INCARNATION, b"old"), (INCARNATION, b"new")],
        )

    def test_beyond_budget_queued(self) -> None:
        """
        A run larger than what the peer's streams may hold together does
        not go straight: ``on_data`` keeps what fits (the rest is asked for
        again once room is made), and that is delivered.
        """
        target = Target()
        f = Fixture(target)
        f.streams[0].held.max_messages = 2
        self.assertEqual(f.streams[0].fits_run(1, [b"a", b"b", b"c"]), -1)
        stream = f.streams[-1]
        self.assertFalse(f.deliverer.take_run(stream, f.streams, 1, [b"a", b"b", b"c"]))
        self.assertEqual((stream.delivered, target.messages), (0, []))
        self.assertEqual(stream.on_data(1, [b"a", b"b", b"c"]), (2, False, 0))
        self.assertTrue(stream.starved)
        f.deliverer.arrived(stream, 2)
        f.deliverer.deliver()
        self.assertEqual([m.contents for m in target.messages], [b"a", b"b"])

    def test_not_next_not_straight(self) -> None:
        """
        Data that does not continue the stream (a gap, or a repeat) never
        goes straight: ``on_data`` decides what it means.
        """
        f = Fixture(Target())
        stream = f.streams[-1]
        self.assertFalse(f.deliverer.take_run(stream, f.streams, 2, [b"gap"]))
        self.assertTrue(f.arrive(b"one"))
        self.assertFalse(f.deliverer.take_run(stream, f.streams, 1, [b"one"]))
        self.assertEqual(stream.delivered, 1)

    def test_same_as_general_path(self) -> None:
        """
        For runs of random sizes and a target that takes, raises, returns a
        pending Deferred or one that has fired, in random turns: delivering
        straight from the read (``take_run``) leaves everything as queueing
        each run and delivering it would (``on_data``, ``arrived``,
        ``deliver``): the messages delivered, in order, the streams'
        counts, the delivery marks and latency counts, at every step.
        """
        import random

        straight_taken = 0
        for seed in range(300):
            rng = random.Random(seed)
            sides = []
            for straight in (True, False):
                target = Target()
                target.result = []
                f = Fixture(target)
                f.straight = straight
                sides.append((f, target, []))
            sent = 0
            for step in range(rng.randrange(1, 12)):
                action = rng.random()
                if action < 0.6 and sent < 50:
                    count = rng.randrange(1, 6)
                    results = [
                        rng.choice(["none", "none", "none", "raise", "wait", "fired"])
                        for _ in range(count + 2)
                    ]
                    contents = [b"m%d" % (sent + i) for i in range(count)]
                    sent += count
                    for f, target, waiting in sides:
                        target.result = []
                        for r in results:
                            if r == "raise":
                                target.result.append(ValueError("not now"))
                            elif r == "wait":
                                d: Deferred[None] = Deferred()
                                waiting.append(d)
                                target.result.append(d)
                            elif r == "fired":
                                target.result.append(succeed(None))
                            else:
                                target.result.append(None)
                        straight_taken += f.arrive(*contents)
                elif action < 0.8:
                    for _, target, waiting in sides:
                        target.result = []
                        for d in waiting:
                            if not d.called:
                                d.callback(None)
                                break
                else:
                    seconds = rng.choice([0.01, 1, 10])
                    for f, target, _ in sides:
                        target.result = []
                        f.clock.advance(seconds)
                (a, ta, _), (b, tb, _) = sides
                where = f"seed {seed}, step {step}"
                self.assertEqual(ta.messages, tb.messages, where)
                sa, sb = a.streams[-1], b.streams[-1]
                self.assertEqual(
                    (sa.delivered, sa.delivered_bytes, list(sa.queue), sa.nacked),
                    (sb.delivered, sb.delivered_bytes, list(sb.queue), sb.nacked),
                    where,
                )
                self.assertEqual(
                    (sa.held.messages, sa.held.bytes),
                    (sb.held.messages, sb.held.bytes),
                    where,
                )
                self.assertEqual(
                    (a.deliverer.delivered, a.deliverer.held, a.deliverer.delivering),
                    (b.deliverer.delivered, b.deliverer.held, b.deliverer.delivering),
                    where,
                )
                self.assertEqual(
                    a.committer.bookkeeping.delivered,
                    b.committer.bookkeeping.delivered,
                    where,
                )
                self.assertEqual(a.latency.count, b.latency.count, where)
                self.assertEqual((a.host.errors, b.host.errors), ([], []), where)
        # The straight line was taken, and not always.
        self.assertGreater(straight_taken, 300)


class LastMarksTests(SynchronousTestCase):
    def test_last_marks(self) -> None:
        """
        ``GroupCommitter.last_marks`` is the number of delivery marks the
        last commit to start carried (what marks are spaced by).
        """

        class Backend:
            def commit(self, batch: StoreBatch) -> Deferred[None]:
                return succeed(None)

        clock = Clock()
        committer = GroupCommitter(
            Backend(),  # type: ignore[arg-type]
            clock,
            Backoff(jitter=0),
            later=clock.callLater,
            may_commit=lambda: True,
            drop_unstorable=lambda batch, sends, problems: sends,
            committed=lambda result, batch, sends: sends,
            receipts=lambda sends: None,
            failed=lambda reason, sends, delay: None,
            settled=lambda: None,
            unexpected=lambda reason, doing: None,
        )
        for peer in range(1, 6):
            committer.bookkeeping.delivered[(peer, INCARNATION)] = 3
        committer.schedule(0.002)
        clock.advance(0.002)
        self.assertEqual((committer.commits, committer.last_marks), (1, 5))
        committer.bookkeeping.delivered[(1, INCARNATION)] = 4
        committer.schedule(0.002)
        clock.advance(0.002)
        self.assertEqual((committer.commits, committer.last_marks), (2, 1))
