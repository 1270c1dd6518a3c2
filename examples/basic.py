from twisted.internet import defer, task

from ilm import ILM
from ilm.testing import InMemoryBackend, InMemoryNetwork


async def main(reactor):
    network = InMemoryNetwork()
    network1 = network.add_peer(1)
    network2 = network.add_peer(2)

    backend1 = InMemoryBackend()
    backend2 = InMemoryBackend()

    rx1 = defer.DeferredQueue()
    rx2 = defer.DeferredQueue()

    messenger1 = await ILM.create(backend1, rx1, network1)
    messenger2 = await ILM.create(backend2, rx2, network2)

    # Peer 1 sends a message to Peer 2
    await messenger1.send_to(2, b"\x01\x02\x03")

    # Peer 2 sends a message to Peer 1
    await messenger2.send_to(1, b"\x04\x05\x06")

    # Peer 1 receives the message from Peer 2
    received_message1 = await rx1.get()
    assert received_message1.source_id == 2
    assert received_message1.destination_id == 1
    assert received_message1.contents == b"\x04\x05\x06"

    # Peer 2 receives the message from Peer 1
    received_message2 = await rx2.get()
    assert received_message2.source_id == 1
    assert received_message2.destination_id == 2
    assert received_message2.contents == b"\x01\x02\x03"

    await messenger1.shutdown()
    await messenger2.shutdown()


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
