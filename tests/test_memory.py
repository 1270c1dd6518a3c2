"""
Tests for the in-memory backend and network.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ilm import StoreBatch
from ilm.errors import StoreError
from ilm.interfaces import IFrameReceiver
from ilm.testing import InMemoryBackend, InMemoryNetwork, InMemoryStorage


class BackendTests(SynchronousTestCase):
    def test_new_store_gets_incarnation(self) -> None:
        """
        A new store gets a random 32-hex-digit incarnation that persists in its
        storage.
        """
        storage = InMemoryStorage()
        first = self.successResultOf(InMemoryBackend(storage).open())
        again = self.successResultOf(InMemoryBackend(storage).open())
        other = self.successResultOf(InMemoryBackend().open())
        self.assertEqual(len(first.incarnation), 32)
        int(first.incarnation, 16)
        self.assertEqual(first.incarnation, again.incarnation)
        self.assertNotEqual(first.incarnation, other.incarnation)

    def test_commit_and_reopen(self) -> None:
        """
        Committed messages, acknowledgements, marks and retirements are what a
        reopened backend reports; acknowledgements free bytes.
        """
        storage = InMemoryStorage()
        backend = InMemoryBackend(storage)
        self.successResultOf(backend.open())
        batch = StoreBatch()
        batch.messages[2] = (1, [b"aa", b"bbb", b"c"])
        batch.delivered[(3, "f" * 32)] = 9
        self.successResultOf(backend.commit(batch))
        ack = StoreBatch(acked={2: 2}, retired={(3, "e" * 32)})
        result = self.successResultOf(backend.commit(ack))
        self.assertEqual(result.released_bytes, {2: 5})
        state = self.successResultOf(InMemoryBackend(storage).open())
        [out] = state.outbound
        self.assertEqual(
            (out.peer_id, out.acked, out.last_position, out.pending_bytes), (2, 2, 3, 1)
        )
        marks = {(r.incarnation, r.delivered, r.retired) for r in state.inbound}
        self.assertEqual(marks, {("f" * 32, 9, False), ("e" * 32, 0, True)})
        self.assertEqual(
            self.successResultOf(backend.read_outbound(2, 2, 10, 1 << 30)), [b"c"]
        )
        self.assertEqual(
            self.successResultOf(backend.read_outbound(2, 3, 10, 1 << 30)), []
        )

    def test_bad_batches_apply_nothing(self) -> None:
        """
        A batch that breaks the store's invariants fails and changes nothing.
        """
        storage = InMemoryStorage()
        backend = InMemoryBackend(storage)
        self.successResultOf(backend.open())
        bad = StoreBatch()
        bad.messages[2] = (1, [b"ok"])
        bad.messages[3] = (5, [b"gap"])
        self.failureResultOf(backend.commit(bad), StoreError)
        self.assertEqual(storage.pending(2), [])
        self.failureResultOf(backend.commit(StoreBatch(acked={2: 1})), StoreError)
        self.successResultOf(
            backend.commit(StoreBatch(messages={2: (1, [b"x", b"y"])}))
        )
        self.successResultOf(backend.commit(StoreBatch(acked={2: 1})))
        self.failureResultOf(backend.read_outbound(2, 0, 1, 1 << 30), StoreError)
        self.successResultOf(backend.close())
        self.failureResultOf(backend.commit(StoreBatch()), StoreError)


@implementer(IFrameReceiver)
class Log:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def link_established(self, peer_id: object) -> None:
        self.events.append(("up", peer_id))

    def link_lost(self, peer_id: object, reason: object) -> None:
        self.events.append(("down", peer_id))

    def frame_received(self, peer_id: object, frame: bytes) -> None:
        self.events.append(("frame", peer_id, frame))

    def link_paused(self, peer_id: object) -> None:
        self.events.append(("paused", peer_id))

    def link_resumed(self, peer_id: object) -> None:
        self.events.append(("resumed", peer_id))


class NetworkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = InMemoryNetwork(self.clock)
        self.a, self.b = self.net.add_peer(1), self.net.add_peer(2)
        self.la, self.lb = Log(), Log()
        self.a.start(self.la)
        self.b.start(self.lb)
        self.clock.advance(0)

    def test_link_and_frames(self) -> None:
        """
        Started nodes are linked; frames arrive in order, through the clock.
        """
        self.assertEqual(self.la.events, [("up", 2)])
        self.assertEqual(self.a.connected_peers(), frozenset({2}))
        self.a.send_frames(2, [b"x", b"y"])
        self.assertEqual(self.lb.events, [("up", 1)])
        self.clock.advance(0)
        self.assertEqual(self.lb.events[1:], [("frame", 1, b"x"), ("frame", 1, b"y")])

    def test_cut_loses_in_flight(self) -> None:
        """
        A cut drops frames in flight and reports link_lost on both sides; the
        link returns only on restore.
        """
        self.a.send_frames(2, [b"lost"])
        self.net.cut(1, 2)
        self.clock.advance(1)
        self.assertEqual(self.lb.events, [("up", 1), ("down", 1)])
        self.a.send_frames(2, [b"void"])
        self.net.restore(1, 2)
        self.clock.advance(0)
        self.assertEqual(self.lb.events[-1], ("up", 1))

    def test_drop_and_duplicate(self) -> None:
        """
        drop_next and duplicate_next act on the next frames of one direction.
        """
        self.net.drop_next(1, 2)
        self.net.duplicate_next(1, 2)
        self.a.send_frames(2, [b"gone", b"twice", b"once"])
        self.clock.advance(0)
        frames = [e[2] for e in self.lb.events if e[0] == "frame"]
        self.assertEqual(frames, [b"twice", b"twice", b"once"])

    def test_close_link_reconnects(self) -> None:
        """
        close_link drops the link and it comes back after the reconnect delay.
        """
        self.a.close_link(2, ValueError("bad"))
        self.clock.advance(0)
        self.assertEqual(self.lb.events[-1], ("down", 1))
        self.clock.advance(self.net.reconnect_delay)
        self.clock.advance(0)
        self.assertEqual(self.lb.events[-1], ("up", 1))

    def test_repeated_closes_back_off(self) -> None:
        """
        Each close in a row doubles the time before the link comes back.
        """
        delay = self.net.reconnect_delay
        for wait in (delay, 2 * delay, 4 * delay):
            self.a.close_link(2, ValueError("bad"))
            self.clock.advance(0)
            self.clock.advance(wait * 0.9)
            self.assertEqual(self.lb.events[-1], ("down", 1))
            self.clock.advance(wait * 0.2)
            self.clock.advance(0)
            self.assertEqual(self.lb.events[-1], ("up", 1))

    def test_stop_delivers_what_was_sent(self) -> None:
        """
        A clean stop delivers the stopping node's frames already sent, then
        drops the link; a crash does not.
        """
        self.a.send_frames(2, [b"last words"])
        self.a.stop()
        self.assertEqual(self.lb.events[1:], [("frame", 1, b"last words"), ("down", 1)])
        self.b.send_frames(1, [b"nobody"])
        self.clock.advance(0)
        self.assertNotIn(("frame", 2, b"nobody"), self.la.events)

    def test_crash(self) -> None:
        """
        A crashed node's frames in flight are lost, and its id can be added
        again.
        """
        self.a.send_frames(2, [b"lost"])
        self.net.crash(1)
        self.clock.advance(0)
        self.assertEqual(self.lb.events, [("up", 1), ("down", 1)])
        self.assertRaises(ValueError, self.net.add_peer, 2)
        again = self.net.add_peer(1)
        again.start(Log())
        self.clock.advance(0)
        self.assertEqual(self.lb.events[-1], ("up", 1))

    def test_frame_size_limit(self) -> None:
        """
        With max_frame_size set, an oversized frame closes the link.
        """
        self.net.max_frame_size = 10
        self.a.send_frames(2, [b"x" * 11])
        self.clock.advance(0)
        self.assertEqual(self.lb.events[-1], ("down", 1))
