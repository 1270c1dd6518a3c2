"""
A hypothesis state machine for the pure protocol core (ilm._session): one
stream A -> B driven only by OutboundStream, InboundStream, resume_inbound
and resume_outbound, with HELLOs exchanged on every link, several
incarnations of both sides, crashes and store loss on either side, and a
channel that drops, duplicates and reorders frames.

The durable state of each side is modelled explicitly (A: its outbox and its
acknowledgement point; B: its delivery records per incarnation of A, with
retirements), and everything else is rebuilt from it after a crash, as the
messenger does.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
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

WINDOW_BYTES = 10_000


class StreamMachine(RuleBasedStateMachine):
    """
    A sender A and a receiver B, each with an explicit durable store.
    """

    # -- setup ----------------------------------------------------------------

    @initialize(window=st.integers(1, 6))
    def setup(self, window: int) -> None:
        self.window = window
        self.incarnations = 0
        # A's durable store: its incarnation, outbox contents by position and
        # acknowledgement point.  Every store A ever had is kept (by
        # incarnation) to check what B delivers.
        self.a_inc = self._incarnation("a")
        self.a_stores: dict[str, list[bytes]] = {self.a_inc: []}
        self.a_durable_acked = 0
        self.out = self._new_out()
        self.a_ready = False
        # B's durable store: its incarnation, and per incarnation of A a
        # delivery mark and whether it is retired.
        self.b_inc = self._incarnation("b")
        self.b_records: dict[str, list[Any]] = {}
        self.b_streams: list[InboundStream] = []
        self.b_retired: set[str] = set()
        self.b_pending_marks: dict[str, int] = {}
        self.b_pending_retired: set[str] = set()
        self.b_ready = False
        self.b_peer_inc: str | None = None
        # The link.
        self.linked = False
        self.to_b: deque[tuple[Any, ...]] = deque()
        self.to_a: deque[tuple[Any, ...]] = deque()
        # What B's application took, per incarnation of A, and the
        # at-least-once windows.
        self.high: Counter[str] = Counter()
        self.cursor: Counter[str] = Counter()
        self.rewind: set[str] = set()
        self.credits: Counter[tuple[str, int]] = Counter()
        self.max_mark: Counter[str] = Counter()
        self.repeats = 0

    def _incarnation(self, side: str) -> str:
        self.incarnations += 1
        return f"{side}{self.incarnations:031d}"

    def _new_out(self) -> OutboundStream:
        return OutboundStream(
            self.a_durable_acked,
            len(self.a_stores[self.a_inc]),
            window=self.window,
            window_bytes=WINDOW_BYTES,
            cache_messages=2 * self.window,
            cache_bytes=2 * WINDOW_BYTES,
        )

    def _new_in(self, incarnation: str, delivered: int) -> InboundStream:
        return InboundStream(
            incarnation,
            delivered,
            window=self.window,
            window_bytes=WINDOW_BYTES,
            max_frame_size=1000,
        )

    # -- A -----------------------------------------------------------------------

    def send(self, count: int = 1) -> None:
        """A commits ``count`` new messages."""
        store = self.a_stores[self.a_inc]
        first = len(store) + 1
        new = [f"{self.a_inc}:{first + i}".encode() for i in range(count)]
        store.extend(new)
        self.out.on_stored(first, new)

    def pump(self) -> None:
        """A transmits what its window allows, reading its store as needed."""
        if not self.a_ready:
            return
        store = self.a_stores[self.a_inc]
        while True:
            request = self.out.read_request(2)
            if request is not None:
                after, limit, max_bytes = request
                self.out.on_read(
                    after, within_bytes(store[after : after + limit], max_bytes)
                )
            first, chunk = self.out.take()
            if not chunk:
                return
            for i in range(0, len(chunk), 2):
                self.to_b.append(("data", first + i, chunk[i : i + 2]))

    def a_commit(self) -> None:
        """A durably deletes what B acknowledged."""
        self.a_durable_acked = self.out.acked

    def retransmission_timer(self) -> None:
        """A's retransmission timer expires."""
        self.out.retransmit()

    def _a_receives(self, frame: tuple[Any, ...]) -> None:
        kind = frame[0]
        if kind == "hello":
            hello: Hello = frame[1]
            if self.a_ready:
                assert hello.incarnation == self.a_peer_inc, "incarnation changed"
            else:
                resume_after = resume_outbound(
                    hello, self.a_inc, self.out.acked, self.out.stored
                )
                self.out.link_ready(resume_after, hello.window, hello.window_bytes)
                self.a_ready = True
                self.a_peer_inc = hello.incarnation
            if hello.reply_requested:
                self.to_b.append(("hello", self._hello_from_a(False)))
        elif not self.a_ready:
            return
        elif kind == "ack":
            self.out.on_ack(frame[1], frame[2])
        else:
            self.out.on_nack(frame[1])

    # -- B -------------------------------------------------------------------------

    def _b_receives(self, frame: tuple[Any, ...]) -> None:
        kind = frame[0]
        if kind == "hello":
            hello: Hello = frame[1]
            if self.b_ready:
                assert hello.incarnation == self.b_peer_inc, "incarnation changed"
            else:
                self._b_hello(hello)
            if hello.reply_requested:
                self.to_a.append(("hello", self._hello_from_b(False)))
        elif not self.b_ready:
            return
        else:
            stream = self.b_streams[-1]
            _accepted, ack_now, nack = stream.on_data(frame[1], frame[2])
            if nack:
                self.to_a.append(("nack", nack))
            if ack_now:
                self._b_ack()

    def _b_hello(self, hello: Hello) -> None:
        incarnation = hello.incarnation
        stream = None
        for candidate in self.b_streams:
            if candidate.incarnation == incarnation:
                stream = candidate
        resume = resume_inbound(
            hello,
            stream.marked if stream is not None else None,
            incarnation in self.b_retired,
        )
        assert resume.lost is None, f"positions lost: {resume.lost}"
        if stream is None:
            for old in self.b_streams:
                self.b_retired.add(old.incarnation)
                self.b_pending_retired.add(old.incarnation)
            self.b_streams = [old for old in self.b_streams if old.queue]
            stream = self._new_in(incarnation, resume.delivered)
            self.b_streams.append(stream)
            self.b_pending_marks[incarnation] = resume.delivered
        elif self.b_streams[-1] is not stream:
            self.b_streams.remove(stream)
            self.b_streams.append(stream)
        self.b_ready = True
        self.b_peer_inc = incarnation

    def _b_ack(self) -> None:
        stream = self.b_streams[-1] if self.b_streams else None
        if self.linked and stream is not None and stream.incarnation == self.b_peer_inc:
            self.to_a.append(("ack", stream.marked, stream.received))

    def b_deliver(self) -> None:
        """B hands its application the next queued message."""
        for stream in self.b_streams:
            if stream.queue:
                contents = stream.queue[0]
                position = stream.delivered + 1
                stream.pop_delivered()
                self._delivered(stream.incarnation, position, contents)
                return

    def b_commit(self) -> None:
        """B's group commit: delivery marks and retirements become durable."""
        marks = dict(self.b_pending_marks)
        for stream in self.b_streams:
            if stream.delivered > stream.marked:
                marks[stream.incarnation] = stream.delivered
        for incarnation, mark in marks.items():
            record = self.b_records.setdefault(incarnation, [0, False])
            record[0] = max(record[0], mark)
            self.max_mark[incarnation] = max(self.max_mark[incarnation], mark)
        for incarnation in self.b_pending_retired:
            self.b_records.setdefault(incarnation, [0, False])[1] = True
        self.b_pending_marks.clear()
        self.b_pending_retired.clear()
        for stream in self.b_streams:
            if stream.incarnation in marks:
                stream.marked = max(stream.marked, marks[stream.incarnation])
        self._b_ack()
        if len(self.b_streams) > 1:
            current = self.b_streams[-1]
            self.b_streams = [
                s
                for s in self.b_streams
                if s is current or s.queue or s.delivered > s.marked
            ]

    def b_delayed_ack(self) -> None:
        """B's ack timer: it reports what it holds."""
        if self.b_ready:
            self._b_ack()

    def _delivered(self, incarnation: str, position: int, contents: bytes) -> None:
        store = self.a_stores[incarnation]
        assert store[position - 1] == contents, "delivered contents misplaced"
        cursor = self.cursor[incarnation]
        assert position == cursor + 1 or (
            incarnation in self.rewind and position <= cursor
        ), f"position {position} delivered after {cursor}"
        self.rewind.discard(incarnation)
        self.cursor[incarnation] = position
        high = self.high[incarnation]
        if position <= high:
            key = (incarnation, position)
            assert self.credits[key] > 0, f"{position} delivered twice"
            self.credits[key] -= 1
            self.repeats += 1
        else:
            assert position == high + 1, f"skipped to {position} after {high}"
            self.high[incarnation] = position

    # -- the link --------------------------------------------------------------------

    def _hello_from_a(self, reply_requested: bool) -> Hello:
        return Hello(
            PROTOCOL_VERSION,
            self.a_inc,
            self.window,
            WINDOW_BYTES,
            self.out.acked + 1,
            self.out.stored,
            None,
            0,
            reply_requested,
        )

    def _hello_from_b(self, reply_requested: bool) -> Hello:
        stream = self.b_streams[-1] if self.b_streams else None
        return Hello(
            PROTOCOL_VERSION,
            self.b_inc,
            self.window,
            WINDOW_BYTES,
            1,
            0,
            stream.incarnation if stream is not None else None,
            stream.marked if stream is not None else 0,
            reply_requested,
        )

    def handshake_retry(self) -> None:
        """
        A side that has not seen the other's HELLO sends its own again,
        asking for a reply (the first may have been lost).
        """
        if not self.a_ready:
            self.to_b.append(("hello", self._hello_from_a(True)))
        if not self.b_ready:
            self.to_a.append(("hello", self._hello_from_b(True)))

    def connect(self) -> None:
        """A link comes up: both sides send a HELLO at once."""
        self.linked = True
        self.to_b.clear()
        self.to_a.clear()
        self.to_b.append(("hello", self._hello_from_a(False)))
        self.to_a.append(("hello", self._hello_from_b(False)))

    def _possible(self) -> list[str]:
        """The normal-operation actions that would do something now."""
        out = self.out
        possible = ["send"]
        if self.a_ready and out.stored > out.sent:
            possible.append("pump")
        if out.acked > self.a_durable_acked:
            possible.append("a_commit")
        if self.a_ready and out.outstanding:
            possible.append("retransmission_timer")
        if any(s.queue for s in self.b_streams):
            possible.append("b_deliver")
        if (
            self.b_pending_marks
            or self.b_pending_retired
            or any(s.delivered > s.marked for s in self.b_streams)
        ):
            possible.append("b_commit")
        if self.b_ready and self.b_streams:
            possible.append("b_delayed_ack")
        if not self.linked:
            possible.append("connect")
        elif not (self.a_ready and self.b_ready):
            possible.append("handshake_retry")
        if self.to_b:
            possible.append("frame_to_b")
        if self.to_a:
            possible.append("frame_to_a")
        return possible

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """
        One step of normal operation, among those possible now: A sends,
        transmits, commits or times out; B delivers, commits or
        acknowledges; the link comes up; a frame arrives.  (One rule, so
        that hypothesis's swarm testing never switches a step off.)
        """
        action = data.draw(st.sampled_from(self._possible()), label="action")
        if action == "send":
            self.send(data.draw(st.integers(1, 5), label="count"))
        else:
            getattr(self, action)()

    @rule(
        kind=st.sampled_from(
            [
                "cut",
                "crash_a",
                "crash_b",
                "crash_b_after_delivery",
                "a_loses_store",
                "b_loses_store",
                "drop_to_b",
                "drop_to_a",
                "duplicate_to_b",
                "duplicate_to_a",
                "swap_to_b",
                "swap_to_a",
            ]
            + ["no_fault"] * 100
        )
    )
    def fault(self, kind: str) -> None:
        """
        One fault (most draws are none, so that the streams make progress
        between faults): the link is cut, a side crashes or loses its store,
        or the channel drops, duplicates or reorders a frame.
        """
        if kind == "no_fault":
            return
        if "_to_" in kind:
            action, _, side = kind.partition("_to_")
            self._mangle(self.to_b if side == "b" else self.to_a, action)
        else:
            getattr(self, kind)()

    def _mangle(self, queue: deque[tuple[Any, ...]], action: str) -> None:
        if not queue:
            return
        if action == "drop":
            queue.popleft()
        elif action == "duplicate":
            queue.appendleft(queue[0])
        elif len(queue) > 1:
            queue[0], queue[1] = queue[1], queue[0]

    def crash_b_after_delivery(self) -> None:
        """B delivers what it holds and dies before its mark commit."""
        while any(s.queue for s in self.b_streams):
            self.b_deliver()
        self.crash_b()

    def cut(self) -> None:
        """The link goes down; frames in flight are lost."""
        self.linked = False
        self.to_b.clear()
        self.to_a.clear()
        self.out.link_lost()
        self.a_ready = False
        self.a_peer_inc = None
        self.b_ready = False
        self.b_peer_inc = None

    def frame_to_b(self) -> None:
        self._b_receives(self.to_b.popleft())

    def frame_to_a(self) -> None:
        self._a_receives(self.to_a.popleft())

    # -- crashes and store loss ------------------------------------------------------

    def crash_a(self) -> None:
        """A dies and restarts from its durable store."""
        self.cut()
        self.out = self._new_out()

    def crash_b(self) -> None:
        """B dies and restarts from its durable records."""
        self.cut()
        for stream in self.b_streams:
            incarnation = stream.incarnation
            record = self.b_records.get(incarnation)
            mark = record[0] if record is not None else 0
            if incarnation == self.a_inc:
                mark = max(mark, self.a_durable_acked)
            # A new window: each position B took after its durable mark (or
            # after A's acknowledgement point) may come once more.
            for key in [k for k in self.credits if k[0] == incarnation]:
                del self.credits[key]
            for position in range(mark + 1, self.high[incarnation] + 1):
                self.credits[(incarnation, position)] = 1
            self.rewind.add(incarnation)
        self.b_streams = [
            self._new_in(incarnation, record[0])
            for incarnation, record in self.b_records.items()
            if not record[1]
        ]
        self.b_retired = {i for i, record in self.b_records.items() if record[1]}
        self.b_pending_marks.clear()
        self.b_pending_retired.clear()

    def a_loses_store(self) -> None:
        """A's store is gone: it comes back as a new incarnation."""
        self.cut()
        self.a_inc = self._incarnation("a")
        self.a_stores[self.a_inc] = []
        self.a_durable_acked = 0
        self.out = self._new_out()

    def b_loses_store(self) -> None:
        """B's store is gone: it comes back as a new incarnation."""
        self.crash_b()
        record = self.b_records.get(self.a_inc)
        if record is not None:
            for position in range(self.a_durable_acked + 1, record[0] + 1):
                self.credits[(self.a_inc, position)] = 1
            self.rewind.add(self.a_inc)
        self.b_inc = self._incarnation("b")
        self.b_records = {}
        self.b_streams = []
        self.b_retired = set()

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def sender_state_is_consistent(self) -> None:
        """acked <= sent <= cache_end <= stored, and the cache is bounded."""
        out = self.out
        assert self.a_durable_acked <= out.acked <= out.sent, (out.acked, out.sent)
        assert out.sent <= out.cache_end <= out.stored, (out.cache_end, out.stored)
        assert out.stored == len(self.a_stores[self.a_inc])
        assert out.cache_end - out.acked <= 2 * self.window

    @invariant()
    def never_acknowledged_beyond_the_durable_mark(self) -> None:
        """A's acknowledgement point never passes B's durable mark."""
        assert self.out.acked <= self.max_mark[self.a_inc], (
            self.out.acked,
            self.max_mark[self.a_inc],
        )

    @invariant()
    def receiver_state_is_consistent(self) -> None:
        """marked <= delivered <= received, and the queue fits the window."""
        for stream in self.b_streams:
            assert stream.marked <= stream.delivered <= stream.received
            assert len(stream.queue) <= self.window
            record = self.b_records.get(stream.incarnation)
            if record is not None:
                assert record[0] <= stream.marked

    @invariant()
    def deliveries_follow_the_store(self) -> None:
        """Nothing is delivered beyond what the sender stored."""
        for incarnation, high in self.high.items():
            assert high <= len(self.a_stores[incarnation])

    def _drain_channel(self) -> None:
        while self.to_b or self.to_a:
            if self.to_b:
                self.frame_to_b()
            if self.to_a:
                self.frame_to_a()

    def teardown(self) -> None:
        """
        Once the faults stop, everything the current incarnation of A
        stored is delivered and acknowledged.
        """
        if not hasattr(self, "out"):
            return
        if not self.linked:
            self.connect()
        for _ in range(10_000):
            self._drain_channel()
            while any(s.queue for s in self.b_streams):
                self.b_deliver()
            self.b_commit()
            self._drain_channel()
            self.a_commit()
            stored = len(self.a_stores[self.a_inc])
            if (
                self.out.acked == stored
                and self.high[self.a_inc] == stored
                and not any(s.queue for s in self.b_streams)
            ):
                return
            if not (self.a_ready and self.b_ready):
                self.handshake_retry()
                continue
            if self.out.outstanding:
                self.retransmission_timer()
            self.pump()
        raise AssertionError("the stream did not converge once the faults stopped")


StreamMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=200, deadline=None, derandomize=True
)


class AckBeforeMarkMachine(StreamMachine):
    """
    A broken receiver: it acknowledges what it delivered, not its durable
    mark.
    """

    def _b_ack(self) -> None:
        stream = self.b_streams[-1] if self.b_streams else None
        if self.linked and stream is not None and stream.incarnation == self.b_peer_inc:
            self.to_a.append(("ack", stream.delivered, stream.received))


AckBeforeMarkMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=80,
    deadline=None,
    phases=[Phase.generate],
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


class StatefulTests(SynchronousTestCase):
    def test_stream_machine(self) -> None:
        """
        Under any sequence of sends, link cuts, frame loss, duplication and
        reordering, crashes and store loss of either side: deliveries follow
        the sender's store in order, repeats happen only in the documented
        at-least-once windows, A never acknowledges beyond B's durable mark,
        memory stays within the window, and once the faults stop the current
        stream is delivered and acknowledged.
        """
        StreamMachine.TestCase("runTest").runTest()

    def test_machine_catches_ack_before_mark(self) -> None:
        """
        The machine can fail: a receiver that acknowledges delivered
        positions before their mark is durable is caught by the invariant
        that A never acknowledges beyond B's durable mark.
        """
        with self.assertRaises(AssertionError) as caught:
            AckBeforeMarkMachine.TestCase("runTest").runTest()
        notes = "\n".join(getattr(caught.exception, "__notes__", []))
        self.assertIn("never_acknowledged_beyond_the_durable_mark", notes)
