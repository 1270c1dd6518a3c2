"""
Tests for ilm._delivery: the delivery adapters.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredQueue, QueueOverflow, succeed
from twisted.trial.unittest import SynchronousTestCase

from ilm import CallableDelivery, Config, Message, QueueDelivery
from ilm._deliverer import MAX_RETRY_AFTER
from ilm.errors import DeliveryFailed

from .support import Cluster

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
