"""
The stream network's small parts, each on its own: the dialler, which
peers are dialled (held or not), the listeners, the refusal policy shared
with the in-memory network, the admission caps and the link writer's flow
control.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ilm._backoff import Backoff
from ilm._peerid import PeerId
from ilm.errors import ConfigurationError
from ilm.network import _wire
from ilm.network._admission import Admission
from ilm.network._counters import NetworkCounters
from ilm.network._dialler import Dialler, _LinkEndpoint
from ilm.network._handshake import PreSharedKeys
from ilm.network._listeners import Listeners
from ilm.network._peer_dials import PeerDials, peer_endpoints
from ilm.network._refusal import RefusalPolicy
from ilm.network._writer import LinkWriter

from .stream_support import Switchboard


class Events:
    """Log events with an ``ilm_event`` while a test runs."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self._observe)
        case.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: LogEvent) -> None:
        if "ilm_event" in event:
            self.events.append(event)

    def named(self, name: str) -> list[LogEvent]:
        return [e for e in self.events if e["ilm_event"] == name]


class DiallerTests(SynchronousTestCase):
    def dialler(self, wanted: set[PeerId]) -> tuple[Dialler, Clock]:
        clock = Clock()
        board = Switchboard(clock)
        dialler = Dialler(
            endpoints={2: [(board.client("2"), "two")]},
            tls=None,
            clock=clock,
            reconnect=Backoff(),
            uniform=lambda: 0.0,
            counters=NetworkCounters(),
            factory_for=lambda peer_id: Factory(),
            wanted=lambda peer_id: peer_id in wanted,
            moot=lambda peer_id: False,
            refused_for=lambda peer_id: 0.0,
        )
        dialler.start()
        self.addCleanup(dialler.abort)
        return dialler, clock

    def test_link_endpoint(self) -> None:
        """
        What ClientService dials is an IStreamClientEndpoint that names its
        peer.
        """
        dialler, clock = self.dialler(set())
        endpoint = _LinkEndpoint(dialler, 2, [(Switchboard(clock).client("2"), "two")])
        verifyObject(IStreamClientEndpoint, endpoint)
        self.assertEqual(endpoint.peer_id, 2)
        self.assertIn("two", repr(endpoint))

    def test_sync_raising_is_logged(self) -> None:
        """
        An exception while synchronising a dialler (a reactor turn after it
        was scheduled) is logged with what it was doing, never raised into
        the reactor.
        """
        events = Events(self)
        dialler, clock = self.dialler(set())

        def sync(peer_id: PeerId) -> None:
            raise RuntimeError(f"simulated bug syncing {peer_id!r}")

        dialler.sync = sync  # type: ignore[method-assign]
        dialler.schedule_sync(2)
        clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [event] = events.named("internal_error")
        self.assertEqual(event["doing"], "synchronising a dialer")

    def test_failures_counted_and_logged_once_per_reason(self) -> None:
        """
        Failed attempts count under their reason; the first is logged at
        warn level, a repeat at debug level; a link clears link_error.
        """
        from twisted.internet.error import ConnectionRefusedError

        events = Events(self)
        dialler, _clock = self.dialler(set())
        for _ in range(3):
            dialler.failed(2, ConnectionRefusedError(), "two")
        error = dialler.link_error(2)
        assert error is not None
        self.assertEqual(error.attempts, 3)
        self.assertEqual(dialler.counters.dial_failures[error.reason], 3)
        self.assertEqual(len(events.named("dial_failed")), 1)
        self.assertEqual(len(events.named("dial_failed_again")), 2)
        dialler.linked(2)
        self.assertIsNone(dialler.link_error(2))


class PeerDialsTests(SynchronousTestCase):
    def dials(self, linkable: set[PeerId]) -> tuple[PeerDials, Switchboard]:
        """Dials of peers 2 and 3, neither reachable; started."""
        clock = Clock()
        board = Switchboard(clock)
        dials = PeerDials(
            endpoints={
                2: [(board.client("2"), "two")],
                3: [(board.client("3"), "three")],
            },
            tls=None,
            clock=clock,
            reconnect=Backoff(initial=0.5, factor=1.0, maximum=0.5, jitter=0.0),
            uniform=lambda: 0.0,
            counters=NetworkCounters(),
            factory_for=lambda peer_id: Factory(),
            linkable=lambda peer_id: peer_id in linkable,
            moot=lambda peer_id: False,
            refused_for=lambda peer_id: 0.0,
        )
        self.board = board
        self.clock = clock
        return dials, board

    def attempts(self) -> dict[str, int]:
        """Attempts per peer during the next two seconds."""
        before = dict(self.board.attempts)
        self.clock.advance(0)
        for _ in range(20):
            self.clock.advance(0.1)
        return {
            name: self.board.attempts.get(name, 0) - before.get(name, 0)
            for name in ("2", "3")
        }

    def test_every_linkable_peer_dialled(self) -> None:
        """
        Without a hold, each configured peer is dialled while linkable;
        ``dial`` and ``stop_dialling`` change nothing.
        """
        dials, _ = self.dials({2, 3})
        self.assertEqual(dials.peers(), frozenset({2, 3}))
        dials.start()
        self.addCleanup(dials.abort)
        dials.stop_dialling(2)
        attempts = self.attempts()
        self.assertGreater(attempts["2"], 0)
        self.assertGreater(attempts["3"], 0)

    def test_held_dials_only_the_peers_told(self) -> None:
        """
        Once held, a peer is dialled only between ``dial`` and
        ``stop_dialling``, and only while linkable; a peer that is not
        configured cannot be chosen.
        """
        dials, _ = self.dials({2})
        dials.hold()
        dials.start()
        self.addCleanup(dials.abort)
        self.assertEqual(self.attempts(), {"2": 0, "3": 0})
        dials.dial(2)
        dials.dial(3)  # configured, but not linkable
        dials.dial(9)  # not configured: ignored
        attempts = self.attempts()
        self.assertGreater(attempts["2"], 0)
        self.assertEqual(attempts["3"], 0)
        dials.stop_dialling(2)
        self.clock.advance(0)
        self.assertEqual(self.attempts(), {"2": 0, "3": 0})
        self.assertEqual(dials.peers(), frozenset({2, 3}))

    def test_peer_endpoints_checked(self) -> None:
        """
        A node does not dial itself, nor (with keys) a peer without a key;
        each peer's endpoints come with their descriptions.
        """
        clock = Clock()
        keys = PreSharedKeys({2: b"k" * 32})
        with self.assertRaises(ConfigurationError):
            peer_endpoints(clock, 1, None, {1: "tcp:host=127.0.0.1:port=9001"})
        with self.assertRaises(ConfigurationError) as caught:
            peer_endpoints(clock, 1, keys, {3: "tcp:host=127.0.0.1:port=9003"})
        self.assertIn("no key", str(caught.exception))
        endpoints = peer_endpoints(clock, 1, keys, {2: "tcp:host=127.0.0.1:port=9002"})
        [(_, description)] = endpoints[2]
        self.assertEqual(description, "tcp:host=127.0.0.1:port=9002")


class ListenersTests(SynchronousTestCase):
    def test_failures_reported_ports_kept(self) -> None:
        """
        Listening reports the endpoints that failed; the ports opened are
        kept (their addresses known) until stopped.
        """
        board = Switchboard(Clock())
        listeners = Listeners([board.server("a"), board.server("a")], None, Clock())
        failures = self.successResultOf(listeners.listen(Factory()))
        [failure] = failures
        self.assertIsInstance(failure.value, OSError)
        self.assertEqual(len(listeners.addresses()), 1)
        self.assertIn("a", board.listeners)
        for d in listeners.stop():
            self.successResultOf(d)
        self.assertNotIn("a", board.listeners)


class RefusalPolicyTests(SynchronousTestCase):
    def test_hold_grows_and_resets(self) -> None:
        """
        Each violation in a row holds the peer off for longer (the
        backoff); a link that stayed up for ``reset`` starts over; the hold
        passes with time.
        """
        clock = Clock()
        policy: RefusalPolicy[PeerId] = RefusalPolicy(
            Backoff(initial=1.0, factor=2.0, maximum=10.0, jitter=0.0),
            60.0,
            clock.seconds,
        )
        self.assertEqual(policy.refused_for(2), 0.0)
        policy.link_up(2)
        self.assertEqual([policy.violation(2) for _ in range(5)], [1, 2, 4, 8, 10])
        self.assertEqual(policy.refused_for(2), 10.0)
        clock.advance(4)
        self.assertEqual(policy.refused_for(2), 6.0)
        clock.advance(6)
        self.assertEqual(policy.refused_for(2), 0.0)
        policy.link_up(2)
        clock.advance(60)
        self.assertEqual(policy.violation(2), 1.0)
        self.assertEqual(policy.refused_for(3), 0.0)

    def test_in_memory_network_uses_it(self) -> None:
        """
        The in-memory network brings a link closed by a node back after the
        policy's hold: ``reconnect_delay``, doubling.
        """
        from ilm.errors import AckOutOfRange
        from ilm.network import InMemoryNetwork

        from .stream_support import RecordingReceiver

        clock = Clock()
        network = InMemoryNetwork(clock, reconnect_delay=0.5)
        a, b = network.add_peer(1), network.add_peer(2)
        a.start(RecordingReceiver())
        b.start(RecordingReceiver())
        clock.advance(0)
        for hold in (0.5, 1.0, 2.0):
            a.close_link(2, AckOutOfRange("x"))
            clock.advance(0)
            self.assertFalse(network.linked(1, 2))
            clock.advance(hold - 0.01)
            self.assertFalse(network.linked(1, 2))
            clock.advance(0.01)
            clock.advance(0)
            self.assertTrue(network.linked(1, 2), hold)


class AdmissionTests(SynchronousTestCase):
    def test_caps(self) -> None:
        """
        Connections are admitted up to the cap per host and in total; a
        released one frees its place; releasing twice is harmless.
        """
        admission = Admission(max_total=3, max_per_host=2)
        self.assertIsNone(admission.admit("a1", "a"))
        self.assertIsNone(admission.admit("a2", "a"))
        refused = admission.admit("a3", "a")
        assert refused is not None
        self.assertIn("from a", refused)
        self.assertIsNone(admission.admit("b1", "b"))
        refused = admission.admit("c1", "c")
        assert refused is not None
        self.assertIn("3 unauthenticated connections", refused)
        admission.release("a1")
        admission.release("a1")
        self.assertEqual(len(admission), 2)
        self.assertIsNone(admission.admit("a3", "a"))


class LinkWriterTests(SynchronousTestCase):
    def test_frames_in_one_write_sequence(self) -> None:
        """
        Session frames go out as CARRY link frames, all in one write.
        """
        writer = LinkWriter(100)
        transport = StringTransport()
        writer.transport = transport
        self.assertFalse(writer.send_session_frames([b"one", b"two"]))
        self.assertEqual(
            transport.value(),
            _wire.carry_header(3) + b"one" + _wire.carry_header(3) + b"two",
        )
        self.assertTrue(writer.sent)

    def test_paused_counts(self) -> None:
        """
        While paused, bytes written and read are counted; past the limit
        the writer says to stop reading; the owed LINK_PONG is handed back
        once on resume.
        """
        writer = LinkWriter(10)
        writer.transport = StringTransport()
        writer.pause()
        self.assertFalse(writer.send(_wire.LINK_PING, b"\x00" * 4))
        self.assertTrue(writer.send(_wire.LINK_PING, b"\x00" * 4))
        self.assertFalse(writer.read(10))
        self.assertTrue(writer.read(1))
        writer.pending_pong = 7
        self.assertEqual(writer.resume(), 7)
        self.assertEqual(writer.resume(), None)
        self.assertEqual((writer.unsent, writer.unread, writer.paused), (0, 0, False))

    def test_unconnected(self) -> None:
        """
        Before it has a transport, writing does nothing.
        """
        writer: Any = LinkWriter(10)
        self.assertFalse(writer.write([b"x"]))
