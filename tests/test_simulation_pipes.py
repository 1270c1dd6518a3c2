"""
Tests for ilm.simulation._pipes: in-memory stream connections on a Clock
that can lose bytes in flight, go silent, stall, split and coalesce what
they carry, and be partitioned.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoRouteError,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ilm.simulation._pipes import Pipe, Switchboard


class Peer(Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class Connected:
    """
    A server and a client connected through a switchboard.
    """

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.board = Switchboard(self.clock, **options)
        self.servers: list[Peer] = []
        self.board.server("s").listen(Factory.forProtocol(self._server))
        self.client = Peer()
        self.board.client("s", source="c").connect(
            Factory.forProtocol(lambda: self.client)
        )
        self.clock.advance(self.board.latency)
        [self.server] = self.servers
        [self.pipe] = self.board.pipes

    def _server(self) -> Peer:
        peer = Peer()
        self.servers.append(peer)
        return peer

    def send(self, side: int, data: bytes) -> None:
        self.pipe.ends[side].write(data)


class PipeTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        """
        Pipe ends are transports; the endpoints and the listening port
        provide their Twisted interfaces.
        """
        c = Connected()
        verifyObject(ITransport, c.pipe.ends[0])
        verifyObject(IStreamServerEndpoint, c.board.server("x"))
        verifyObject(IStreamClientEndpoint, c.board.client("x"))
        port = self.successResultOf(
            c.board.server("y").listen(Factory.forProtocol(Protocol))
        )
        verifyObject(IListeningPort, port)
        self.assertEqual(c.pipe.names, ("c", "s"))

    def test_bytes_take_the_latency(self) -> None:
        """
        Written bytes arrive after the latency, in order.
        """
        c = Connected(latency=0.5)
        c.send(0, b"ab")
        c.send(0, b"cd")
        c.clock.advance(0.4)
        self.assertEqual(c.server.received, [])
        c.clock.advance(0.1)
        self.assertEqual(b"".join(c.server.received), b"abcd")

    def test_abort_loses_in_flight(self) -> None:
        """
        An abort loses what is in flight; the aborting side sees
        ConnectionAborted, the other ConnectionLost.
        """
        c = Connected()
        c.send(0, b"lost")
        c.pipe.abort(1)
        c.clock.advance(1)
        self.assertEqual(c.server.received, [])
        self.assertTrue(c.server.lost.check(ConnectionAborted))
        self.assertTrue(c.client.lost.check(ConnectionLost))
        self.assertEqual(c.board.pipes, [])

    def test_severed_is_half_open(self) -> None:
        """
        A severed pipe carries nothing, and a side that aborts or closes it
        is the only one to learn that it is gone.
        """
        c = Connected()
        c.send(0, b"in flight")
        c.pipe.sever()
        c.send(1, b"later")
        c.clock.advance(1)
        self.assertEqual((c.server.received, c.client.received), ([], []))
        c.pipe.ends[0].abortConnection()
        self.assertTrue(c.client.lost.check(ConnectionAborted))
        self.assertIsNone(c.server.lost)
        self.assertEqual(c.board.pipes, [c.pipe])
        c.pipe.ends[1].loseConnection()
        c.clock.advance(0)
        self.assertTrue(c.server.lost.check(ConnectionDone))
        self.assertEqual(c.board.pipes, [])

    def test_stall_and_backpressure(self) -> None:
        """
        A stalled side receives nothing; the writer's producer is paused
        over the high-water mark and resumed once the reader drains.
        """
        c = Connected(high_water=10)
        events: list[str] = []

        class Producer:
            def pauseProducing(self) -> None:
                events.append("pause")

            def resumeProducing(self) -> None:
                events.append("resume")

            def stopProducing(self) -> None:
                events.append("stop")

        c.pipe.ends[0].registerProducer(Producer(), True)
        c.pipe.stall(1)
        c.send(0, b"x" * 11)
        c.clock.advance(1)
        self.assertEqual((c.server.received, events), ([], ["pause"]))
        c.pipe.stall(1, False)
        c.clock.advance(1)
        self.assertEqual(c.server.received, [b"x" * 11])
        self.assertEqual(events, ["pause", "resume"])

    def test_chunks(self) -> None:
        """
        With a chunking function, what waits for a side is coalesced and
        handed over in the pieces it returns.
        """
        c = Connected(chunks=lambda data: [data[:1], data[1:]])
        c.send(0, b"abc")
        c.send(0, b"def")
        c.clock.advance(1)
        self.assertEqual(c.server.received, [b"a", b"bcdef"])

    def test_partition(self) -> None:
        """
        Partitioned names cannot connect (NoRouteError) until healed; an
        address nobody listens on refuses the connection.
        """
        c = Connected()
        c.board.partition("c", "s")
        self.assertTrue(c.board.partitioned("s", "c"))
        d = c.board.client("s", source="c").connect(Factory.forProtocol(Peer))
        c.clock.advance(1)
        self.failureResultOf(d, NoRouteError)
        other = c.board.client("s", source="x").connect(Factory.forProtocol(Peer))
        c.clock.advance(1)
        self.successResultOf(other)
        c.board.heal("c", "s")
        again = c.board.client("s", source="c").connect(Factory.forProtocol(Peer))
        c.clock.advance(1)
        self.successResultOf(again)
        self.assertEqual(len(c.board.pipes_between("c", "s")), 2)
        nobody = c.board.client("nobody").connect(Factory.forProtocol(Peer))
        c.clock.advance(1)
        self.failureResultOf(nobody, ConnectionRefusedError)

    def test_cut(self) -> None:
        """
        A cut loses what is in flight and both sides see ConnectionLost.
        """
        c = Connected()
        c.send(1, b"lost")
        c.pipe.cut()
        self.assertTrue(c.client.lost.check(ConnectionLost))
        self.assertTrue(c.server.lost.check(ConnectionLost))
        self.assertIsInstance(c.pipe, Pipe)
        self.assertEqual(c.pipe.open_sides(), [])
