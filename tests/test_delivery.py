"""
Tests for ilm._delivery: the delivery adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredQueue,
    QueueOverflow,
    ensureDeferred,
    succeed,
)
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ilm import BatchQueueDelivery, CallableDelivery, Config, Message, QueueDelivery
from ilm._deliverer import MAX_RETRY_AFTER
from ilm.errors import DeliveryFailed
from ilm.interfaces import IBatchDelivery

from .support import Cluster, numbered

MESSAGE = Message(1, 2, 1, b"x")


class AdapterTests(SynchronousTestCase):
    def test_queue(self) -> None:
        """
        QueueDelivery puts the message on the queue; a full queue raises.
        """
        queue: DeferredQueue[object] = DeferredQueue(size=1)
        delivery = QueueDelivery(queue)
        self.assertIsNone(delivery.deliver(MESSAGE))
        self.assertIs(self.successResultOf(queue.get()), MESSAGE)
        delivery.deliver(MESSAGE)
        self.assertRaises(QueueOverflow, delivery.deliver, MESSAGE)

    def test_callable_results(self) -> None:
        """
        CallableDelivery passes None and Deferreds through, turns coroutines
        into Deferreds, and takes other return values for "delivered"
        (``delivery_outcome``, the rule providers follow too).
        """
        self.assertIsNone(CallableDelivery(lambda m: None).deliver(MESSAGE))
        d: Deferred[None] = succeed(None)
        self.assertIs(CallableDelivery(lambda m: d).deliver(MESSAGE), d)
        self.assertIsNone(CallableDelivery(lambda m: 42).deliver(MESSAGE))
        seen = []

        async def handler(message: Message) -> None:
            seen.append(message)

        result = CallableDelivery(handler).deliver(MESSAGE)
        self.assertIsInstance(result, Deferred)
        self.successResultOf(result)
        self.assertEqual(seen, [MESSAGE])

    def test_callable_raises(self) -> None:
        """
        An exception from the callable propagates (ILM treats it as a failed
        delivery).
        """

        def refuse(message: Message) -> None:
            raise ValueError("no")

        self.assertRaises(ValueError, CallableDelivery(refuse).deliver, MESSAGE)


class RetryAfterTests(SynchronousTestCase):
    """
    A target that fails with ``DeliveryFailed(retry_after=...)`` (the
    webhook's ``Retry-After``) is not tried again before that many seconds,
    and never made to wait longer than an hour.
    """

    def attempts_after(self, retry_after: float) -> list[float]:
        """
        Send one message from "a" to "b", whose target refuses the first
        attempt asking for ``retry_after`` seconds; the times of b's
        attempts.
        """
        cluster = Cluster(Config(delivery_retry=0.1, max_delivery_retry=30.0))
        attempts: list[float] = []

        def target(message: Message) -> None:
            attempts.append(cluster.clock.seconds())
            if len(attempts) == 1:
                raise DeliveryFailed("busy", retry_after=retry_after)

        cluster.recorders["b"] = target  # type: ignore[assignment]
        a = cluster.start("a")
        cluster.start("b")
        sent = a.send_to("b", b"x")
        cluster.run_until(lambda: len(attempts) == 2, timeout=4 * 3600)
        self.successResultOf(sent)
        # The refusal was logged (with its traceback, the first time).
        self.assertEqual(len(self.flushLoggedErrors(DeliveryFailed)), 1)
        return attempts

    def test_waits_as_asked(self) -> None:
        """
        ``retry_after`` longer than the backoff (0.1 s) sets the wait.
        """
        first, second = self.attempts_after(120.0)
        self.assertGreaterEqual(second - first, 120.0)
        self.assertLess(second - first, 121.0)

    def test_short_request_keeps_backoff(self) -> None:
        """
        ``retry_after`` shorter than the backoff does not shorten it.
        """
        first, second = self.attempts_after(0.0)
        self.assertGreaterEqual(second - first, 0.1)
        self.assertLess(second - first, 1.0)

    def test_capped_at_an_hour(self) -> None:
        """
        A target asking for a day is tried again after an hour.
        """
        first, second = self.attempts_after(86400.0)
        self.assertAlmostEqual(second - first, MAX_RETRY_AFTER, delta=1.0)
        self.assertEqual(MAX_RETRY_AFTER, 3600.0)


@implementer(IBatchDelivery)
class ListRecorder:
    """
    An ``IBatchDelivery`` target recording the lists it is given; it can
    be told to fail some calls, or to hold them until a Deferred fires.
    """

    def __init__(self) -> None:
        self.calls: list[list[Message]] = []
        self.failures_left = 0
        self.hold: Deferred[None] | None = None
        self.pending = 0

    def deliver(self, message: Message) -> None:
        raise AssertionError("deliver_many is used for an IBatchDelivery")

    def deliver_many(self, messages: Sequence[Message]) -> Deferred[None] | None:
        assert self.pending == 0, "a call while the previous one is pending"
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("the batch was refused")
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.pending += 1

            def taken(_: object) -> None:
                self.pending -= 1
                self.calls.append(list(messages))

            return hold.addCallback(taken)
        self.calls.append(list(messages))
        return None

    def contents(self) -> list[bytes]:
        return [m.contents for call in self.calls for m in call]


class BatchDeliveryTests(SynchronousTestCase):
    """
    A target providing ``IBatchDelivery`` gets lists of consecutive messages
    from one sender, exactly once and in order, in fewer calls than
    messages; a refused list is delivered again, whole, holding later ones.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(Config(delivery_retry=0.1, max_delivery_retry=1.0))
        self.target = ListRecorder()
        self.cluster.recorders["b"] = self.target  # type: ignore[assignment]
        self.a = self.cluster.start("a")
        self.cluster.start("b")

    def send(self, contents: list[bytes]) -> None:
        for c in contents:
            self.a.send_to("b", c)

    def check_exactly_once_in_order(self, expected: list[bytes]) -> None:
        self.assertEqual(self.target.contents(), expected)
        ids = [m.message_id for call in self.target.calls for m in call]
        self.assertEqual(ids, list(range(1, len(expected) + 1)))
        for call in self.target.calls:
            self.assertEqual({m.source_id for m in call}, {"a"})

    def test_lists_in_order(self) -> None:
        expected = numbered(500)
        self.send(expected)
        self.cluster.run_until(lambda: len(self.target.contents()) == 500)
        self.check_exactly_once_in_order(expected)
        self.assertLess(len(self.target.calls), 50)

    def test_refused_list_delivered_again(self) -> None:
        self.target.failures_left = 2
        expected = numbered(100)
        self.send(expected)
        self.cluster.run_until(lambda: len(self.target.contents()) == 100)
        self.check_exactly_once_in_order(expected)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIsNone(self.cluster.nodes["b"].peer_status("a").delivery_held_reason)

    def test_pending_list_holds_the_next(self) -> None:
        """
        While a list is pending, what arrives goes in the next list, never
        in a concurrent call.
        """
        hold: Deferred[None] = Deferred()
        self.target.hold = hold
        self.send(numbered(10))
        self.cluster.run_until(lambda: self.target.pending == 1)
        more = numbered(10, start=10)
        self.send(more)
        self.cluster.clock.advance(1)
        self.assertEqual(self.target.calls, [])
        hold.callback(None)
        self.cluster.run_until(lambda: len(self.target.contents()) == 20)
        self.check_exactly_once_in_order(numbered(20))
        self.assertGreaterEqual(len(self.target.calls), 2)

    def test_receiver_crash(self) -> None:
        """
        Lists resume where the durable marks left off after the receiver
        crashes and restarts: nothing lost, ids consecutive.
        """
        self.send(numbered(100))
        self.cluster.run_until(lambda: len(self.target.contents()) == 100)
        self.cluster.run_until(lambda: self.a.pending_outbound().get("b", 0) == 0)
        self.cluster.crash("b")
        self.send(numbered(100, start=100))
        self.cluster.start("b")
        self.cluster.run_until(lambda: len(self.target.contents()) == 200)
        self.check_exactly_once_in_order(numbered(200))


class BatchQueueDeliveryTests(SynchronousTestCase):
    def test_lists_on_the_queue(self) -> None:
        """
        BatchQueueDelivery puts each list (and a single message as a list
        of one) on the queue as one item.
        """
        queue: DeferredQueue[list[Message]] = DeferredQueue()
        delivery = BatchQueueDelivery(queue)
        self.assertTrue(IBatchDelivery.providedBy(delivery))
        self.assertIsNone(delivery.deliver_many([MESSAGE, MESSAGE]))
        self.assertIsNone(delivery.deliver(MESSAGE))
        self.assertEqual(self.successResultOf(queue.get()), [MESSAGE, MESSAGE])
        self.assertEqual(self.successResultOf(queue.get()), [MESSAGE])


class QueueRunTests(SynchronousTestCase):
    """
    ``QueueDelivery.put_run``: a run of messages put on a ``DeferredQueue``
    as one ``put`` per message would put them, with the waiting consumers
    given their items after the run is queued.
    """

    def messages(self, count: int) -> list[Message]:
        return [Message(1, 2, i + 1, b"m%d" % i) for i in range(count)]

    def test_waiting_getters_then_pending(self) -> None:
        """
        Each waiting ``get`` is given the next message, in the order they
        waited; the rest stay queued, in order.
        """
        queue: DeferredQueue[Message] = DeferredQueue()
        first, second = queue.get(), queue.get()
        messages = self.messages(5)
        self.assertEqual(QueueDelivery(queue).put_run(messages), 5)
        self.assertIs(self.successResultOf(first), messages[0])
        self.assertIs(self.successResultOf(second), messages[1])
        self.assertEqual(queue.pending, messages[2:])
        self.assertEqual(queue.waiting, [])

    def test_consumer_takes_the_run_awake(self) -> None:
        """
        A consumer awaiting ``get`` is woken once for the run and takes the
        rest without suspending.
        """
        queue: DeferredQueue[Message] = DeferredQueue()
        got: list[Message] = []
        suspended = 0

        async def consume() -> None:
            nonlocal suspended
            while True:
                d = queue.get()
                if not d.called:
                    suspended += 1
                got.append(await d)

        consumer = ensureDeferred(consume())
        messages = self.messages(10)
        self.assertEqual(QueueDelivery(queue).put_run(messages), 10)
        self.assertEqual(got, messages)
        # Once before the run, once after it.
        self.assertEqual(suspended, 2)
        consumer.cancel()
        self.failureResultOf(consumer, CancelledError)

    def test_bounded_queue_takes_what_puts_would(self) -> None:
        """
        A queue with a ``size`` takes one message per waiting ``get`` and
        then up to its size; a full one refuses the run with
        ``QueueOverflow``, taking nothing.
        """
        queue: DeferredQueue[Message] = DeferredQueue(size=2)
        waiter = queue.get()
        messages = self.messages(5)
        delivery = QueueDelivery(queue)
        self.assertEqual(delivery.put_run(messages), 3)
        self.assertIs(self.successResultOf(waiter), messages[0])
        self.assertEqual(queue.pending, messages[1:3])
        self.assertRaises(QueueOverflow, delivery.put_run, messages[3:])
        self.assertEqual(queue.pending, messages[1:3])

    def test_subclass_puts_one_by_one(self) -> None:
        """
        A ``DeferredQueue`` subclass overriding ``put`` gets every message
        through its ``put``: ILM delivers it one message at a time.
        """

        class Counting(DeferredQueue[Message]):
            puts = 0

            def put(self, obj: Message) -> None:
                self.puts += 1
                super().put(obj)

        self.assertTrue(QueueDelivery(DeferredQueue()).runs())
        self.assertFalse(QueueDelivery(Counting()).runs())
        cluster = Cluster()
        queue = Counting()
        cluster.recorders["b"] = queue  # type: ignore[assignment]
        a = cluster.start("a")
        cluster.start("b")
        for contents in numbered(50):
            a.send_to("b", contents)
        cluster.run_until(lambda: len(queue.pending) == 50)
        self.assertEqual(queue.puts, 50)
        self.assertEqual([m.contents for m in queue.pending], numbered(50))


class QueueTargetTests(SynchronousTestCase):
    """
    A ``DeferredQueue`` as a node's delivery target, read as the README
    reads it: every message exactly once, in order, in runs.
    """

    def test_awaiting_consumer(self) -> None:
        """
        A consumer awaiting ``get`` gets every message once, in order, and
        is woken far fewer times than there are messages.
        """
        cluster = Cluster()
        queue: DeferredQueue[Message] = DeferredQueue()
        cluster.recorders["b"] = queue  # type: ignore[assignment]
        a = cluster.start("a")
        cluster.start("b")
        got: list[Message] = []
        suspended = 0

        async def consume() -> None:
            nonlocal suspended
            while True:
                d = queue.get()
                if not d.called:
                    suspended += 1
                got.append(await d)

        consumer = ensureDeferred(consume())
        expected = numbered(2000)
        for contents in expected:
            a.send_to("b", contents)
        cluster.run_until(lambda: len(got) == 2000)
        self.assertEqual([m.contents for m in got], expected)
        self.assertEqual([m.message_id for m in got], list(range(1, 2001)))
        self.assertLess(suspended, 2000 // 10)
        consumer.cancel()
        self.failureResultOf(consumer, CancelledError)

    def test_callback_consumer(self) -> None:
        """
        A consumer written with callbacks, asking for the next message from
        inside the callback (which runs at once while messages are
        queued), gets every message without exceeding the recursion limit:
        runs are short.
        """
        cluster = Cluster()
        queue: DeferredQueue[Message] = DeferredQueue()
        cluster.recorders["b"] = queue  # type: ignore[assignment]
        a = cluster.start("a")
        cluster.start("b")
        got: list[Message] = []

        def take(message: Message) -> None:
            got.append(message)
            queue.get().addCallback(take)

        queue.get().addCallback(take)
        expected = numbered(5000)
        for contents in expected:
            a.send_to("b", contents)
        cluster.run_until(lambda: len(got) == 5000)
        self.assertEqual([m.contents for m in got], expected)
        self.assertEqual(self.flushLoggedErrors(), [])
