"""
Tests for ``ILM.peer_status()`` and ``ILM.stats()``: every field of
:class:`ilm.PeerStatus` and :class:`ilm.NodeStats`, read through the public
API of nodes on a Clock and an in-memory network.
"""

from __future__ import annotations

import math

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from ilm import (
    ILM,
    LINK_CONNECTING,
    LINK_DOWN,
    LINK_UP,
    Config,
    Histogram,
    NodeStats,
    PeerStatus,
    StoreBatch,
)
from ilm.errors import InvalidPeerId, StoreError, StoreInDoubt, UnknownPeer
from ilm.testing import InMemoryBackend, InMemoryStorage

from .support import Cluster, Recorder, numbered
from .test_messenger import FlakyBackend


def count_at(histogram: Histogram | None, bound: float) -> int:
    """
    The cumulative count of ``histogram`` at ``bound``.
    """
    assert histogram is not None
    return dict(histogram.buckets)[bound]


class PeerStatusLookupTests(SynchronousTestCase):
    def test_invalid_and_unknown_peers(self) -> None:
        """
        A malformed id is refused with ``InvalidPeerId``; this node's own id
        and a peer the network can never link to with ``UnknownPeer``; a
        peer the network could link to but the node never heard of gets a
        blank status.
        """
        c = Cluster()
        a = c.start(1)
        self.assertRaises(InvalidPeerId, a.peer_status, -1)
        self.assertRaises(InvalidPeerId, a.peer_status, 1.5)  # type: ignore[call-overload]
        self.assertRaises(UnknownPeer, a.peer_status, 1)
        blank = a.peer_status(7)
        self.assertEqual(
            (blank.peer_id, blank.link, blank.link_since, blank.pending),
            (7, LINK_DOWN, None, 0),
        )
        self.assertEqual(a.peer_status(), {})
        c2 = Cluster()
        net = c2.network.add_peer(3)
        net.can_link = lambda peer_id: peer_id == 4  # type: ignore[attr-defined]
        node = ILM(InMemoryBackend(InMemoryStorage()), [].append, net, clock=c2.clock)
        node.startService()
        c2.clock.advance(0)
        self.assertRaises(UnknownPeer, node.peer_status, 5)
        self.assertEqual(node.peer_status(4).link, LINK_DOWN)

    def test_every_known_peer(self) -> None:
        """
        ``peer_status()`` covers the peers the network dials (its optional
        ``dialled_peers``) and every peer with state, in id order; the
        network's ``link_error`` gives ``last_link_error``.
        """
        c = Cluster()
        net = c.network.add_peer(1)
        net.dialled_peers = lambda: frozenset({5, "x"})  # type: ignore[attr-defined]
        net.link_error = lambda peer_id: (  # type: ignore[attr-defined]
            "connection refused" if peer_id == 5 else None
        )
        a = ILM(InMemoryBackend(InMemoryStorage()), [].append, net, clock=c.clock)
        a.startService()
        c.clock.advance(0)
        a.send_to(3, b"m")
        statuses = a.peer_status()
        self.assertEqual(list(statuses), [3, 5, "x"])
        self.assertTrue(all(isinstance(s, PeerStatus) for s in statuses.values()))
        self.assertEqual(statuses[5].last_link_error, "connection refused")
        self.assertIsNone(statuses[3].last_link_error)
        self.assertEqual(a.peer_status(5), statuses[5])


class PeerStatusFieldTests(SynchronousTestCase):
    def test_link_state_and_since(self) -> None:
        """
        ``link`` is down until a link comes, connecting during the session
        handshake, up after it; ``link_since`` is when it last changed; a
        lost link records its reason as ``last_link_error``.
        """
        c = Cluster(latency=0.5)
        a = c.start(1)
        a.send_to(2, b"m")
        c.clock.advance(1)
        self.assertEqual(a.peer_status(2).link, LINK_DOWN)
        self.assertIsNone(a.peer_status(2).link_since)
        c.start(2)
        c.run_until(lambda: a.peer_status(2).link != LINK_DOWN)
        connecting = a.peer_status(2)
        self.assertEqual(connecting.link, LINK_CONNECTING)
        self.assertEqual(connecting.link_since, c.clock.seconds())
        c.run_until(lambda: a.peer_status(2).link == LINK_UP)
        up = a.peer_status(2)
        self.assertEqual(up.link_since, c.clock.seconds())
        self.assertEqual(a.connected_peers(), {2})
        c.clock.advance(3)
        c.network.cut(1, 2)
        down = a.peer_status(2)
        self.assertEqual(down.link, LINK_DOWN)
        self.assertEqual(down.link_since, c.clock.seconds())
        assert down.last_link_error is not None
        self.assertIn("link cut", down.last_link_error)
        self.assertNotIn("\n", down.last_link_error)

    def test_outbox_fields(self) -> None:
        """
        ``pending``, ``pending_bytes``, ``oldest_pending_age``,
        ``in_flight``, ``last_message_id``, ``last_acknowledged``, ``sent``
        and ``acknowledged`` follow messages from ``send_to`` to their
        acknowledgement.
        """
        c = Cluster()
        a = c.start(1)
        for payload in (b"one", b"three"):
            a.send_to(2, payload)
        c.clock.advance(0)
        c.clock.advance(5)
        status = a.peer_status(2)
        self.assertEqual(
            (
                status.pending,
                status.pending_bytes,
                status.oldest_pending_age,
                status.in_flight,
                status.last_message_id,
                status.last_acknowledged,
                status.sent,
                status.acknowledged,
            ),
            (2, 8, 5.0, 0, 2, 0, 2, 0),
        )
        c.recorders[2] = Recorder()
        c.recorders[2].hold = Deferred()
        c.start(2)
        c.run_until(lambda: a.peer_status(2).in_flight == 2)
        self.assertEqual(a.peer_status(2).pending, 2)
        c.recorders[2].hold.callback(None)
        c.run_until(lambda: a.peer_status(2).pending == 0)
        done = a.peer_status(2)
        self.assertEqual(
            (
                done.oldest_pending_age,
                done.in_flight,
                done.last_acknowledged,
                done.acknowledged,
                done.sent,
            ),
            (None, 0, 2, 2, 2),
        )

    def test_pending_left_from_before_a_restart(self) -> None:
        """
        Messages stored before a restart are pending since the restart.
        """
        c = Cluster()
        a = c.start(1)
        a.send_to(2, b"x")
        c.clock.advance(10)
        c.crash(1)
        c.clock.advance(10)
        a = c.start(1)
        c.clock.advance(2)
        status = a.peer_status(2)
        self.assertEqual((status.pending, status.sent), (1, 0))
        self.assertEqual(status.oldest_pending_age, 2.0)

    def test_retransmitted(self) -> None:
        """
        Messages sent again on a new link count as ``retransmitted``.
        """
        c = Cluster()
        a, _b = c.start(1), c.start(2)
        c.recorders[2].hold = Deferred()
        for payload in numbered(3):
            a.send_to(2, payload)
        c.run_until(lambda: a.peer_status(2).in_flight == 3)
        self.assertEqual(a.peer_status(2).retransmitted, 0)
        c.network.cut(1, 2)
        c.network.restore(1, 2)
        c.run_until(lambda: a.peer_status(2).in_flight == 3)
        self.assertEqual(a.peer_status(2).retransmitted, 3)
        self.assertEqual(a.stats().retransmitted, 3)

    def test_delivery_fields(self) -> None:
        """
        ``delivered``, ``last_delivered`` and the hold fields follow the
        receiving side: a failed delivery holds the peer's stream, with its
        reason, since when and how many attempts failed; a success releases
        it.
        """
        c = Cluster()
        a, b = c.start(1), c.start(2)
        c.recorders[2].failures_left = 2
        a.send_to(2, b"first")
        a.send_to(2, b"second")
        c.run_until(lambda: b.peer_status(1).delivery_held)
        held = b.peer_status(1)
        self.assertEqual(held.delivery_retries, 1)
        self.assertEqual(held.delivery_held_since, c.clock.seconds())
        assert held.delivery_held_reason is not None
        self.assertIn(
            "RuntimeError: delivery target refused", held.delivery_held_reason
        )
        self.assertEqual((held.delivered, held.last_delivered), (0, 0))
        c.run_until(lambda: b.peer_status(1).delivery_retries == 2)
        self.assertEqual(b.peer_status(1).delivery_held_since, held.delivery_held_since)
        c.run_until(lambda: b.peer_status(1).delivered == 2)
        done = b.peer_status(1)
        self.assertEqual(
            (
                done.last_delivered,
                done.delivery_held,
                done.delivery_held_reason,
                done.delivery_held_since,
                done.delivery_retries,
            ),
            (2, False, None, None, 0),
        )
        self.assertEqual(b.stats().delivery_failures, 2)
        self.assertTrue(self.flushLoggedErrors(RuntimeError))

    def test_incarnations(self) -> None:
        """
        ``peer_incarnation`` is the peer's incarnation from its hello (or
        its store's record before one); ``incarnations`` counts the streams
        held, old ones until their messages are delivered.
        """
        c = Cluster()
        a, b = c.start(1), c.start(2)
        self.assertIsNone(b.peer_status(3).peer_incarnation)
        a.send_to(2, b"m")
        c.run_until(lambda: b.peer_status(1).delivered == 1)
        self.assertEqual(b.peer_status(1).peer_incarnation, a.incarnation)
        self.assertEqual(b.peer_status(1).incarnations, 1)
        c.crash(2)
        b = c.start(2)
        self.assertEqual(b.peer_status(1).peer_incarnation, a.incarnation)
        c.run_until(lambda: a.peer_status(2).pending == 0)
        c.recorders[2].hold = Deferred()
        attempts = c.recorders[2].attempts
        a.send_to(2, b"n")
        c.run_until(lambda: c.recorders[2].attempts == attempts + 1)
        old = a.incarnation
        c.crash(1)
        c.lose_store(1)
        a = c.start(1)
        c.run_until(lambda: b.peer_status(1).peer_incarnation == a.incarnation)
        self.assertNotEqual(a.incarnation, old)
        self.assertEqual(b.peer_status(1).incarnations, 2)
        c.recorders[2].hold.callback(None)
        a.send_to(2, b"o")
        c.run_until(lambda: b.peer_status(1).incarnations == 1)


class StatsTests(SynchronousTestCase):
    def test_counters(self) -> None:
        """
        ``stats()`` counts sends, stores, deliveries, acknowledgements,
        links, commits and refusals by reason, and says when the node
        started and in which state it is.
        """
        c = Cluster(config=Config(max_message_size=100))
        a = c.start(1)
        self.assertEqual(a.stats().started_at, 0.0)
        c.clock.advance(4)
        b = c.start(2)
        for payload in numbered(4):
            a.send_to(2, payload)
        self.failureResultOf(a.send_to(1, b"self"))
        self.failureResultOf(a.send_to(2, b"x" * 101))
        self.failureResultOf(a.send_to(-5, b"bad"))
        c.run_until(lambda: b.stats().delivered == 4 and a.stats().acknowledged == 4)
        stats = a.stats()
        self.assertIsInstance(stats, NodeStats)
        self.assertEqual(
            (stats.state, stats.sent, stats.stored, stats.acknowledged),
            ("running", 4, 4, 4),
        )
        self.assertEqual(
            dict(stats.refused),
            {"send_to_self": 1, "message_too_large": 1, "invalid_peer_id": 1},
        )
        self.assertEqual((stats.link_ups, stats.link_downs), (1, 0))
        self.assertGreaterEqual(stats.commits, 1)
        self.assertEqual(stats.commit_failures, 0)
        self.assertFalse(stats.store_in_doubt)
        self.assertEqual(b.stats().started_at, 4.0)
        c.network.cut(1, 2)
        self.assertEqual(a.stats().link_downs, 1)
        self.successResultOf(_shut(c, a))
        self.failureResultOf(a.send_to(2, b"late"))
        self.assertEqual(a.stats().refused["not_running"], 1)
        self.assertEqual(a.stats().state, "stopped")

    def test_histograms(self) -> None:
        """
        Commit latency, commit batch size and delivery latency are
        cumulative histograms ending at +inf whose last count is their
        count.
        """
        c = Cluster()
        storage = InMemoryStorage()
        flaky = FlakyBackend(InMemoryBackend(storage))
        a = c.start(1, backend=flaky)
        b = c.start(2)
        c.clock.advance(1)
        before = a.stats()
        flaky.hold_commits = True
        for payload in numbered(5):
            a.send_to(2, payload)
        c.clock.advance(0)
        c.clock.advance(0.003)
        flaky.hold_commits = False
        flaky.release()
        commits = a.stats().commit_seconds
        batches = a.stats().commit_batch
        assert commits is not None and batches is not None
        assert before.commit_seconds is not None and before.commit_batch is not None
        self.assertEqual(commits.count - before.commit_seconds.count, 1)
        self.assertEqual(
            count_at(commits, 0.0025), count_at(before.commit_seconds, 0.0025)
        )
        self.assertEqual(
            count_at(commits, 0.005), count_at(before.commit_seconds, 0.005) + 1
        )
        self.assertEqual(count_at(batches, 4.0), count_at(before.commit_batch, 4.0))
        self.assertEqual(count_at(batches, 8.0), count_at(before.commit_batch, 8.0) + 1)
        c.recorders[2].hold = Deferred()
        c.run_until(lambda: c.recorders[2].attempts == 1)
        c.clock.advance(2)
        c.recorders[2].hold.callback(None)
        c.run_until(lambda: b.stats().delivered == 5)
        delivery = b.stats().delivery_seconds
        assert delivery is not None
        self.assertEqual(delivery.count, 5)
        self.assertEqual(count_at(delivery, 1.0), 0)
        self.assertEqual(count_at(delivery, 2.5), 5)
        for histogram in (commits, batches, delivery):
            bounds = [bound for bound, _ in histogram.buckets]
            counts = [count for _, count in histogram.buckets]
            self.assertEqual(bounds, sorted(bounds))
            self.assertEqual(counts, sorted(counts))
            self.assertEqual(histogram.buckets[-1], (math.inf, histogram.count))

    def test_commit_failures_and_doubt(self) -> None:
        """
        A failed commit counts as a commit failure; one that may have
        half-written (``StoreInDoubt``) sets ``store_in_doubt`` until a
        commit succeeds again.
        """
        c = Cluster()
        storage = InMemoryStorage()

        class Doubtful(FlakyBackend):
            doubt = 0

            def commit(self, batch: StoreBatch) -> Deferred[object]:
                if self.doubt:
                    self.doubt -= 1
                    return fail(StoreInDoubt("connection lost during COMMIT"))
                return super().commit(batch)

        backend = Doubtful(InMemoryBackend(storage))
        a = c.start(1, backend=backend)
        backend.fail_commits = 1
        self.failureResultOf(_run(c, a.send_to(2, b"m")), StoreError)
        self.assertEqual((a.stats().commit_failures, a.stats().commits), (1, 0))
        self.assertFalse(a.stats().store_in_doubt)
        backend.doubt = 1
        self.failureResultOf(_run(c, a.send_to(2, b"m")), StoreInDoubt)
        self.assertTrue(a.stats().store_in_doubt)
        self.successResultOf(_run(c, a.send_to(2, b"m")))
        self.assertFalse(a.stats().store_in_doubt)
        self.assertEqual(a.stats().commit_failures, 2)
        self.assertEqual(a.peer_status(2).sent, 3)
        self.assertEqual(a.peer_status(2).pending, 1)
        self.flushLoggedErrors(StoreError)


def _run(c: Cluster, d: Deferred[object]) -> Deferred[object]:
    """
    Run the cluster's clock until ``d`` has fired, then hand it back.
    """
    c.run_until(lambda: d.called)
    return d


def _shut(c: Cluster, node: object) -> Deferred[None]:
    """
    Shut ``node`` down on the cluster's clock.
    """
    d = node.shutdown()  # type: ignore[attr-defined]
    c.run_until(lambda: d.called)
    return d  # type: ignore[no-any-return]
