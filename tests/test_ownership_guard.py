"""
Tests for :mod:`ilm._ownership_guard`: the messenger's policy for a store
shared by several gateways, on a ``Clock`` with a hand-driven ownership
backend (every Deferred fired by the test).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ilm._ownership_guard import GatedHost, OwnershipGuard
from ilm._peerid import PeerId
from ilm.backends import IStreamOwnership
from ilm.backends._ownership import Fenced, LeaseHeld, Renewal, StreamTaken
from ilm.errors import StoreError


@implementer(IStreamOwnership)
class FakeOwnership:
    """
    Leases by hand: ``acquire``, ``renew`` and ``release`` return Deferreds
    the test fires; ``windows`` holds each stream's delivery window.
    """

    gateway = "g1"
    lease_duration = 3.0

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.acquiring: list[tuple[PeerId, Deferred[StreamTaken]]] = []
        self.take_overs: list[bool] = []
        self.listing: list[tuple[frozenset[PeerId], Deferred[list[PeerId]]]] = []
        self.renewing: list[Deferred[Renewal]] = []
        self.released: list[PeerId] = []
        self.windows: dict[PeerId, tuple[float, float]] = {}

    def acquire(self, peer_id: PeerId, take_over: bool = True) -> Deferred[Any]:
        d: Deferred[StreamTaken] = Deferred()
        self.acquiring.append((peer_id, d))
        self.take_overs.append(take_over)
        return d

    def refuse(self, error: Exception, index: int = -1) -> None:
        """Fail an acquire: the backend then does not hold the stream."""
        peer_id, d = self.acquiring.pop(index)
        self.windows.pop(peer_id, None)
        d.errback(error)

    def grant(
        self,
        deliver_after: float = 0.0,
        index: int = -1,
        epoch: int = 1,
        previous: tuple[str | None, int] = (None, 0),
    ) -> None:
        peer_id, d = self.acquiring.pop(index)
        now = self.clock.seconds()
        self.windows[peer_id] = (now + deliver_after, now + self.lease_duration)
        d.callback(
            StreamTaken(peer_id, epoch, *previous, deliver_after, now + 3.0, None, ())
        )

    def renew(self) -> Deferred[Any]:
        d: Deferred[Renewal] = Deferred()
        self.renewing.append(d)
        return d

    def release(self, peer_id: PeerId) -> Deferred[Any]:
        self.released.append(peer_id)
        self.windows.pop(peer_id, None)
        return succeed(True)

    def holds(self, peer_id: PeerId) -> bool:
        window = self.windows.get(peer_id)
        return window is not None and window[0] <= self.clock.seconds() < window[1]

    def delivery_window(self, peer_id: PeerId) -> tuple[float, float] | None:
        return self.windows.get(peer_id)

    def owned(self) -> frozenset[PeerId]:
        return frozenset(self.windows)

    def claimable(self, limit: int = 1000, peers: Any = ()) -> Deferred[Any]:
        d: Deferred[list[PeerId]] = Deferred()
        self.listing.append((frozenset(peers), d))
        return d

    def commit_shared(self, batch: Any) -> Deferred[Any]:
        raise NotImplementedError

    def outbound_state(self, peer_id: PeerId) -> Deferred[Any]:
        return succeed(None)

    def watch(self, callback: Any) -> Deferred[Any]:
        return succeed(None)


class Messenger:
    """What the guard calls back, recorded in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.links: set[PeerId] = set()
        self.busy: set[PeerId] = set()
        self.barriers: list[Deferred[None]] = []
        self.initiated: set[PeerId] = set()
        self.dials: list[tuple[PeerId, bool]] = []

    def callbacks(self) -> dict[str, Any]:
        def barrier() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            self.barriers.append(d)
            return d

        return dict(
            proceed=lambda p: self.calls.append(("proceed", p)),
            restart=lambda p, taken: self.calls.append(("restart", p, taken.epoch)),
            replay=lambda p, frame: self.calls.append(("replay", p, frame)),
            drop=lambda p, error: self.calls.append(("drop", p, type(error))),
            wake=lambda p: self.calls.append(("wake", p)),
            barrier=barrier,
            linked=lambda p: p in self.links,
            delivering=lambda p: p in self.busy,
            initiated=lambda p: p in self.initiated,
            dial=lambda p, wanted: self.dials.append((p, wanted)),
        )


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ownership = FakeOwnership(self.clock)
        self.messenger = Messenger()
        guard = OwnershipGuard.for_backend(
            self.ownership,
            clock=self.clock,
            monotonic=self.clock.seconds,
            **self.messenger.callbacks(),
        )
        assert guard is not None
        self.guard = guard
        self.guard.start()
        self.addCleanup(self.guard.stop)

    def test_no_guard_without_ownership(self) -> None:
        """
        A backend that does not provide IStreamOwnership gets no guard.
        """
        self.assertIsNone(
            OwnershipGuard.for_backend(
                object(), clock=self.clock, **self.messenger.callbacks()
            )
        )

    def test_frames_held_while_taking_then_replayed(self) -> None:
        """
        A link's frames wait while its stream is taken; once granted, the
        messenger restarts the peer, handles the link, then gets the frames
        in order; nothing may be delivered before.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.assertTrue(self.guard.taking(2, b"one"))
        self.assertTrue(self.guard.taking(2, b"two"))
        self.assertFalse(self.guard.may_deliver(2))
        self.assertEqual(self.messenger.calls, [])
        self.ownership.grant()
        self.assertEqual(
            self.messenger.calls,
            [
                ("restart", 2, 1),
                ("proceed", 2),
                ("replay", 2, b"one"),
                ("replay", 2, b"two"),
                ("wake", 2),
            ],
        )
        self.assertFalse(self.guard.taking(2, b"three"))
        self.assertTrue(self.guard.may_deliver(2))

    def test_delivery_waits_for_the_window(self) -> None:
        """
        After a take-over from a live lease, deliveries wait
        ``deliver_after``; the peer is woken when the window opens.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant(deliver_after=2.0)
        self.assertFalse(self.guard.may_deliver(2))
        self.assertNotIn(("wake", 2), self.messenger.calls)
        self.clock.advance(2.01)
        self.assertTrue(self.guard.may_deliver(2))
        self.assertEqual(self.messenger.calls[-1], ("wake", 2))

    def test_link_gone_while_taking(self) -> None:
        """
        A link that ended before its stream was granted is not handled; the
        stream is released once pending work is committed.
        """
        self.guard.link_established(2)
        self.ownership.grant()
        self.assertEqual(self.messenger.calls, [])
        self.messenger.barriers.pop().callback(None)
        self.assertEqual(self.ownership.released, [2])

    def test_fenced_commit_drops_the_stream(self) -> None:
        """
        A commit failing with Fenced drops each fenced stream; other
        failures drop nothing.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.assertFalse(self.guard.commit_failed(Failure(StoreError("disk"))))
        self.assertTrue(self.guard.commit_failed(Failure(Fenced({2: (7, "g2")}))))
        self.assertEqual(self.messenger.calls[-1], ("drop", 2, Fenced))
        self.assertFalse(self.guard.may_deliver(2))

    def test_renewal_reports_lost_streams(self) -> None:
        """
        Every third of the lease the leases are renewed; a stream reported
        lost is dropped, a renewed one woken.
        """
        for peer_id in (2, 3):
            self.messenger.links.add(peer_id)
            self.guard.link_established(peer_id)
            self.ownership.grant(index=0)
        self.clock.advance(1.0)
        self.assertEqual(len(self.ownership.renewing), 1)
        del self.ownership.windows[2]  # as a backend forgets a lost stream
        self.ownership.renewing.pop().callback(
            Renewal(frozenset({3}), frozenset({2}), 4.0)
        )
        self.assertIn(("drop", 2, Fenced), self.messenger.calls)
        self.assertEqual(self.messenger.calls[-1], ("wake", 3))
        self.clock.advance(1.0)
        self.assertEqual(len(self.ownership.renewing), 1)

    def test_link_lost_stops_delivery_then_releases(self) -> None:
        """
        When the link ends, deliveries stop at once; the lease is released
        only after the pending commit, and not if a new link came meanwhile.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.guard.link_lost(2)
        self.assertFalse(self.guard.may_deliver(2))
        self.assertEqual(self.ownership.released, [])
        barrier = self.messenger.barriers.pop()
        self.guard.link_established(2)
        barrier.callback(None)
        self.assertEqual(self.ownership.released, [])
        self.ownership.grant()
        self.guard.link_lost(2)
        self.messenger.barriers.pop().callback(None)
        self.assertEqual(self.ownership.released, [2])

    def test_gated_host(self) -> None:
        """
        The deliverer's host allows deliveries only when the node does and
        the guard says this gateway may deliver for that peer.
        """

        class Host:
            deliveries_allowed = True

            def delivery_settled(self) -> None:
                pass

        host = Host()
        gated = GatedHost(host, self.guard, 2)
        self.assertFalse(gated.deliveries_allowed)
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.assertTrue(gated.deliveries_allowed)
        host.deliveries_allowed = False
        self.assertFalse(gated.deliveries_allowed)
        self.assertEqual(gated.delivery_settled, gated.delivery_settled)

    def test_gated_host_of_a_replaced_peer(self) -> None:
        """
        The host of a peer's state replaced by a take-over's restart (or
        dropped) allows no more deliveries, even while the guard allows
        them for the peer: a delivery of the old state that settles starts
        no other (two deliverers of one peer took turns, found by the
        simulator with three gateways dialling node 1).
        """

        class Host:
            deliveries_allowed = True
            peers: dict[PeerId, object] = {}

        host = Host()
        old, new = object(), object()
        host.peers = {2: old}
        gated = GatedHost(host, self.guard, 2, old)
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.assertTrue(gated.deliveries_allowed)
        host.peers[2] = new
        self.assertFalse(gated.deliveries_allowed)
        self.assertTrue(GatedHost(host, self.guard, 2, new).deliveries_allowed)
        del host.peers[2]
        self.assertFalse(GatedHost(host, self.guard, 2, new).deliveries_allowed)

    def test_no_delivery_starts_near_the_deadline(self) -> None:
        """
        No delivery starts in the last fifth of the lease before the local
        deadline, so one in progress ends before the lease does.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.clock.advance(2.3)
        self.assertTrue(self.ownership.holds(2))
        self.assertTrue(self.guard.may_deliver(2))
        self.clock.advance(0.2)
        self.assertTrue(self.ownership.holds(2))
        self.assertFalse(self.guard.may_deliver(2))

    def test_release_waits_for_the_delivery_in_progress(self) -> None:
        """
        A link that ends with a delivery in progress releases the stream
        only once that delivery settled.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.messenger.busy.add(2)
        self.guard.link_lost(2)
        self.assertEqual(self.messenger.barriers, [])
        self.messenger.busy.discard(2)
        self.guard.delivery_settled(2)
        self.messenger.barriers.pop().callback(None)
        self.assertEqual(self.ownership.released, [2])

    def test_taken_back_with_nothing_in_between(self) -> None:
        """
        A stream this gateway takes back from itself (or from its own
        release) keeps its state here, ahead of the store; taken from
        another gateway's epoch, it restarts from the grant.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant(epoch=1)
        self.guard.link_established(2)
        self.ownership.grant(epoch=2, previous=("g1", 1))
        self.guard.link_established(2)
        self.ownership.grant(epoch=4, previous=("g2", 3))
        restarts = [c for c in self.messenger.calls if c[0] == "restart"]
        self.assertEqual(restarts, [("restart", 2, 1), ("restart", 2, 4)])

    def test_renewal_does_not_drop_a_newer_grant(self) -> None:
        """
        A renewal that reports a stream lost, answered after the stream was
        taken again (a new link), leaves the newer grant alone.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.clock.advance(1.0)
        renewal = self.ownership.renewing.pop()
        self.guard.link_established(2)
        self.ownership.grant(epoch=3, previous=("g2", 2))
        renewal.callback(Renewal(frozenset(), frozenset({2}), 4.0))
        self.assertNotIn(("drop", 2, Fenced), self.messenger.calls)
        self.assertTrue(self.guard.may_deliver(2))

    def test_old_release_spares_a_stream_taken_again(self) -> None:
        """
        A release waiting for a commit, from a link that ended before the
        stream was dropped and taken again, does not release the new grant.
        """
        self.messenger.links.add(2)
        self.guard.link_established(2)
        self.ownership.grant()
        self.guard.link_lost(2)
        barrier = self.messenger.barriers.pop()
        self.guard.commit_failed(Failure(Fenced({2: (2, "g2")})))
        self.guard.link_established(2)
        self.ownership.grant(epoch=3, previous=("g2", 2))
        barrier.callback(None)
        self.assertEqual(self.ownership.released, [])
        self.assertTrue(self.guard.may_deliver(2))


class DiallingTests(SynchronousTestCase):
    """
    A gateway dials its configured peer 7 only while it owns 7's stream.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.ownership = FakeOwnership(self.clock)
        self.messenger = Messenger()
        guard = OwnershipGuard.for_backend(
            self.ownership,
            clock=self.clock,
            monotonic=self.clock.seconds,
            dialled=frozenset({7}),
            claim_interval=1.0,
            **self.messenger.callbacks(),
        )
        assert guard is not None
        self.guard = guard
        self.guard.start()
        self.addCleanup(self.guard.stop)

    def claimed(self) -> None:
        """The claim made at start is granted."""
        self.assertEqual(self.ownership.take_overs, [False])
        self.ownership.grant()

    def test_claims_at_start_then_dials(self) -> None:
        """
        At start every configured peer is claimed (take_over=False); once
        granted, the peer restarts from the grant and is dialled; nothing
        is delivered before a link arrives.
        """
        self.assertEqual(self.messenger.dials, [])
        self.claimed()
        self.assertEqual(self.messenger.calls, [("restart", 7, 1)])
        self.assertEqual(self.messenger.dials, [(7, True)])
        self.assertEqual(self.guard.dialling(), frozenset({7}))
        self.assertFalse(self.guard.may_deliver(7))

    def test_lease_held_elsewhere_leaves_it(self) -> None:
        """
        A claim refused with LeaseHeld leaves the peer alone: no dial, no
        restart; the next look at claimable claims it once it is listed.
        """
        self.ownership.refuse(LeaseHeld(7, "g2", 3, 2.0))
        self.assertEqual(self.messenger.dials, [])
        self.assertEqual(self.messenger.calls, [])
        self.clock.advance(1.0)
        (peers, listed) = self.ownership.listing.pop()
        self.assertEqual(peers, frozenset({7}))
        listed.callback([])
        self.assertEqual(self.ownership.acquiring, [])
        self.clock.advance(1.0)
        self.ownership.listing.pop()[1].callback([7, 9])
        # Only configured peers are claimed (9 is someone else's to dial).
        self.assertEqual([p for p, _ in self.ownership.acquiring], [7])
        self.assertEqual(self.ownership.take_overs[-1], False)
        self.ownership.grant()
        self.assertEqual(self.messenger.dials, [(7, True)])

    def test_link_dialled_keeps_the_stream(self) -> None:
        """
        The link this gateway dialled takes the stream only with
        take_over=False; when it ends, the lease is kept (not released) and
        the dialling goes on.
        """
        self.claimed()
        self.messenger.links.add(7)
        self.messenger.initiated.add(7)
        self.guard.link_established(7)
        self.assertEqual(self.ownership.take_overs, [False, False])
        self.ownership.grant(epoch=2, previous=("g1", 1))
        self.assertTrue(self.guard.may_deliver(7))
        self.messenger.links.discard(7)
        self.guard.link_lost(7)
        self.assertFalse(self.guard.may_deliver(7))
        self.assertEqual(self.messenger.barriers, [])
        self.assertEqual(self.ownership.released, [])
        self.assertEqual(self.messenger.dials, [(7, True)])

    def test_dialled_link_refused_stops_dialling(self) -> None:
        """
        The link this gateway dialled arrives after another gateway took
        the stream (a link the peer dialled reached it): the take is
        refused, the link closed, and the dialling stops; no ping-pong.
        """
        self.claimed()
        self.messenger.links.add(7)
        self.messenger.initiated.add(7)
        self.guard.link_established(7)
        self.ownership.refuse(LeaseHeld(7, "g2", 5, 3.0))
        self.assertEqual(self.messenger.calls[-1], ("drop", 7, LeaseHeld))
        self.assertEqual(self.messenger.dials, [(7, True), (7, False)])
        self.assertEqual(self.guard.dialling(), frozenset())

    def test_peer_dialled_link_takes_over(self) -> None:
        """
        A link the peer dialled takes the stream whoever holds it
        (take_over=True), and this gateway then dials the peer too.
        """
        self.ownership.refuse(LeaseHeld(7, "g2", 3, 2.0))
        self.messenger.links.add(7)
        self.guard.link_established(7)
        self.assertEqual(self.ownership.take_overs, [False, True])
        self.ownership.grant(epoch=4, previous=("g2", 3))
        self.assertEqual(self.messenger.dials, [(7, True)])

    def test_stream_lost_stops_dialling(self) -> None:
        """
        The stream lost at a renewal, or fenced, the dialling stops; a
        later claim starts it again.
        """
        self.claimed()
        self.clock.advance(1.0)
        del self.ownership.windows[7]
        self.ownership.renewing.pop().callback(
            Renewal(frozenset(), frozenset({7}), 4.0)
        )
        self.assertEqual(self.messenger.dials, [(7, True), (7, False)])
        self.ownership.listing.pop()[1].callback([7])
        self.ownership.grant(epoch=3, previous=("g2", 2))
        self.assertEqual(self.messenger.dials[-1], (7, True))
        del self.ownership.windows[7]
        self.guard.commit_failed(Failure(Fenced({7: (4, "g2")})))
        self.assertEqual(self.messenger.dials[-1], (7, False))

    def test_stop_stops_dialling(self) -> None:
        """Stopping the guard stops the dialling and the looks."""
        self.claimed()
        self.guard.stop()
        self.assertEqual(self.messenger.dials, [(7, True), (7, False)])
        self.clock.advance(5.0)
        self.assertEqual(self.ownership.listing, [])

    def test_crash_tells_the_network_nothing(self) -> None:
        """
        Stopped because the node was abandoned (a simulated crash), the
        guard says nothing more to the network.
        """
        self.claimed()
        self.guard.stop(crashed=True)
        self.assertEqual(self.messenger.dials, [(7, True)])
        self.assertEqual(self.guard.dialling(), frozenset())

    def test_deadline_passed_stops_dialling(self) -> None:
        """
        Renewals failing (cut off from the store), the gateway stops
        dialling once the local deadline of its lease has passed, before
        another gateway may claim the stream (its expiry in the store is
        later); a link it dialled is closed with the dialling.
        """
        self.claimed()
        self.clock.advance(1.0)
        self.ownership.renewing.pop().errback(StoreError("cut off"))
        self.assertEqual(self.messenger.dials, [(7, True)])
        self.clock.advance(1.0)
        self.ownership.renewing.pop().errback(StoreError("cut off"))
        self.assertEqual(self.messenger.dials, [(7, True)])
        self.clock.advance(1.0)
        self.ownership.renewing.pop().errback(StoreError("cut off"))
        self.assertEqual(self.messenger.dials, [(7, True), (7, False)])
