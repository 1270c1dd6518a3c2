"""
Tests for ilm._messenger: the ILM service over the in-memory network and
backend, on a Clock.
"""

from __future__ import annotations

import random
from typing import Any

import attr
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredQueue, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ilm import (
    ILM,
    Config,
    Message,
    Receipt,
    StoreBatch,
    _committer,
    _frames,
    _lifecycle,
)
from ilm._session import PROTOCOL_VERSION, Hello
from ilm.errors import (
    InvalidPeerId,
    MessageTooLarge,
    NotRunning,
    OutboxFull,
    SendRefused,
    SendToSelf,
    ShutdownTimeout,
    StoppedBeforeAcknowledged,
    StoreError,
    UnknownPeer,
    WrongSource,
)
from ilm.interfaces import IBackend, IFrameReceiver, ILocalDelivery, INetwork
from ilm.testing import InMemoryBackend, InMemoryStorage, TestMessage, settle

from .support import Cluster, numbered


class Events:
    """
    Collect ILM log events with an ``ilm_event`` key.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, object]) -> None:
        if "ilm_event" in event:
            self.events.append(event)

    def named(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.events if e["ilm_event"] == name]


class BasicTests(SynchronousTestCase):
    def test_exchange(self) -> None:
        """
        Two nodes each send one message; each receives the other's with the
        right source, destination, id and contents, and receipts carry the
        message ids.
        """
        c = Cluster()
        a, b = c.start(1), c.start(2)
        r1 = self.successResultOf(wait(c, a.send_to(2, b"\x01\x02\x03")))
        r2 = self.successResultOf(wait(c, b.send_to(1, b"\x04\x05\x06")))
        self.assertEqual((r1.peer_id, r1.message_id), (2, 1))
        self.assertEqual((r2.peer_id, r2.message_id), (1, 1))
        c.run_until(lambda: c.recorders[1].messages and c.recorders[2].messages)
        [m2] = c.recorders[2].messages
        [m1] = c.recorders[1].messages
        self.assertEqual(
            (m2.source_id, m2.destination_id, m2.message_id, m2.contents),
            (1, 2, 1, b"\x01\x02\x03"),
        )
        self.assertEqual(
            (m1.source_id, m1.destination_id, m1.message_id, m1.contents),
            (2, 1, 1, b"\x04\x05\x06"),
        )

    def test_last_message_id_and_receipt_after_restart(self) -> None:
        """
        ``last_message_id`` is the highest position stored for a peer, also
        after a crash and restart; ``receipt`` gives the receipt of a
        message sent before the restart, whose ``acknowledged`` fires once
        the peer has it.  Ids never stored are refused.
        """
        c = Cluster()
        a = c.start(1)
        self.assertEqual(a.last_message_id(2), 0)
        for p in numbered(5):
            a.send_to(2, p)
        c.run_until(lambda: a.last_message_id(2) == 5)
        c.crash(1)
        a = c.start(1)
        self.assertEqual(a.last_message_id(2), 5)
        self.assertRaises(ValueError, a.receipt, 2, 6)
        self.assertRaises(ValueError, a.receipt, 2, 0)
        acknowledged = a.receipt(2, 5).acknowledged
        self.assertNoResult(acknowledged)
        c.start(2)
        c.run_until(lambda: acknowledged.called)
        self.assertEqual(self.successResultOf(acknowledged).message_id, 5)
        self.assertEqual(c.received(2, 1), numbered(5))

    def test_ten_thousand_in_order(self) -> None:
        """
        10,000 messages arrive exactly once and in order.
        """
        c = Cluster()
        a = c.start("a")
        c.start("b")
        payloads = numbered(10_000)
        for p in payloads:
            a.send_to("b", p)
        c.run_until(lambda: len(c.recorders["b"].messages) >= 10_000)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received("b", "a"), payloads)
        self.assertEqual(c.recorders["b"].ids_from("a"), list(range(1, 10_001)))

    def test_both_directions(self) -> None:
        """
        Two nodes stream to each other at the same time; both streams arrive
        whole and in order.
        """
        c = Cluster(Config(window=64))
        a, b = c.start(1), c.start(2)
        to_b, to_a = numbered(3000, prefix=b"ab"), numbered(3000, prefix=b"ba")
        for x, y in zip(to_b, to_a, strict=True):
            a.send_to(2, x)
            b.send_to(1, y)
        c.run_until(lambda: not a.pending_outbound() and not b.pending_outbound())
        self.assertEqual(c.received(2, 1), to_b)
        self.assertEqual(c.received(1, 2), to_a)

    def test_many_peers(self) -> None:
        """
        A hub exchanges streams with 12 peers at once; every stream arrives
        whole and in order, independently of the others.
        """
        c = Cluster(Config(window=32))
        hub = c.start("hub")
        spokes = {f"n{i}": c.start(f"n{i}") for i in range(12)}
        for round_ in range(200):
            for name, node in spokes.items():
                node.send_to("hub", b"%s-%d" % (name.encode(), round_))
                hub.send_to(name, b"hub-%d" % round_)
        c.run_until(
            lambda: (
                not hub.pending_outbound()
                and not any(n.pending_outbound() for n in spokes.values())
            )
        )
        for name in spokes:
            self.assertEqual(
                c.received("hub", name),
                [b"%s-%d" % (name.encode(), r) for r in range(200)],
            )
            self.assertEqual(
                c.received(name, "hub"), [b"hub-%d" % r for r in range(200)]
            )
        self.assertEqual(hub.connected_peers(), frozenset(spokes))

    def test_acks_clear_outbox(self) -> None:
        """
        Once the receiver acknowledges, the sender's store no longer holds the
        messages and each receipt's ``acknowledged`` fires.
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        sends = [a.send_to(2, p) for p in numbered(50)]
        c.clock.advance(0)
        receipts = [self.successResultOf(d) for d in sends]
        acks = [r.acknowledged for r in receipts]
        self.assertEqual(set(c.outbox(1, 2)) | set(c.received(2, 1)), set(numbered(50)))
        c.run_until(lambda: not a.pending_outbound())
        c.run_until(lambda: not c.outbox(1, 2))
        for r, d in zip(receipts, acks, strict=True):
            self.assertIs(self.successResultOf(d), r)
        self.assertIs(self.successResultOf(receipts[0].acknowledged), receipts[0])
        self.assertEqual(c.storages[1].outboxes[2].acked, 50)

    def test_send_before_start(self) -> None:
        """
        Messages sent before the node has opened its store are accepted once
        it has, in order.
        """
        c = Cluster()
        c.start(2)
        backend = PausedOpen(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        node = ILM(backend, lambda m: None, c.network.add_peer(1), clock=c.clock)
        node.startService()
        early = [node.send_to(2, p) for p in numbered(3)]
        self.assertNoResult(early[0])
        backend.release()
        c.run_until(lambda: len(c.received(2, 1)) == 3)
        self.assertEqual([self.successResultOf(d).message_id for d in early], [1, 2, 3])
        self.assertEqual(c.received(2, 1), numbered(3))

    def test_start_failure(self) -> None:
        """
        When the network cannot start, create() fails with its error, sends
        made meanwhile fail with it too, and the opened store is closed.
        """
        c = Cluster()
        backend = InMemoryBackend()
        network = c.network.add_peer(1)
        network.start = lambda receiver: fail(RuntimeError("no network"))  # type: ignore[method-assign]
        node = ILM(backend, lambda m: None, network, clock=c.clock)
        started = node.when_started()
        early = node.send_to(2, b"x")
        node.startService()
        self.failureResultOf(started, RuntimeError)
        refusal = self.failureResultOf(early, NotRunning)
        self.assertIsInstance(refusal.value.__cause__, RuntimeError)
        self.assertTrue(backend.closed)
        self.failureResultOf(node.send_to(2, b"y"), NotRunning)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(node.shutdown())

    def test_store_of_another_node(self) -> None:
        """
        A store holding state for a peer with this node's own id belongs to
        another node: starting on it fails with StoreError.
        """
        c = Cluster()
        storage = InMemoryStorage()
        storage.apply(StoreBatch(messages={1: (1, [b"x"])}))
        node = ILM(
            InMemoryBackend(storage), print, c.network.add_peer(1), clock=c.clock
        )
        started = node.when_started()
        node.startService()
        self.failureResultOf(started, StoreError)
        self.flushLoggedErrors(StoreError)

    def test_early_sends_keep_their_order(self) -> None:
        """
        Messages sent before the start completed take their positions before
        anything sent from a start callback.
        """
        c = Cluster()
        c.start(2)
        backend = PausedOpen(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        node = ILM(backend, lambda m: None, c.network.add_peer(1), clock=c.clock)
        node.when_started().addCallback(lambda _: node.send_to(2, b"second"))
        node.startService()
        node.send_to(2, b"first")
        backend.release()
        c.run_until(lambda: len(c.received(2, 1)) == 2)
        self.assertEqual(c.received(2, 1), [b"first", b"second"])

    def test_no_restart(self) -> None:
        """
        A stopped node refuses to start again, with a typed error.
        """
        c = Cluster()
        a = c.start(1)
        d = a.shutdown(1)
        c.run_until(lambda: d.called)
        self.assertRaises(NotRunning, a.startService)

    def test_service(self) -> None:
        """
        ILM provides IService and starts and stops inside a MultiService.
        """
        c = Cluster()
        c.start(2)
        node = ILM(
            InMemoryBackend(), lambda m: None, c.network.add_peer(1), clock=c.clock
        )
        verifyObject(IService, node)
        parent = MultiService()
        node.setServiceParent(parent)
        parent.startService()
        self.successResultOf(node.when_started())
        d = node.send_to(2, b"x")
        c.run_until(lambda: c.received(2, 1) == [b"x"])
        self.successResultOf(d)
        stopped = parent.stopService()
        c.run_until(lambda: stopped.called)
        self.successResultOf(stopped)
        self.failureResultOf(node.send_to(2, b"y"), NotRunning)


class RefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.c = Cluster(
            Config(
                max_message_size=100,
                max_outbox_messages=10,
                max_outbox_bytes=500,
                max_frame_size=4096,
            )
        )
        self.a = self.c.start(1)

    def test_any_peer_on_a_network_without_can_link(self) -> None:
        """
        A network without ``can_link`` (the in-memory one, where any peer
        may appear later) never makes send_to refuse a peer as unknown.
        """
        for peer_id in (2, "2", "typo", 2**62):
            self.successResultOf(wait(self.c, self.a.send_to(peer_id, b"x")))

    def test_self_send(self) -> None:
        """
        Sending to one's own id fails with SendToSelf.
        """
        self.failureResultOf(self.a.send_to(1, b"x"), SendToSelf)

    def test_raw_message(self) -> None:
        """
        send_raw_message refuses a message whose source is another node, and
        sends one whose source is this node.
        """
        self.failureResultOf(
            self.a.send_raw_message(TestMessage(3, 2, 7, b"x")), WrongSource
        )
        self.failureResultOf(
            self.a.send_raw_message(TestMessage(1, 1, 7, b"x")), SendToSelf
        )
        self.c.start(2)
        d = self.a.send_raw_message(TestMessage(1, 2, 99, b"raw"))
        self.c.run_until(lambda: self.c.received(2, 1) == [b"raw"])
        self.assertEqual(self.successResultOf(d).message_id, 1)
        self.assertEqual(self.c.recorders[2].messages[0].message_id, 1)
        self.assertRaises(TypeError, self.a.send_raw_message, object())

    def test_argument_types(self) -> None:
        """
        Wrong argument types raise TypeError at once; out-of-range ids and
        oversized contents fail the Deferred with typed errors.
        """
        self.assertRaises(TypeError, self.a.send_to, 2, "text")
        self.assertRaises(TypeError, self.a.send_to, 2.0, b"x")
        self.assertRaises(TypeError, self.a.send_to, True, b"x")
        self.failureResultOf(self.a.send_to(-1, b"x"), InvalidPeerId)
        self.failureResultOf(self.a.send_to(2**63, b"x"), InvalidPeerId)
        self.failureResultOf(self.a.send_to("", b"x"), InvalidPeerId)
        self.failureResultOf(self.a.send_to("x" * 256, b"x"), InvalidPeerId)
        failure = self.failureResultOf(self.a.send_to(2, b"x" * 101), MessageTooLarge)
        self.assertEqual((failure.value.size, failure.value.limit), (101, 100))
        d = self.a.send_to(2, bytearray(b"ok"))
        self.c.clock.advance(0)
        self.successResultOf(d)

    def test_outbox_message_limit(self) -> None:
        """
        With the peer away, the outbox takes max_outbox_messages, refuses the
        next with OutboxFull, and takes more once the peer has acknowledged.
        """
        sends = [self.a.send_to(2, b"%d" % i) for i in range(10)]
        failure = self.failureResultOf(self.a.send_to(2, b"more"), OutboxFull)
        self.assertEqual((failure.value.peer_id, failure.value.kind), (2, "messages"))
        self.c.clock.advance(0)
        for d in sends:
            self.successResultOf(d)
        self.failureResultOf(self.a.send_to(2, b"more"), OutboxFull)
        self.c.start(2)
        self.c.run_until(lambda: not self.a.pending_outbound())
        d = self.a.send_to(2, b"more")
        self.c.run_until(lambda: len(self.c.received(2, 1)) == 11)
        self.successResultOf(d)

    def test_outbox_byte_limit(self) -> None:
        """
        The outbox refuses a message that would take it over max_outbox_bytes.
        """
        for _ in range(5):
            self.a.send_to(2, b"x" * 100)
        failure = self.failureResultOf(self.a.send_to(2, b"y"), OutboxFull)
        self.assertEqual(failure.value.kind, "bytes")

    def test_frame_limit_of_network(self) -> None:
        """
        ILM refuses a Config whose frames could exceed what its network
        carries, instead of failing link after link later.
        """
        c = Cluster(max_frame_size=100_000)
        self.assertRaises(
            ValueError,
            ILM,
            InMemoryBackend(),
            print,
            c.network.add_peer(7),
            config=Config(),
        )
        ILM(
            InMemoryBackend(),
            print,
            c.network.add_peer(8),
            config=Config(max_message_size=90_000, max_frame_size=100_000),
        )

    def test_config_validation(self) -> None:
        """
        Config refuses non-positive limits and a frame size that cannot hold
        a maximal message.
        """
        self.assertRaises(ValueError, Config, window=0)
        self.assertRaises(ValueError, Config, window_bytes=2**32)
        self.assertRaises(ValueError, Config, window=2**32)
        self.assertRaises(
            ValueError, Config, max_message_size=2000, max_frame_size=1000
        )
        self.assertRaises(TypeError, ILM, InMemoryBackend(), print, object())
        self.assertRaises(TypeError, ILM, object(), print, self.c.network.add_peer(9))


class DeliveryTests(SynchronousTestCase):
    def test_failure_holds_the_line(self) -> None:
        """
        When delivery fails, later messages from the same sender wait and the
        failing one is retried with backoff until it succeeds; another sender's
        stream is not held up; the first failure is logged in full with its
        traceback and the later ones (from the same sender) as one
        rate-limited summary.
        """
        c = Cluster()
        a, b = c.start("a"), c.start("b")
        receiver = c.start("r")
        events = Events(self)
        c.recorders["r"].fail_from["a"] = 4
        for p in numbered(5, prefix=b"a"):
            a.send_to("r", p)
        c.run_until(lambda: c.recorders["r"].attempts >= 2)
        for p in numbered(5, prefix=b"b"):
            b.send_to("r", p)
        c.run_until(lambda: len(c.received("r", "b")) == 5)
        self.assertEqual(c.received("r", "b"), numbered(5, prefix=b"b"))
        self.assertEqual(c.received("r", "a"), [])
        c.run_until(lambda: len(c.received("r", "a")) == 5)
        self.assertEqual(c.received("r", "a"), numbered(5, prefix=b"a"))
        self.assertEqual(c.recorders["r"].attempts, 5 + 5 + 4)
        [failure] = events.named("delivery_failed")
        self.assertIn("log_failure", failure)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        c.run_until(lambda: not a.pending_outbound())
        c.clock.advance(60)
        [first, summary] = events.named("delivery_failed")
        self.assertEqual(summary["suppressed"], 3)
        self.assertNotIn("log_failure", summary)
        self.assertGreater(summary["delay"], first["delay"])
        del receiver

    def test_bug_while_settling_a_delivery_is_logged(self) -> None:
        """
        An exception raised while ILM settles an application's delivery
        Deferred is logged as an internal_error event at once (not left for
        the garbage collector as an unhandled error in a Deferred), and
        delivery goes on.
        """
        c = Cluster()
        a = c.start(1)
        pending: list[Deferred[None]] = []
        delivered: list[bytes] = []

        def deliver(message: Message) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: delivered.append(message.contents))
            pending.append(d)
            return d

        b = ILM(InMemoryBackend(), deliver, c.network.add_peer(2), clock=c.clock)
        b.startService()
        events = Events(self)
        for p in numbered(3):
            a.send_to(2, p)
        c.run_until(lambda: pending)

        def broken() -> None:
            raise RuntimeError("simulated bug after a delivery")

        b._core.delivery_settled = broken  # type: ignore[method-assign]
        pending[0].callback(None)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [event] = events.named("internal_error")
        self.assertEqual(event["doing"], "settling a delivery")
        del b._core.delivery_settled
        c.run_until(lambda: len(pending) == 2)
        pending[1].callback(None)
        c.run_until(lambda: len(pending) == 3)
        pending[2].callback(None)
        self.assertEqual(delivered, numbered(3))

    def test_async_target_burst(self) -> None:
        """
        An ``async def`` target that finishes without waiting gets every
        message of a burst (sent in one MESSAGES frame), in order, without
        waiting for more to arrive.
        """
        c = Cluster()
        a = c.start(1)
        delivered: list[bytes] = []

        async def deliver(message: Message) -> None:
            delivered.append(message.contents)

        b = ILM(InMemoryBackend(), deliver, c.network.add_peer(2), clock=c.clock)
        b.startService()
        self.addCleanup(b.stopService)
        for p in numbered(5):
            a.send_to(2, p)
        c.run_until(lambda: delivered)
        c.clock.advance(0.1)
        self.assertEqual(delivered, numbered(5))

    def test_frame_from_unhashable_peer_id(self) -> None:
        """
        A network that reports a frame from an id that cannot be a peer id
        (unhashable) gets an internal_error event, not an exception.
        """
        c = Cluster()
        a = c.start(1)
        events = Events(self)
        a._router.frame_received([2], b"\x00")
        [event] = events.named("internal_error")
        self.assertEqual((event["peer_id"], event["peer_type"]), ("[2]", "list"))

    def test_deferred_delivery(self) -> None:
        """
        A delivery target returning a Deferred gets the next message only once
        the previous Deferred has fired; acknowledgement waits for it.
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        gate: Deferred[None] = Deferred()
        c.recorders[2].hold = gate
        a.send_to(2, b"first")
        a.send_to(2, b"second")
        c.run_until(lambda: c.recorders[2].attempts == 1)
        c.clock.advance(5)
        self.assertEqual(c.recorders[2].attempts, 1)
        self.assertEqual(a.pending_outbound(), {2: 2})
        c.recorders[2].hold = None
        gate.callback(None)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), [b"first", b"second"])

    def test_async_provider(self) -> None:
        """
        An ILocalDelivery provider whose deliver is a coroutine function is
        awaited: its failure is retried and its success acknowledged (a
        coroutine is never taken for a finished delivery).
        """
        c = Cluster()
        a = c.start(1)
        attempts: list[bytes] = []
        done: list[bytes] = []

        @implementer(ILocalDelivery)
        class AsyncTarget:
            async def deliver(self, message: Message) -> None:
                attempts.append(message.contents)
                if len(attempts) == 1:
                    raise RuntimeError("not yet")
                done.append(message.contents)

        node = ILM(
            InMemoryBackend(), AsyncTarget(), c.network.add_peer(2), clock=c.clock
        )
        node.startService()
        a.send_to(2, b"x")
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual((attempts, done), ([b"x", b"x"], [b"x"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_delivery_results(self) -> None:
        """
        One rule for what a delivery returned, for providers and callables
        alike (``delivery_outcome``): a value that is neither a Deferred
        nor an awaitable means delivered, at once, not retried.
        """

        @implementer(ILocalDelivery)
        class Returns42:
            def __init__(self) -> None:
                self.taken: list[Message] = []

            def deliver(self, message: Message) -> object:
                self.taken.append(message)
                return 42

        provider = Returns42()
        taken: list[Message] = []

        def function(message: Message) -> object:
            taken.append(message)
            return 42

        c = Cluster()
        a = c.start(1)
        for peer_id, target in ((2, provider), (3, function)):
            node = ILM(
                InMemoryBackend(), target, c.network.add_peer(peer_id), clock=c.clock
            )
            node.startService()
            a.send_to(peer_id, b"x")
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual([m.contents for m in provider.taken], [b"x"])
        self.assertEqual([m.contents for m in taken], [b"x"])
        self.assertEqual(a.stats().acknowledged, 2)

    def test_deferred_queue_target(self) -> None:
        """
        A DeferredQueue can be the delivery target; one that is full refuses
        (QueueOverflow), which ILM retries.
        """
        c = Cluster()
        a = c.start(1)
        queue: DeferredQueue[object] = DeferredQueue(size=2)
        node = ILM(InMemoryBackend(), queue, c.network.add_peer(2), clock=c.clock)
        node.startService()
        for p in numbered(4):
            a.send_to(2, p)
        c.run_until(lambda: len(queue.pending) == 2)
        c.clock.advance(1)
        self.assertEqual(len(queue.pending), 2)
        got = [self.successResultOf(queue.get()).contents for _ in range(2)]
        c.run_until(lambda: len(queue.pending) == 2)
        got += [self.successResultOf(queue.get()).contents for _ in range(2)]
        self.assertEqual(got, numbered(4))
        self.flushLoggedErrors()


class FrameRunTests(SynchronousTestCase):
    """
    ``PeerRouter.frames_received``: the frames of one read, together.
    """

    def test_run_then_malformed(self) -> None:
        """
        Consecutive MESSAGES frames are delivered as one run, in order; a
        malformed frame after them closes the link, and nothing after it is
        taken (the frames of the read that follow it came on a closed link).
        """
        c = Cluster()
        a = c.start(1)
        b = c.start(2)
        a.send_to(2, b"first")
        c.run_until(lambda: c.received(2, 1) == [b"first"])
        events = Events(self)

        def one(position: int, contents: bytes) -> bytes:
            return _frames.encode_messages(position, [contents], 1 << 20)[0]

        malformed = one(4, b"z")[:-1]
        b._router.frames_received(
            1, [one(2, b"x"), one(3, b"y"), malformed, one(4, b"z")]
        )
        self.assertEqual(c.received(2, 1), [b"first", b"x", b"y"])
        [event] = events.named("protocol_violation")
        self.assertEqual((event["peer_id"], event["kind"]), (1, "MalformedFrame"))
        self.assertNotIn(1, b.connected_peers())

    def test_same_as_frame_by_frame(self) -> None:
        """
        Whatever one read holds (a run, a repeat, a gap, a run that goes
        beyond the receiver's window, a malformed frame), ``frames_received``
        delivers what ``frame_received`` for each frame in turn delivers,
        and closes the link in the same cases with the same violation.
        """

        def one(position: int, contents: bytes) -> bytes:
            return _frames.encode_messages(position, [contents], 1 << 20)[0]

        reads = {
            "run": [one(p, b"%d" % p) for p in range(2, 7)],
            "repeat and gap": [one(2, b"2"), one(2, b"2"), one(3, b"3"), one(5, b"5")],
            "beyond the window": [one(p, b"%d" % p) for p in range(2, 40)],
            "malformed": [one(2, b"2"), one(3, b"3")[:-1], one(3, b"3")],
        }
        for name, frames in reads.items():
            outcomes = []
            for together in (True, False):
                c = Cluster(config=Config(window=8))
                a = c.start(1)
                b = c.start(2)
                a.send_to(2, b"1")
                c.run_until(lambda c=c: c.received(2, 1) == [b"1"])
                events = Events(self)
                if together:
                    b._router.frames_received(1, list(frames))
                else:
                    for frame in frames:
                        if 1 not in b.connected_peers():
                            break
                        b._router.frame_received(1, frame)
                outcomes.append(
                    (
                        c.received(2, 1),
                        1 in b.connected_peers(),
                        [e["kind"] for e in events.named("protocol_violation")],
                    )
                )
            self.assertEqual(outcomes[0], outcomes[1], name)
        self.assertEqual(len(outcomes[0][0]), 2)


class FaultTests(SynchronousTestCase):
    def test_cut_mid_stream(self) -> None:
        """
        Cutting the link while frames are in flight loses them; after the link
        comes back every message is delivered exactly once, in order.
        """
        c = Cluster(Config(window=100), latency=0.01)
        a = c.start(1)
        c.start(2)
        payloads = numbered(2000)
        for p in payloads:
            a.send_to(2, p)
        rng = random.Random(1234)
        cuts = 0
        while a.pending_outbound():
            c.clock.advance(rng.random() * 0.02)
            if rng.random() < 0.2 and c.network.in_flight():
                c.network.cut(1, 2)
                cuts += 1
                c.clock.advance(rng.random())
                c.network.restore(1, 2)
        self.assertGreater(cuts, 10)
        self.assertEqual(c.received(2, 1), payloads)

    def test_dropped_and_duplicated_frames(self) -> None:
        """
        Frames dropped or duplicated on a live link (data, acks, handshakes)
        are recovered by NACK, retransmission and handshake retry, with
        exactly-once in-order delivery.
        """
        c = Cluster(Config(window=20))
        a = c.start(1)
        c.start(2)
        rng = random.Random(99)

        def policy(src: object, dst: object, frame: bytes) -> tuple[float, ...]:
            roll = rng.random()
            if roll < 0.1:
                return ()
            if roll < 0.2:
                return (0.0, 0.0)
            if roll < 0.25:
                return (rng.random() * 0.5,)
            return (0.0,)

        c.network.fault_policy = policy
        payloads = numbered(1500)
        for p in payloads:
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), payloads)
        self.assertGreater(c.network.frames_dropped, 10)
        self.assertGreater(c.network.frames_duplicated, 10)

    def test_lost_hello(self) -> None:
        """
        A lost handshake frame is repeated until the link is ready.
        """
        c = Cluster()
        c.network.drop_next(2, 1, 1)
        a = c.start(1)
        c.start(2)
        a.send_to(2, b"x")
        c.run_until(lambda: c.received(2, 1) == [b"x"])
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(a.connected_peers(), frozenset({2}))

    def test_lost_ack_after_held_delivery(self) -> None:
        """
        A receiver whose delivery was held reports holding the data (a
        delayed ACK), then delivers it and sends one ACK with the new mark,
        which is lost: the sender, still waiting for the acknowledgement,
        sends the last message again, the receiver acknowledges the
        duplicate and the stream completes.  (Found by the simulator: the
        stream stalled until the link happened to reconnect; its seeds are
        kept in tests/test_simulation.py, REGRESSION_SEEDS.)
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        hold: Deferred[None] = Deferred()
        c.recorders[2].hold = hold
        a.send_to(2, b"x")
        settle(c.clock, 0.5)
        self.assertEqual(a.pending_outbound(), {2: 1})
        self.assertEqual(a._peers[2].out.peer_received, 1)
        c.network.drop_next(2, 1, 1)
        c.recorders[2].hold = None
        hold.callback(None)
        c.run_until(lambda: not a.pending_outbound(), timeout=60)
        self.assertEqual(c.received(2, 1), [b"x"])

    def test_sender_crash(self) -> None:
        """
        A sender killed mid-stream and restarted from its store resumes: every
        stored message is delivered exactly once, in order.
        """
        c = Cluster(Config(window=50))
        a = c.start(1)
        c.start(2)
        payloads = numbered(3000)
        for p in payloads[:1500]:
            a.send_to(2, p)
        c.run_until(lambda: len(c.received(2, 1)) >= 300)
        c.crash(1)
        a = c.start(1)
        for p in payloads[1500:]:
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), payloads)

    def test_receiver_crash(self) -> None:
        """
        A receiver killed mid-stream and restarted resumes from its delivery
        mark; the only messages delivered twice are those delivered after the
        last mark committed before the crash (the at-least-once window).
        """
        c = Cluster(Config(window=50))
        a = c.start(1)
        c.start(2)
        payloads = numbered(2000)
        for p in payloads:
            a.send_to(2, p)
        c.run_until(lambda: len(c.received(2, 1)) >= 777)
        durable = max(r.delivered for r in c.storages[2].inbound.values())
        delivered = len(c.received(2, 1))
        c.crash(2)
        c.start(2)
        c.run_until(lambda: not a.pending_outbound())
        ids = c.recorders[2].ids_from(1)
        window = list(range(durable + 1, delivered + 1))
        self.assertEqual(
            ids, list(range(1, delivered + 1)) + list(range(durable + 1, 2001))
        )
        self.assertEqual(c.received(2, 1)[delivered:], payloads[durable:])
        self.assertLessEqual(len(window), 50)

    def test_sender_lost_store(self) -> None:
        """
        A sender that lost its store comes back as a new incarnation: its new
        messages (numbered from 1 again) are delivered, not swallowed as
        duplicates of the old ones.
        """
        c = Cluster()
        events = Events(self)
        a = c.start(1)
        c.start(2)
        for p in numbered(100, prefix=b"old"):
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        old_incarnation = a.incarnation
        c.crash(1)
        c.lose_store(1)
        a = c.start(1)
        self.assertNotEqual(a.incarnation, old_incarnation)
        for p in numbered(30, prefix=b"new"):
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(
            c.received(2, 1), numbered(100, prefix=b"old") + numbered(30, prefix=b"new")
        )
        self.assertEqual(c.recorders[2].ids_from(1)[100:], list(range(1, 31)))
        incarnations = [m.source_incarnation for m in c.recorders[2].messages]
        self.assertEqual(incarnations, [old_incarnation] * 100 + [a.incarnation] * 30)
        identities = {
            (m.source_id, m.source_incarnation, m.message_id)
            for m in c.recorders[2].messages
        }
        self.assertEqual(len(identities), 130)
        self.assertEqual(len(events.named("peer_new_incarnation")), 1)

    def test_receiver_lost_store(self) -> None:
        """
        A receiver that lost its store does not block the sender: messages
        still pending are delivered to its new incarnation.
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        for p in numbered(100, prefix=b"first"):
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        c.crash(2)
        for p in numbered(40, prefix=b"second"):
            a.send_to(2, p)
        c.clock.advance(1)
        c.lose_store(2)
        c.recorders[2].messages.clear()
        c.start(2)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), numbered(40, prefix=b"second"))
        self.assertEqual(c.recorders[2].ids_from(1), list(range(101, 141)))

    def test_stale_incarnation_refused(self) -> None:
        """
        An old incarnation of a peer that shows up after its replacement was
        seen is refused: the link is closed with StaleIncarnation.
        """
        c = Cluster()
        events = Events(self)
        a = c.start(1)
        c.start(2)
        a.send_to(2, b"old")
        c.run_until(lambda: not a.pending_outbound())
        old_storage = c.storages[1]
        c.crash(1)
        c.lose_store(1)
        a = c.start(1)
        a.send_to(2, b"new")
        c.run_until(lambda: not a.pending_outbound())
        c.crash(1)
        c.storages[1] = old_storage
        a = c.start(1)
        a.send_to(2, b"zombie")
        c.clock.advance(2)
        kinds = [e["kind"] for e in events.named("protocol_violation")]
        self.assertIn("StaleIncarnation", kinds)
        self.assertEqual(c.received(2, 1), [b"old", b"new"])

    def test_peer_accepts_smaller_messages(self) -> None:
        """
        A peer that accepts smaller messages than this node says so in its
        handshake: a larger message already stored is not sent (the peer
        would refuse it and the link would fail again and again); the stream
        holds there, with one logged error per link, and flows again once
        the peer accepts it.  New sends over the peer's limit are refused at
        once.
        """
        c = Cluster()
        events = Events(self)
        a = c.start(1)
        a.send_to(2, b"small")
        a.send_to(2, b"x" * 200)
        a.send_to(2, b"after")
        c.clock.advance(0)
        c.config = Config(max_message_size=100, max_frame_size=4096)
        c.start(2)
        c.run_until(lambda: c.received(2, 1) == [b"small"])
        c.clock.advance(5)
        self.assertEqual(c.received(2, 1), [b"small"])
        self.assertEqual(events.named("protocol_violation"), [])
        self.assertEqual(len(events.named("message_too_large_for_peer")), 1)
        self.failureResultOf(a.send_to(2, b"y" * 150), MessageTooLarge)
        c.crash(2)
        c.config = Config()
        c.start(2)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), [b"small", b"x" * 200, b"after"])

    def test_oversized_frame_refused(self) -> None:
        """
        A frame larger than Config.max_frame_size closes the link with
        FrameTooLarge, whatever the network let through.
        """
        c = Cluster(Config(max_message_size=1000, max_frame_size=2000))
        events = Events(self)
        c.start(1)
        c.start(2)
        c.run_until(lambda: c.network.linked(1, 2))
        c.network._transmit(1, 2, [b"\x02" + b"x" * 3000])
        c.clock.advance(0)
        self.assertEqual(events.named("protocol_violation")[0]["kind"], "FrameTooLarge")

    def test_regressed_sender_store_refused(self) -> None:
        """
        A sender whose store lost committed messages but kept its incarnation
        would reuse positions the receiver has delivered: the receiver
        refuses it (PeerStoreRegressed) and the sender, seeing the receiver
        ahead of its store, refuses too (StoreBehindPeer); nothing is
        delivered twice or swallowed.
        """
        c = Cluster()
        events = Events(self)
        a = c.start(1)
        c.start(2)
        for p in numbered(10):
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        c.crash(1)
        box = c.storages[1].outboxes[2]
        box.acked = box.last = 4
        a = c.start(1)
        a.send_to(2, b"would reuse position 5")
        c.clock.advance(3)
        kinds = {e["kind"] for e in events.named("protocol_violation")}
        self.assertEqual(kinds, {"PeerStoreRegressed", "StoreBehindPeer"})
        self.assertEqual(c.received(2, 1), numbered(10))

    def test_receiver_lost_marks(self) -> None:
        """
        A receiver whose store lost delivery marks (but kept its incarnation)
        finds that the sender no longer has the positions in between: it logs
        them as lost (critical) and continues after them, without blocking.
        """
        c = Cluster()
        events = Events(self)
        a = c.start(1)
        c.start(2)
        for p in numbered(10):
            a.send_to(2, p)
        c.run_until(lambda: not a.pending_outbound())
        c.clock.advance(1)
        c.crash(2)
        [(key, record)] = c.storages[2].inbound.items()
        c.storages[2].inbound[key] = attr.evolve(record, delivered=4)
        c.start(2)
        a.send_to(2, b"next")
        c.run_until(lambda: not a.pending_outbound())
        [lost] = events.named("messages_lost")
        self.assertEqual((lost["first"], lost["last"]), (5, 10))
        self.assertEqual(c.received(2, 1)[-1], b"next")
        self.assertEqual(c.recorders[2].ids_from(1)[-1], 11)

    def test_incarnation_change_on_ready_link(self) -> None:
        """
        A handshake announcing another incarnation on a link that is already
        up is an UnexpectedFrame violation.
        """
        c = Cluster()
        events = Events(self)
        c.start(1)
        c.start(2)
        c.run_until(lambda: c.network.linked(1, 2))
        c.clock.advance(0.1)
        hello = _frames.encode_resume(
            Hello(PROTOCOL_VERSION, "ab" * 16, 1, 1, 1, 0, None, 0)
        )
        c.network._transmit(1, 2, [hello])
        c.clock.advance(0)
        self.assertEqual(
            events.named("protocol_violation")[0]["kind"], "UnexpectedFrame"
        )

    def test_outbox_read_failures_back_off(self) -> None:
        """
        Failing outbox reads are retried with a doubling delay (the first
        failure logged in full, the others summarised), and the stream
        continues once reads work.
        """
        c = Cluster(Config(window=4, read_batch=4))
        a = c.start(1)
        for p in numbered(40):
            a.send_to(2, p)
        c.clock.advance(0)
        c.crash(1)
        flaky = FailingReads(InMemoryBackend(c.storages[1]), failures=4)
        events = Events(self)
        a = c.start(1, flaky)
        c.start(2)
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), numbered(40))
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)
        c.clock.advance(60)
        first, summary = events.named("outbox_read_failed")
        self.assertEqual(summary["suppressed"], 3)
        self.assertEqual(summary["delay"], 8 * first["delay"])

    def test_garbage_frame_closes_link(self) -> None:
        """
        A malformed frame closes that link with a logged, typed reason; the
        link comes back and the stream continues.
        """
        c = Cluster()
        events = Events(self)
        a = c.start(1)
        c.start(2)
        a.send_to(2, b"before")
        c.run_until(lambda: not a.pending_outbound())
        c.network._transmit(1, 2, [b"\x02garbage"])
        c.clock.advance(0)
        self.assertEqual(
            events.named("protocol_violation")[0]["kind"], "MalformedFrame"
        )
        a.send_to(2, b"after")
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(c.received(2, 1), [b"before", b"after"])


class StoreTests(SynchronousTestCase):
    def test_commit_failure_refuses_sends(self) -> None:
        """
        When the store fails a commit, the sends in it fail with StoreError,
        nothing of them is transmitted, and later sends work.
        """
        c = Cluster()
        backend = FlakyBackend(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        a = c.start(1, backend)
        c.start(2)
        c.run_until(lambda: a.connected_peers())
        backend.fail_commits = 1
        bad = [a.send_to(2, b"lost1"), a.send_to(2, b"lost2")]
        c.clock.advance(0)
        for d in bad:
            self.failureResultOf(d, StoreError)
        good = a.send_to(2, b"kept")
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(self.successResultOf(good).message_id, 1)
        self.assertEqual(c.received(2, 1), [b"kept"])
        self.flushLoggedErrors(StoreError)

    def test_next_commit_before_receipts(self) -> None:
        """
        When a commit succeeds, the next one (with what was sent while it
        ran) is handed to the store before the finished one's receipts
        fire, so the store writes while they are given.
        """
        c = Cluster()
        backend = SlowCommits(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage())), c.clock, 0.01
        )
        commits: list[int] = []
        commit = backend.commit

        def counted(batch: StoreBatch) -> Deferred[object]:
            commits.append(sum(len(m) for _, m in batch.messages.values()))
            return commit(batch)

        backend.commit = counted  # type: ignore[method-assign]
        a = c.start(1, backend)
        c.start(2)
        c.run_until(lambda: a.connected_peers())
        c.clock.advance(1)
        del commits[:]
        seen: list[int] = []
        first = a.send_to(2, b"first")
        c.clock.advance(0)
        self.assertEqual(commits, [1])
        second = a.send_to(2, b"second")
        first.addCallback(lambda _: seen.append(len(commits)))
        c.clock.advance(0.01)
        self.assertEqual(seen, [2])
        self.assertEqual(commits, [1, 1])
        c.run_until(lambda: not a.pending_outbound())
        self.assertEqual(self.successResultOf(second).message_id, 2)
        self.assertEqual(c.received(2, 1), [b"first", b"second"])

    def test_receipts_in_order_with_a_store_that_commits_at_once(self) -> None:
        """
        With a store whose commits fire at once, a backlog committed in
        steps (the next started from inside the previous one's outcome)
        and sends made by receipt callbacks still get their receipts in
        send order.
        """
        self.patch(_committer, "COMMIT_MESSAGES", 3)
        c = Cluster()
        a = c.start(1)
        c.start(2)
        c.run_until(lambda: a.connected_peers())
        order: list[int] = []

        def record(receipt: Receipt) -> None:
            order.append(receipt.message_id)
            if receipt.message_id == 5:
                # Sent while a commit's outcome is handled.
                a.send_to(2, b"late").addCallback(record)

        for i in range(10):
            a.send_to(2, b"%d" % i).addCallback(record)
        c.run_until(lambda: len(order) == 11 and not a.pending_outbound())
        self.assertEqual(order, list(range(1, 12)))
        self.assertEqual(c.received(2, 1), [b"%d" % i for i in range(10)] + [b"late"])

    def test_ack_only_after_mark_committed(self) -> None:
        """
        The receiver acknowledges only after the commit recording the
        delivery mark has fired; a failed mark commit is retried.
        """
        c = Cluster()
        a = c.start(1)
        backend = FlakyBackend(
            InMemoryBackend(c.storages.setdefault(2, InMemoryStorage()))
        )
        c.start(2, backend)
        c.run_until(lambda: a.connected_peers())
        backend.hold_commits = True
        d = a.send_to(2, b"x")
        c.run_until(lambda: c.received(2, 1) == [b"x"])
        receipt = self.successResultOf(d)
        c.clock.advance(10)
        self.assertEqual(a.pending_outbound(), {2: 1})
        self.assertEqual(c.storages[1].pending(2), [b"x"])
        backend.hold_commits = False
        backend.fail_commits = 1
        backend.release(StoreError("disk hiccup"))
        c.run_until(lambda: not a.pending_outbound())
        self.successResultOf(receipt.acknowledged)
        self.flushLoggedErrors(StoreError)

    def test_read_overtaken_by_acknowledgement(self) -> None:
        """
        An outbox read still in flight when an acknowledgement moves past
        its starting point (a store whose reads run apart from its commits,
        as SQLite's reader thread does) fails in the store; that is not a
        store failure: ILM logs no outbox_read_failed, backs off nothing,
        and reads again from the new point at once.  (Found by the
        simulator on its SQLite store, seed 57 of ``--store sqlite``.)
        """
        events = Events(self)
        clock = Clock()
        storage = InMemoryStorage()
        storage.incarnation = "a" * 32
        storage.apply(StoreBatch(messages={2: (1, numbered(10))}))
        backend = LaggingReads(InMemoryBackend(storage))
        network = ScriptedNetwork(1)
        node = ILM(backend, lambda m: None, network, config=Config(), clock=clock)
        node.startService()
        clock.advance(0)
        network.establish(2)
        hello = Hello(
            version=PROTOCOL_VERSION,
            incarnation="b" * 32,
            window=64,
            window_bytes=1 << 20,
            first_unacked=1,
            last_position=0,
            known_incarnation="a" * 32,
            delivered=0,
        )
        network.receive(2, _frames.encode_resume(hello))
        clock.advance(0)
        self.assertEqual(backend.pending(), [(2, 0)])
        # The peer acknowledges 6 (delivered in an earlier life of this
        # node); the acknowledgement is committed before the read runs.
        network.receive(2, _frames.encode_ack(6, 6))
        clock.advance(1)
        self.assertEqual(storage.outboxes[2].acked, 6)
        backend.release()
        clock.advance(0)
        self.assertEqual(events.named("outbox_read_failed"), [])
        self.assertEqual(backend.pending(), [(2, 6)])
        backend.release()
        clock.advance(0)
        sent = [
            _frames.decode_messages(frame, 1 << 20)
            for frame in network.sent
            if frame[0] == _frames.MESSAGES
        ]
        self.assertEqual(sent, [(7, numbered(4, start=6))])

    def test_memory_bounded_by_window(self) -> None:
        """
        With a large backlog, the sender keeps at most twice the window in
        memory and reads the rest from the store in batches.
        """
        c = Cluster(Config(window=64, read_batch=32))
        a = c.start(1)
        for p in numbered(20_000):
            a.send_to(2, p)
        c.clock.advance(0)
        c.crash(1)
        reads = CountingBackend(InMemoryBackend(c.storages[1]))
        a = c.start(1, reads)
        c.start(2)
        peak = 0
        while a.pending_outbound():
            c.clock.advance(0.001)
            peak = max(peak, a.peer_status(2).cached)
        self.assertLessEqual(peak, 128)
        self.assertGreater(reads.reads, 20_000 // 32 - 1)
        self.assertEqual(len(c.received(2, 1)), 20_000)


class ShutdownTests(SynchronousTestCase):
    def test_drains(self) -> None:
        """
        shutdown refuses new sends at once and fires only after every pending
        message has been acknowledged.
        """
        c = Cluster(Config(window=10))
        a = c.start(1)
        c.start(2)
        for p in numbered(500):
            a.send_to(2, p)
        d = a.shutdown(timeout=60)
        self.failureResultOf(a.send_to(2, b"late"), NotRunning)
        self.assertNoResult(d)
        c.run_until(lambda: d.called)
        self.successResultOf(d)
        self.assertEqual(c.received(2, 1), numbered(500))
        self.assertEqual(c.outbox(1, 2), [])
        self.assertTrue(c.backends[1].closed)

    def test_store_that_never_closes(self) -> None:
        """
        A backend whose close never ends (its thread gone) does not hold
        the shutdown forever: after the close's grace it fails with
        ShutdownTimeout and logs store_close_timeout.
        """

        class NeverCloses(WrappedBackend):
            def close(self) -> Deferred[None]:
                return Deferred()

        c = Cluster()
        a = c.start(1, NeverCloses(InMemoryBackend(InMemoryStorage())))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        started = c.clock.seconds()
        d = a.shutdown(timeout=1)
        for _ in range(49):
            c.clock.advance(0.1)
        self.assertNoResult(d)
        c.run_until(lambda: d.called, timeout=60)
        self.assertLess(c.clock.seconds() - started, _lifecycle.CLOSE_GRACE + 2)
        self.failureResultOf(d, ShutdownTimeout)
        self.assertIn("store_close_timeout", [e.get("ilm_event") for e in events])
        self.flushLoggedErrors()

    def test_timeout(self) -> None:
        """
        With the peer unreachable, shutdown fails with ShutdownTimeout after
        the timeout, reporting what is pending; the messages stay stored and
        are delivered after a restart.
        """
        c = Cluster()
        a = c.start(1)
        sends = [a.send_to(2, p) for p in numbered(7)]
        c.clock.advance(0)
        receipts = [self.successResultOf(s) for s in sends]
        ack = receipts[0].acknowledged
        d = a.shutdown(timeout=5)
        c.clock.advance(4.9)
        self.assertNoResult(d)
        c.run_until(lambda: d.called)
        failure = self.failureResultOf(d, ShutdownTimeout)
        self.assertEqual(failure.value.pending, {2: 7})
        stopped = self.failureResultOf(ack, StoppedBeforeAcknowledged)
        self.assertNotIsInstance(stopped.value, SendRefused)
        self.assertEqual((stopped.value.peer_id, stopped.value.message_id), (2, 1))
        self.assertEqual(c.outbox(1, 2), numbered(7))
        c.start(1)
        c.start(2)
        c.run_until(lambda: len(c.received(2, 1)) == 7)
        self.assertEqual(c.received(2, 1), numbered(7))

    def test_shutdown_from_inside_delivery(self) -> None:
        """
        An application that shuts its node down from inside a delivery (a
        DeferredQueue fires its getter synchronously) still records that
        delivery and acknowledges it before the links close, so the sender
        drains too.
        """
        c = Cluster()
        a = c.start(1)
        queue: DeferredQueue[object] = DeferredQueue()
        b = ILM(InMemoryBackend(), queue, c.network.add_peer(2), clock=c.clock)
        b.startService()
        stopped: list[Deferred[None]] = []
        queue.get().addCallback(lambda _: stopped.append(b.shutdown(10)))
        a.send_to(2, b"last")
        c.run_until(lambda: stopped and stopped[0].called)
        self.successResultOf(stopped[0])
        self.assertEqual(a.pending_outbound(), {})
        d = a.shutdown(1)
        c.run_until(lambda: d.called)
        self.successResultOf(d)

    def test_drain_completed_by_handshake(self) -> None:
        """
        A shutdown waiting for acknowledgements finishes when they arrive in
        the peer's handshake after a reconnect (the ACK frame itself was
        lost), not only in an ACK frame.
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        c.run_until(lambda: a.connected_peers())
        c.network.drop_next(2, 1, 100)
        a.send_to(2, b"x")
        c.run_until(lambda: c.received(2, 1) == [b"x"])
        c.clock.advance(0.5)
        d = a.shutdown(timeout=30)
        c.clock.advance(1)
        self.assertNoResult(d)
        c.network._drop.clear()
        c.network.cut(1, 2)
        c.network.restore(1, 2)
        c.clock.advance(0)
        c.clock.advance(0)
        self.successResultOf(d)

    def test_crash_during_shutdown(self) -> None:
        """
        A node killed while its shutdown is in progress runs no more of that
        shutdown: it neither stops its network nor closes its store, and the
        shutdown's Deferred fails with NotRunning.
        """
        c = Cluster()
        a = c.start(1)
        a.send_to(2, b"never acknowledged")
        d = a.shutdown(timeout=5)
        c.clock.advance(1)
        backend = c.backends[1]
        c.crash(1)
        c.clock.advance(10)
        self.failureResultOf(d, NotRunning)
        self.assertFalse(backend.closed)

    def test_busy_receiver(self) -> None:
        """
        A node that keeps receiving while it shuts down (its commits slower
        than the messages arriving) still finishes its shutdown: it waits for
        one commit after the links close, not for a moment with nothing
        pending.
        """
        c = Cluster()
        a = c.start(1)
        backend = SlowCommits(
            InMemoryBackend(c.storages.setdefault(2, InMemoryStorage())), c.clock, 0.003
        )
        b = c.start(2, backend)
        c.run_until(lambda: a.connected_peers())

        def keep_sending() -> None:
            if a.state == "running":
                a.send_to(2, b"more")
                c.clock.callLater(0.001, keep_sending)

        keep_sending()
        c.clock.advance(0.05)
        d = b.shutdown(timeout=5)
        c.run_until(lambda: d.called, timeout=10)
        self.successResultOf(d)
        self.assertLess(c.clock.seconds(), 1)

    def test_failed_commit_completes_drain(self) -> None:
        """
        A shutdown waiting on sends whose commit then fails finishes at once
        (nothing of them is pending any more) instead of waiting out its
        timeout.
        """
        c = Cluster()
        backend = FlakyBackend(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        a = c.start(1, backend)
        backend.hold_commits = True
        sent = a.send_to(2, b"doomed")
        c.clock.advance(0)
        d = a.shutdown(timeout=30)
        c.clock.advance(0.1)
        backend.hold_commits = False
        backend.release(StoreError("disk gone"))
        c.run_until(lambda: d.called)
        self.successResultOf(d)
        self.failureResultOf(sent, StoreError)
        self.assertLess(c.clock.seconds(), 5)
        self.flushLoggedErrors(StoreError)

    def test_shutdown_while_starting(self) -> None:
        """
        A shutdown whose timeout expires while the store is still opening
        fails with ShutdownTimeout; when the store opens later, the node
        closes it again instead of coming to life.
        """
        c = Cluster()
        c.start(2)
        inner = InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        backend = PausedOpen(inner)
        node = ILM(backend, lambda m: None, c.network.add_peer(1), clock=c.clock)
        started = node.when_started()
        node.startService()
        d = node.shutdown(timeout=1)
        c.run_until(lambda: d.called)
        self.failureResultOf(d, ShutdownTimeout)
        backend.release()
        c.clock.advance(1)
        self.failureResultOf(started, NotRunning)
        self.assertTrue(inner.closed)
        self.assertEqual(node.connected_peers(), frozenset())
        self.failureResultOf(node.send_to(2, b"x"), NotRunning)

    def test_idempotent(self) -> None:
        """
        Calling shutdown twice gives the same outcome to both callers.
        """
        c = Cluster()
        a = c.start(1)
        first, second = a.shutdown(1), a.shutdown(1)
        c.run_until(lambda: first.called and second.called)
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(a.shutdown())


class DeterminismTests(SynchronousTestCase):
    def test_acknowledgements_follow_the_commit_order(self) -> None:
        """
        After a commit that records delivery marks for several peers, the
        ACKs go out in the order of the marks in the batch, not in an order
        that depends on object addresses, so that a run on a Clock replays
        exactly.
        """
        c = Cluster()
        c.start(0)
        spokes = list(range(1, 9))
        for spoke in spokes:
            c.start(spoke)
        c.clock.advance(1)
        acks: list[object] = []

        def policy(source: object, destination: object, frame: bytes) -> list[float]:
            if source == 0 and frame[0] == _frames.ACK:
                acks.append(destination)
            return [0.0]

        c.network.fault_policy = policy
        for spoke in reversed(spokes):
            c.nodes[spoke].send_to(0, b"x")
        c.run_until(lambda: len(acks) >= len(spokes))
        self.assertEqual(acks, list(reversed(spokes)))


@implementer(IBackend)
class WrappedBackend:
    """
    A backend that hands everything to ``inner``; each wrapper below
    changes one thing.
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        self._inner = inner

    def open(self) -> Deferred[object]:
        return self._inner.open()  # type: ignore[return-value]

    def commit(self, batch: StoreBatch) -> Deferred[object]:
        return self._inner.commit(batch)  # type: ignore[return-value]

    def read_outbound(
        self, peer_id: object, after: int, limit: int, max_bytes: int
    ) -> Deferred[object]:
        return self._inner.read_outbound(peer_id, after, limit, max_bytes)  # type: ignore[arg-type, return-value]

    def close(self) -> Deferred[None]:
        return self._inner.close()


class PausedOpen(WrappedBackend):
    """
    A backend wrapper whose open() waits for release().
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        super().__init__(inner)
        self._open: Deferred[object] = Deferred()

    def release(self) -> None:
        self._inner.open().chainDeferred(self._open)

    def open(self) -> Deferred[object]:
        return self._open


class FlakyBackend(WrappedBackend):
    """
    A backend wrapper that can fail or hold commits.
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        super().__init__(inner)
        self.fail_commits = 0
        self.hold_commits = False
        self._held: list[tuple[StoreBatch, Deferred[object]]] = []

    def commit(self, batch: StoreBatch) -> Deferred[object]:
        if self.hold_commits:
            d: Deferred[object] = Deferred()
            self._held.append((batch, d))
            return d
        if self.fail_commits:
            self.fail_commits -= 1
            return fail(StoreError("injected commit failure"))
        return super().commit(batch)

    def release(self, error: Exception | None = None) -> None:
        held, self._held = self._held, []
        for batch, d in held:
            if error is not None:
                d.errback(error)
            else:
                self._inner.commit(batch).chainDeferred(d)


class CountingBackend(WrappedBackend):
    """
    A backend wrapper counting outbox reads (closing it leaves the inner
    backend open).
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        super().__init__(inner)
        self.reads = 0
        self.closed = False

    def read_outbound(
        self, peer_id: object, after: int, limit: int, max_bytes: int
    ) -> Deferred[object]:
        self.reads += 1
        return super().read_outbound(peer_id, after, limit, max_bytes)

    def close(self) -> Deferred[None]:
        return succeed(None)


class FailingReads(WrappedBackend):
    """
    A backend wrapper whose first ``failures`` outbox reads fail.
    """

    def __init__(self, inner: InMemoryBackend, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures
        self.closed = False

    def read_outbound(
        self, peer_id: object, after: int, limit: int, max_bytes: int
    ) -> Deferred[object]:
        if self.failures:
            self.failures -= 1
            return fail(StoreError("injected read failure"))
        return super().read_outbound(peer_id, after, limit, max_bytes)


class SlowCommits(WrappedBackend):
    """
    A backend wrapper whose commits take ``delay`` seconds of clock time.
    """

    def __init__(self, inner: InMemoryBackend, clock: object, delay: float) -> None:
        super().__init__(inner)
        self._clock = clock
        self._delay = delay
        self.closed = False

    def commit(self, batch: StoreBatch) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        result = self._inner.commit(batch)
        self._clock.callLater(self._delay, result.chainDeferred, d)  # type: ignore[attr-defined]
        return d

    def close(self) -> Deferred[None]:
        self.closed = True
        return super().close()


class LaggingReads(WrappedBackend):
    """
    A backend wrapper whose outbox reads run only when released (as with a
    store whose reader lags behind its commits).
    """

    def __init__(self, inner: InMemoryBackend) -> None:
        super().__init__(inner)
        self._reads: list[tuple[object, int, int, int, Deferred[object]]] = []

    def pending(self) -> list[tuple[object, int]]:
        return [(peer_id, after) for peer_id, after, _, _, _ in self._reads]

    def release(self) -> None:
        reads, self._reads = self._reads, []
        for peer_id, after, limit, max_bytes, d in reads:
            self._inner.read_outbound(peer_id, after, limit, max_bytes).chainDeferred(d)  # type: ignore[arg-type]

    def read_outbound(
        self, peer_id: object, after: int, limit: int, max_bytes: int
    ) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self._reads.append((peer_id, after, limit, max_bytes, d))
        return d


@implementer(INetwork)
class ScriptedNetwork:
    """
    A network whose links and incoming frames the test makes by hand; it
    records what the node sends.
    """

    def __init__(self, local_id: object) -> None:
        self.local_id = local_id
        self.receiver: IFrameReceiver | None = None
        self.links: set[object] = set()
        self.sent: list[bytes] = []

    def start(self, receiver: IFrameReceiver) -> None:
        self.receiver = receiver

    def stop(self) -> None:
        self.receiver = None

    def connected_peers(self) -> frozenset[object]:
        return frozenset(self.links)

    def send_frames(self, peer_id: object, frames: list[bytes]) -> None:
        self.sent.extend(frames)

    def close_link(self, peer_id: object, reason: Exception) -> None:
        self.links.discard(peer_id)

    def establish(self, peer_id: object) -> None:
        assert self.receiver is not None
        self.links.add(peer_id)
        self.receiver.link_established(peer_id)

    def receive(self, peer_id: object, frame: bytes) -> None:
        assert self.receiver is not None
        self.receiver.frame_received(peer_id, frame)


def wait(c: Cluster, d: Deferred[Receipt]) -> Deferred[Receipt]:
    c.clock.advance(0)
    return d


class UnknownPeerTests(TestCase):
    """
    Over a real ``StreamNetwork`` (loopback TCP, pre-shared keys, the real
    reactor): a peer the network could never authenticate is refused at
    ``send_to``.
    """

    timeout = 30

    async def test_typo_refused_real_peer_reached(self) -> None:
        """
        A node holding a key for peer 2 only: send_to(3), send_to("2") and
        send_to("reciever") fail at once with UnknownPeer (a SendRefused;
        nothing stored, no peer state made), while send_to(2) is delivered
        to the real peer 2; the network is asked once per peer, not per
        message.
        """
        from twisted.internet import reactor

        from ilm.network import StreamNetwork

        key = b"k" * 32
        inbox: list[bytes] = []
        receiver_net = StreamNetwork(
            2, listen=["tcp:0:interface=127.0.0.1"], keys={1: key}, reactor=reactor
        )
        receiver = await ILM.create(
            InMemoryBackend(), lambda m: inbox.append(m.contents), receiver_net
        )
        self.addCleanup(receiver.shutdown, 5)
        port = receiver_net.listening_addresses()[0].port  # type: ignore[attr-defined]
        sender_net = StreamNetwork(
            1,
            peers={2: f"tcp:host=127.0.0.1:port={port}"},
            keys={2: key},
            reactor=reactor,
        )
        asked: list[object] = []
        can_link = sender_net.can_link

        def counting(peer_id: object) -> bool:
            asked.append(peer_id)
            return can_link(peer_id)  # type: ignore[arg-type]

        sender_net.can_link = counting  # type: ignore[method-assign]
        sender = await ILM.create(InMemoryBackend(), lambda m: None, sender_net)
        self.addCleanup(sender.shutdown, 5)
        for typo in (3, "2", "reciever"):
            error = await self.assertFailure(sender.send_to(typo, b"lost"), UnknownPeer)
            self.assertIsInstance(error, SendRefused)
            self.assertIn(repr(typo), str(error))
        receipts = [await sender.send_to(2, b"m%d" % n) for n in range(20)]
        await receipts[-1].acknowledged
        self.assertEqual(inbox, [b"m%d" % n for n in range(20)])
        self.assertEqual(asked, [3, "2", "reciever", 2])
        self.assertEqual(set(sender.peer_status()), {2})
        self.assertEqual(sender.pending_outbound(), {})


class StartLineTests(SynchronousTestCase):
    def test_start_line_says_what_is_true(self) -> None:
        """
        The start line counts (and lists, as plain values) the peers the
        store holds state for and the peers the network dials; the
        messenger itself logs link events at debug level only (the network
        logs them at info).
        """
        from twisted.logger import LogLevel

        from ilm.network import StreamNetwork

        from .stream_support import Switchboard
        from .test_stream_network import pair_key

        clock = Clock()
        board = Switchboard(clock, latency=0.001)
        events = Events(self)
        storage = InMemoryStorage()
        storage.apply(StoreBatch(messages={7: (1, [b"x"]), "seven": (1, [b"y", b"z"])}))
        network = StreamNetwork(
            1,
            peers={2: board.client("2")},
            keys={2: pair_key(1, 2)},
            reactor=clock,
        )
        node = ILM(InMemoryBackend(storage), lambda m: None, network, clock=clock)
        node.startService()
        clock.advance(0)
        [started] = events.named("started")
        self.assertEqual(started["stored_count"], 2)
        self.assertEqual(started["stored_peers"], [7, "seven"])
        self.assertEqual(started["pending"], 3)
        self.assertEqual((started["dialled_count"], started["dialled_peers"]), (1, [2]))
        from twisted.logger import formatEvent

        self.assertIn(
            "holds state for 2 peer(s) [7, 'seven'], 3 message(s) pending; its "
            "network dials 1 peer(s)",
            formatEvent(started),
        )
        seen: list[dict[str, object]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        node._router.link_established(2)
        node._router.link_lost(2, "gone")
        self.assertEqual(
            [
                e
                for e in seen
                if e.get("log_namespace") == "ilm"
                and e.get("log_level") != LogLevel.debug
            ],
            [],
        )
        self.assertEqual(len([e for e in seen if e.get("log_namespace") == "ilm"]), 2)
        done = node.shutdown(1)
        settle(clock, 10)
        self.failureResultOf(done, ShutdownTimeout)


class SendManyTests(SynchronousTestCase):
    def test_receipts_in_order_one_commit(self) -> None:
        """
        ``send_many`` stores its messages in one commit and fires once with
        their receipts, consecutive ids in order after what ``send_to``
        stored; the peer receives them in order.
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        first = a.send_to(2, b"one")
        commits = a.stats().commits
        many = a.send_many(2, [b"two", bytearray(b"three"), memoryview(b"four")])
        c.run_until(lambda: many.called)
        receipts = self.successResultOf(many)
        self.assertEqual(self.successResultOf(first).message_id, 1)
        self.assertEqual(
            [(r.peer_id, r.message_id) for r in receipts], [(2, 2), (2, 3), (2, 4)]
        )
        self.assertEqual(a.stats().commits, commits + 1)
        acknowledged = receipts[-1].acknowledged
        c.run_until(lambda: acknowledged.called)
        self.assertEqual(c.received(2, 1), [b"one", b"two", b"three", b"four"])
        self.assertEqual(a.stats().sent, 4)

    def test_mixed_in_one_commit(self) -> None:
        """
        Lists and single sends accepted before one commit get their
        receipts in the order they were accepted, ids consecutive.
        """
        c = Cluster()
        a = c.start(1)
        c.start(2)
        c.run_until(lambda: a.connected_peers())
        commits = a.stats().commits
        sends = [
            a.send_to(2, b"1"),
            a.send_many(2, [b"2", b"3", b"4"]),
            a.send_to(2, b"5"),
            a.send_many(2, [b"6", b"7"]),
            a.send_to(2, b"8"),
        ]
        c.run_until(lambda: all(d.called for d in sends))
        self.assertEqual(a.stats().commits, commits + 1)
        ids = []
        for d in sends:
            got = self.successResultOf(d)
            ids.append(
                [r.message_id for r in got] if isinstance(got, list) else got.message_id
            )
        self.assertEqual(ids, [1, [2, 3, 4], 5, [6, 7], 8])
        c.run_until(lambda: len(c.received(2, 1)) == 8)
        self.assertEqual(c.received(2, 1), [b"%d" % i for i in range(1, 9)])

    def test_all_or_nothing(self) -> None:
        """
        A list that does not fit the outbox, or holds one message too large,
        is refused whole (one refusal counted); nothing of it is stored.
        """
        c = Cluster(Config(max_outbox_messages=3, max_message_size=10))
        a = c.start(1)
        self.failureResultOf(a.send_many(2, numbered(4)), OutboxFull)
        self.failureResultOf(a.send_many(2, [b"ok", b"x" * 11]), MessageTooLarge)
        self.assertEqual(a.stats().refused, {"outbox_full": 1, "message_too_large": 1})
        fits = a.send_many(2, numbered(3))
        c.clock.advance(0)
        self.assertEqual(len(self.successResultOf(fits)), 3)
        self.assertEqual(a.last_message_id(2), 3)
        self.failureResultOf(a.send_many(2, [b"more"]), OutboxFull)

    def test_failed_commit_fails_the_list(self) -> None:
        """
        A commit that fails fails the list's one Deferred, once, and frees
        its room in the outbox.
        """
        c = Cluster()
        backend = FlakyBackend(
            InMemoryBackend(c.storages.setdefault(1, InMemoryStorage()))
        )
        a = c.start(1, backend)
        backend.fail_commits = 1
        many = a.send_many(2, numbered(5))
        c.clock.advance(0)
        self.failureResultOf(many, StoreError)
        self.assertEqual(len(self.flushLoggedErrors(StoreError)), 1)
        self.assertEqual(a.pending_outbound(), {})
        again = a.send_many(2, numbered(2))
        c.clock.advance(1)
        self.assertEqual([r.message_id for r in self.successResultOf(again)], [1, 2])

    def test_before_start_and_empty(self) -> None:
        """
        Before the start, a list waits in line with single sends and keeps
        its place; an empty list gives an empty list; a lone bytes value or
        a list of non-bytes is a TypeError.
        """
        c = Cluster()
        storage = c.storages.setdefault(1, InMemoryStorage())
        backend = PausedOpen(InMemoryBackend(storage))
        a = c.start(1, backend)
        one = a.send_to(2, b"a")
        many = a.send_many(2, [b"b", b"c"])
        last = a.send_to(2, b"d")
        self.assertEqual(self.successResultOf(a.send_many(2, [])), [])
        self.assertRaises(TypeError, a.send_many, 2, b"abc")
        self.assertRaises(TypeError, a.send_many, 2, ["text"])
        backend.release()
        c.clock.advance(0)
        self.assertEqual(self.successResultOf(one).message_id, 1)
        self.assertEqual([r.message_id for r in self.successResultOf(many)], [2, 3])
        self.assertEqual(self.successResultOf(last).message_id, 4)

    def test_refused_when_not_running(self) -> None:
        """
        A list sent to a node shutting down, or to its own id, is refused.
        """
        c = Cluster()
        a = c.start(1)
        self.failureResultOf(a.send_many(1, [b"x"]), SendToSelf)
        a.shutdown()
        self.failureResultOf(a.send_many(2, [b"x"]), NotRunning)


class InternalErrorTests(SynchronousTestCase):
    def test_internal_error_is_not_the_peers_fault(self) -> None:
        """
        A bug while handling a frame logs an internal_error and closes the
        link with a plain ILMError, not a ProtocolViolation (which the
        network would count against the peer); the link comes back and the
        stream completes once the bug is gone.
        """
        from ilm._sender import PeerSender
        from ilm.errors import ILMError, ProtocolViolation

        c = Cluster()
        a, b = c.start(1), c.start(2)
        c.run_until(lambda: a.connected_peers() and b.connected_peers())
        reasons: list[Exception] = []
        close_link = b._network.close_link

        def recording(peer_id: object, reason: Exception) -> None:
            reasons.append(reason)
            close_link(peer_id, reason)  # type: ignore[arg-type]

        b._network.close_link = recording  # type: ignore[method-assign]
        on_ack = PeerSender.on_ack

        def broken(self: PeerSender, delivered: int, received: int) -> None:
            raise RuntimeError("simulated bug")

        self.patch(PeerSender, "on_ack", broken)
        events = Events(self)
        sent = b.send_to(1, b"m")
        c.run_until(lambda: reasons)
        [reason] = reasons
        self.assertIsInstance(reason, ILMError)
        self.assertNotIsInstance(reason, ProtocolViolation)
        self.assertEqual(len(events.named("internal_error")), 1)
        self.assertEqual(events.named("protocol_violation"), [])
        self.flushLoggedErrors(RuntimeError)
        self.patch(PeerSender, "on_ack", on_ack)
        receipt = self.successResultOf(sent)
        acknowledged = receipt.acknowledged
        c.run_until(lambda: acknowledged.called)
        self.assertEqual(c.received(1, 2), [b"m"])


class CommitStepTests(SynchronousTestCase):
    """
    A backlog larger than ``COMMIT_MESSAGES`` is stored in several commits,
    one after the other, so that the first of it is transmitted while the
    rest is written.
    """

    def test_backlog_in_steps(self) -> None:
        """
        Each commit takes at most ``COMMIT_MESSAGES`` of a peer's messages,
        or more to keep a ``send_many`` list whole; receipts come in
        order; a barrier asked for before waits for the last step.
        """
        self.patch(_committer, "COMMIT_MESSAGES", 10)
        sizes: list[int] = []

        class Recording(InMemoryBackend):
            def commit(self, batch: StoreBatch) -> Any:
                if batch.messages:
                    sizes.append(sum(len(c) for _, c in batch.messages.values()))
                return super().commit(batch)

        c = Cluster()
        a = c.start(1, backend=Recording(InMemoryStorage()))
        c.start(2)
        c.run_until(lambda: a.connected_peers())
        sends: list[Deferred[Any]] = [a.send_to(2, b"%d" % i) for i in range(1, 16)]
        sends.append(a.send_many(2, [b"%d" % i for i in range(16, 24)]))
        sends += [a.send_to(2, b"%d" % i) for i in range(24, 29)]
        fired_with: list[int] = []
        a._committer.barrier().addCallback(
            lambda _: fired_with.append(sum(d.called for d in sends))
        )
        c.run_until(lambda: bool(fired_with))
        # 1-10; 11-15 and the list 16-23 whole; 24-28.
        self.assertEqual(sizes, [10, 13, 5])
        self.assertEqual(fired_with, [len(sends)])
        ids = []
        for d in sends:
            got = self.successResultOf(d)
            ids += (
                [r.message_id for r in got]
                if isinstance(got, list)
                else [got.message_id]
            )
        self.assertEqual(ids, list(range(1, 29)))
        c.run_until(lambda: len(c.received(2, 1)) == 28)
        self.assertEqual(c.received(2, 1), [b"%d" % i for i in range(1, 29)])
