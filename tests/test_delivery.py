"""
Tests for ilm._delivery: the delivery adapters.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredQueue, QueueOverflow, succeed
from twisted.trial.unittest import SynchronousTestCase

from ilm import CallableDelivery, Message, QueueDelivery

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
