"""
Attacks on a real node's stream network, over real TCP (and TLS) sockets:
a peer that never reads, strangers flooding it with refusals, TLS clients
that cannot speak TLS properly, a stranger making the node search its keys,
a stranger taking descriptors from a node with 256 of them, and an on-path
relay that alters, drops, replays and reorders frames.

Each test shows the attack resisted (the node's memory, log and CPU within
the bounds stated in docs/security.md), that another peer keeps exchanging
messages with the node during and after the attack, and that nothing
accepted is lost.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import (
    LogEvent,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.trial.unittest import SkipTest, TestCase

from ilm import ILM, Message, PeerId
from ilm.network import Backoff, LinkSettings, StreamNetwork, _wire
from ilm.testing import InMemoryBackend

from . import attack_node
from .stream_support import RawLink
from .test_stream_network import pair_key
from .test_stream_sockets import free_port

FAST = Backoff(initial=0.01, maximum=0.2)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class Node:
    """
    An ILM node (in-memory store) on a real StreamNetwork, in this process;
    records what it is given.
    """

    def __init__(self, network: StreamNetwork) -> None:
        self.network = network
        self.received: dict[PeerId, list[bytes]] = {}
        self.arrivals: list[float] = []
        self.ilm: ILM | None = None

    def deliver(self, message: Message) -> None:
        self.received.setdefault(message.source_id, []).append(message.contents)
        self.arrivals.append(reactor.seconds())

    @property
    def port(self) -> int:
        return self.network.listening_addresses()[0].port  # type: ignore[attr-defined,no-any-return]


async def start_node(case: TestCase, network: StreamNetwork) -> Node:
    node = Node(network)
    node.ilm = await ILM.create(InMemoryBackend(), node.deliver, network)
    case.addCleanup(node.ilm.shutdown, timeout=1.0)
    return node


class Exchange:
    """
    Two ILM nodes send each other a numbered message every ``interval``
    seconds while an attack runs; :meth:`finish` waits until every message
    is delivered and checks that each arrived exactly once and in order,
    and how long each side went without a delivery while it ran.
    """

    def __init__(self, a: Node, b: Node, interval: float = 0.01) -> None:
        self.nodes = (a, b)
        self.interval = interval
        self.sent = 0
        self._loop = task.LoopingCall(self._send)

    def start(self, case: TestCase) -> None:
        self.started = reactor.seconds()
        self._loop.start(self.interval)
        case.addCleanup(lambda: self._loop.running and self._loop.stop())

    def _send(self) -> None:
        self.sent += 1
        a, b = self.nodes
        for source, destination in ((a, b), (b, a)):
            assert source.ilm is not None
            source.ilm.send_to(destination.network.local_id, b"%d" % self.sent)

    def largest_gap(self, until: float) -> float:
        """
        The longest time either node went without a delivery between the
        start and ``until``.
        """
        gaps = []
        for node in self.nodes:
            times = [self.started, *(t for t in node.arrivals if t <= until), until]
            gaps.append(max(b - a for a, b in itertools.pairwise(times)))
        return max(gaps)

    async def finish(self, case: TestCase, timeout: float = 10.0) -> None:
        self._loop.stop()
        a, b = self.nodes
        expected = [b"%d" % n for n in range(1, self.sent + 1)]
        deadline = reactor.seconds() + timeout
        for source, destination in ((a, b), (b, a)):
            while len(destination.received.get(source.network.local_id, [])) < len(
                expected
            ):
                case.assertLess(reactor.seconds(), deadline, "messages not delivered")
                await sleep(0.02)
            case.assertEqual(destination.received[source.network.local_id], expected)


class LogVolume:
    """
    Measures what the stream network logs at info level and above: lines,
    and bytes as JSON lines (``jsonFileLogObserver``) and as text.
    """

    def __init__(self, case: TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: LogEvent) -> None:
        namespace = str(event.get("log_namespace", ""))
        level = event.get("log_level")
        if namespace.startswith("ilm.network") and level is not None:
            if level >= LogLevel.info:
                self.events.append(event)

    def lines(self) -> int:
        return len(self.events)

    def json_bytes(self) -> int:
        return sum(len(eventAsJSON(e)) + 2 for e in self.events)

    def text_bytes(self) -> int:
        return sum(len(formatEventAsClassicLogText(e) or "") for e in self.events)

    def named(self, name: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("ilm_event") == name]


def unsent(network: StreamNetwork, peer_id: PeerId) -> int:
    """
    Bytes written to the link with ``peer_id`` that its TCP transport has
    not sent yet (0 without a link).
    """
    link = network.link(peer_id)
    if link is None or link.transport is None:
        return 0
    transport: Any = link.transport
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


async def connect_raw(port: int, peer: Protocol, source: str = "127.0.0.1") -> Protocol:
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port, bindAddress=(source, 0), timeout=5
    )
    return await endpoint.connect(Factory.forProtocol(lambda: peer))


def session_hello(reply_requested: bool = False) -> bytes:
    from ilm import _frames
    from ilm._session import Hello

    return _frames.encode_resume(
        Hello(
            version=1,
            incarnation="ab" * 16,
            window=16,
            window_bytes=1 << 16,
            first_unacked=1,
            last_position=0,
            known_incarnation=None,
            delivered=0,
            reply_requested=reply_requested,
        )
    )


class NeverReadingPeerTests(TestCase):
    timeout = 30

    async def test_peer_that_sends_but_never_reads(self) -> None:
        """
        An authenticated peer that never reads floods the node with PINGs
        and with session HELLOs that each ask for a reply (about 5 MB of
        replies provoked): the bytes the node holds unsent for it never
        exceed the transport's 64 KiB buffer plus max_unsent_bytes (1 MiB)
        plus 64 KiB; the node stops reading from it and drops the link
        (LinkTimeout) within idle_timeout of that, although the peer never
        stopped sending.  Another peer exchanges messages with the node
        every 10 ms throughout, none delayed by more than 2 s, all
        delivered exactly once and in order, during and after.
        """
        settings = LinkSettings(
            keepalive_interval=0.5, idle_timeout=1.5, reconnect=FAST
        )
        logs = LogVolume(self)
        node = await start_node(
            self,
            StreamNetwork(
                2,
                listen=["tcp:0:interface=127.0.0.1"],
                keys={1: pair_key(1, 2), 3: pair_key(2, 3)},
                settings=settings,
            ),
        )
        friend = await start_node(
            self,
            StreamNetwork(
                3,
                peers={2: f"tcp:host=127.0.0.1:port={node.port}"},
                keys={2: pair_key(2, 3)},
                settings=settings,
            ),
        )
        while 3 not in node.network.connected_peers():
            await sleep(0.01)
        exchange = Exchange(node, friend)
        exchange.start(self)

        attacker = RawLink(1, 2, pair_key(1, 2))
        await connect_raw(node.port, attacker)
        await attacker.authenticated
        while 1 not in node.network.connected_peers():
            await sleep(0.005)
        transport: Any = attacker.transport
        transport.pauseProducing()  # never read again
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        attacker.send(attacker.data(session_hello()))
        ping = lambda: attacker.frame(_wire.LINK_PING, b"\x00" * 8)  # noqa: E731
        ask = lambda: attacker.data(session_hello(reply_requested=True))  # noqa: E731
        peak = 0
        flooded_at = reactor.seconds()
        sent = 0
        while 1 in node.network.connected_peers():
            self.assertLess(reactor.seconds() - flooded_at, 15.0, "never dropped")
            if sent < 6_000_000:
                batch = [ping() for _ in range(2000)] + [ask() for _ in range(400)]
                sent += sum(map(len, batch))
                attacker.send(*batch)
            peak = max(peak, unsent(node.network, 1))
            await sleep(0.005)
        dropped_after = reactor.seconds() - flooded_at
        after_attack = reactor.seconds()
        await sleep(1.0)
        await exchange.finish(self)

        bound = 64 * 1024 + settings.max_unsent_bytes + 64 * 1024
        self.assertLessEqual(peak, bound)
        self.assertGreater(sent, 1_500_000)
        [stopped] = logs.named("link_reading_stopped")
        self.assertEqual(stopped["peer_id"], 1)
        [timeout] = logs.named("link_timeout")
        self.assertIn("read nothing", timeout["reason"])
        # Dropped within idle_timeout (and a keepalive tick) of reading
        # stopping, while the peer was still sending.
        stuck = timeout["log_time"] - stopped["log_time"]
        self.assertLess(stuck, settings.idle_timeout + settings.keepalive_interval + 1)
        self.assertLess(exchange.largest_gap(after_attack), 2.0)
        self.assertLessEqual(logs.lines(), 20)
        print(
            f"\n  peer that never reads: {sent:,} bytes sent by it, peak unsent "
            f"{peak:,} bytes (bound {bound:,}), dropped {dropped_after:.2f} s "
            f"after the flood began ({stuck:.2f} s after reading stopped), "
            f"{exchange.sent} messages each way "
            f"exchanged with another peer, largest gap "
            f"{exchange.largest_gap(after_attack) * 1000:.0f} ms, "
            f"{logs.lines()} log lines"
        )


class Closed(Protocol):
    """
    A stranger's connection: writes ``data`` when connected, reads and
    ignores what comes back, and fires ``closed`` when the connection ends.
    """

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.data:
            self.transport.write(self.data)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


class ClosedLink(RawLink):
    """
    A stranger running the link handshake with a key the node will not
    accept; ``closed`` fires when the node ends it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.closed.callback(None)


REFUSALS: dict[str, Callable[[], Closed | ClosedLink]] = {
    "garbage": lambda: Closed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "wrong key": lambda: ClosedLink(1, 2, b"a key node 2 does not hold, 32 b"),
    "unknown id": lambda: ClosedLink(99, 2, b"a key node 2 does not hold, 32 b"),
    "spoofed id": lambda: ClosedLink(1, 2, pair_key(2, 3)),
    "silent": lambda: Closed(),
}
"""What a flooding stranger does on each connection, and what the node
logs for it: link_protocol_violation (FrameTooLarge), authentication_failed
twice, spoofed_peer, link_timeout."""


class Stranger:
    """
    Floods a node with connections that it must refuse: from each source
    address, ``parallel`` loops per kind of refusal, each connecting again
    as soon as the node ended its last connection, for ``seconds``.
    """

    def __init__(
        self, port: int, sources: list[str], parallel: int, seconds: float
    ) -> None:
        self.port = port
        self.sources = sources
        self.parallel = parallel
        self.seconds = seconds
        self.connections = 0
        self.ended = 0
        self.kinds = REFUSALS

    async def _loop(self, source: str, make: Callable[[], Closed | ClosedLink]) -> None:
        deadline = reactor.seconds() + self.seconds
        while reactor.seconds() < deadline:
            peer = make()
            try:
                await connect_raw(self.port, peer, source)
            except Exception:
                await sleep(0.01)
                continue
            self.connections += 1
            await peer.closed
            self.ended += 1

    async def run(self) -> None:
        loops = [
            Deferred.fromCoroutine(self._loop(source, make))
            for source in self.sources
            for make in self.kinds.values()
            for _ in range(self.parallel)
        ]
        await DeferredList(loops, fireOnOneErrback=True, consumeErrors=True)


REFUSAL_EVENTS = (
    "authentication_failed",
    "spoofed_peer",
    "link_protocol_violation",
    "link_timeout",
    "connection_limit",
    "tls_handshake_failed",
)


class StrangerFloodTests(TestCase):
    timeout = 30

    async def test_log_flood_from_strangers(self) -> None:
        """
        Strangers on 4 source addresses make the node refuse connections as
        fast as it can for 2 s (garbage, wrong keys, unknown ids, a spoofed
        id, silence until the handshake timeout, and connections beyond the
        per-address cap): thousands of refusals, yet the node logs each
        (event, source address) once in full, and when it stops one summary
        each whose counts add up to every refusal: at most 2 lines per key,
        far under the stated 66 lines a minute.  Another peer exchanges
        messages with the node throughout, all delivered exactly once and
        in order.
        """
        logs = LogVolume(self)
        settings = LinkSettings(handshake_timeout=0.5, reconnect=FAST)
        node = await start_node(
            self,
            StreamNetwork(
                2,
                listen=["tcp:0:interface=127.0.0.1"],
                keys={1: pair_key(1, 2), 3: pair_key(2, 3)},
                settings=settings,
            ),
        )
        friend = await start_node(
            self,
            StreamNetwork(
                3,
                peers={2: f"tcp:host=127.0.0.1:port={node.port}"},
                keys={2: pair_key(2, 3)},
                settings=settings,
            ),
        )
        while 3 not in node.network.connected_peers():
            await sleep(0.01)
        exchange = Exchange(node, friend)
        exchange.start(self)
        sources = [f"127.0.0.{n}" for n in range(10, 14)]
        stranger = Stranger(node.port, sources, parallel=2, seconds=2.0)
        started = reactor.seconds()
        await stranger.run()
        flood = reactor.seconds() - started
        during = logs.lines()
        await exchange.finish(self)
        await node.ilm.shutdown()  # type: ignore[union-attr]

        refusals = [e for e in logs.events if e.get("ilm_event") in REFUSAL_EVENTS]
        full = [e for e in refusals if "suppressed" not in e]
        summaries = [e for e in refusals if "suppressed" in e]
        counted = len(full) + sum(e["suppressed"] for e in summaries)
        keys = {(e["ilm_event"], e["host"]) for e in refusals}
        self.assertGreater(stranger.ended, 500)
        self.assertEqual(counted, stranger.ended)
        self.assertEqual(len(full), len(keys))
        self.assertLessEqual(len(summaries), len(keys))
        self.assertEqual(
            {e for e, _ in keys},
            {
                "authentication_failed",
                "spoofed_peer",
                "link_protocol_violation",
                "link_timeout",
                "connection_limit",
            },
        )
        self.assertEqual({h for _, h in keys}, set(sources))
        self.assertLessEqual(during, len(keys) + 10)
        bytes_json = logs.json_bytes()
        self.assertLessEqual(bytes_json, logs.lines() * 4096)
        print(
            f"\n  stranger flood: {stranger.ended:,} refusals in {flood:.1f} s "
            f"from {len(sources)} addresses; {len(full)} full lines and "
            f"{len(summaries)} summaries ({logs.lines()} network log lines, "
            f"{bytes_json:,} bytes as JSON, {logs.text_bytes():,} as text); "
            f"{exchange.sent} messages each way exchanged meanwhile, largest "
            f"gap {exchange.largest_gap(started + flood) * 1000:.0f} ms"
        )
        self.assertLess(exchange.largest_gap(started + flood), 2.0)


def tls11_client_hello() -> bytes:
    """
    A TLS ClientHello offering TLS 1.1 only (no supported_versions
    extension), as an old client sends it.
    """
    ciphers = b"\x00\x2f\x00\x35"  # TLS_RSA_WITH_AES_{128,256}_CBC_SHA
    body = (
        b"\x03\x02"
        + bytes(range(32))
        + b"\x00"
        + len(ciphers).to_bytes(2, "big")
        + ciphers
        + b"\x01\x00"
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


class TLSRefusalTests(TestCase):
    timeout = 30

    async def test_tls_refusals_are_logged(self) -> None:
        """
        A TLS client without a certificate, a TLS 1.1 ClientHello, a
        plaintext ILM HELLO and random bytes sent to a TLS listener (ten
        times each, each kind from its own address) are each logged once in
        full as tls_handshake_failed (TLSHandshakeFailed) with what it
        means, the other nine counted in one summary; a TLS peer exchanges
        messages with the node throughout.
        """
        from twisted.internet.endpoints import wrapClientTLS
        from twisted.internet.ssl import CertificateOptions

        from ilm.network import TLSCredentials

        from .tls_support import issue, make_ca

        ca = make_ca()
        logs = LogVolume(self)

        def credentials(node_id: int) -> TLSCredentials:
            certificate, key = issue(ca, node_id)
            return TLSCredentials(certificate, key, ca_certificates=[ca[0]])

        settings = LinkSettings(handshake_timeout=2.0, reconnect=FAST)
        node = await start_node(
            self,
            StreamNetwork(
                2,
                listen=["tcp:0:interface=127.0.0.1"],
                tls=credentials(2),
                settings=settings,
            ),
        )
        friend = await start_node(
            self,
            StreamNetwork(
                3,
                peers={2: f"tcp:host=127.0.0.1:port={node.port}"},
                tls=credentials(3),
                settings=settings,
            ),
        )
        while 3 not in node.network.connected_peers():
            await sleep(0.01)
        exchange = Exchange(node, friend)
        exchange.start(self)
        hello = _wire.encode_hello(_wire.LinkHello(_wire.LINK_VERSION, bytes(32), 1, 2))
        noise = random.Random(20261204).randbytes(200)
        clients: dict[str, tuple[str, Callable[[], Any]]] = {
            "the peer presented no certificate": (
                "127.0.0.20",
                lambda: wrapClientTLS(
                    CertificateOptions(),
                    TCP4ClientEndpoint(
                        reactor, "127.0.0.1", node.port, bindAddress=("127.0.0.20", 0)
                    ),
                ).connect(Factory.forProtocol(lambda: Closed(hello))),
            ),
            "older than 1.2": ("127.0.0.21", lambda: tls11_client_hello()),
            "does not speak TLS": ("127.0.0.22", lambda: hello),
            "does not speak TLS ": ("127.0.0.23", lambda: noise),
        }
        for source, make in clients.values():
            for _ in range(10):
                made = make()
                if isinstance(made, bytes):
                    peer = Closed(made)
                    await connect_raw(node.port, peer, source)
                else:
                    peer = await made
                await peer.closed
        await sleep(0.1)
        node.network.flush_log()
        failures = logs.named("tls_handshake_failed")
        by_host: dict[str, list[LogEvent]] = {}
        for event in failures:
            by_host.setdefault(event["host"], []).append(event)
        for hint, (source, _make) in clients.items():
            full, summary = by_host[source]
            self.assertEqual(full["kind"], "TLSHandshakeFailed")
            self.assertIn(hint.strip(), full["reason"])
            self.assertIn("OpenSSL", full["reason"])
            self.assertEqual(summary["suppressed"], 9)
        self.assertEqual(len(failures), 8)
        await exchange.finish(self)
        self.assertEqual(node.network.connected_peers(), frozenset({3}))
        self.assertLess(exchange.largest_gap(reactor.seconds()), 2.0)


class KeySearchTests(TestCase):
    timeout = 30

    async def test_failed_proofs_cost_a_bounded_key_search(self) -> None:
        """
        A node with 256 keys, flooded for 2 s by strangers whose proofs fail
        (each failed proof could be tried against all 256 keys to name its
        author): the node spends at most key_search_rate (1,024) key trials
        a second plus one bucket (1,024) on those searches, skips the rest,
        refuses every attempt, and another peer exchanges messages with it
        throughout.
        """
        keys = {n: pair_key(2, n) for n in range(1000, 1254)}
        keys[3] = pair_key(2, 3)
        keys[1] = pair_key(1, 2)
        settings = LinkSettings(reconnect=FAST)
        node = await start_node(
            self,
            StreamNetwork(
                2,
                listen=["tcp:0:interface=127.0.0.1"],
                keys=keys,
                settings=settings,
            ),
        )
        friend = await start_node(
            self,
            StreamNetwork(
                3,
                peers={2: f"tcp:host=127.0.0.1:port={node.port}"},
                keys={2: pair_key(2, 3)},
                settings=settings,
            ),
        )
        while 3 not in node.network.connected_peers():
            await sleep(0.01)
        exchange = Exchange(node, friend)
        exchange.start(self)
        budget = node.network.key_search_budget
        self.assertEqual(len(keys), 256)
        stranger = Stranger(node.port, [f"127.0.0.{n}" for n in (30, 31)], 4, 2.0)
        wrong = b"a key node 2 does not hold, 32 b"
        stranger.kinds = {"failed proof": lambda: ClosedLink(1000, 2, wrong)}
        started = reactor.seconds()
        await stranger.run()
        elapsed = reactor.seconds() - started
        await exchange.finish(self)

        searches = budget.spent // len(keys)
        self.assertGreater(stranger.ended, 200)
        self.assertLessEqual(budget.spent, budget.capacity + budget.rate * elapsed)
        self.assertEqual(searches + budget.skipped, stranger.ended)
        self.assertGreater(budget.skipped, searches)
        self.assertLess(exchange.largest_gap(started + elapsed), 2.0)
        cost = timeit_link_mac()
        print(
            f"\n  key search: {stranger.ended:,} failed proofs in {elapsed:.1f} s "
            f"against 256 keys: {searches} searched ({budget.spent:,} key trials, "
            f"{budget.spent / elapsed:,.0f} a second, about "
            f"{budget.spent * cost / elapsed * 1000:.1f} ms of CPU a second at "
            f"{cost * 1e6:.1f} us each), {budget.skipped:,} not searched"
        )


def timeit_link_mac() -> float:
    """
    Seconds one key trial (one ``link_mac``) takes here.
    """
    import timeit

    transcript = _wire.Transcript(2, 1, 1, bytes(32), bytes(32), 1000, 2)
    key = pair_key(2, 1000)
    runs = 2000
    seconds = min(
        timeit.repeat(
            lambda: _wire.link_mac(key, _wire.INITIATOR_ROLE, transcript),
            number=runs,
            repeat=3,
        )
    )
    return seconds / runs


class LineProcess(ProcessProtocol):
    """
    A child process whose stdout lines are collected; ``line(prefix)``
    waits for the first line starting with ``prefix``.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._buffer = b""
        self._waiting: list[tuple[str, Deferred[str]]] = []
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.decode()
            self.lines.append(line)
            for entry in list(self._waiting):
                if line.startswith(entry[0]):
                    self._waiting.remove(entry)
                    entry[1].callback(line[len(entry[0]) :])

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason: object) -> None:
        for _prefix, d in self._waiting:
            d.errback(RuntimeError(f"process ended: {self.lines}"))
        self._waiting = []
        self.ended.callback(None)

    def line(self, prefix: str, timeout: float = 20.0) -> Deferred[str]:
        for line in self.lines:
            if line.startswith(prefix):
                return succeed(line[len(prefix) :])
        d: Deferred[str] = Deferred()
        self._waiting.append((prefix, d))
        d.addTimeout(timeout, reactor)
        return d


def spawn(case: TestCase, *arguments: str) -> tuple[LineProcess, Any]:
    process = LineProcess()
    script = os.path.join(os.path.dirname(__file__), "attack_node.py")
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        process,
        sys.executable,
        [sys.executable, script, *arguments],
        env=os.environ.copy(),
    )

    async def stop() -> None:
        if process.ended.called:
            return
        transport.signalProcess("TERM")
        stopped = Deferred.fromCoroutine(_wait(process.ended, 5.0))
        try:
            await stopped
        except Exception:
            transport.signalProcess("KILL")
            await process.ended

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return process, transport


async def _wait(d: Deferred[None], timeout: float) -> None:
    d.addTimeout(timeout, reactor)
    await d


def rss(pid: int) -> int:
    """
    The resident set size of process ``pid`` in bytes.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class DescriptorExhaustionTests(TestCase):
    timeout = 60

    async def test_stranger_cannot_take_every_descriptor(self) -> None:
        """
        A node process limited to 256 descriptors, a stranger opening TCP
        connections to it as fast as it can for 4 s (keeping up to 1,000
        open): the node never runs out of descriptors (it holds at most
        max_unauthenticated_per_host, 8, of them and aborts the rest at
        once), a peer that dials it in the middle of the attack gets its
        link within 3 s, a peer linked before exchanges messages with it
        (echoed back) throughout, and its log and memory stay small.
        """
        if sys.platform != "linux":
            raise SkipTest("needs /proc and loopback addresses beyond 127.0.0.1")
        directory = self.mktemp()
        os.makedirs(directory)
        log_path = os.path.join(directory, "node.log")
        port = free_port()
        node, node_transport = spawn(
            self, "--port", str(port), "--log", log_path, "--nofile", "256"
        )
        await node.line("READY ")
        keys = attack_node.KEYS
        settings = LinkSettings(reconnect=FAST)

        def peer_network(node_id: int, source: str) -> StreamNetwork:
            return StreamNetwork(
                node_id,
                peers={
                    2: TCP4ClientEndpoint(
                        reactor, "127.0.0.1", port, bindAddress=(source, 0)
                    )
                },
                keys={2: keys[node_id]},
                settings=settings,
            )

        friend = await start_node(self, peer_network(1, "127.0.0.2"))
        while 2 not in friend.network.connected_peers():
            await sleep(0.01)
        sent = 0

        def send() -> None:
            nonlocal sent
            sent += 1
            assert friend.ilm is not None
            friend.ilm.send_to(2, b"%d" % sent)

        loop = task.LoopingCall(send)
        loop.start(0.01)
        self.addCleanup(lambda: loop.running and loop.stop())
        rss_before = rss(node_transport.pid)
        started = reactor.seconds()
        stranger, _ = spawn(
            self,
            "--stranger",
            "--port", str(port),
            "--source", "127.0.0.9",
            "--seconds", "4",
            "--hold", "1000",
            "--threads", "32",
        )  # fmt: skip
        await sleep(1.0)
        dialled = reactor.seconds()
        late = await start_node(self, peer_network(3, "127.0.0.3"))
        while 2 not in late.network.connected_peers():
            self.assertLess(reactor.seconds() - dialled, 10.0, "no link")
            await sleep(0.01)
        link_time = reactor.seconds() - dialled
        assert late.ilm is not None
        late_receipts = [late.ilm.send_to(2, b"late %d" % n) for n in range(20)]
        made, failed = map(int, (await stranger.line("STRANGER ")).split())
        attack_end = reactor.seconds()
        rss_after = rss(node_transport.pid)
        await sleep(1.0)
        loop.stop()
        expected = [b"%d" % n for n in range(1, sent + 1)]
        while len(friend.received.get(2, [])) < len(expected):
            self.assertLess(reactor.seconds() - attack_end, 10.0, "echoes missing")
            await sleep(0.02)
        self.assertEqual(friend.received[2], expected)
        for receipt in late_receipts:
            await receipt
        while len(late.received.get(2, [])) < 20:
            await sleep(0.02)
        self.assertEqual(late.received[2], [b"late %d" % n for n in range(20)])

        with open(log_path, encoding="utf-8") as f:
            # jsonFileLogObserver: one record a line, each after a \x1e.
            lines = [json.loads(r) for r in f.read().split("\x1e") if r.strip()]
        log_bytes = os.path.getsize(log_path)
        exhausted = [
            e for e in lines if "EMFILE" in str(e.get("log_format", "")) + str(e)
        ]
        limits = [e for e in lines if e.get("ilm_event") == "connection_limit"]
        self.assertEqual(exhausted, [])
        self.assertEqual(len(limits), 1)
        # More connections than the node has descriptors, all held open.
        self.assertGreater(made, 300)
        self.assertLess(link_time, 3.0)
        self.assertLess(len(lines), 40)
        self.assertLess(rss_after - rss_before, 30 * 1024 * 1024)
        gap = friend_gap(friend.arrivals, started, attack_end)
        print(
            f"\n  descriptor exhaustion (RLIMIT_NOFILE 256): the stranger made "
            f"{made:,} connections ({failed} failed) in 4 s; a peer dialling "
            f"during the attack linked in {link_time:.2f} s; {sent} messages "
            f"echoed to a linked peer, largest gap {gap * 1000:.0f} ms; node "
            f"log {len(lines)} lines, {log_bytes:,} bytes; node RSS "
            f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
        )
        self.assertLess(gap, 2.0)


def friend_gap(arrivals: list[float], start: float, end: float) -> float:
    times = [start, *(t for t in arrivals if start <= t <= end), end]
    return max(b - a for a, b in itertools.pairwise(times))


class RelayServer(Protocol):
    """
    One connection through :class:`Relay`: what the dialler sends is split
    into link frames and passed to ``relay.tamper`` (which returns what to
    forward); what the listener sends comes back unchanged.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.buffer = b""
        self.pending: list[bytes] = []
        self.upstream: Protocol | None = None

    def connectionMade(self) -> None:
        relay = self.relay
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.target)
        connecting = endpoint.connect(Factory.forProtocol(lambda: RelayClient(self)))
        connecting.addErrback(lambda _: self.transport.abortConnection())  # type: ignore[union-attr]

    def upstream_made(self, upstream: Protocol) -> None:
        self.upstream = upstream
        assert upstream.transport is not None
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while len(self.buffer) >= 4:
            length = int.from_bytes(self.buffer[:4], "big")
            if len(self.buffer) < 4 + length:
                break
            frame, self.buffer = self.buffer[: 4 + length], self.buffer[4 + length :]
            out.extend(self.relay.tamper(frame))
        if not out:
            return
        if self.upstream is None:
            self.pending.extend(out)
        else:
            assert self.upstream.transport is not None
            self.upstream.transport.writeSequence(out)

    def connectionLost(self, reason: object = None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abortConnection()  # type: ignore[attr-defined]


class RelayClient(Protocol):
    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def connectionMade(self) -> None:
        self.server.upstream_made(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.server.transport is not None
        self.server.transport.write(data)

    def connectionLost(self, reason: object = None) -> None:
        if self.server.transport is not None:
            self.server.transport.abortConnection()  # type: ignore[attr-defined]


class Relay:
    """
    An on-path relay between a dialler and a listener, over real TCP, that
    does one thing to the first DATA frame carrying ``marker`` (on the
    first connection that carries it) and is transparent otherwise:
    ``alter`` flips one byte of the marker, ``drop`` leaves the frame out,
    ``replay`` sends it twice, ``reorder`` sends it after the next frame.
    """

    def __init__(self, target: int, fault: str, marker: bytes) -> None:
        self.target = target
        self.fault = fault
        self.marker = marker
        self.done = False
        self.held: bytes | None = None

    def tamper(self, frame: bytes) -> list[bytes]:
        if self.held is not None:
            held, self.held = self.held, None
            return [frame, held]
        if self.done or frame[4] != _wire.CARRY or self.marker not in frame:
            return [frame]
        self.done = True
        if self.fault == "alter":
            at = frame.index(self.marker) + len(self.marker) - 1
            return [frame[:at] + bytes([frame[at] ^ 0x01]) + frame[at + 1 :]]
        if self.fault == "drop":
            return []
        if self.fault == "replay":
            return [frame, frame]
        self.held = frame
        return []

    async def listen(self) -> int:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: RelayServer(self))
        )
        self.port = port
        return port.getHost().port  # type: ignore[no-any-return]


class OnPathRelayTests(TestCase):
    """
    A relay on the path of a pre-shared-key link, over real TCP: whatever it
    does to one frame, the link is closed (FrameAuthenticationFailed),
    nothing it altered is delivered, and once the dialler has reconnected
    every message arrives exactly once and in order.
    """

    timeout = 30

    async def through_relay(self, fault: str) -> tuple[float, float]:
        """
        Send 30 messages through a relay doing ``fault`` to message 10;
        check that the link closed with FrameAuthenticationFailed and that
        all 30 arrived exactly once and in order.

        :return: when the receiver closed the link, and when the sender got
            the acknowledgement of message 10.
        """
        logs = LogVolume(self)
        closed_at: list[float] = []

        def watch(event: LogEvent) -> None:
            if event.get("ilm_event") == "frame_authentication_failed":
                closed_at.append(reactor.seconds())

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        settings = LinkSettings(reconnect=FAST)
        receiver = await start_node(
            self,
            StreamNetwork(
                2,
                listen=["tcp:0:interface=127.0.0.1"],
                keys={1: pair_key(1, 2)},
                settings=settings,
            ),
        )
        relay = Relay(receiver.port, fault, b"message 0010")
        relay_port = await relay.listen()
        self.addCleanup(relay.port.stopListening)
        sender = await start_node(
            self,
            StreamNetwork(
                1,
                peers={2: f"tcp:host=127.0.0.1:port={relay_port}"},
                keys={2: pair_key(1, 2)},
                settings=settings,
            ),
        )
        while 2 not in sender.network.connected_peers():
            await sleep(0.01)
        assert sender.ilm is not None
        receipts = []
        acked_at: list[float] = []
        for n in range(1, 31):
            receipt = await sender.ilm.send_to(2, b"message %04d" % n)
            receipts.append(receipt)
            if n == 10:
                receipt.acknowledged.addCallback(
                    lambda _: acked_at.append(reactor.seconds())
                )
            await sleep(0.005)
        for receipt in receipts:
            await receipt.acknowledged
        self.assertTrue(relay.done)
        expected = [b"message %04d" % n for n in range(1, 31)]
        self.assertEqual(receiver.received[1], expected)
        [closed] = logs.named("frame_authentication_failed")
        self.assertEqual(closed["kind"], "FrameAuthenticationFailed")
        self.assertEqual(closed["peer_id"], 1)
        self.assertEqual(len(closed_at), 1)
        return closed_at[0], acked_at[0]

    async def test_altered_frame(self) -> None:
        """
        One byte of message 10 altered on the way: the link closes before
        anything of that frame is delivered, and the sender gets no
        acknowledgement for it: message 10 is acknowledged only after the
        reconnection, once its intact copy arrived.
        """
        closed, acknowledged = await self.through_relay("alter")
        self.assertGreater(acknowledged, closed)

    async def test_dropped_frame(self) -> None:
        """
        The frame of message 10 dropped: the next frame's counter does not
        match, the link closes, and message 10 is sent again.
        """
        await self.through_relay("drop")

    async def test_replayed_frame(self) -> None:
        """
        The frame of message 10 sent twice: the copy closes the link and is
        not delivered a second time.
        """
        await self.through_relay("replay")

    async def test_reordered_frames(self) -> None:
        """
        The frame of message 10 sent after the next frame: the link closes
        and no message is delivered out of order.
        """
        await self.through_relay("reorder")
