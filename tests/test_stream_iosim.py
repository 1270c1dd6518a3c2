"""
ILM nodes over the stream network's protocol on Twisted's own in-memory
transports (``twisted.test.iosim``): the handshake, data in both directions,
a connection lost mid-stream and a new one, and a peer breaking the rules,
all without sockets.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from ilm import ILM, Config, Message, PeerId
from ilm.network import ILMFactory, ILMProtocol, LinkSettings, StreamNetwork
from ilm.testing import InMemoryBackend, InMemoryStorage

KEY = b"iosim pre-shared key of 32 bytes"


class Node:
    def __init__(self, clock: Clock, node_id: PeerId, other: PeerId) -> None:
        self.clock = clock
        self.node_id = node_id
        self.other = other
        self.storage = InMemoryStorage()
        self.received: list[Message] = []
        self.start()

    def start(self) -> None:
        self.network = StreamNetwork(
            self.node_id, keys={self.other: KEY}, reactor=self.clock
        )
        self.ilm = ILM(
            InMemoryBackend(self.storage),
            self.received.append,
            self.network,
            config=Config(window=16),
            clock=self.clock,
        )
        self.ilm.startService()
        self.clock.advance(0)


def address(port: int) -> IPv4Address:
    return IPv4Address("TCP", "127.0.0.1", port)


class IOSimTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.one = Node(self.clock, 1, 2)
        self.two = Node(self.clock, 2, 1)
        self.port = 40000

    def link(self) -> tuple[ILMProtocol, ILMProtocol, IOPump]:
        """
        Connect node 1 (dialling) to node 2 (listening) through iosim.
        """
        self.port += 1
        client = ILMFactory(self.one.network, 2).buildProtocol(address(self.port))
        server = ILMFactory(self.two.network, None).buildProtocol(address(2))
        pump = connect(
            server,
            FakeTransport(server, isServer=True, peerAddress=address(self.port)),
            client,
            FakeTransport(client, isServer=False, peerAddress=address(2)),
            greet=False,
            clock=self.clock,
        )
        self.pump_for(pump)
        return client, server, pump

    def pump_for(self, pump: IOPump, seconds: float = 0.5) -> None:
        for _ in range(int(seconds / 0.005)):
            pump.pump()
            self.clock.advance(0.005)

    def test_exchange_and_reconnect(self) -> None:
        """
        Over iosim transports: both nodes authenticate each other, stream
        to each other, lose the connection mid-stream (bytes in flight are
        lost), and on a new connection finish exactly once and in order.
        """
        client, server, pump = self.link()
        self.assertEqual(self.one.ilm.connected_peers(), frozenset({2}))
        self.assertEqual(self.two.ilm.connected_peers(), frozenset({1}))
        self.assertEqual((client.peer_id, server.peer_id), (2, 1))
        to_two = [b"1->2 %d" % i for i in range(200)]
        to_one = [b"2->1 %d" % i for i in range(200)]
        for a, b in zip(to_two, to_one, strict=True):
            self.one.ilm.send_to(2, a)
            self.two.ilm.send_to(1, b)
        for _ in range(3):
            pump.pump()
            self.clock.advance(0.005)
        self.assertTrue(0 < len(self.two.received) < 200, len(self.two.received))
        # Cut: what is still buffered in the fake transports is lost.
        client.transport.abortConnection()  # type: ignore[union-attr]
        server.transport.abortConnection()  # type: ignore[union-attr]
        self.pump_for(pump, 0.1)
        self.assertEqual(self.one.ilm.connected_peers(), frozenset())
        _, _, pump = self.link()
        self.pump_for(pump, 2.0)
        self.assertEqual([m.contents for m in self.two.received], to_two)
        self.assertEqual([m.contents for m in self.one.received], to_one)
        self.assertEqual([m.message_id for m in self.two.received], list(range(1, 201)))
        self.assertEqual(self.one.ilm.pending_outbound(), {})
        self.assertEqual(self.two.ilm.pending_outbound(), {})

    def test_violation_closes_only_that_connection(self) -> None:
        """
        A session frame ILM cannot decode, sent by the authenticated peer,
        closes that connection; for the refusal period the peer gets no new
        link; then a new connection carries on and nothing accepted is lost.
        """
        _, server, pump = self.link()
        receipts = [self.one.ilm.send_to(2, b"m%d" % i) for i in range(5)]
        self.pump_for(pump, 0.1)
        self.assertEqual(len(self.two.received), 5)
        for d in receipts:
            self.successResultOf(self.successResultOf(d).acknowledged)
        self.one.network.send_frames(2, [b"\x02 not a DATA frame"])
        self.pump_for(pump, 0.1)
        self.assertEqual(server.state, "closed")
        self.assertEqual(self.two.ilm.connected_peers(), frozenset())
        self.one.ilm.send_to(2, b"after")
        _, refused, pump = self.link()
        self.assertEqual(refused.state, "closed")
        self.assertEqual(self.two.ilm.connected_peers(), frozenset())
        self.clock.advance(LinkSettings().refusal.initial)
        _, _, pump = self.link()
        self.pump_for(pump, 1.0)
        self.assertEqual(
            [m.contents for m in self.two.received],
            [b"m0", b"m1", b"m2", b"m3", b"m4", b"after"],
        )
