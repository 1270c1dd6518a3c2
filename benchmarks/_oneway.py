"""
The ILM run shared by the one-process throughput benchmarks: two nodes on
the in-memory network, one way, checked exactly once and in order.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, task

from ilm import ILM, Message
from ilm.testing import InMemoryNetwork


async def one_way(
    reactor: Any,
    sender_backend: Any,
    receiver_backend: Any,
    payloads: list[bytes],
    burst: int,
) -> tuple[float, float]:
    """
    Send ``payloads`` from node 1 to node 2 (``burst`` ``send_to`` calls per
    reactor turn) and shut both down.

    :return: messages per second to the last delivery and to the last
        acknowledgement, timed from the first ``send_to``.
    :raises AssertionError: if a message arrives out of order or corrupt.
    """
    messages = len(payloads)
    network = InMemoryNetwork(reactor)
    done: defer.Deferred[None] = defer.Deferred()
    count = 0

    def deliver(message: Message) -> None:
        nonlocal count
        if message.message_id != count + 1 or message.contents != payloads[count]:
            # Fail the run (raising would only make ILM retry the delivery).
            if not done.called:
                done.errback(AssertionError(f"out of order or corrupt at {count + 1}"))
            return
        count += 1
        if count == messages:
            done.callback(None)

    sender = await ILM.create(sender_backend, lambda m: None, network.add_peer(1))
    receiver = await ILM.create(receiver_backend, deliver, network.add_peer(2))
    while 2 not in sender.connected_peers():
        await task.deferLater(reactor, 0.001)

    start = time.perf_counter()
    last: defer.Deferred[Any] | None = None
    for offset in range(0, messages, burst):
        for p in payloads[offset : offset + burst]:
            last = sender.send_to(2, p)
        await task.deferLater(reactor, 0)
    await done
    delivered = time.perf_counter() - start
    assert last is not None
    receipt = await last
    await receipt.acknowledged
    acknowledged = time.perf_counter() - start
    assert count == messages and not sender.pending_outbound()
    await sender.shutdown()
    await receiver.shutdown()
    return messages / delivered, messages / acknowledged
