"""
Tests for ilm._session: the pure protocol rules, directly and under random
loss, duplication, reordering, link cuts and crashes (hypothesis).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ilm._session import (
    PROTOCOL_VERSION,
    Hello,
    InboundStream,
    OutboundStream,
    resume_inbound,
    resume_outbound,
)
from ilm._store import within_bytes
from ilm.errors import (
    AckOutOfRange,
    OutOfWindow,
    PeerStoreRegressed,
    StaleIncarnation,
    StoreBehindPeer,
)

INC_A = "a" * 32
INC_B = "b" * 32


def outbound(
    acked: int = 0,
    stored: int = 0,
    window: int = 4,
    window_bytes: int = 1000,
    cache: int = 8,
) -> OutboundStream:
    return OutboundStream(
        acked,
        stored,
        window=window,
        window_bytes=window_bytes,
        cache_messages=cache,
        cache_bytes=10_000,
    )


def inbound(
    delivered: int = 0, window: int = 4, window_bytes: int = 1000
) -> InboundStream:
    return InboundStream(
        INC_A, delivered, window=window, window_bytes=window_bytes, max_frame_size=100
    )


def hello(
    first_unacked: int = 1,
    last: int = 0,
    known: str | None = None,
    delivered: int = 0,
    incarnation: str = INC_A,
) -> Hello:
    return Hello(
        PROTOCOL_VERSION, incarnation, 4, 1000, first_unacked, last, known, delivered
    )


class OutboundTests(SynchronousTestCase):
    def test_nothing_sent_before_ready(self) -> None:
        """
        Stored messages are not released for transmission until the link is
        ready.
        """
        out = outbound()
        out.on_stored(1, [b"a", b"b"])
        self.assertEqual(out.take(), (0, []))
        out.link_ready(0, 10, 10_000)
        self.assertEqual(out.take(), (1, [b"a", b"b"]))
        self.assertEqual(out.take(), (0, []))

    def test_window(self) -> None:
        """
        At most ``window`` messages are in flight; acknowledgements open the
        window again; the smaller of the two announced windows applies.
        """
        out = outbound(window=4)
        out.link_ready(0, 3, 10_000)
        out.on_stored(1, [b"%d" % i for i in range(10)])
        self.assertEqual(out.take(), (1, [b"0", b"1", b"2"]))
        self.assertEqual(out.take(), (0, []))
        self.assertEqual(out.on_ack(2, 3), (2, True))
        self.assertEqual(out.take(), (4, [b"3", b"4"]))

    def test_byte_window(self) -> None:
        """
        In-flight bytes stay within ``window_bytes``, except that a single
        larger message may go alone.
        """
        out = outbound(window=100, window_bytes=10)
        out.link_ready(0, 100, 10_000)
        out.on_stored(1, [b"x" * 4, b"x" * 4, b"x" * 4, b"y" * 30])
        self.assertEqual(out.take(), (1, [b"x" * 4, b"x" * 4]))
        out.on_ack(2, 2)
        self.assertEqual(out.take(), (3, [b"x" * 4]))
        out.on_ack(3, 3)
        self.assertEqual(out.take(), (4, [b"y" * 30]))
        self.assertEqual(out.inflight_bytes, 30)

    def test_ack_out_of_range(self) -> None:
        """
        An acknowledgement beyond what was ever stored is a protocol violation.
        """
        out = outbound()
        out.on_stored(1, [b"a"])
        self.assertRaises(AckOutOfRange, out.on_ack, 2, 2)
        self.assertRaises(AckOutOfRange, out.on_ack, 0, 5)
        self.assertEqual(out.on_ack(0, 0), (0, False))

    def test_stale_ack_ignored(self) -> None:
        """
        An acknowledgement below the current one changes nothing.
        """
        out = outbound()
        out.link_ready(0, 10, 10_000)
        out.on_stored(1, [b"a", b"b", b"c"])
        out.take()
        out.on_ack(2, 2)
        self.assertEqual(out.on_ack(1, 1), (0, False))
        self.assertEqual(out.acked, 2)

    def test_cache_bounded(self) -> None:
        """
        Contents beyond the cache bound are not kept in memory; they are read
        back from the store when the window reaches them.
        """
        out = outbound(window=2, cache=4)
        out.link_ready(0, 10, 10_000)
        out.on_stored(1, [b"%d" % i for i in range(10)])
        self.assertEqual(out.cache_end, 4)
        self.assertEqual(out.take(), (1, [b"0", b"1"]))
        self.assertIsNone(out.read_request(8))
        out.on_ack(2, 2)
        self.assertEqual(out.take(), (3, [b"2", b"3"]))
        self.assertEqual(out.read_request(8), (4, 2, 10_000 - 2))
        self.assertIsNone(out.read_request(8))
        self.assertEqual(out.on_read(4, [b"4", b"5"]), 2)
        out.on_ack(4, 4)
        self.assertEqual(out.take(), (5, [b"4", b"5"]))

    def test_read_after_ack_overtook_it(self) -> None:
        """
        A read that returns after acknowledgements moved past its start only
        adds what is still unacknowledged.
        """
        out = outbound(window=2, cache=2)
        out.link_ready(0, 10, 10_000)
        out.on_stored(1, [b"1", b"2", b"3", b"4", b"5"])
        out.take()
        out.on_ack(2, 2)
        self.assertEqual(out.read_request(8), (2, 2, 10_000))
        out.on_ack(3, 3)
        self.assertEqual(out.on_read(2, [b"3", b"4"]), 1)
        self.assertEqual(out.take(), (4, [b"4"]))

    def test_nack_and_retransmit(self) -> None:
        """
        A NACK sends again from the missing position; the retransmission timer
        sends again everything not confirmed received.
        """
        out = outbound(window=10)
        out.link_ready(0, 10, 10_000)
        out.on_stored(1, [b"%d" % i for i in range(6)])
        out.take()
        self.assertTrue(out.on_nack(3))
        self.assertEqual(out.take(), (3, [b"2", b"3", b"4", b"5"]))
        self.assertFalse(out.on_nack(9))
        out.on_ack(0, 4)
        self.assertTrue(out.outstanding)
        self.assertTrue(out.retransmit())
        self.assertEqual(out.take(), (5, [b"4", b"5"]))
        out.on_ack(6, 6)
        self.assertFalse(out.outstanding)
        self.assertFalse(out.retransmit())

    def test_one_go_back_per_retransmit_timeout(self) -> None:
        """
        However many NACKs arrive (for any positions), the stream goes back
        at most once per ``interval`` seconds, and the retransmission timer
        counts as a go-back too; a new link starts afresh.
        """
        out = outbound(window=100, cache=100)
        out.link_ready(0, 100, 100_000)
        out.on_stored(1, [b"%d" % i for i in range(50)])
        self.assertEqual(len(out.take()[1]), 50)
        self.assertTrue(out.on_nack(10, now=5.0, interval=1.0))
        self.assertEqual(out.take()[0], 10)
        for position in (10, 5, 30, 49, 2):
            self.assertFalse(out.on_nack(position, now=5.5, interval=1.0))
            self.assertEqual(out.take(), (0, []))
        self.assertFalse(out.retransmit(now=5.9, interval=1.0))
        self.assertTrue(out.on_nack(20, now=6.0, interval=1.0))
        self.assertEqual(out.take()[0], 20)
        self.assertFalse(out.on_nack(20, now=6.2, interval=1.0))
        self.assertTrue(out.retransmit(now=7.1, interval=1.0))
        out.link_lost()
        out.link_ready(0, 100, 100_000)
        out.take()
        self.assertTrue(out.on_nack(3, now=7.2, interval=1.0))

    def test_lost_ack_recovered(self) -> None:
        """
        Data the peer confirmed receiving but has not acknowledged stays
        outstanding: when the retransmission timer expires, the last message
        is sent again (the peer answers a duplicate with an ACK at once), so
        a lost ACK cannot stall the stream.
        """
        out = outbound(window=10)
        out.link_ready(0, 10, 10_000)
        out.on_stored(1, [b"a", b"b", b"c"])
        out.take()
        self.assertEqual(out.on_ack(0, 3), (0, True))
        self.assertTrue(out.outstanding)
        self.assertTrue(out.retransmit())
        self.assertEqual(out.take(), (3, [b"c"]))
        out.on_ack(3, 3)
        self.assertFalse(out.outstanding)
        self.assertFalse(out.retransmit())

    def test_link_lost_resends_everything_unacked(self) -> None:
        """
        After a link is lost, the next link starts from the last
        acknowledgement.
        """
        out = outbound(window=10)
        out.link_ready(0, 10, 10_000)
        out.on_stored(1, [b"a", b"b", b"c"])
        out.take()
        out.on_ack(1, 3)
        out.link_lost()
        self.assertEqual(out.take(), (0, []))
        out.link_ready(1, 10, 10_000)
        self.assertEqual(out.take(), (2, [b"b", b"c"]))

    def test_link_ready_acknowledges(self) -> None:
        """
        A resume point beyond the last acknowledgement acknowledges the
        messages up to it.
        """
        out = outbound(window=10)
        out.on_stored(1, [b"a", b"b", b"c"])
        self.assertEqual(out.link_ready(2, 10, 10_000), 2)
        self.assertEqual(out.acked, 2)
        self.assertEqual(out.take(), (3, [b"c"]))

    def test_out_of_order_store_rejected(self) -> None:
        """
        Stores must be consecutive; anything else is a programming error.
        """
        out = outbound()
        self.assertRaises(ValueError, out.on_stored, 2, [b"x"])
        self.assertRaises(
            ValueError,
            OutboundStream,
            3,
            2,
            window=1,
            window_bytes=1,
            cache_messages=1,
            cache_bytes=1,
        )


class InboundTests(SynchronousTestCase):
    def test_in_order(self) -> None:
        """
        Consecutive data is queued for delivery.
        """
        s = inbound()
        self.assertEqual(s.on_data(1, [b"a", b"b"]), (2, False, 0))
        self.assertEqual(s.on_data(3, [b"c"]), (1, False, 0))
        self.assertEqual(list(s.queue), [b"a", b"b", b"c"])
        s.pop_delivered()
        self.assertEqual((s.delivered, s.received, s.held_bytes), (1, 3, 2))

    def test_duplicates(self) -> None:
        """
        Data already held is not queued again, and asks for an immediate ACK;
        a frame overlapping held data keeps only its new part.
        """
        s = inbound()
        s.on_data(1, [b"a", b"b"])
        self.assertEqual(s.on_data(1, [b"a"]), (0, True, 0))
        self.assertEqual(s.on_data(2, [b"b", b"c"]), (1, True, 0))
        self.assertEqual(list(s.queue), [b"a", b"b", b"c"])

    def test_gap_nacked_once(self) -> None:
        """
        Data after a gap is dropped and the missing position is NACKed once.
        """
        s = inbound()
        s.on_data(1, [b"a"])
        self.assertEqual(s.on_data(3, [b"c"]), (0, False, 2))
        self.assertEqual(s.on_data(4, [b"d"]), (0, False, 0))
        self.assertEqual(s.on_data(2, [b"b"]), (1, False, 0))
        self.assertEqual(s.on_data(4, [b"d"]), (0, False, 3))

    def test_out_of_window(self) -> None:
        """
        Data beyond the announced window (by count or bytes) is a violation.
        """
        s = inbound(window=4)
        self.assertRaises(OutOfWindow, s.on_data, 1, [b"x"] * 5)
        s.on_data(1, [b"x"] * 4)
        self.assertRaises(OutOfWindow, s.on_data, 5, [b"x"])
        s2 = inbound(window=100, window_bytes=10)
        self.assertRaises(OutOfWindow, s2.on_data, 1, [b"x" * 60, b"x" * 60])

    def test_window_follows_durable_mark(self) -> None:
        """
        The window slides with the durable mark, not with delivery.
        """
        s = inbound(window=2)
        s.on_data(1, [b"a", b"b"])
        s.pop_delivered()
        s.pop_delivered()
        self.assertRaises(OutOfWindow, s.on_data, 3, [b"c"])
        s.marked = 2
        self.assertEqual(s.on_data(3, [b"c"]), (1, False, 0))


class ResumeTests(SynchronousTestCase):
    def test_new_incarnation_adopts_first_unacked(self) -> None:
        """
        With no record of the sender's incarnation, the stream starts just
        before the sender's first unacknowledged position.
        """
        r = resume_inbound(hello(first_unacked=101, last=140), None, False)
        self.assertEqual((r.delivered, r.new_stream, r.lost), (100, True, None))

    def test_known_incarnation_resumes_from_mark(self) -> None:
        """
        With a record, the stream continues after its delivery mark.
        """
        r = resume_inbound(hello(first_unacked=5, last=20), 12, False)
        self.assertEqual((r.delivered, r.new_stream, r.lost), (12, False, None))

    def test_lost_positions_reported(self) -> None:
        """
        A sender that no longer has positions above our mark is followed, and
        the gap is reported as lost.
        """
        r = resume_inbound(hello(first_unacked=30, last=40), 12, False)
        self.assertEqual((r.delivered, r.lost), (29, (13, 29)))

    def test_regressed_sender(self) -> None:
        """
        A sender whose store ends below our mark has lost committed data.
        """
        self.assertRaises(
            PeerStoreRegressed, resume_inbound, hello(first_unacked=1, last=5), 9, False
        )

    def test_retired(self) -> None:
        """
        A retired incarnation is refused.
        """
        self.assertRaises(StaleIncarnation, resume_inbound, hello(), None, True)

    def test_outbound(self) -> None:
        """
        The sender continues after the peer's mark only if the mark is for
        its own incarnation, and refuses a mark beyond its store.
        """
        self.assertEqual(
            resume_outbound(hello(known=INC_B, delivered=7), INC_B, 3, 9), 7
        )
        self.assertEqual(
            resume_outbound(hello(known=INC_B, delivered=2), INC_B, 3, 9), 3
        )
        self.assertEqual(
            resume_outbound(hello(known=INC_A, delivered=7), INC_B, 3, 9), 3
        )
        self.assertEqual(resume_outbound(hello(), INC_B, 3, 9), 3)
        self.assertRaises(
            StoreBehindPeer,
            resume_outbound,
            hello(known=INC_B, delivered=10),
            INC_B,
            3,
            9,
        )


# --- property-based: a sender and a receiver over a hostile channel -------------


class Pair:
    """
    One sender and one receiver driven only by the pure rules, with a
    durable store modelled explicitly: ``store`` and ``acked`` survive a
    sender crash, ``marked`` survives a receiver crash.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.store: list[bytes] = []
        self.acked = 0
        self.marked = 0
        self.out = self._new_out()
        self.inb = self._new_in()
        self.to_receiver: deque[tuple[Any, ...]] = deque()
        self.to_sender: deque[tuple[Any, ...]] = deque()
        self.linked = False
        self.delivered: list[int] = []
        self.highest = 0
        self.repeats = 0
        self.counter = 0
        # Positions a receiver crash forgot it had delivered (delivered, not
        # yet marked): the only ones that may be delivered again, once each.
        self.forgotten: Counter[int] = Counter()

    def _new_out(self) -> OutboundStream:
        return OutboundStream(
            self.acked,
            len(self.store),
            window=self.window,
            window_bytes=10_000,
            cache_messages=2 * self.window,
            cache_bytes=20_000,
        )

    def _new_in(self) -> InboundStream:
        return InboundStream(
            INC_A,
            self.marked,
            window=self.window,
            window_bytes=10_000,
            max_frame_size=100,
        )

    # events
    def send(self, count: int) -> None:
        first = len(self.store) + 1
        new = [b"m%d" % (self.counter + i) for i in range(count)]
        self.counter += count
        self.store.extend(new)
        self.out.on_stored(first, new)

    def connect(self) -> None:
        if self.linked:
            return
        self.linked = True
        self.to_receiver.clear()
        self.to_sender.clear()
        h_sender = Hello(
            PROTOCOL_VERSION,
            INC_A,
            self.window,
            10_000,
            self.out.acked + 1,
            self.out.stored,
            None,
            0,
        )
        h_receiver = Hello(
            PROTOCOL_VERSION, INC_B, self.window, 10_000, 1, 0, INC_A, self.inb.marked
        )
        r = resume_inbound(h_sender, self.inb.marked, False)
        assert r.lost is None, r
        newly_after = resume_outbound(
            h_receiver, INC_A, self.out.acked, self.out.stored
        )
        self.out.link_ready(newly_after, self.window, 10_000)
        self.acked = self.out.acked

    def cut(self) -> None:
        self.linked = False
        self.to_receiver.clear()
        self.to_sender.clear()
        self.out.link_lost()

    def crash_sender(self) -> None:
        self.cut()
        self.out = self._new_out()

    def crash_receiver(self) -> None:
        self.cut()
        self.forgotten.update(range(self.marked + 1, self.inb.delivered + 1))
        self.inb = self._new_in()

    def pump(self) -> None:
        if not self.linked:
            return
        while True:
            request = self.out.read_request(3)
            if request is not None:
                after, limit, max_bytes = request
                self.out.on_read(
                    after, within_bytes(self.store[after : after + limit], max_bytes)
                )
            first, chunk = self.out.take()
            if not chunk:
                break
            for i in range(0, len(chunk), 2):
                self.to_receiver.append(("data", first + i, chunk[i : i + 2]))

    def receive(self) -> None:
        if not self.to_receiver:
            return
        _kind, first, contents = self.to_receiver.popleft()
        _accepted, ack_now, nack = self.inb.on_data(first, contents)
        if nack:
            self.to_sender.append(("nack", nack))
        if ack_now:
            self.to_sender.append(("ack", self.inb.marked, self.inb.received))

    def deliver(self) -> None:
        while self.inb.queue:
            position = self.inb.delivered + 1
            assert self.inb.queue[0] == self.store[position - 1], "contents misaligned"
            self.inb.pop_delivered()
            if position <= self.highest:
                assert self.forgotten[position] > 0, f"{position} delivered twice"
                self.forgotten[position] -= 1
                self.repeats += 1
            else:
                assert position == self.highest + 1, f"skipped to {position}"
                self.highest = position
            self.delivered.append(position)

    def mark(self) -> None:
        self.marked = self.inb.delivered
        self.inb.marked = self.marked
        if self.linked:
            self.to_sender.append(("ack", self.inb.marked, self.inb.received))

    def acknowledge(self) -> None:
        if not self.to_sender:
            return
        frame = self.to_sender.popleft()
        if frame[0] == "ack":
            self.out.on_ack(frame[1], frame[2])
            assert self.out.acked <= self.marked, "acknowledged beyond the durable mark"
            self.acked = self.out.acked
        else:
            self.out.on_nack(frame[1])

    def timeout(self) -> None:
        self.out.retransmit()

    def drop(self) -> None:
        if self.to_receiver:
            self.to_receiver.popleft()
        elif self.to_sender:
            self.to_sender.popleft()

    def duplicate(self) -> None:
        if self.to_receiver:
            self.to_receiver.appendleft(self.to_receiver[0])

    def swap(self) -> None:
        if len(self.to_receiver) > 1:
            self.to_receiver[0], self.to_receiver[1] = (
                self.to_receiver[1],
                self.to_receiver[0],
            )

    def heal(self) -> None:
        self.connect()
        for _ in range(10_000):
            if self.out.acked == len(self.store):
                return
            self.pump()
            while self.to_receiver:
                self.receive()
            self.deliver()
            self.mark()
            while self.to_sender:
                self.acknowledge()
            if self.out.outstanding:
                self.timeout()
        raise AssertionError("did not converge")


OPS = [
    "send",
    "connect",
    "cut",
    "crash_sender",
    "crash_receiver",
    "pump",
    "receive",
    "deliver",
    "mark",
    "acknowledge",
    "timeout",
    "drop",
    "duplicate",
    "swap",
]


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        window=st.integers(1, 8),
        ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(1, 5)), max_size=200),
    )
    def test_exactly_once_in_order(
        self, window: int, ops: list[tuple[str, int]]
    ) -> None:
        """
        Under any schedule of sends, loss, duplication, reordering, link cuts
        and crashes of either side: nothing is delivered out of order or
        skipped, nothing is acknowledged before its mark is durable, the only
        repeated deliveries are those a receiver crash forgot (delivered but
        not yet marked), and once the faults stop everything is delivered and
        acknowledged.
        """
        pair = Pair(window)
        for op, arg in ops:
            if op == "send":
                pair.send(arg)
            else:
                getattr(pair, op)()
        pair.heal()
        self.assertEqual(pair.highest, len(pair.store))
        self.assertEqual(pair.out.acked, len(pair.store))
        self.assertEqual(
            sorted(set(pair.delivered)), list(range(1, len(pair.store) + 1))
        )
        self.assertEqual(len(pair.delivered), len(pair.store) + pair.repeats)

    def test_model_detects_double_delivery(self) -> None:
        """
        The model's checks can fail: a receiver that forgets its durable mark
        (restarting from 0) is caught delivering twice.
        """
        pair = Pair(4)
        pair.send(3)
        pair.heal()
        pair.cut()
        pair.marked = 0
        pair.inb = pair._new_in()
        pair.acked = pair.out.acked = 0
        pair.out = pair._new_out()
        self.assertRaises(AssertionError, pair.heal)
