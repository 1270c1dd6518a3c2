"""
Tests for :mod:`ilm._acks`: the pacing of ACKs after commits, alone on a
``Clock`` and between two nodes.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase

from ilm import Config, Receipt, _frames
from ilm._acks import CHUNK, AckPacer, AckSchedule
from ilm._peerid import PeerId
from ilm._session import InboundStream
from ilm._store import StoreBatch
from ilm.testing import InMemoryBackend, InMemoryStorage
from tests.support import Cluster, numbered


class PacerFixture:
    """One pacer on a ``Clock``, counting the ACKs it asks for."""

    def __init__(self, interval: float) -> None:
        self.clock = Clock()
        self.stream = InboundStream(
            "a" * 32, 0, window=64, window_bytes=1000, max_frame_size=100
        )
        self.sends: list[float] = []
        self.schedule = AckSchedule(
            interval, clock=self.clock, later=self.clock.callLater
        )
        self.pacer = AckPacer(
            interval,
            clock=self.clock,
            schedule=self.schedule,
            send=self.send,
        )

    def send(self) -> None:
        # What PeerRouter.send_ack does: an ACK computed now, reported.
        self.sends.append(self.clock.seconds())
        self.pacer.sent(self.stream)

    def commit(self, marked: int, delivered_bytes: int = 0) -> None:
        """
        A commit made the stream's mark ``marked`` durable, while one more
        message had arrived (a sender with more on the way).
        """
        self.stream.marked = marked
        self.stream.delivered = marked + 1
        self.stream.delivered_bytes = delivered_bytes
        self.pacer.committed(self.stream, 64, 1000)


class Fleet:
    """
    Many peers' pacers sharing one schedule on a ``Clock``, counting the
    reactor turns (zero-delay calls run) and each ACK written as ``(turn,
    peer, mark)``.
    """

    def __init__(self, peers: int, interval: float = 0.08) -> None:
        self.clock = Clock()
        self.turn = 0
        self.schedule = AckSchedule(interval, clock=self.clock, later=self.later)
        self.streams = [
            InboundStream(
                "a" * 32, 0, window=4096, window_bytes=1 << 20, max_frame_size=100
            )
            for _ in range(peers)
        ]
        self.sends: list[tuple[int, int, int]] = []
        self.pacers = [
            AckPacer(
                interval,
                clock=self.clock,
                schedule=self.schedule,
                send=lambda i=i: self.send(i),  # type: ignore[misc]
            )
            for i in range(peers)
        ]
        for pacer, stream in zip(self.pacers, self.streams, strict=True):
            pacer.resumed(stream)

    def later(self, delay: float, f: Any, *args: object) -> Any:
        def run() -> None:
            if delay == 0:
                self.turn += 1
            f(*args)

        return self.clock.callLater(delay, run)

    def send(self, i: int) -> None:
        # What PeerRouter.send_ack does: an ACK computed now, reported.
        self.sends.append((self.turn, i, self.streams[i].marked))
        self.pacers[i].sent(self.streams[i])

    def commit(self, peers: Any, marked: int) -> None:
        """One commit made mark ``marked`` of each of ``peers`` durable."""
        for i in peers:
            stream = self.streams[i]
            stream.marked = marked
            stream.delivered = marked + 1
            self.pacers[i].committed(stream, 4096, 1 << 20)


class AckPacerTests(SynchronousTestCase):
    def test_leading_edge(self) -> None:
        """
        The first commit's ACK goes at once, as does the first after a
        spell of at least the interval without one.
        """
        f = PacerFixture(0.05)
        f.commit(1)
        self.assertEqual(f.sends, [0.0])
        f.clock.advance(0.05)
        f.commit(2)
        self.assertEqual(f.sends, [0.0, 0.05])
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_coalesced(self) -> None:
        """
        Commits within the interval after an ACK share one ACK, written
        when the interval has passed; nothing more is owed after it.
        """
        f = PacerFixture(0.05)
        f.commit(1)
        for position in range(2, 6):
            f.clock.advance(0.01)
            f.commit(position)
        self.assertEqual(f.sends, [0.0])
        f.clock.advance(0.0099)
        self.assertEqual(f.sends, [0.0])
        f.clock.advance(0.0001)
        self.assertEqual(len(f.sends), 2)
        self.assertAlmostEqual(f.sends[1], 0.05)
        self.assertEqual(f.pacer.acked, 5)
        f.clock.advance(1)
        self.assertEqual(len(f.sends), 2)

    def test_quarter_window(self) -> None:
        """
        A commit that leaves a quarter of the window (16 of 64 messages)
        unacknowledged is acknowledged at once, even within the interval,
        and the trailing ACK is then no longer owed.
        """
        f = PacerFixture(10.0)
        f.commit(1)
        f.commit(16)
        self.assertEqual(len(f.sends), 1)
        self.assertTrue(f.pacer.owed)
        f.commit(17)
        self.assertEqual(len(f.sends), 2)
        self.assertFalse(f.pacer.owed)
        f.clock.advance(20)
        self.assertEqual(len(f.sends), 2)

    def test_quarter_window_bytes(self) -> None:
        """
        A quarter of the byte window (250 of 1,000) delivered since the last
        ACK also sends one at once.
        """
        f = PacerFixture(10.0)
        f.commit(1, delivered_bytes=10)
        f.commit(2, delivered_bytes=259)
        self.assertEqual(len(f.sends), 1)
        f.commit(3, delivered_bytes=260)
        self.assertEqual(len(f.sends), 2)

    def test_new_stream(self) -> None:
        """
        The marks of a stream other than the one last acknowledged (the
        peer's new incarnation) are acknowledged at once.
        """
        f = PacerFixture(10.0)
        f.commit(1)
        f.stream = InboundStream(
            "b" * 32, 0, window=64, window_bytes=1000, max_frame_size=100
        )
        f.commit(1)
        self.assertEqual(len(f.sends), 2)

    def test_all_marked(self) -> None:
        """
        Marks that cover everything the peer sent (nothing arrived since)
        go at once even within the interval: the sender may be waiting.
        """
        f = PacerFixture(10.0)
        f.commit(1)
        f.commit(2)
        self.assertEqual(len(f.sends), 1)
        f.stream.marked = f.stream.delivered = 5
        f.pacer.committed(f.stream, 64, 1000)
        self.assertEqual(len(f.sends), 2)
        self.assertFalse(f.pacer.owed)

    def test_zero_interval(self) -> None:
        """With an interval of 0 every commit's marks go out at once."""
        f = PacerFixture(0.0)
        for position in range(1, 5):
            f.commit(position)
        self.assertEqual(f.sends, [0.0] * 4)
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_other_ack_cancels(self) -> None:
        """
        An ACK written for another reason (duplicates, held data) carries
        the latest mark: the owed one is dropped and the interval counts
        from it.
        """
        f = PacerFixture(0.05)
        f.commit(1)
        f.clock.advance(0.01)
        f.commit(2)
        f.clock.advance(0.01)
        f.send()
        self.assertFalse(f.pacer.owed)
        f.clock.advance(0.04)
        f.commit(3)
        self.assertEqual(len(f.sends), 2)
        f.clock.advance(0.011)
        self.assertEqual(len(f.sends), 3)

    def test_flush_and_cancel(self) -> None:
        """
        ``flush`` writes the owed ACK now (the node stops); ``cancel``
        drops it (the link went); neither writes one that is not owed.
        """
        f = PacerFixture(0.05)
        f.pacer.flush()
        self.assertEqual(f.sends, [])
        f.commit(1)
        f.commit(2)
        f.pacer.flush()
        self.assertEqual(f.sends, [0.0, 0.0])
        f.clock.advance(1)
        self.assertEqual(f.sends, [0.0, 0.0])
        f.commit(3)
        f.commit(4)
        f.pacer.cancel()
        f.clock.advance(1)
        self.assertEqual(len(f.sends), 3)
        self.assertEqual(f.clock.getDelayedCalls(), [])


class AckScheduleTests(SynchronousTestCase):
    def test_one_timer_for_many_peers(self) -> None:
        """
        The ACKs 1,000 peers owe share one pending timer; each is written
        when due (no sooner than an eighth of the interval after the
        previous firing), and none is written twice.
        """
        clock = Clock()
        schedule = AckSchedule(0.08, clock=clock, later=clock.callLater)
        sends: list[tuple[int, float]] = []
        pacers = []
        stream = InboundStream(
            "a" * 32, 0, window=4096, window_bytes=1 << 20, max_frame_size=100
        )
        for i in range(1000):
            pacer = AckPacer(
                0.08,
                clock=clock,
                schedule=schedule,
                send=lambda i=i: sends.append((i, clock.seconds())),
            )
            pacer.sent(stream)
            pacers.append(pacer)
        clock.advance(0.05)
        stream.marked = 1
        for i, pacer in enumerate(pacers):
            # Each peer's last ACK was at 0 or at 0.005 (the odd ones).
            pacer.sent_at = 0.005 * (i % 2)
            stream.delivered = 2
            pacer.committed(stream, 4096, 1 << 20)
        self.assertEqual(sends, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0.03)
        self.assertEqual(sorted(i for i, _ in sends), list(range(0, 1000, 2)))
        clock.advance(0.005)
        self.assertEqual(len(sends), 500)
        clock.advance(0.005)
        self.assertEqual(sorted(i for i, _ in sends), list(range(1000)))
        self.assertAlmostEqual(max(at for _, at in sends), 0.09)
        clock.advance(1)
        self.assertEqual(len(sends), 1000)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_commit_for_many_peers_written_in_chunks(self) -> None:
        """
        1,000 ACKs due at once (one commit made 1,000 peers' marks durable)
        are written at most ``CHUNK`` per reactor turn, the first chunk at
        once: all of them, each once, with the mark of when it is written
        (a later commit's, for a peer acknowledged again meanwhile), and
        none for a peer whose link went meanwhile.
        """
        fleet = Fleet(1000)
        fleet.commit(range(1000), 1)
        self.assertEqual(len(fleet.sends), CHUNK)
        self.assertEqual(len(fleet.schedule.ready), 1000 - CHUNK)
        # Before the next turn: peer 999 gets a later mark, peer 998's
        # link goes, and peer 997's ACK is written for another reason.
        fleet.commit([999], 2)
        fleet.pacers[998].cancel()
        fleet.send(997)
        self.assertEqual(len(fleet.schedule.ready), 1000 - CHUNK)
        fleet.clock.advance(0)
        turns = [turn for turn, i, _ in fleet.sends if i != 997]
        self.assertEqual(max(turns), -(-1000 // CHUNK) - 1)
        self.assertTrue(all(turns.count(turn) <= CHUNK for turn in set(turns)), turns)
        self.assertEqual(sorted(i for _, i, _ in fleet.sends), [*range(998), 999])
        self.assertEqual(fleet.sends[-1][1:], (999, 2))
        self.assertEqual({m for _, i, m in fleet.sends if i != 999}, {1})
        self.assertEqual(list(fleet.schedule.ready), [])
        self.assertFalse(any(p.owed or p.queued for p in fleet.pacers))
        self.assertEqual(fleet.clock.getDelayedCalls(), [])

    def test_timer_writes_in_chunks(self) -> None:
        """
        Paced ACKs that come due at one firing are written a chunk per
        turn too, the first in the firing's turn.
        """
        fleet = Fleet(1000)
        for pacer in fleet.pacers:
            pacer.sent_at = 0.0
        fleet.commit(range(1000), 1)
        self.assertEqual(fleet.sends, [])
        fleet.clock.advance(0.08)
        turns = [turn for turn, _, _ in fleet.sends]
        self.assertEqual(turns.count(0), CHUNK)
        self.assertEqual(sorted(i for _, i, _ in fleet.sends), list(range(1000)))
        self.assertTrue(all(turns.count(turn) <= CHUNK for turn in set(turns)))
        self.assertEqual(fleet.clock.getDelayedCalls(), [])

    def test_flush_writes_queued_at_once(self) -> None:
        """
        ``flush`` (the node stops) writes a queued ACK at once; the queue
        then writes it no second time.
        """
        fleet = Fleet(1000)
        fleet.commit(range(1000), 1)
        for pacer in fleet.pacers:
            pacer.flush()
        self.assertEqual(len(fleet.sends), 1000)
        self.assertEqual({turn for turn, _, _ in fleet.sends}, {0})
        fleet.clock.advance(0)
        self.assertEqual(len(fleet.sends), 1000)

    def test_turn_budget(self) -> None:
        """
        Few ACKs at a time go at once; once a chunk's worth went since the
        queue last ran, the next waits a turn, after which the count
        starts again.
        """
        fleet = Fleet(CHUNK + 1, interval=0.0)
        for i in range(CHUNK + 1):
            fleet.commit([i], 1)
        self.assertEqual(len(fleet.sends), CHUNK)
        fleet.clock.advance(0)
        self.assertEqual(len(fleet.sends), CHUNK + 1)
        fleet.commit([0], 2)
        self.assertEqual(len(fleet.sends), CHUNK + 2)

    def test_stop_drops_queued(self) -> None:
        """
        A stopped schedule writes none of its queued ACKs, and a pacer
        whose ACK it dropped is queued again by its next commit.
        """
        fleet = Fleet(CHUNK + 1)
        fleet.commit(range(CHUNK + 1), 1)
        fleet.schedule.stop()
        self.assertEqual(fleet.clock.getDelayedCalls(), [])
        fleet.clock.advance(1)
        self.assertEqual(len(fleet.sends), CHUNK)
        self.assertFalse(fleet.pacers[CHUNK].queued)
        fleet.commit([CHUNK], 2)
        fleet.clock.advance(0)
        self.assertEqual(fleet.sends[-1][1:], (CHUNK, 2))

    def test_stop(self) -> None:
        """A stopped schedule writes nothing and leaves no timer."""
        f = PacerFixture(0.05)
        f.commit(1)
        f.commit(2)
        f.schedule.stop()
        self.assertEqual(f.clock.getDelayedCalls(), [])
        f.clock.advance(1)
        self.assertEqual(len(f.sends), 1)


class AckRecorder:
    """A fault policy that lets every frame through and records ACKs 2 → 1."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.acks: list[tuple[float, int]] = []

    def __call__(
        self, source: PeerId, destination: PeerId, frame: bytes
    ) -> tuple[float, ...]:
        if source == 2 and _frames.frame_type(frame) == _frames.ACK:
            self.acks.append((self.clock.seconds(), _frames.decode_ack(frame)[0]))
        return (0.0,)


class SlowCommits:
    """An in-memory backend whose commits take 5 ms; counts them."""

    def __init__(self, inner: InMemoryBackend, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock
        self.commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit(self, batch: StoreBatch) -> Deferred[object]:
        self.commits += 1
        return deferLater(self._clock, 0.005, lambda: None).addCallback(
            lambda _: self._inner.commit(batch)
        )


def paced_cluster(**config: object) -> tuple[Cluster, AckRecorder]:
    c = Cluster(Config(**config))  # type: ignore[arg-type]
    recorder = AckRecorder(c.clock)
    c.network.fault_policy = recorder
    c.start(1)
    storage = c.storages.setdefault(2, InMemoryStorage())
    c.start(2, SlowCommits(InMemoryBackend(storage), c.clock))
    c.run_until(lambda: c.nodes[1].connected_peers())
    c.run_until(lambda: not c.clock.getDelayedCalls() or recorder.acks, 1.0)
    c.clock.advance(0.01)
    # The ACK of the handshake's mark (position 0) is not what is tested.
    del recorder.acks[:]
    return c, recorder


class PacedNodesTests(SynchronousTestCase):
    def stored(self, c: Cluster, d: Deferred[Receipt]) -> Receipt:
        """The receipt ``d`` gives once its message is stored."""
        c.run_until(lambda: d.called, 1.0)
        return self.successResultOf(d)

    def test_lone_message_acknowledged_at_once(self) -> None:
        """
        A lone message's acknowledgement waits for its mark's commit, not
        for the interval.
        """
        c, recorder = paced_cluster(ack_interval=5.0)
        receipt = self.stored(c, c.nodes[1].send_to(2, b"x"))
        elapsed = c.run_until(lambda: receipt.acknowledged.called)
        self.assertLess(elapsed, 0.1)
        self.assertEqual([position for _, position in recorder.acks], [1])

    def streamed(self, c: Cluster, count: int, gap: float) -> list[Deferred[Receipt]]:
        """
        Node 1 sends ``count`` messages to node 2, one every ``gap`` seconds
        (node 2's commits take 5 ms, so each lands with more arrived).
        """
        sends = []
        for contents in numbered(count):
            sends.append(c.nodes[1].send_to(2, contents))
            c.clock.advance(gap)
        return sends

    def test_coalesced_receipts_fire(self) -> None:
        """
        A steady stream (a message every 2 ms for 0.5 s, an interval of
        0.1 s) gets about one ACK per interval, not one per commit, every
        ACK carrying the mark of its moment; every ``acknowledged`` receipt
        fires.
        """
        c, recorder = paced_cluster(ack_interval=0.1)
        sends = self.streamed(c, 250, 0.002)
        receipts = [self.stored(c, d) for d in sends]
        c.run_until(lambda: all(r.acknowledged.called for r in receipts), 1.0)
        positions = [p for _, p in recorder.acks]
        self.assertEqual(positions[-1], 250)
        self.assertEqual(positions, sorted(positions))
        self.assertLessEqual(len(positions), 9)
        times = [t for t, _ in recorder.acks]
        gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
        self.assertTrue(all(g >= 0.1 - 1e-9 for g in gaps), gaps)
        self.assertGreater(c.backends[2].commits, 3 * len(positions))

    def test_waiting_sender_not_paced(self) -> None:
        """
        A sender that awaits each message's acknowledgement before sending
        the next gets each one after its commit, not after the interval.
        """
        c, recorder = paced_cluster(ack_interval=5.0)
        a = c.nodes[1]
        elapsed = 0.0
        for contents in numbered(20):
            acknowledged = self.stored(c, a.send_to(2, contents)).acknowledged
            elapsed += c.run_until(lambda d=acknowledged: d.called, 1.0)
        self.assertLess(elapsed, 0.5)
        self.assertEqual([p for _, p in recorder.acks], list(range(1, 21)))

    def test_window_never_waits_for_the_interval(self) -> None:
        """
        With a window of 8 and an interval of 10 s, 200 messages go through
        in well under one interval: each quarter window is acknowledged at
        once.
        """
        c, recorder = paced_cluster(window=8, ack_interval=10.0)
        a = c.nodes[1]
        sends = [a.send_to(2, m) for m in numbered(200)]
        receipts = [self.stored(c, d) for d in sends]
        elapsed = c.run_until(lambda: receipts[-1].acknowledged.called)
        self.assertLess(elapsed, 2.0)
        self.assertEqual(c.received(2, 1), numbered(200))
        self.assertGreaterEqual(len(recorder.acks), 200 // 8)

    def test_shutdown_acknowledges_the_last_mark(self) -> None:
        """
        A node that stops in the middle of a paced stream acknowledges its
        last durable mark before its links close, not an interval later.
        """
        c, recorder = paced_cluster(ack_interval=5.0)
        pacer = c.nodes[2]._router.peers[1].acks
        sends = iter(numbered(100))
        while not pacer.owed:
            c.nodes[1].send_to(2, next(sends))
            c.clock.advance(0.002)
        owed_at = c.clock.seconds()
        before = len(recorder.acks)
        stopped = c.nodes[2].stopService()
        c.run_until(lambda: stopped.called, 10.0)
        self.assertGreater(len(recorder.acks), before)
        at, position = recorder.acks[-1]
        self.assertLess(at - owed_at, 1.0)
        self.assertEqual(position, pacer.acked)
        marks = {r.peer_id: r.delivered for r in c.storages[2].state().inbound}
        self.assertEqual(position, marks[1])

    def test_shutdown_writes_the_owed_ack(self) -> None:
        """
        A node that stops while it owes a paced ACK, with nothing left to
        commit (later messages wait behind a delivery that has not
        finished), writes that ACK before its links close.
        """
        c, recorder = paced_cluster(ack_interval=5.0, ack_delay=10.0)
        pacer = c.nodes[2]._router.peers[1].acks
        c.recorders[2].hold = hold = Deferred()
        sends = iter(numbered(100))
        c.nodes[1].send_to(2, b"held")
        c.clock.advance(0.002)
        hold.callback(None)
        c.recorders[2].hold = Deferred()
        while not pacer.owed:
            c.nodes[1].send_to(2, next(sends))
            c.clock.advance(0.002)
        c.clock.advance(0.1)
        self.assertTrue(pacer.owed)
        before = len(recorder.acks)
        stopped = c.nodes[2].stopService()
        stopped.addErrback(lambda _: None)
        c.run_until(lambda: len(recorder.acks) > before, 1.0)
        self.assertEqual(recorder.acks[-1][1], pacer.acked)
        c.recorders[2].hold.callback(None)
        c.run_until(lambda: stopped.called, 60.0)
