"""
Reconnection through ``ClientService``: the pitfall that shapes how the
stream network uses it, the backoff policy, and connections that fail or
are stopped in the middle of the link handshake.
"""

from __future__ import annotations

from automat import NoTransition
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm.network import Backoff, LinkSettings

from .stream_support import RawPeer, Switchboard
from .test_stream_network import Nodes


class PrepareConnectionPitfallTests(SynchronousTestCase):
    def test_connection_lost_during_prepare_connection(self) -> None:
        """
        Pitfall: ClientService's state machine has no transition for a
        connection lost while prepareConnection is pending, so the loss
        raises NoTransition from connectionLost.  This is why StreamNetwork
        runs its handshake inside the client endpoint instead.  (If this
        test fails, Twisted has fixed the state machine.)
        """
        clock = Clock()
        board = Switchboard(clock)
        board.server("s").listen(Factory.forProtocol(Protocol))
        pending: Deferred[None] = Deferred()
        service = ClientService(
            board.client("s"),
            Factory.forProtocol(Protocol),
            clock=clock,
            prepareConnection=lambda protocol: pending,
        )
        service.startService()
        clock.advance(0.01)
        [pipe] = board.pipes
        self.assertRaises(NoTransition, pipe.cut)

    def test_default_policy_is_slow_after_a_drop(self) -> None:
        """
        Pitfall: ClientService's default policy waits over a second after a
        clean drop (counted as a failed attempt); Backoff's default redials
        within 50 ms and grows to at most 5 s.
        """
        self.assertGreaterEqual(backoffPolicy(jitter=lambda: 0.0)(1), 1.0)
        backoff = Backoff()
        self.assertLessEqual(backoff.delay(1, 0.0), 0.05)
        self.assertLessEqual(backoff.delay(100, 0.0), 5.0)
        self.assertEqual(backoff.delay(10**6, 0.0), 5.0)


class BackoffTests(SynchronousTestCase):
    def test_growth_and_jitter(self) -> None:
        """
        Delays double from the initial value up to the maximum; jitter takes
        off at most its fraction.
        """
        backoff = Backoff(initial=0.1, factor=2.0, maximum=1.0, jitter=0.5)
        self.assertEqual(
            [backoff.delay(n, 0.0) for n in range(1, 7)],
            [0.1, 0.2, 0.4, 0.8, 1.0, 1.0],
        )
        self.assertAlmostEqual(backoff.delay(3, 0.999999), 0.2, places=4)
        for uniform in (0.0, 0.3, 0.7, 0.99):
            self.assertTrue(0.2 <= backoff.delay(3, uniform) <= 0.4)

    def test_validation(self) -> None:
        """
        Non-positive delays, a factor below 1 or jitter outside [0, 1) are
        refused; so is an idle timeout under twice the keepalive interval.
        """
        self.assertRaises(ValueError, Backoff, initial=0)
        self.assertRaises(ValueError, Backoff, factor=0.5)
        self.assertRaises(ValueError, Backoff, jitter=1.0)
        self.assertRaises(
            ValueError, LinkSettings, keepalive_interval=5, idle_timeout=9
        )


class HandshakeInterruptedTests(SynchronousTestCase):
    def test_peer_closes_during_handshake(self) -> None:
        """
        A server that accepts and hangs up at once makes every handshake
        fail; the dialler backs off and keeps trying, with no exception
        reaching the event loop (the pitfall above does not apply).
        """

        class HangUp(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

        nodes = Nodes(reconnect=Backoff(initial=0.05, maximum=0.5, jitter=0.0))
        nodes.board.server("2").listen(Factory.forProtocol(HangUp))
        nodes.start(1, dial=(2,))
        nodes.settle(5.0)
        self.assertTrue(8 <= nodes.board.attempts["2"] <= 16, nodes.board.attempts)
        self.assertEqual(nodes.receivers[1].events, [])

    def test_stop_during_handshake(self) -> None:
        """
        Stopping while a dial is in the middle of its handshake aborts that
        connection and completes; nothing is reported.
        """
        silent: list[RawPeer] = []

        def build() -> RawPeer:
            silent.append(RawPeer())
            return silent[-1]

        nodes = Nodes()
        nodes.board.server("2").listen(Factory.forProtocol(build))
        network = nodes.start(1, dial=(2,))
        nodes.settle(0.5)
        [peer] = silent
        self.assertIsNone(peer.lost)
        stopped = network.stop()
        nodes.settle(0.1)
        self.successResultOf(stopped)
        self.assertIsNotNone(peer.lost)
        nodes.settle(5.0)
        self.assertEqual(len(silent), 1)
        self.assertEqual(nodes.receivers[1].events, [])

    def test_handshake_timeout_counts_as_failed_attempt(self) -> None:
        """
        A server that never answers the HELLO times the handshake out; the
        dialler aborts that connection and tries again later.
        """
        silent: list[RawPeer] = []

        def build() -> RawPeer:
            silent.append(RawPeer())
            return silent[-1]

        nodes = Nodes(handshake_timeout=1.0, reconnect=Backoff(initial=0.5, jitter=0.0))
        nodes.board.server("2").listen(Factory.forProtocol(build))
        nodes.start(1, dial=(2,))
        nodes.settle(1.2)
        self.assertIsNotNone(silent[0].lost)
        self.assertEqual(len(silent), 1)
        nodes.settle(0.5)
        self.assertEqual(len(silent), 2)
