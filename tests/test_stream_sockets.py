"""
The stream network for real: loopback TCP, TLS (certificates made in the
test) and UNIX sockets on the real reactor.  Two ILM nodes stream to each
other while connections are killed at random moments and the nodes crash
and restart; authentication failures, spoofing and garbage over real
sockets.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from ilm import PeerId
from ilm.network import (
    Backoff,
    LinkSettings,
    StreamNetwork,
    TLSCredentials,
    _wire,
    fingerprint,
)

from .stream_chaos import Chaos
from .stream_support import RawPeer, RecordingReceiver
from .test_stream_network import pair_key
from .tls_support import issue, make_ca, self_signed

CHAOS_SEED = int(os.environ.get("ILM_CHAOS_SEED", "20261126"))
FAST = LinkSettings(reconnect=Backoff(initial=0.01, maximum=0.2))


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """
    A free TCP port below the ephemeral range: a node restarted in the
    middle of a test listens on it again, and no outgoing connection (ours
    or another process's) may take it in between, nor connect to itself
    through it.
    """
    rng = random.Random()
    high = max(_ephemeral_low(), 12000)
    for _ in range(1000):
        port = rng.randrange(10000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


class EventWaiter:
    """
    Fire Deferreds when log events with a given ``ilm_event`` appear.
    """

    def __init__(self, case: TestCase) -> None:
        self.events: list[LogEvent] = []
        self._waiting: list[tuple[str, Deferred[LogEvent]]] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: LogEvent) -> None:
        name = event.get("ilm_event")
        if name is None:
            return
        self.events.append(event)
        for entry in list(self._waiting):
            if entry[0] == name:
                self._waiting.remove(entry)
                entry[1].callback(event)

    def wait(self, name: str, count: int = 1, timeout: float = 10.0) -> Deferred[Any]:
        """
        :return: a ``Deferred`` firing with the ``count``-th event called
            ``name`` (at once if it has been seen).
        """
        seen = self.named(name)
        if len(seen) >= count:
            return succeed(seen[count - 1])
        d: Deferred[LogEvent] = Deferred()
        self._waiting.append((name, d))
        d.addTimeout(timeout, reactor)
        if count > len(seen) + 1:
            d.addCallback(lambda _: self.wait(name, count, timeout))
        return d

    def named(self, name: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("ilm_event") == name]


class RealChaosTests(TestCase):
    timeout = 90

    async def chaos(
        self,
        make: Callable[[PeerId], StreamNetwork],
        seed: int,
        duration: float,
        kill_interval: float,
    ) -> Chaos:
        chaos = Chaos(
            reactor, make, seed=seed, duration=duration, kill_interval=kill_interval
        )
        chaos.run()
        delivered = chaos.when_delivered()
        delivered.addTimeout(60, reactor)
        try:
            await delivered
        except Exception:
            await chaos.stop()
            raise AssertionError(f"not all delivered: {chaos.summary()}")
        results = await chaos.stop()
        for ok, value in results:
            self.assertTrue(ok, f"{chaos.summary()}: shutdown failed: {value}")
        chaos.check()
        # Both sides were restarted from their stores at least once.
        for node_id, crashes in chaos.crashes_by_node.items():
            self.assertGreaterEqual(crashes, 1, f"node {node_id}: {chaos.summary()}")
        if os.environ.get("ILM_CHAOS_VERBOSE"):
            print(chaos.summary())
        return chaos

    async def test_tcp(self) -> None:
        """
        Over loopback TCP, with over 50 links killed mid-stream and crashes
        of both nodes at random moments: every accepted message, both ways,
        delivered exactly once and in order (seed in the failure message; ILM_CHAOS_SEED
        repeats the schedule of faults, though real sockets and the real
        clock make no two runs interleave exactly alike).
        """
        ports = {1: free_port(), 2: free_port()}

        def make(node_id: PeerId) -> StreamNetwork:
            other = 2 if node_id == 1 else 1
            return StreamNetwork(
                node_id,
                listen=[f"tcp:{ports[node_id]}:interface=127.0.0.1"],
                peers={other: f"tcp:host=127.0.0.1:port={ports[other]}"},
                keys={other: pair_key(1, 2)},
                settings=FAST,
            )

        chaos = await self.chaos(make, CHAOS_SEED, duration=5.0, kill_interval=0.05)
        self.assertGreaterEqual(chaos.cuts, 50, chaos.summary())

    async def test_tls(self) -> None:
        """
        Over mutual TLS (CA-issued certificates naming the nodes), with
        connection kills and crashes: exactly-once, in-order delivery.
        """
        ca = make_ca()
        certificates = {n: issue(ca, n) for n in (1, 2)}
        ports = {1: free_port(), 2: free_port()}

        def make(node_id: PeerId) -> StreamNetwork:
            other = 2 if node_id == 1 else 1
            certificate, key = certificates[node_id]  # type: ignore[index]
            return StreamNetwork(
                node_id,
                listen=[f"tcp:{ports[node_id]}:interface=127.0.0.1"],
                peers={other: f"tcp:host=127.0.0.1:port={ports[other]}"},
                tls=TLSCredentials(certificate, key, ca_certificates=[ca[0]]),
                settings=FAST,
            )

        chaos = await self.chaos(make, CHAOS_SEED + 1, duration=3.0, kill_interval=0.1)
        self.assertGreaterEqual(chaos.cuts, 10, chaos.summary())

    async def test_unix(self) -> None:
        """
        Over UNIX sockets, with connection kills and crashes: exactly-once,
        in-order delivery.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        paths = {n: os.path.join(directory, f"{n}.sock") for n in (1, 2)}

        def make(node_id: PeerId) -> StreamNetwork:
            other = 2 if node_id == 1 else 1
            return StreamNetwork(
                node_id,
                listen=[f"unix:{paths[node_id]}:lockfile=0"],
                peers={other: f"unix:path={paths[other]}"},
                keys={other: pair_key(1, 2)},
                settings=FAST,
            )

        chaos = await self.chaos(make, CHAOS_SEED + 2, duration=3.0, kill_interval=0.1)
        self.assertGreaterEqual(chaos.cuts, 10, chaos.summary())


class RealAuthenticationTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.waiter = EventWaiter(self)
        self.ca = make_ca()
        self.port = free_port()

    async def server(self, **credentials: Any) -> StreamNetwork:
        network = StreamNetwork(
            2,
            listen=[f"tcp:{self.port}:interface=127.0.0.1"],
            settings=FAST,
            **credentials,
        )
        self.receiver = RecordingReceiver()
        await network.start(self.receiver)
        self.addCleanup(network.stop)
        return network

    async def dial(self, node_id: PeerId, **credentials: Any) -> StreamNetwork:
        network = StreamNetwork(
            node_id,
            peers={2: f"tcp:host=127.0.0.1:port={self.port}"},
            settings=FAST,
            **credentials,
        )
        receiver = RecordingReceiver()
        await network.start(receiver)
        self.addCleanup(network.stop)
        return network

    def tls(self, certificate: Any, **kwargs: Any) -> TLSCredentials:
        return TLSCredentials(certificate[0], certificate[1], **kwargs)

    async def test_tls_link_with_pins(self) -> None:
        """
        Self-signed certificates pinned by SHA-256 fingerprint authenticate
        both ways, and frames flow over the link.
        """
        server_cert, client_cert = self_signed("server"), self_signed("client")
        client_pin = {1: fingerprint(client_cert[0])}
        server_pin = {2: fingerprint(server_cert[0])}
        server = await self.server(
            tls=self.tls(server_cert, peer_fingerprints=client_pin)
        )
        client = await self.dial(
            1, tls=self.tls(client_cert, peer_fingerprints=server_pin)
        )
        await self.waiter.wait("link_established", count=2)
        self.assertEqual(server.connected_peers(), frozenset({1}))
        arrived: Deferred[None] = Deferred()
        self.receiver.on_frame = lambda peer, frame: arrived.callback((peer, frame))
        client.send_frames(2, [b"over TLS"])
        self.assertEqual(await arrived, (1, b"over TLS"))

    async def test_tls_link_with_expired_pinned_certificates(self) -> None:
        """
        Over real TLS, self-signed certificates that expired two days ago
        still link when pinned: pins ignore validity dates.
        """
        server_cert = self_signed("server", expired=True)
        client_cert = self_signed("client", expired=True)
        await self.server(
            tls=self.tls(
                server_cert, peer_fingerprints={1: fingerprint(client_cert[0])}
            )
        )
        await self.dial(
            1,
            tls=self.tls(
                client_cert, peer_fingerprints={2: fingerprint(server_cert[0])}
            ),
        )
        await self.waiter.wait("link_established", count=2)

    async def test_tls_unpinned_certificate(self) -> None:
        """
        A client whose certificate is neither pinned nor CA-issued is refused
        with authentication_failed; the server reports no link.
        """
        await self.server(tls=self.tls(issue(self.ca, 2), ca_certificates=[self.ca[0]]))
        await self.dial(1, tls=self.tls(self_signed(), ca_certificates=[self.ca[0]]))
        event = await self.waiter.wait("authentication_failed")
        self.assertIn("neither pinned nor valid", event["reason"])
        self.assertEqual(self.receiver.events, [])

    async def test_tls_client_without_certificate(self) -> None:
        """
        A TLS client that presents no certificate fails the TLS handshake
        (the listener requires one): it receives nothing, nothing reaches
        ILM, and the listener logs why (tls_handshake_failed).
        """
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import CertificateOptions

        from ilm.network import _wire

        await self.server(tls=self.tls(issue(self.ca, 2), ca_certificates=[self.ca[0]]))
        endpoint = wrapClientTLS(
            CertificateOptions(), TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        )
        raw = await endpoint.connect(Factory.forProtocol(RawPeer))
        lost: Deferred[None] = Deferred()
        raw.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        assert raw.transport is not None
        raw.transport.write(_wire.encode_hello(_wire.LinkHello(1, b"n" * 32, 1, 2)))
        lost.addTimeout(10, reactor)
        await lost
        self.assertEqual(raw.received, b"")
        self.assertEqual(self.receiver.events, [])
        event = await self.waiter.wait("tls_handshake_failed")
        self.assertEqual(event["kind"], "TLSHandshakeFailed")
        self.assertIn("presented no certificate", event["reason"])

    async def test_tls_spoofed_identity(self) -> None:
        """
        A client with a valid certificate for node 3 claiming to be node 1 is
        refused with spoofed_peer.
        """
        await self.server(tls=self.tls(issue(self.ca, 2), ca_certificates=[self.ca[0]]))
        await self.dial(
            1, tls=self.tls(issue(self.ca, 3), ca_certificates=[self.ca[0]])
        )
        event = await self.waiter.wait("spoofed_peer")
        self.assertIn("proves 3", event["reason"])
        self.assertEqual(self.receiver.events, [])

    async def test_tls_server_impostor(self) -> None:
        """
        A server whose certificate proves another node than the one dialled
        is refused by the dialler (SpoofedPeer, in its dial_failed event and
        link_error), before it proves anything.
        """
        await self.server(tls=self.tls(issue(self.ca, 4), ca_certificates=[self.ca[0]]))
        client = await self.dial(
            1, tls=self.tls(issue(self.ca, 1), ca_certificates=[self.ca[0]])
        )
        event = await self.waiter.wait("dial_failed")
        self.assertEqual(event["kind"], "SpoofedPeer")
        self.assertIn("dialled node 2", event["reason"])
        error = client.link_error(2)
        assert error is not None
        self.assertEqual(error.kind, "SpoofedPeer")

    async def test_tcp_link_without_nagle(self) -> None:
        """
        Links over TCP disable Nagle's algorithm on both ends: ILM waits on
        small ACK frames, which Nagle would hold back for a delayed ACK.
        """
        server = await self.server(keys={1: pair_key(1, 2)})
        client = await self.dial(1, keys={2: pair_key(1, 2)})
        await self.waiter.wait("link_established", count=2)
        for network, peer in ((server, 1), (client, 2)):
            link = network.link(peer)
            assert link is not None
            transport = link.transport
            self.assertTrue(transport.getTcpNoDelay())  # type: ignore[union-attr]

    async def test_psk_wrong_key_over_tcp(self) -> None:
        """
        Over real TCP, a dialler with the wrong pre-shared key is refused
        with authentication_failed, and the server reports nothing.
        """
        await self.server(keys={1: pair_key(1, 2)})
        await self.dial(1, keys={2: b"not the right key at all".ljust(32)})
        await self.waiter.wait("authentication_failed")
        self.assertEqual(self.receiver.events, [])

    async def test_garbage_over_tcp(self) -> None:
        """
        Garbage written to a real socket closes that connection with a typed
        reason and reaches nobody.
        """
        await self.server(keys={1: pair_key(1, 2)})
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        raw = await endpoint.connect(Factory.forProtocol(RawPeer))
        lost: Deferred[None] = Deferred()
        raw.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign]
        assert raw.transport is not None
        raw.transport.write(b"\x00\x00\x00\x05\x99garbage")
        event = await self.waiter.wait("link_protocol_violation")
        self.assertEqual(event["kind"], "UnknownFrameType")
        await lost
        self.assertEqual(raw.received, b"")
        self.assertEqual(self.receiver.events, [])


class AllEvents:
    """
    Every log event published while a test runs.
    """

    def __init__(self, case: TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def named(self, name: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("ilm_event") == name]


class DialReasonTests(TestCase):
    """
    Over real sockets, the dialling side says why it cannot link: once per
    change of reason at warn level (dial_failed), with the retries at debug
    level, and in ``link_error``; ClientService's own retry lines never
    reach the log at info level.
    """

    timeout = 30

    def setUp(self) -> None:
        self.waiter = EventWaiter(self)
        self.all = AllEvents(self)
        self.port = free_port()

    async def dialler(
        self, node_id: PeerId, endpoint: str | None = None, **credentials: Any
    ) -> StreamNetwork:
        network = StreamNetwork(
            node_id,
            peers={2: endpoint or f"tcp:host=127.0.0.1:port={self.port}"},
            settings=FAST,
            **credentials,
        )
        await network.start(RecordingReceiver())
        self.addCleanup(network.stop)
        return network

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

    async def failing(
        self, network: StreamNetwork, attempts: int = 4
    ) -> tuple[LogEvent, Any]:
        """
        Wait until ``attempts`` attempts to reach node 2 failed; return the
        one dial_failed event and ``link_error(2)``, having checked that
        the repeats were logged at debug level only.
        """
        while True:
            error = network.link_error(2)
            if error is not None and error.attempts >= attempts:
                break
            await self.waiter.wait("dial_failed_again", count=attempts - 1)
        [event] = self.waiter.named("dial_failed")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["reason"], error.reason)
        self.assertEqual(event["kind"], error.kind)
        self.assertEqual(event["peer_id"], 2)
        for repeat in self.waiter.named("dial_failed_again") + self.waiter.named(
            "dial_retry"
        ):
            self.assertEqual(repeat["log_level"], LogLevel.debug)
        retries = self.waiter.named("dial_retry")
        self.assertGreaterEqual(len(retries), attempts - 1)
        self.assertEqual({r["peer_id"] for r in retries}, {2})
        self.assertNotIn("endpoint", retries[0])
        leaked = [
            e
            for e in self.all.events
            if str(e.get("log_format", "")).startswith("Scheduling retry")
        ]
        self.assertEqual(leaked, [])
        return event, error

    async def test_connection_refused_then_linked(self) -> None:
        """
        Nothing listening: "connection refused", logged once over several
        attempts; once the peer listens the link comes up and link_error
        is None again.
        """
        network = await self.dialler(1, keys={2: pair_key(1, 2)})
        event, error = await self.failing(network)
        self.assertEqual(event["kind"], "ConnectionRefusedError")
        self.assertIn("connection refused", event["reason"])
        self.assertEqual(event["endpoint"], f"tcp:host=127.0.0.1:port={self.port}")
        self.assertLessEqual(error.since, reactor.seconds())
        await self.listener(keys={1: pair_key(1, 2)})
        await self.waiter.wait("link_established", count=2)
        self.assertIsNone(network.link_error(2))

    async def test_wrong_key(self) -> None:
        """
        A dialler whose key the listener does not accept is told, in its
        own log, that the peer refused its key proof.
        """
        await self.listener(keys={1: pair_key(1, 2)})
        network = await self.dialler(1, keys={2: b"not the key node 2 holds for 1"})
        event, error = await self.failing(network)
        self.assertEqual(event["kind"], "AuthenticationFailed")
        self.assertIn("the peer refused our key proof", error.reason)

    async def test_unknown_id(self) -> None:
        """
        Dialling as an id the listener does not know (9, or "1" where it
        knows 1) reads, on the dialler, as the same refusal of its proof
        (the listener tells an unauthenticated dialler nothing more).
        """
        await self.listener(keys={1: pair_key(1, 2)})
        for node_id in (9, "1"):
            network = await self.dialler(node_id, keys={2: pair_key(1, 2)})
            _event, error = await self.failing(network, attempts=2)
            self.assertIn("the peer refused our key proof", error.reason)
            self.assertIn(repr(node_id), error.reason)
            await network.stop()
            self.waiter.events.clear()

    async def test_unresolvable_host(self) -> None:
        """
        A host name that does not resolve (under .invalid) is reported as a
        DNS failure.
        """
        network = await self.dialler(
            1, "tcp:host=ilm-test.invalid:port=9", keys={2: pair_key(1, 2)}
        )
        event, _error = await self.failing(network, attempts=2)
        self.assertEqual(event["kind"], "DNSLookupError")
        self.assertIn("cannot be resolved (DNS)", event["reason"])

    async def test_one_line_per_change_of_reason(self) -> None:
        """
        Refused, then listening with the wrong key: two dial_failed lines,
        one per reason, however many attempts each took.
        """
        network = await self.dialler(1, keys={2: pair_key(1, 2)})
        await self.failing(network, attempts=3)
        await self.listener(keys={1: b"a key node 1 does not hold, 32 b"})
        await self.waiter.wait("dial_failed", count=2)
        while (error := network.link_error(2)) is None or error.attempts < 3:
            await self.waiter.wait(
                "dial_failed_again",
                count=len(self.waiter.named("dial_failed_again")) + 1,
            )
        reasons = [e["kind"] for e in self.waiter.named("dial_failed")]
        self.assertEqual(reasons, ["ConnectionRefusedError", "AuthenticationFailed"])


class DirectWriteTests(TestCase):
    """
    ``LinkWriter`` on a real TCP connection: small writes go straight to
    an idle socket, and everything stays in order when they cannot.  (It
    reads Twisted's transport buffer, ``_tempDataLen`` and ``dataBuffer``:
    this test fails if those change.)
    """

    timeout = 30

    async def test_small_writes_skip_an_idle_transport(self) -> None:
        """
        A small write with nothing held by the transport is on the socket
        at once (the transport holds none of it); while the transport holds
        data, and for a write over ``DIRECT_LIMIT``, the bytes queue in the
        transport behind what it holds; the peer receives all of it, in
        order.
        """
        from twisted.internet.protocol import Protocol

        from ilm.network._writer import DIRECT_LIMIT, LinkWriter

        received = bytearray()
        lost: Deferred[None] = Deferred()
        expected = b""

        class Sink(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

            def connectionLost(self, reason: object = None) -> None:
                lost.callback(None)

        port = reactor.listenTCP(0, Factory.forProtocol(Sink), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await endpoint.connect(Factory.forProtocol(Protocol))
        transport: Any = client.transport
        writer = LinkWriter(1 << 20)
        writer.attach(transport)

        writer.write([b"one"])
        self.assertEqual((transport._tempDataLen, transport.dataBuffer), (0, b""))
        transport.write(b"held")
        writer.write([b"two"])
        self.assertEqual(transport._tempDataLen, len(b"heldtwo"))
        expected = b"one" + b"held" + b"two"

        while transport._tempDataLen or transport.dataBuffer:
            await deferLater(reactor, 0.01)
        big = b"y" * (DIRECT_LIMIT + 1)
        writer.send_session_frames([big])
        self.assertEqual(transport._tempDataLen, len(big) + 5)
        expected += _wire.carry_header(len(big)) + big

        while len(received) < len(expected):
            await deferLater(reactor, 0.01)
        self.assertEqual(bytes(received), expected)
        transport.loseConnection()
        await lost
