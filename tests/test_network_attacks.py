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
import socket
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import (
    LogEvent,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.trial.unittest import TestCase

from ilm import ILM, Message, PeerId
from ilm.network import Backoff, LinkSettings, StreamNetwork, _wire
from ilm.testing import InMemoryBackend

from .stream_support import RawLink
from .test_stream_network import pair_key

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

    def start(self) -> None:
        self.started = reactor.seconds()
        self._loop.start(self.interval)

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
    link = network._links.get(peer_id)
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

    return _frames.encode_hello(
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
        (LinkTimeout) once idle_timeout has passed, although the peer never
        stopped sending.  Another peer exchanges messages with the node
        every 10 ms throughout, none delayed by more than 1 s, all
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
        exchange.start()

        attacker = RawLink(1, 2, pair_key(1, 2))
        await connect_raw(node.port, attacker)
        await attacker.authenticated
        while 1 not in node.network.connected_peers():
            await sleep(0.005)
        transport: Any = attacker.transport
        transport.pauseProducing()  # never read again
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        attacker.send(attacker.data(session_hello()))
        ping = lambda: attacker.frame(_wire.PING, b"\x00" * 8)  # noqa: E731
        ask = lambda: attacker.data(session_hello(reply_requested=True))  # noqa: E731
        peak = 0
        flooded_at = reactor.seconds()
        sent = 0
        while 1 in node.network.connected_peers():
            self.assertLess(reactor.seconds() - flooded_at, 8.0, "never dropped")
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
        self.assertLess(dropped_after, 4.0)
        [stopped] = logs.named("link_reading_stopped")
        self.assertEqual(stopped["peer_id"], 1)
        [timeout] = logs.named("link_timeout")
        self.assertIn("read nothing", timeout["reason"])
        self.assertLess(exchange.largest_gap(after_attack), 1.0)
        self.assertLessEqual(logs.lines(), 20)
        print(
            f"\n  peer that never reads: {sent:,} bytes sent by it, peak unsent "
            f"{peak:,} bytes (bound {bound:,}), dropped after "
            f"{dropped_after:.2f} s, {exchange.sent} messages each way "
            f"exchanged with another peer, largest gap "
            f"{exchange.largest_gap(after_attack) * 1000:.0f} ms, "
            f"{logs.lines()} log lines"
        )
