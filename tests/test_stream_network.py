"""
The stream network's logic over in-memory pipes on a ``Clock``: links,
simultaneous dial, reconnection, keepalives, backpressure, stop, and what
happens to unauthenticated or hostile peers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import ilm.errors
from ilm import PeerId
from ilm.errors import (
    FrameAuthenticationFailed,
    FrameTooLarge,
    ILMError,
    LinkTimeout,
    MalformedFrame,
    ProtocolViolation,
    UnexpectedFrame,
    UnknownFrameType,
    UnsupportedVersion,
)
from ilm.interfaces import INetwork
from ilm.network import (
    Backoff,
    ILMProtocol,
    LinkSettings,
    PreSharedKeys,
    StreamNetwork,
    _wire,
)
from ilm.network._handshake import LinkHandshake
from ilm.network._keepalive import Keepalive
from ilm.network._protocol import IConnectionOwner
from ilm.testing import settle

from .stream_support import Pipe, RawLink, RawPeer, RecordingReceiver, Switchboard


class LinkTimeoutErrorTests(SynchronousTestCase):
    def test_link_timeout_is_not_a_violation(self) -> None:
        """
        LinkTimeout is an ILMError, exported by ilm.errors, and not a
        ProtocolViolation (a silent peer broke no rule).
        """
        self.assertTrue(issubclass(LinkTimeout, ILMError))
        self.assertFalse(issubclass(LinkTimeout, ProtocolViolation))
        self.assertIn("LinkTimeout", ilm.errors.__all__)


def pair_key(a: PeerId, b: PeerId) -> bytes:
    low, high = sorted((repr(a), repr(b)))
    return (low + "|" + high).encode().ljust(32, b"#")


class LogCapture:
    """
    Collect log events with an ``ilm_event`` key while a test runs.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: LogEvent) -> None:
        if "ilm_event" in event:
            self.events.append(event)

    def named(self, name: str) -> list[LogEvent]:
        return [e for e in self.events if e["ilm_event"] == name]


class Nodes:
    """
    Stream networks on one Switchboard and Clock; node ``n`` listens on
    address ``"n"``.
    """

    def __init__(self, seed: int = 0, latency: float = 0.001, **settings: Any) -> None:
        self.clock = Clock()
        self.board = Switchboard(self.clock, latency=latency)
        self.random = random.Random(seed)
        self.settings = LinkSettings(**settings)
        self.networks: dict[PeerId, StreamNetwork] = {}
        self.receivers: dict[PeerId, RecordingReceiver] = {}

    def start(
        self,
        node: PeerId,
        dial: tuple[PeerId, ...] = (),
        keys: dict[PeerId, bytes] | None = None,
        known: tuple[PeerId, ...] = (),
    ) -> StreamNetwork:
        if keys is None:
            keys = {p: pair_key(node, p) for p in (*dial, *known)}
        network = StreamNetwork(
            node,
            listen=[self.board.server(str(node))],
            peers={p: self.board.client(str(p)) for p in dial},
            keys=keys,
            settings=self.settings,
            reactor=self.clock,
            random=self.random.random,
            random_bytes=self.random.randbytes,
        )
        receiver = RecordingReceiver()
        network.start(receiver)
        self.networks[node] = network
        self.receivers[node] = receiver
        return network

    def settle(self, seconds: float = 1.0) -> None:
        settle(self.clock, seconds)


def raw_connect(nodes: Nodes, address: str, peer: RawPeer | None = None) -> RawPeer:
    holder: list[RawPeer] = []

    def build() -> RawPeer:
        built = peer if peer is not None else RawPeer()
        holder.append(built)
        return built

    nodes.board.client(address).connect(Factory.forProtocol(build))
    settle(nodes.clock, 0.01)
    return holder[0]


def frames(data: bytes) -> list[tuple[int, bytes]]:
    parser = _wire.FrameParser(1 << 21)
    parser.feed(data)
    out = []
    while (frame := parser.next_frame()) is not None:
        out.append(frame)
    return out


def authenticate(
    nodes: Nodes, local: PeerId, remote: PeerId, key: bytes, **options: Any
) -> RawLink:
    """
    Connect a raw peer to ``remote`` and run a valid handshake as ``local``;
    return it once it holds the link (LINK_UP sent or received).
    """
    raw = raw_connect(nodes, str(remote), RawLink(local, remote, key, **options))
    assert isinstance(raw, RawLink)
    for _ in range(10):
        if raw.handshake.done:
            break
        nodes.settle(0.01)
    assert raw.handshake.done
    nodes.settle(0.01)
    return raw


class LinkTests(SynchronousTestCase):
    def test_provides_inetwork(self) -> None:
        """
        StreamNetwork provides INetwork and IConnectionOwner (what its
        connections talk to); its protocol is an IPushProducer (and an
        IProtocol).
        """
        nodes = Nodes()
        network = nodes.start(1, dial=(2,))
        verifyObject(INetwork, network)
        nodes.start(2, known=(1,))
        nodes.settle()
        protocol = network.link(2)
        verifyObject(IPushProducer, protocol)
        verifyObject(IProtocol, protocol)
        verifyObject(IConnectionOwner, network)

    def test_link_and_frames_both_ways(self) -> None:
        """
        Once linked, frames flow both ways in order, each peer sees one
        link_established, and connected_peers reports the link.
        """
        nodes = Nodes()
        a = nodes.start(1, dial=(2,))
        b = nodes.start(2, known=(1,))
        nodes.settle()
        self.assertEqual(nodes.receivers[1].kinds(), ["established"])
        self.assertEqual(nodes.receivers[2].kinds(), ["established"])
        self.assertEqual((a.connected_peers(), b.connected_peers()), ({2}, {1}))
        sent = [b"f%d" % i for i in range(100)]
        a.send_frames(2, sent[:50])
        a.send_frames(2, sent[50:])
        b.send_frames(1, [b"back"])
        nodes.settle()
        self.assertEqual(nodes.receivers[2].frames[1], sent)
        self.assertEqual(nodes.receivers[1].frames[2], [b"back"])

    def test_one_write_per_send(self) -> None:
        """
        send_frames writes a whole sequence of frames with one write.
        """
        nodes = Nodes()
        a = nodes.start(1, dial=(2,))
        nodes.start(2, known=(1,))
        nodes.settle()
        [pipe] = nodes.board.pipes
        before = pipe.ends[0].writes
        a.send_frames(2, [b"x" * 10] * 20)
        self.assertEqual(pipe.ends[0].writes, before + 1)

    def test_frames_to_unlinked_peer_discarded(self) -> None:
        """
        Frames for a peer without a link are discarded, and close_link on it
        does nothing.
        """
        nodes = Nodes()
        a = nodes.start(1, known=(2,))
        a.send_frames(2, [b"x"])
        a.close_link(2, ProtocolViolation("test"))
        nodes.settle()
        self.assertEqual(nodes.receivers[1].events, [])

    def test_reconnect_after_cut(self) -> None:
        """
        A cut link (bytes in flight lost) is reported lost on both sides and
        comes back within the fast default backoff.
        """
        nodes = Nodes()
        nodes.start(1, dial=(2,))
        nodes.start(2, known=(1,))
        nodes.settle()
        nodes.board.cut_all()
        self.assertEqual(nodes.receivers[1].kinds(), ["established", "lost"])
        nodes.settle(0.2)
        self.assertEqual(
            nodes.receivers[1].kinds(), ["established", "lost", "established"]
        )
        self.assertEqual(
            nodes.receivers[2].kinds(), ["established", "lost", "established"]
        )

    def test_peer_restart(self) -> None:
        """
        A peer that dies (its network aborted) and comes back on the same
        address is linked again.
        """
        nodes = Nodes()
        nodes.start(1, dial=(2,))
        nodes.networks[2] = nodes.start(2, known=(1,))
        nodes.settle()
        nodes.networks[2].abort()
        nodes.settle(0.5)
        self.assertEqual(nodes.receivers[1].kinds(), ["established", "lost"])
        nodes.start(2, known=(1,))
        nodes.settle(10)
        self.assertEqual(
            nodes.receivers[1].kinds(), ["established", "lost", "established"]
        )
        self.assertEqual(nodes.receivers[2].kinds(), ["established"])

    def test_backoff_grows_while_unreachable(self) -> None:
        """
        While the peer is unreachable, attempts back off exponentially up to
        the maximum: with 50 ms doubling to 1 s, about 9 attempts in 5 s.
        """
        nodes = Nodes(reconnect=Backoff(initial=0.05, maximum=1.0, jitter=0.0))
        nodes.start(1, dial=(2,))
        nodes.settle(5.0)
        self.assertTrue(7 <= nodes.board.attempts["2"] <= 10, nodes.board.attempts)
        nodes.start(2, known=(1,))
        nodes.settle(1.1)
        self.assertEqual(nodes.receivers[1].kinds(), ["established"])

    def test_refusal_after_violations_grows(self) -> None:
        """
        After ILM closes a link for a protocol violation, the node neither
        redials the peer nor accepts it for a while, longer after each
        violation in a row: 0.5 s, then 1 s (without jitter here).
        """
        refusal = Backoff(initial=0.5, maximum=60.0, jitter=0.0)
        nodes = Nodes(refusal=refusal)
        nodes.start(1, dial=(2,))
        nodes.start(2, known=(1,))
        nodes.settle()
        for hold in (0.5, 1.0):
            kinds = len(nodes.receivers[1].kinds())
            nodes.networks[1].close_link(2, ProtocolViolation("bad frame"))
            nodes.settle(hold - 0.05)
            self.assertEqual(nodes.receivers[1].kinds()[kinds:], ["lost"])
            nodes.settle(0.2)
            self.assertEqual(
                nodes.receivers[1].kinds()[kinds:], ["lost", "established"]
            )

    def test_refused_peer_that_dials(self) -> None:
        """
        A node that closed a link for a violation also turns away the
        peer's own redials until the refusal has passed.
        """
        refusal = Backoff(initial=2.0, maximum=60.0, jitter=0.0)
        nodes = Nodes(refusal=refusal)
        nodes.start(1, known=(2,))
        nodes.start(2, dial=(1,))
        nodes.settle()
        attempts = nodes.board.attempts["1"]
        nodes.networks[1].close_link(2, ProtocolViolation("bad frame"))
        nodes.settle(1.9)
        self.assertEqual(nodes.receivers[1].kinds(), ["established", "lost"])
        self.assertGreater(nodes.board.attempts["1"], attempts)
        nodes.settle(3)
        self.assertEqual(
            nodes.receivers[1].kinds(), ["established", "lost", "established"]
        )

    def test_start_fails_when_an_endpoint_cannot_listen(self) -> None:
        """
        If one endpoint cannot listen, start() fails with its error and the
        endpoints that did listen are closed again.
        """
        nodes = Nodes()
        nodes.board.server("taken").listen(Factory.forProtocol(Protocol))
        network = StreamNetwork(
            1,
            listen=[nodes.board.server("free"), nodes.board.server("taken")],
            keys={2: pair_key(1, 2)},
            reactor=nodes.clock,
        )
        started = network.start(RecordingReceiver())
        nodes.settle()
        self.failureResultOf(started, OSError)
        self.assertNotIn("free", nodes.board.listeners)

    def test_stop(self) -> None:
        """
        stop() closes the links cleanly (what was sent arrives), reports
        link_lost before its Deferred fires, closes the server-side
        connections, stops listening, and nothing is reported after.
        """
        nodes = Nodes()
        nodes.start(1, known=(2,))
        b = nodes.start(2, dial=(1,))
        nodes.settle()
        nodes.networks[1].send_frames(2, [b"last words"])
        stopped = nodes.networks[1].stop()
        nodes.settle(1)
        self.successResultOf(stopped)
        self.assertEqual(nodes.receivers[2].frames[1], [b"last words"])
        self.assertEqual(nodes.receivers[1].kinds(), ["established", "lost"])
        self.assertEqual(nodes.board.pipes, [])
        self.assertNotIn("1", nodes.board.listeners)
        nodes.settle(5)
        self.assertEqual(nodes.receivers[1].kinds(), ["established", "lost"])
        self.assertEqual(b.connected_peers(), frozenset())

    def test_stop_aborts_stalled_peer(self) -> None:
        """
        A peer that stops reading cannot hold stop() up: after close_grace
        the connection is aborted.
        """
        nodes = Nodes(close_grace=2.0)
        nodes.start(1, known=(2,))
        nodes.start(2, dial=(1,))
        nodes.settle()
        [pipe] = nodes.board.pipes
        pipe.stall(0)
        pipe.stall(1)
        nodes.networks[1].send_frames(2, [b"x"])
        stopped = nodes.networks[1].stop()
        nodes.settle(1.0)
        self.assertNoResult(stopped)
        nodes.settle(1.5)
        self.successResultOf(stopped)


class SimultaneousDialTests(SynchronousTestCase):
    def run_dial(self, delay: float, latency: float, seed: int) -> Nodes:
        nodes = Nodes(seed=seed, latency=latency)
        nodes.start(1, dial=(2,))
        nodes.settle(delay)
        nodes.start(2, dial=(1,))
        nodes.settle(2.0)
        return nodes

    def test_exactly_one_link(self) -> None:
        """
        When both nodes dial each other at once (over many timings), exactly
        one connection survives, each side sees a single link_established
        and no link_lost, and frames flow over the link.
        """
        for seed in range(40):
            rng = random.Random(seed)
            delay = rng.choice([0.0, 0.0005, 0.001, 0.002, 0.003, 0.01])
            latency = rng.choice([0.0005, 0.001, 0.003])
            nodes = self.run_dial(delay, latency, seed)
            context = f"seed {seed}: delay {delay}, latency {latency}"
            self.assertEqual(nodes.receivers[1].kinds(), ["established"], context)
            self.assertEqual(nodes.receivers[2].kinds(), ["established"], context)
            self.assertEqual(len(nodes.board.pipes), 1, context)
            nodes.networks[2].send_frames(1, [b"over the link"])
            nodes.settle(0.1)
            self.assertEqual(nodes.receivers[1].frames[2], [b"over the link"], context)

    def test_smaller_id_connection_wins(self) -> None:
        """
        When both connections authenticate at the same time, the one
        initiated by the smaller id is the link.
        """
        nodes = self.run_dial(0.0, 0.001, 0)
        [pipe] = nodes.board.pipes
        # The client end of the surviving pipe belongs to node 1.
        self.assertEqual(pipe.ends[0].protocol.initiated, True)  # type: ignore[union-attr]
        self.assertEqual(pipe.ends[0].protocol.local_id, 1)  # type: ignore[union-attr]

    def test_string_and_int_ids(self) -> None:
        """
        Mixed int and str ids resolve a simultaneous dial too (ints order
        before strings).
        """
        nodes = Nodes()
        nodes.start("alpha", dial=(7,))
        nodes.start(7, dial=("alpha",))
        nodes.settle(2.0)
        self.assertEqual(nodes.receivers["alpha"].kinds(), ["established"])
        self.assertEqual(nodes.receivers[7].kinds(), ["established"])
        [pipe] = nodes.board.pipes
        self.assertEqual(pipe.ends[0].protocol.local_id, 7)  # type: ignore[union-attr]

    def test_no_dialling_while_peer_linked(self) -> None:
        """
        A node whose link was initiated by its peer does not dial that peer,
        and dials again once the link is lost.
        """
        nodes = Nodes()
        nodes.start(1, dial=(2,))
        nodes.start(2, dial=(1,))
        nodes.settle(2.0)
        attempts = dict(nodes.board.attempts)
        nodes.settle(30.0)
        self.assertEqual(nodes.board.attempts, attempts)
        nodes.board.cut_all()
        nodes.settle(1.0)
        self.assertEqual(
            nodes.receivers[2].kinds(), ["established", "lost", "established"]
        )


class KeepaliveTests(SynchronousTestCase):
    def test_idle_link_stays_up(self) -> None:
        """
        A link with no traffic exchanges PING/PONG and stays up.
        """
        nodes = Nodes(keepalive_interval=1.0, idle_timeout=3.0)
        nodes.start(1, dial=(2,))
        nodes.start(2, known=(1,))
        nodes.settle(60.0)
        self.assertEqual(nodes.receivers[1].kinds(), ["established"])
        [pipe] = nodes.board.pipes
        self.assertGreater(pipe.bytes_delivered[0], 60 * 13)

    def test_half_open_detected(self) -> None:
        """
        A connection that silently stops carrying bytes (half-open) is
        closed with LinkTimeout after the idle timeout, logged as
        link_timeout, and the link is then re-established.
        """
        logs = LogCapture(self)
        nodes = Nodes(keepalive_interval=1.0, idle_timeout=3.0)
        nodes.start(1, dial=(2,))
        nodes.start(2, known=(1,))
        nodes.settle(1.0)
        [pipe] = nodes.board.pipes
        pipe.blackhole()
        nodes.settle(2.5)
        self.assertEqual(nodes.receivers[1].kinds(), ["established"])
        nodes.settle(2.0)
        self.assertEqual(nodes.receivers[1].kinds()[:2], ["established", "lost"])
        reason = nodes.receivers[1].lost_reasons()[0]
        self.assertTrue(reason.check(LinkTimeout), reason)
        self.assertTrue(logs.named("link_timeout"))
        nodes.settle(2.0)
        self.assertEqual(nodes.receivers[1].kinds()[-1], "established")

    def test_handshake_timeout(self) -> None:
        """
        A connection that never completes the handshake is aborted after
        handshake_timeout, with a LinkTimeout log event.
        """
        logs = LogCapture(self)
        nodes = Nodes(handshake_timeout=2.0)
        nodes.start(1, known=(2,))
        raw = raw_connect(nodes, "1")
        nodes.settle(1.9)
        self.assertIsNone(raw.lost)
        nodes.settle(0.2)
        self.assertIsNotNone(raw.lost)
        self.assertEqual(raw.received, b"")
        [event] = logs.named("link_timeout")
        self.assertEqual(event["kind"], "LinkTimeout")


class InternalErrorTests(SynchronousTestCase):
    """
    A bug in the network's own timers costs at most the link it hit: it is
    logged as an internal_error event and never reaches the reactor.
    """

    def test_keepalive_timer_raising_closes_only_that_link(self) -> None:
        """
        An exception in a keepalive tick is logged, that link is closed and
        re-established, and the next keepalive runs as usual.
        """
        logs = LogCapture(self)
        nodes = Nodes(keepalive_interval=1.0, idle_timeout=3.0)
        nodes.start(1, dial=(2,))
        nodes.start(2, known=(1,))
        nodes.settle(0.5)
        broken = [True]
        real_silence = Keepalive.silence

        def silence(keepalive: Keepalive) -> str | None:
            if broken[0] and keepalive.peer_id == 2:
                broken[0] = False
                raise RuntimeError("simulated bug in the keepalive path")
            return real_silence(keepalive)

        self.patch(Keepalive, "silence", silence)
        nodes.settle(1.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [event] = logs.named("internal_error")
        self.assertEqual(event["peer_id"], 2)
        self.assertEqual(nodes.receivers[1].kinds()[:2], ["established", "lost"])
        nodes.settle(5.0)
        self.assertEqual(nodes.receivers[1].kinds()[-1], "established")
        self.assertEqual(len(logs.named("internal_error")), 1)


class BackpressureTests(SynchronousTestCase):
    def test_pause_and_resume(self) -> None:
        """
        When the peer stops reading and the transport's buffer fills, ILM is
        told link_paused; when it drains, link_resumed.  Other links are not
        paused.
        """
        nodes = Nodes()
        a = nodes.start(1, dial=(2, 3))
        nodes.start(2, known=(1,))
        nodes.start(3, known=(1,))
        nodes.settle()
        pipe = next(
            p
            for p in nodes.board.pipes
            if p.ends[1].protocol.local_id == 2  # type: ignore[union-attr]
        )
        pipe.stall(1)
        for _ in range(40):
            a.send_frames(2, [b"x" * 10_000])
        self.assertEqual(nodes.receivers[1].kinds(2)[-1], "paused")
        self.assertNotIn("paused", nodes.receivers[1].kinds(3))
        pipe.stall(1, False)
        nodes.settle(0.1)
        self.assertEqual(nodes.receivers[1].kinds(2)[-1], "resumed")
        self.assertEqual(len(nodes.receivers[2].frames[1]), 40)


class NeverReadingPeerTests(SynchronousTestCase):
    """
    A peer that sends but does not read: while its link is paused the node
    owes it at most one PONG, and once it has written or received
    ``max_unsent_bytes`` it stops reading from it and drops the link after
    ``idle_timeout`` if the peer still reads nothing.
    """

    def paused_link(self, **settings: Any) -> tuple[Nodes, RawLink, Pipe, list[str]]:
        """
        Node 2 with a raw peer 1 that stopped reading; node 2's link to it
        is paused (its transport's pause/resume of reading recorded).
        """
        nodes = Nodes(keepalive_interval=1.0, idle_timeout=3.0, **settings)
        nodes.start(2, known=(1, 3))
        raw = authenticate(nodes, 1, 2, pair_key(1, 2))
        [pipe] = [p for p in nodes.board.pipes if p.ends[0].protocol is raw]
        reading: list[str] = []
        node_end = pipe.ends[1]
        node_end.pauseProducing = lambda: reading.append("paused")  # type: ignore[method-assign]
        node_end.resumeProducing = lambda: reading.append("resumed")  # type: ignore[method-assign]
        pipe.stall(0)
        nodes.networks[2].send_frames(1, [b"x" * 300_000])
        self.assertEqual(nodes.receivers[2].kinds(1), ["established", "paused"])
        return nodes, raw, pipe, reading

    def test_one_pong_owed_while_paused(self) -> None:
        """
        1,000 PINGs to a paused link draw no PONG while it is paused and
        exactly one (the latest token) when it resumes; nothing else
        accumulates for the peer.
        """
        nodes, raw, pipe, reading = self.paused_link()
        waiting = pipe.in_flight(0)
        raw.send(
            *(raw.frame(_wire.LINK_PING, _wire.encode_token(n)) for n in range(1000))
        )
        nodes.settle(0.1)
        self.assertEqual(pipe.in_flight(0), waiting)
        pipe.stall(0, False)
        nodes.settle(0.1)
        self.assertEqual(nodes.receivers[2].kinds(1)[-1], "resumed")
        pongs = [body for kind, body in raw.frames if kind == _wire.LINK_PONG]
        self.assertEqual(pongs, [_wire.encode_token(999)])
        self.assertEqual(reading, [])

    def test_stops_reading_then_drops_the_link(self) -> None:
        """
        A paused peer that keeps sending: once it has sent max_unsent_bytes
        the node stops reading from it (logged once), and since the peer
        still reads nothing, the link is dropped with LinkTimeout after
        idle_timeout, although the peer never stopped sending.  Another
        peer's link is untouched.
        """
        logs = LogCapture(self)
        nodes, raw, _pipe, reading = self.paused_link(max_unsent_bytes=10_000)
        nodes.start(3, dial=(2,))
        nodes.settle(0.1)
        for _ in range(40):
            raw.send(
                *(raw.frame(_wire.LINK_PING, _wire.encode_token(1)) for _ in range(50))
            )
            nodes.settle(0.1)
            if raw.lost is not None:
                break
        self.assertEqual(reading, ["paused"])
        [stopped] = logs.named("link_reading_stopped")
        self.assertGreater(stopped["unread"], 10_000)
        self.assertEqual(nodes.receivers[2].kinds(1)[-1], "lost")
        reason = nodes.receivers[2].lost_reasons()[-1]
        self.assertTrue(reason.check(LinkTimeout), reason)
        self.assertIn("read nothing", reason.getErrorMessage())
        self.assertEqual(nodes.receivers[2].kinds(3), ["established"])

    def test_reading_resumes_when_the_peer_reads(self) -> None:
        """
        Past max_unsent_bytes written to a paused link the node stops
        reading; when the peer reads again (the buffer drains) before
        idle_timeout, reading resumes and the link stays up.
        """
        nodes, raw, pipe, reading = self.paused_link(max_unsent_bytes=1000)
        nodes.networks[2].send_frames(1, [b"y" * 2000])
        self.assertEqual(reading, ["paused"])
        nodes.settle(1.5)
        pipe.stall(0, False)
        nodes.settle(0.5)
        self.assertEqual(reading, ["paused", "resumed"])
        nodes.settle(5.0)
        self.assertEqual(
            nodes.receivers[2].kinds(1), ["established", "paused", "resumed"]
        )
        self.assertIsNone(raw.lost)


class AuthenticationTests(SynchronousTestCase):
    def attempt(
        self, claimed: PeerId, key: bytes, nodes: Nodes | None = None
    ) -> tuple[Nodes, RawPeer, LogCapture]:
        logs = LogCapture(self)
        if nodes is None:
            nodes = Nodes()
            nodes.start(2, known=(1, 3))
        raw = raw_connect(nodes, "2")
        handshake = LinkHandshake(
            claimed, 2, keys=PreSharedKeys({2: key}), certificates=False
        )
        assert raw.transport is not None
        for frame in handshake.start():
            raw.transport.write(frame)
        nodes.settle(0.01)
        [(kind, body)] = frames(raw.received)
        for reply in handshake.receive(kind, body, lambda: 2):
            raw.transport.write(reply)
        nodes.settle(0.1)
        return nodes, raw, logs

    def assert_refused(self, nodes: Nodes, raw: RawPeer) -> None:
        self.assertIsNotNone(raw.lost)
        self.assertEqual(
            [kind for kind, _ in frames(raw.received)], [_wire.LINK_CHALLENGE]
        )
        self.assertEqual(nodes.receivers[2].events, [])

    def test_wrong_key(self) -> None:
        """
        A peer with the wrong key is refused with an authentication_failed
        event, learns nothing beyond the CHALLENGE nonce, and ILM sees
        nothing.
        """
        nodes, raw, logs = self.attempt(1, b"w" * 32)
        self.assert_refused(nodes, raw)
        [event] = logs.named("authentication_failed")
        self.assertEqual(event["kind"], "AuthenticationFailed")
        self.assertEqual(event["claimed_id"], 1)

    def test_unconfigured_peer(self) -> None:
        """
        A peer whose id is not configured gets AuthenticationFailed, after the
        same CHALLENGE a configured one gets.
        """
        nodes, raw, logs = self.attempt(99, b"u" * 32)
        self.assert_refused(nodes, raw)
        [event] = logs.named("authentication_failed")
        self.assertIn("not configured", event["reason"])

    def test_spoofed_peer(self) -> None:
        """
        Node 3 claiming to be node 1 (with its own key) is refused with
        SpoofedPeer and a spoofed_peer event naming both ids.
        """
        nodes, raw, logs = self.attempt(1, pair_key(2, 3))
        self.assert_refused(nodes, raw)
        [event] = logs.named("spoofed_peer")
        self.assertEqual(event["kind"], "SpoofedPeer")
        self.assertIn("key of 3", event["reason"])

    def test_refusal_log_lines_are_bounded(self) -> None:
        """
        A stranger claiming the longest, most escaped id there is (255
        control characters) gets refusal lines of at most 4 KiB as JSON
        (the documented worst case per line): the id appears cut to 40
        characters in the text, whole only in the claimed_id field.  A
        second refusal from the same address is a summary, no longer.
        """
        from twisted.logger import eventAsJSON

        claimed = "\x01" * 255
        nodes, _raw, logs = self.attempt(claimed, b"u" * 32)
        self.attempt(claimed, b"u" * 32, nodes)
        nodes.networks[2].flush_log()
        full, summary = logs.named("authentication_failed")
        self.assertEqual(full["claimed_id"], claimed)
        self.assertEqual(summary["suppressed"], 1)
        for event in (full, summary):
            self.assertLessEqual(len(event["reason"]), 120)
            self.assertLessEqual(len(eventAsJSON(event)), 4 * 1024)

    def test_refused_peer_does_not_disturb_links(self) -> None:
        """
        A failed authentication leaves the node's existing links alone.
        """
        nodes = Nodes()
        nodes.start(2, known=(1, 3))
        nodes.start(1, dial=(2,))
        nodes.settle()
        self.attempt(3, b"w" * 32, nodes)
        nodes.networks[1].send_frames(2, [b"still here"])
        nodes.settle()
        self.assertEqual(nodes.receivers[2].kinds(), ["established", "frame"])

    def test_legitimate_peer_redials_after_refusals(self) -> None:
        """
        The dialler's handshake failing (a node answering with the wrong
        key) counts as a failed attempt: it backs off and keeps trying.
        Each side logs the refusal once (the listener rate-limits its
        refusals per source address; the dialler logs the reason once per
        change, with link_error saying how many attempts failed since when).
        """
        logs = LogCapture(self)
        nodes = Nodes(reconnect=Backoff(initial=0.05, maximum=0.4, jitter=0.0))
        nodes.start(2, keys={1: b"x" * 32})
        dialler = nodes.start(1, dial=(2,))
        nodes.settle(3.0)
        self.assertGreaterEqual(nodes.board.attempts["2"], 8)
        self.assertEqual(len(logs.named("authentication_failed")), 1)
        [dial_failed] = logs.named("dial_failed")
        self.assertIn("refused our key proof", dial_failed["reason"])
        error = dialler.link_error(2)
        assert error is not None
        self.assertEqual(error.reason, dial_failed["reason"])
        self.assertEqual(error.attempts, nodes.board.attempts["2"])
        self.assertLess(error.since, 0.1)
        self.assertEqual(nodes.receivers[1].events, [])
        self.assertEqual(nodes.receivers[2].events, [])


class FrameIntegritySettingTests(SynchronousTestCase):
    def test_nodes_that_disagree_never_link(self) -> None:
        """
        A node with frame_integrity off dialling one with it on (and the
        other way round): no link, ever; the listener logs
        frame_integrity_mismatch for the peer whose proof it checked, and
        the dialler's link_error says the setting differs.
        """
        for dialler_tags in (False, True):
            logs = LogCapture(self)
            nodes = Nodes()
            networks = {}
            for node_id, tags in ((1, dialler_tags), (2, not dialler_tags)):
                networks[node_id] = StreamNetwork(
                    node_id,
                    listen=[nodes.board.server(str(node_id))],
                    peers={2: nodes.board.client("2")} if node_id == 1 else {},
                    keys={3 - node_id: pair_key(1, 2)},
                    settings=LinkSettings(frame_integrity=tags),
                    reactor=nodes.clock,
                )
                networks[node_id].start(RecordingReceiver())
            nodes.settle(2.0)
            self.assertEqual(networks[1].connected_peers(), frozenset())
            self.assertEqual(networks[2].connected_peers(), frozenset())
            [refused] = logs.named("frame_integrity_mismatch")
            self.assertEqual(refused["peer_id"], None)
            self.assertEqual(refused["claimed_id"], 1)
            self.assertIn("must be the same on both nodes", refused["reason"])
            error = networks[1].link_error(2)
            assert error is not None
            self.assertEqual(error.kind, "FrameIntegrityMismatch")
            self.assertGreater(error.attempts, 3)


class UnauthenticatedCapTests(SynchronousTestCase):
    def test_caps_per_host_and_in_total(self) -> None:
        """
        Incoming connections in their handshake are capped per source
        address and in total: one beyond either cap is aborted at once
        (logged once as connection_limit), and the count goes back to zero
        as connections authenticate or end, so a legitimate peer links.
        """
        for total, per_host, admitted in ((5, 3, 3), (2, 8, 2)):
            logs = LogCapture(self)
            nodes = Nodes(
                max_unauthenticated=total, max_unauthenticated_per_host=per_host
            )
            network = nodes.start(2, known=(1,))
            raws = [raw_connect(nodes, "2") for _ in range(6)]
            alive = [raw for raw in raws if raw.lost is None]
            self.assertEqual(len(alive), admitted)
            self.assertEqual(network.stats().connections, admitted)
            self.assertEqual(network.stats().refusals["connection_limit"], 6 - admitted)
            [limited] = logs.named("connection_limit")
            self.assertEqual(limited["kind"], "ConnectionLimitReached")
            self.assertIn("refused at once", limited["reason"])
            nodes.settle(11.0)  # the handshake timeout ends the others
            self.assertEqual(network.stats().connections, 0)
            nodes.start(1, dial=(2,))
            nodes.settle(0.5)
            self.assertEqual(network.connected_peers(), frozenset({1}))
            self.assertEqual(network.stats().connections, 1)


class LogFieldTests(SynchronousTestCase):
    def test_fields_hold_plain_values(self) -> None:
        """
        network_started lists the dialled peers as ids and the listening
        addresses as "host:port" strings; a refusal's address is a
        "host:port" string and its host a string: no reprs of Python
        objects.
        """
        logs = LogCapture(self)
        nodes = Nodes()
        nodes.start(2, dial=("b", 1), keys={1: pair_key(1, 2), "b": pair_key(2, "b")})
        raw_connect(nodes, "2").transport.write(b"garbage!")  # type: ignore[union-attr]
        nodes.settle(0.1)
        [started] = logs.named("network_started")
        self.assertEqual(started["peers"], [1, "b"])
        self.assertEqual(started["addresses"], ["127.0.0.1:40000"])
        [refused] = logs.named("link_protocol_violation")
        self.assertRegex(refused["address"], r"^127\.0\.0\.1:\d+$")
        self.assertEqual(refused["host"], "127.0.0.1")


class HostileInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.nodes = Nodes()
        self.nodes.start(2, known=(1, 3))
        self.nodes.start(3, dial=(2,))
        self.nodes.settle()

    def send_raw(self, data: bytes) -> RawPeer:
        raw = raw_connect(self.nodes, "2")
        assert raw.transport is not None
        raw.transport.write(data)
        self.nodes.settle(0.1)
        return raw

    def send_linked(self, make: Callable[[RawLink], bytes], **options: Any) -> RawLink:
        """
        Authenticate as node 1, then write what ``make`` builds with the
        link (tagged frames, or raw bytes).
        """
        raw = authenticate(self.nodes, 1, 2, pair_key(1, 2), **options)
        raw.send(make(raw))
        self.nodes.settle(0.1)
        return raw

    def assert_closed(self, raw: RawPeer, error: type[Exception]) -> None:
        self.assertIsNotNone(raw.lost)
        events = [
            e
            for e in self.logs.events
            if e["ilm_event"]
            in (
                "link_protocol_violation",
                "authentication_failed",
                "spoofed_peer",
                "frame_authentication_failed",
                "frame_integrity_mismatch",
            )
        ]
        self.assertEqual([e["kind"] for e in events], [error.__name__])
        # The other link is unaffected.
        self.nodes.networks[3].send_frames(2, [b"unaffected"])
        self.nodes.settle(0.1)
        self.assertEqual(self.nodes.receivers[2].frames[3][-1], b"unaffected")

    def test_garbage(self) -> None:
        """
        Garbage bytes (an HTTP request) close the connection with
        FrameTooLarge (its first four bytes read as a huge length).
        """
        raw = self.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assert_closed(raw, FrameTooLarge)
        self.assertEqual(raw.received, b"")

    def test_unknown_frame_type(self) -> None:
        """
        An unknown link frame type is UnknownFrameType.
        """
        raw = self.send_raw(b"\x00\x00\x00\x02\x7f\x00")
        self.assert_closed(raw, UnknownFrameType)

    def test_zero_length(self) -> None:
        """
        A zero-length frame is MalformedFrame.
        """
        self.assert_closed(self.send_raw(b"\x00\x00\x00\x00"), MalformedFrame)

    def test_oversized_before_authentication(self) -> None:
        """
        Before authentication, a frame over 1 KiB is refused on its length
        prefix alone.
        """
        raw = self.send_raw(_wire.carry_header(2000))
        self.assert_closed(raw, FrameTooLarge)

    def test_oversized_after_authentication(self) -> None:
        """
        After authentication, a frame over max_frame_size is refused on its
        length prefix; ILM is told the link was lost.
        """
        raw = self.send_linked(lambda raw: _wire.carry_header(2**21))
        self.assert_closed(raw, FrameTooLarge)
        self.assertEqual(self.nodes.receivers[2].kinds(1), ["established", "lost"])

    def test_wrong_version(self) -> None:
        """
        A HELLO of another version is UnsupportedVersion.
        """
        hello = _wire.encode_hello(_wire.LinkHello(1, b"n" * 32, 1, 2))
        bad = hello[:9] + b"\x00\x09" + hello[11:]
        self.assert_closed(self.send_raw(bad), UnsupportedVersion)

    def test_data_before_authentication(self) -> None:
        """
        DATA before the handshake is UnexpectedFrame and reaches nobody.
        """
        raw = self.send_raw(_wire.carry_header(3) + b"abc")
        self.assert_closed(raw, UnexpectedFrame)
        self.assertNotIn(1, self.nodes.receivers[2].frames)

    def test_handshake_frame_after_link_up(self) -> None:
        """
        A handshake frame on a link that is up is UnexpectedFrame; the frames
        before it were delivered.
        """
        raw = self.send_linked(
            lambda raw: (
                raw.data(b"ok")
                + raw.frame(_wire.LINK_CHALLENGE, b"c" * 33)
                + raw.data(b"late")
            )
        )
        self.assert_closed(raw, UnexpectedFrame)
        self.assertEqual(self.nodes.receivers[2].frames[1], [b"ok"])

    def test_truncated_frame(self) -> None:
        """
        A connection that ends in the middle of a frame delivers nothing of
        it; the link is reported lost.
        """
        raw = self.send_linked(lambda raw: raw.data(b"1234567890")[:10])
        assert raw.transport is not None
        raw.transport.loseConnection()
        self.nodes.settle(0.1)
        self.assertNotIn(1, self.nodes.receivers[2].frames)
        self.assertEqual(self.nodes.receivers[2].kinds(1), ["established", "lost"])

    def test_malformed_ping(self) -> None:
        """
        A PING of the wrong size is MalformedFrame.
        """
        raw = self.send_linked(lambda raw: raw.frame(_wire.LINK_PING, b"xyz"))
        self.assert_closed(raw, MalformedFrame)

    def test_empty_data(self) -> None:
        """
        A DATA link frame without a session frame is MalformedFrame.
        """
        raw = self.send_linked(lambda raw: raw.frame(_wire.CARRY))
        self.assert_closed(raw, MalformedFrame)

    def test_link_up_from_larger_id(self) -> None:
        """
        A LINK_UP from the node that does not decide (the larger id) is
        UnexpectedFrame.
        """
        raw = authenticate(self.nodes, 3, 2, pair_key(2, 3))
        self.assertEqual(raw.kinds(), [_wire.LINK_UP])
        raw.send(raw.frame(_wire.LINK_UP))
        self.nodes.settle(0.01)
        self.assertIsNotNone(raw.lost)
        [event] = self.logs.named("link_protocol_violation")
        self.assertEqual(event["kind"], "UnexpectedFrame")

    def test_frame_with_a_wrong_tag(self) -> None:
        """
        On a tagged link, a DATA frame whose body was altered after tagging
        closes the link with FrameAuthenticationFailed and reaches nobody;
        the frames before it were delivered.
        """

        def altered(raw: RawLink) -> bytes:
            good = raw.data(b"ok")
            bad = bytearray(raw.data(b"altered"))
            bad[6] ^= 0x01
            return good + bytes(bad)

        raw = self.send_linked(altered)
        self.assert_closed(raw, FrameAuthenticationFailed)
        self.assertEqual(self.nodes.receivers[2].frames[1], [b"ok"])

    def test_replayed_dropped_and_untagged_frames(self) -> None:
        """
        A frame sent twice (replayed), a frame skipped (the next one carries
        a later counter: one was dropped), and an untagged frame each close
        a tagged link with FrameAuthenticationFailed; only the frames before
        the bad one are delivered.
        """
        cases: dict[str, Callable[[RawLink], bytes]] = {
            "replayed": lambda raw: (lambda f: f + f)(raw.data(b"once")),
            "dropped": lambda raw: (raw.data(b"lost"), raw.data(b"after"))[1],
            "untagged": lambda raw: _wire.carry_header(4) + b"bare",
        }
        receiver = self.nodes.receivers[2]
        for name, make in cases.items():
            before = len(receiver.frames.get(1, []))
            raw = self.send_linked(make)
            self.assertIsNotNone(raw.lost, name)
            lost = [e[2] for e in receiver.events if e[:2] == ("lost", 1)]
            self.assertTrue(lost[-1].check(FrameAuthenticationFailed), name)
            delivered = receiver.frames.get(1, [])[before:]
            self.assertEqual(delivered, [b"once"] if name == "replayed" else [], name)
        # The first is logged in full; the repeats from the same address are
        # counted for the summary.
        self.assertEqual(len(self.logs.named("frame_authentication_failed")), 1)

    def test_frame_integrity_setting_must_match(self) -> None:
        """
        A peer whose frame_integrity setting differs is refused once its
        proof checked out (FrameIntegrityMismatch, naming it), never linked
        without tags; with the setting off on both sides, untagged frames
        flow.
        """
        raw = raw_connect(
            self.nodes, "2", RawLink(1, 2, pair_key(1, 2), frame_integrity=False)
        )
        self.nodes.settle(0.1)
        self.assertIsNotNone(raw.lost)
        [event] = self.logs.named("frame_integrity_mismatch")
        self.assertEqual(event["kind"], "FrameIntegrityMismatch")
        self.assertIn("peer 1 does not tag frames", event["reason"])
        self.assertEqual(self.nodes.receivers[2].kinds(1), [])

        nodes = Nodes(frame_integrity=False)
        nodes.start(2, known=(1,))
        raw = authenticate(nodes, 1, 2, pair_key(1, 2), frame_integrity=False)
        raw.send(_wire.carry_header(5) + b"plain")
        nodes.settle(0.1)
        self.assertEqual(nodes.receivers[2].frames[1], [b"plain"])


def record_loss(log: list[PeerId], peer: PeerId) -> Callable[[PeerId, Any], None]:
    """
    A ``link_lost`` that appends ``peer`` (the node that heard it) to ``log``.
    """
    return lambda peer_id, reason: log.append(peer)


class DeterminismTests(SynchronousTestCase):
    def test_connections_close_in_the_order_they_were_made(self) -> None:
        """
        ``abort`` and ``stop`` close a node's connections in the order the
        connections were made, whatever the protocol objects' hashes (they
        depend on memory addresses): a run on a Clock replays exactly.
        """
        hashes: dict[int, int] = {}

        def reversed_hash(protocol: object) -> int:
            # Each new protocol hashes lower than the one before it, so a
            # set would list them newest first.
            return hashes.setdefault(id(protocol), 1000 - len(hashes))

        self.patch(ILMProtocol, "__hash__", reversed_hash)
        for how in ("abort", "stop"):
            nodes = Nodes()
            peers = (2, 3, 4, 5, 6)
            # The peers dial node 1: its connections are incoming ones (its
            # own dialers would close theirs in the order of its peers).
            nodes.start(1, known=peers)
            closed: list[PeerId] = []
            for peer in peers:
                nodes.start(peer, dial=(1,))
                nodes.receivers[peer].link_lost = record_loss(closed, peer)  # type: ignore[method-assign]
            nodes.settle()
            self.assertEqual(nodes.networks[1].connected_peers(), frozenset(peers))
            getattr(nodes.networks[1], how)()
            nodes.settle()
            self.assertEqual(closed, list(peers), how)


class PublicNamesTests(SynchronousTestCase):
    def test_reexports(self) -> None:
        """
        ilm.network's public names are the private implementations.
        """
        import ilm.network
        from ilm.network import _handshake, _stream, _tls

        for name, module in (
            ("StreamNetwork", _stream),
            ("ILMProtocol", _stream),
            ("ILMFactory", _stream),
            ("LinkSettings", _stream),
            ("Backoff", _stream),
            ("DialFailure", _stream),
            ("PreSharedKeys", _handshake),
            ("TLSCredentials", _tls),
            ("fingerprint", _tls),
            ("node_uri", _tls),
        ):
            self.assertIs(getattr(ilm.network, name), getattr(module, name))
            self.assertIn(name, ilm.network.__all__)


class EndpointConfigurationTests(SynchronousTestCase):
    """
    Endpoint strings are parsed when the network is built: a malformed one
    raises at once, naming the peer or the listen option, instead of
    hanging the node.
    """

    KEYS = {1: b"k" * 32, "b": b"j" * 32}

    def _network(self, **kwargs: Any) -> StreamNetwork:
        return StreamNetwork(2, keys=self.KEYS, reactor=Clock(), **kwargs)

    def test_malformed_peer_endpoints(self) -> None:
        """
        A missing port, a bare host:port, a port that is not a number or
        out of range, and an unknown endpoint type each raise
        ``ConfigurationError`` naming the peer and the string.
        """
        for text in (
            "tcp:host=127.0.0.1",
            "127.0.0.1:9001",
            "tcp:host=127.0.0.1:port=notaport",
            "tcp:host=127.0.0.1:port=99999",
            "bogus:1",
            "",
        ):
            with self.assertRaises(ilm.errors.ConfigurationError) as caught:
                self._network(peers={"b": text})
            message = str(caught.exception)
            self.assertIn("peer 'b'", message)
            self.assertIn(repr(text), message)
            self.assertNotIn("\n", message)
        self.assertIsInstance(caught.exception, ValueError)

    def test_malformed_listen_endpoints(self) -> None:
        """
        A malformed listen endpoint raises ``ConfigurationError`` naming it.
        """
        for text in ("tcp:notaport", "9001", "tcp:70000"):
            with self.assertRaises(ilm.errors.ConfigurationError) as caught:
                self._network(listen=[text])
            self.assertIn("listen endpoint " + repr(text), str(caught.exception))

    def test_valid_endpoints_accepted(self) -> None:
        """
        Well-formed strings and endpoint objects are accepted; port 0 is
        fine for listening (the system picks one).
        """
        network = self._network(
            listen=["tcp:0:interface=127.0.0.1", "unix:/tmp/ilm-test.sock"],
            peers={1: "tcp:host=127.0.0.1:port=9001", "b": "unix:/tmp/b.sock"},
        )
        self.assertEqual(network.connected_peers(), frozenset())

    def test_non_endpoint_object_refused(self) -> None:
        """
        A peer endpoint that is neither a string nor an endpoint is refused.
        """
        with self.assertRaises(ilm.errors.ConfigurationError) as caught:
            self._network(peers={1: 9001})  # type: ignore[dict-item]
        self.assertIn("peer 1", str(caught.exception))

    def test_create_fails_at_once(self) -> None:
        """
        Through the library: ``ILM.create`` with such a network never
        starts; the network cannot even be built, so nothing waits forever.
        """
        with self.assertRaises(ilm.errors.ConfigurationError):
            StreamNetwork("a", peers={"b": "tcp:host=127.0.0.1"}, keys=self.KEYS)

    def test_can_link(self) -> None:
        """
        ``can_link`` is true only for peers the network could authenticate:
        with keys, those with a key; with TLS pins, the pinned ones; with a
        trusted CA, any peer; never this node itself.
        """
        from ilm.network import TLSCredentials

        from .tls_support import make_ca, self_signed

        network = self._network()
        self.assertTrue(network.can_link(1))
        self.assertTrue(network.can_link("b"))
        self.assertFalse(network.can_link("1"))
        self.assertFalse(network.can_link("reciever"))
        self.assertFalse(network.can_link(2))
        certificate, key = self_signed()
        peer_certificate, _ = self_signed("peer")
        from ilm.network._tls import fingerprint

        pinned = TLSCredentials(
            certificate, key, peer_fingerprints={7: fingerprint(peer_certificate)}
        )
        tls_network = StreamNetwork(2, tls=pinned, reactor=Clock())
        self.assertTrue(tls_network.can_link(7))
        self.assertFalse(tls_network.can_link(8))
        ca, _ca_key = make_ca()
        by_ca = TLSCredentials(certificate, key, ca_certificates=[ca])
        self.assertTrue(StreamNetwork(2, tls=by_ca, reactor=Clock()).can_link(8))
