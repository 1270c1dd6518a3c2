"""
``ilm demo``: the Basic Example of the original ILM, in Python.

Two nodes on an in-process network, each with an in-memory store: node 1
sends ``b"\\x01\\x02\\x03"`` to node 2, node 2 sends ``b"\\x04\\x05\\x06"`` to
node 1, and each checks what it received.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from ilm import ILM
from ilm.testing import InMemoryBackend, InMemoryNetwork


async def main(reactor: Any) -> None:
    network = InMemoryNetwork(reactor)
    network1 = network.add_peer(1)
    network2 = network.add_peer(2)

    backend1 = InMemoryBackend()
    backend2 = InMemoryBackend()

    rx1: defer.DeferredQueue[Any] = defer.DeferredQueue()
    rx2: defer.DeferredQueue[Any] = defer.DeferredQueue()

    messenger1 = await ILM.create(backend1, rx1, network1)
    messenger2 = await ILM.create(backend2, rx2, network2)

    # Peer 1 sends a message to Peer 2
    receipt1 = await messenger1.send_to(2, b"\x01\x02\x03")
    print(f"node 1 stored message {receipt1.message_id} for node 2")

    # Peer 2 sends a message to Peer 1
    receipt2 = await messenger2.send_to(1, b"\x04\x05\x06")
    print(f"node 2 stored message {receipt2.message_id} for node 1")

    # Peer 1 receives the message from Peer 2
    received_message1 = await rx1.get()
    assert received_message1.source_id == 2
    assert received_message1.destination_id == 1
    assert received_message1.contents == b"\x04\x05\x06"
    print(f"node 1 received {received_message1}")

    # Peer 2 receives the message from Peer 1
    received_message2 = await rx2.get()
    assert received_message2.source_id == 1
    assert received_message2.destination_id == 2
    assert received_message2.contents == b"\x01\x02\x03"
    print(f"node 2 received {received_message2}")

    await receipt1.acknowledged
    await receipt2.acknowledged
    print("both messages acknowledged by their receivers")

    await messenger1.shutdown()
    await messenger2.shutdown()
    print("demo complete: both nodes shut down cleanly")
