"""
Tests for :mod:`ilm._lease_keeper`: a lease once taken, renewed, timed
against its local deadline and released, on a ``Clock`` with the
hand-driven ownership backend of ``tests.test_ownership_guard``.
"""

from __future__ import annotations

import attr
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ilm._lease_keeper import LeaseKeeper, StreamRecord
from ilm._peerid import PeerId
from ilm.backends._ownership import Renewal
from ilm.errors import StoreError
from tests.test_ownership_guard import FakeOwnership


class LeaseKeeperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ownership = FakeOwnership(self.clock)
        self.streams: dict[PeerId, StreamRecord] = {}
        self.calls: list[tuple[object, ...]] = []
        self.busy: set[PeerId] = set()
        self.barriers: list[Deferred[None]] = []

        def barrier() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            self.barriers.append(d)
            return d

        self.keeper = LeaseKeeper(
            ownership=self.ownership,
            streams=self.streams,
            clock=self.clock,
            monotonic=self.clock.seconds,
            margin=0.2,
            lost=lambda p: self.calls.append(("lost", p)),
            renewal_ended=lambda: self.calls.append(("renewal_ended",)),
            released=lambda p: self.calls.append(("released", p)),
            wake=lambda p: self.calls.append(("wake", p)),
            delivering=lambda p: p in self.busy,
            barrier=barrier,
        )
        self.keeper.start()
        self.addCleanup(self.keeper.stop)

    def held(self, peer_id: PeerId, deliver_after: float = 0.0) -> StreamRecord:
        """A stream taken by the guard, its link here."""
        now = self.clock.seconds()
        self.ownership.windows[peer_id] = (now + deliver_after, now + 3.0)
        record = self.streams[peer_id] = StreamRecord(generation=1, epoch=1)
        return record

    def test_renewal_reports_lost_then_ended(self) -> None:
        """
        Every third of the lease one renewal; a lost lease is reported
        unless a newer grant is held, renewed streams are woken, and the
        guard hears that ownership may have changed, after a failure too.
        """
        self.held(2)
        self.held(3)
        self.held(4)
        self.clock.advance(1.0)
        self.assertEqual(len(self.ownership.renewing), 1)
        del self.ownership.windows[2]
        self.ownership.renewing.pop().callback(
            Renewal(frozenset({3}), frozenset({2, 4}), 4.0)
        )
        # 4 was reported lost but is owned again (a newer grant): kept.
        self.assertEqual(self.calls, [("lost", 2), ("wake", 3), ("renewal_ended",)])
        self.clock.advance(1.0)
        self.ownership.renewing.pop().errback(StoreError("cut off"))
        self.assertEqual(self.calls[-1], ("renewal_ended",))
        self.clock.advance(1.0)
        self.assertEqual(len(self.ownership.renewing), 1)

    def test_wakes_when_the_window_opens(self) -> None:
        """
        A window opening later wakes the peer's deliveries then (not
        before); a stream leaving is not woken.
        """
        self.held(2, deliver_after=0.5)
        self.keeper.wake_at_window(2)
        self.assertFalse(self.keeper.may_deliver(2))
        self.clock.advance(0.4)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.2)
        self.assertEqual(self.calls, [("wake", 2)])
        self.assertTrue(self.keeper.may_deliver(2))
        self.streams[2].leaving = True
        self.keeper.wake_at_window(2)
        self.assertEqual(self.calls, [("wake", 2)])
        self.assertFalse(self.keeper.may_deliver(2))

    def test_deadlines(self) -> None:
        """
        No delivery starts within the margin of the local deadline; the
        peer stays dialled (live) until the deadline itself.
        """
        self.held(2)
        self.clock.advance(2.3)
        self.assertTrue(self.keeper.may_deliver(2))
        self.assertTrue(self.keeper.live(2))
        self.clock.advance(0.2)
        self.assertFalse(self.keeper.may_deliver(2))
        self.assertTrue(self.keeper.live(2))
        self.clock.advance(0.5)
        self.assertFalse(self.keeper.live(2))

    def test_release_after_commit_and_delivery(self) -> None:
        """
        A leaving stream's lease is released once what is pending is
        committed and the delivery in progress settled; then the guard
        hears of it.
        """
        record = self.held(2)
        record.leaving = True
        self.busy.add(2)
        self.keeper.release_when_done(2, record)
        self.assertEqual(self.barriers, [])
        self.busy.clear()
        self.keeper.delivery_settled(2)
        self.assertEqual(self.ownership.released, [])
        self.barriers.pop().callback(None)
        self.assertEqual(self.ownership.released, [2])
        self.assertEqual(self.calls, [("released", 2)])

    def test_no_release_of_a_stream_taken_again(self) -> None:
        """
        A record replaced meanwhile (dropped and taken again) keeps its
        lease; the guard still hears that the release ended.
        """
        record = self.held(2)
        record.leaving = True
        self.keeper.release_when_done(2, record)
        self.held(2)
        self.barriers.pop().callback(None)
        self.assertEqual(self.ownership.released, [])
        self.assertEqual(self.calls, [("released", 2)])

    def test_writes_only_its_own_fields(self) -> None:
        """
        The keeper changes no field of the guard's records but
        ``wake_call`` and ``release_when_settled``.
        """
        record = self.held(2, deliver_after=0.5)
        record.held = [b"frame"]
        own = {"wake_call", "release_when_settled"}

        def others() -> dict[str, object]:
            fields = attr.asdict(record, recurse=False)
            return {k: v for k, v in fields.items() if k not in own}

        before = others()
        self.keeper.wake_at_window(2)
        self.assertIsNotNone(record.wake_call)
        self.busy.add(2)
        record.leaving = True
        before["leaving"] = True
        self.keeper.release_when_done(2, record)
        self.assertTrue(record.release_when_settled)
        self.clock.advance(1.0)
        self.ownership.renewing.pop().callback(
            Renewal(frozenset({2}), frozenset(), 4.0)
        )
        self.keeper.stop()
        self.assertIsNone(record.wake_call)
        self.assertEqual(others(), before)
