"""
``StreamNetwork.stats()`` and ``InMemoryNetwork.stats()``: the counters a
metrics exporter reads, filled where the networks decide and log.  The
stream network is tested over real loopback TCP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ilm import PeerId
from ilm._status import NetworkStats
from ilm.errors import (
    AckOutOfRange,
    AuthenticationFailed,
    ConnectionLimitReached,
    FrameAuthenticationFailed,
    FrameIntegrityMismatch,
    LinkTimeout,
    MalformedFrame,
    SpoofedPeer,
    TLSHandshakeFailed,
)
from ilm.network import InMemoryNetwork, StreamNetwork
from ilm.network._counters import refusal_reason

from .stream_support import RawPeer, RecordingReceiver
from .test_stream_network import pair_key
from .test_stream_sockets import FAST, EventWaiter, free_port

REFUSED = "connection refused: nothing listens at the peer's address"


class RefusalReasonTests(SynchronousTestCase):
    """
    A refusal is counted under its error's log event name.
    """

    def test_reasons(self) -> None:
        """
        Each network error names its event; subclasses without one of
        their own share their parent's; anything else is a protocol
        violation.
        """
        table = [
            (AuthenticationFailed("x"), "authentication_failed"),
            (SpoofedPeer("x"), "spoofed_peer"),
            (TLSHandshakeFailed("x"), "tls_handshake_failed"),
            (FrameAuthenticationFailed("x"), "frame_authentication_failed"),
            (FrameIntegrityMismatch("x"), "frame_integrity_mismatch"),
            (LinkTimeout("x"), "link_timeout"),
            (ConnectionLimitReached("x"), "connection_limit"),
            (MalformedFrame("x"), "link_protocol_violation"),
            (AckOutOfRange("x"), "link_protocol_violation"),
            (ValueError("x"), "link_protocol_violation"),
        ]
        self.assertEqual(
            [refusal_reason(error) for error, _ in table], [name for _, name in table]
        )


class InMemoryStatsTests(SynchronousTestCase):
    """
    The in-memory network counts its links and the links nodes close.
    """

    def test_links_and_closes(self) -> None:
        """
        Two nodes link (one link established, up on both sides); a node
        closing the link for a violation counts a refusal on that node and
        on the network, and the link lost; the link comes back later.
        """
        clock = Clock()
        network = InMemoryNetwork(clock)
        a, b = network.add_peer(1), network.add_peer(2)
        a.start(RecordingReceiver())
        b.start(RecordingReceiver())
        clock.advance(0)
        self.assertEqual(
            network.stats(),
            NetworkStats(1, 1, 1, 0, refusals={}, dial_failures={}),
        )
        self.assertEqual((a.stats().links, a.stats().links_established), (1, 1))
        a.close_link(2, AckOutOfRange("acknowledged too much"))
        clock.advance(0)
        stats = network.stats()
        self.assertEqual((stats.links, stats.links_lost), (0, 1))
        self.assertEqual(dict(stats.refusals), {"link_protocol_violation": 1})
        self.assertEqual(dict(a.stats().refusals), {"link_protocol_violation": 1})
        self.assertEqual(dict(b.stats().refusals), {})
        self.assertEqual(b.stats().links_lost, 1)
        clock.advance(1)
        self.assertEqual(
            (network.stats().links, network.stats().links_established), (1, 2)
        )


class StreamStatsTests(TestCase):
    """
    Over real TCP: links, refusals and failed dials are counted.
    """

    timeout = 30

    def setUp(self) -> None:
        self.waiter = EventWaiter(self)
        self.port = free_port()

    async def listener(self, **credentials: Any) -> StreamNetwork:
        network = StreamNetwork(
            2,
            listen=[f"tcp:{self.port}:interface=127.0.0.1"],
            settings=FAST,
            **credentials,
        )
        await network.start(RecordingReceiver())
        self.addCleanup(network.stop)
        return network

    async def dialler(self, node_id: PeerId, **credentials: Any) -> StreamNetwork:
        network = StreamNetwork(
            node_id,
            peers={2: f"tcp:host=127.0.0.1:port={self.port}"},
            settings=FAST,
            **credentials,
        )
        await network.start(RecordingReceiver())
        self.addCleanup(network.stop)
        return network

    async def test_fresh(self) -> None:
        """
        A network that has done nothing counts nothing.
        """
        network = await self.listener(keys={1: pair_key(1, 2)})
        self.assertEqual(
            network.stats(), NetworkStats(0, 0, 0, 0, refusals={}, dial_failures={})
        )

    async def test_link_up_and_lost(self) -> None:
        """
        A link counts as a connection and a link on both sides, and as one
        link established; once the dialler stops, the listener counts it
        lost and has no connection left.
        """
        server = await self.listener(keys={1: pair_key(1, 2)})
        client = await self.dialler(1, keys={2: pair_key(1, 2)})
        await self.waiter.wait("link_established", count=2)
        for network in (server, client):
            stats = network.stats()
            self.assertEqual(
                (stats.connections, stats.links, stats.links_established),
                (1, 1, 1),
            )
        await client.stop()
        await self.waiter.wait("link_lost", count=2)
        stats = server.stats()
        self.assertEqual((stats.links, stats.links_lost), (0, 1))
        self.assertEqual(client.stats().links_lost, 1)

    async def test_stranger_refused(self) -> None:
        """
        A dialler with the wrong key is refused: the listener counts one
        authentication_failed refusal per attempt (every one, whatever the
        log's rate limit), and no link.
        """
        server = await self.listener(keys={1: pair_key(1, 2)})
        await self.dialler(1, keys={2: b"not the right key at all".ljust(32)})
        await self.waiter.wait("authentication_failed")
        while server.stats().refusals.get("authentication_failed", 0) < 3:
            await self.waiter.wait("dial_failed_again")
            self.waiter.events.clear()
        stats = server.stats()
        self.assertEqual(stats.links_established, 0)
        self.assertEqual(set(stats.refusals), {"authentication_failed"})

    async def test_garbage_refused(self) -> None:
        """
        Garbage on a real socket is counted as a protocol violation, and
        the connection no longer counts once closed.
        """
        server = await self.listener(keys={1: pair_key(1, 2)})
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        raw = await endpoint.connect(Factory.forProtocol(RawPeer))
        lost: Deferred[None] = Deferred()
        raw.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        assert raw.transport is not None
        raw.transport.write(b"\x00\x00\x00\x05\x99garbage")
        await self.waiter.wait("link_protocol_violation")
        await lost
        self.assertEqual(dict(server.stats().refusals), {"link_protocol_violation": 1})
        while server.stats().connections:
            d: Deferred[None] = Deferred()
            reactor.callLater(0.01, d.callback, None)
            await d
        self.assertEqual(server.stats().connections, 0)

    async def test_dial_to_closed_port(self) -> None:
        """
        Nothing listens: each failed attempt counts under its
        ``DialFailure.reason``, and no refusal is counted.
        """
        network = await self.dialler(1, keys={2: pair_key(1, 2)})
        await self.waiter.wait("dial_failed_again", count=2)
        stats = network.stats()
        self.assertEqual(set(stats.dial_failures), {REFUSED})
        self.assertGreaterEqual(stats.dial_failures[REFUSED], 3)
        error = network.link_error(2)
        assert error is not None
        self.assertEqual(error.reason, REFUSED)
        self.assertEqual(dict(stats.refusals), {})

    async def test_violation_then_hold(self) -> None:
        """
        A link closed for a violation counts under the violation's event;
        the peer's redial during the hold counts as refusal_hold.
        """
        server = await self.listener(keys={1: pair_key(1, 2)})
        await self.dialler(1, keys={2: pair_key(1, 2)})
        await self.waiter.wait("link_established", count=2)
        server.close_link(1, AckOutOfRange("acknowledged too much"))
        await self.waiter.wait("refusal_hold")
        refusals = server.stats().refusals
        self.assertEqual(refusals["link_protocol_violation"], 1)
        self.assertGreaterEqual(refusals["refusal_hold"], 1)
