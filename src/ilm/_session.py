"""
The pure rules of the ILM protocol, for one ordered stream at a time.

Nothing here touches a reactor, a clock, a socket or a store: the messenger
feeds events in (messages stored, frames received, links up and down) and
acts on what comes out (messages to transmit, positions to mark, links to
close).  ``docs/protocol.md`` describes the rules; this module is their
implementation.

Positions
    Every message from node A to node B gets a position: 1, 2, 3, ... in send
    order, counted per ordered pair and per incarnation of A's store.
    Python integers do not wrap; the wire carries them as unsigned 64-bit.

Sender side (:class:`OutboundStream`)
    ``acked`` <= ``sent`` <= ``cache_end`` <= ``stored``.  Messages are
    transmitted only once stored, at most ``window`` messages (and
    ``window_bytes`` bytes) beyond ``acked``.  A bounded cache keeps the
    contents of ``acked + 1 .. cache_end`` in memory; the rest is read from
    the store in batches, so memory follows the window, not the backlog.

Receiver side (:class:`InboundStream`)
    ``marked`` (durable) <= ``delivered`` <= ``received``.  Data is accepted
    only in order; duplicates are re-acknowledged, gaps are reported once
    (NACK) and dropped, data beyond the announced window ends the link.
    Acknowledgements carry ``marked``, so nothing is acknowledged before its
    delivery mark is durable.  The streams from all incarnations of one peer
    share one budget (:class:`HeldTotal`): what does not fit is dropped, as
    if lost, and sent again by the peer.

Incarnations (:class:`NewIncarnations`)
    A peer may start only so many new streams (new incarnations) in a given
    period; one more is refused.

Resume (:func:`resume_inbound`, :func:`resume_outbound`)
    Whenever a link comes up, each side sends a :class:`Hello` and continues
    from what the other has durably received.  Inbound state is keyed by the
    sender's incarnation, so a sender that lost its store starts a new stream
    instead of having its messages taken for duplicates; a receiver that lost
    its store adopts the sender's first unacknowledged position instead of
    waiting forever for positions the sender has deleted.
"""

from __future__ import annotations

import math
from collections import deque

import attr

from ilm.errors import (
    AckOutOfRange,
    OutOfWindow,
    PeerStoreRegressed,
    StaleIncarnation,
    StoreBehindPeer,
    TooManyIncarnations,
)

PROTOCOL_VERSION = 1


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Hello:
    """
    What one side tells the other when a link comes up.

    - ``incarnation``: the sender's store incarnation.
    - ``window`` / ``window_bytes``: how much the sender accepts beyond what
      it has acknowledged.
    - ``first_unacked`` / ``last_position``: the sender's outbound stream to
      the receiver: the lowest position not yet acknowledged, and the highest
      position stored.
    - ``known_incarnation`` / ``delivered``: the receiver's incarnation whose
      stream the sender has a delivery mark for, and that mark (``None`` and
      0 when the sender has none).
    - ``reply_requested``: the sender has not seen the receiver's hello on
      this link and asks for it again (lossy networks).
    - ``max_message_size``: the largest message the sender accepts.
    """

    version: int
    incarnation: str
    window: int
    window_bytes: int
    first_unacked: int
    last_position: int
    known_incarnation: str | None
    delivered: int
    reply_requested: bool = False
    max_message_size: int = 1024 * 1024


class OutboundStream:
    """
    The sender's side of the stream from this node to one peer.
    """

    __slots__ = (
        "_buf",
        "_cache_bytes",
        "_cache_bytes_limit",
        "_cache_messages",
        "_head",
        "_inflight_bytes",
        "_window",
        "_window_bytes",
        "acked",
        "back_at",
        "held_at",
        "max_message",
        "peer_received",
        "reading",
        "ready",
        "send_window",
        "send_window_bytes",
        "sent",
        "stored",
    )

    def __init__(
        self,
        acked: int,
        stored: int,
        *,
        window: int,
        window_bytes: int,
        cache_messages: int,
        cache_bytes: int,
    ) -> None:
        if not 0 <= acked <= stored:
            raise ValueError(f"need 0 <= acked ({acked}) <= stored ({stored})")
        self.acked = acked
        self.stored = stored
        self.sent = acked
        self.peer_received = acked
        self.ready = False
        self.reading = False
        self.max_message: int | None = None
        self.held_at = 0
        # When the stream last went back to transmit again (NACK or timer).
        self.back_at = -math.inf
        self._window = window
        self._window_bytes = window_bytes
        self.send_window = window
        self.send_window_bytes = window_bytes
        self._cache_messages = max(cache_messages, 1)
        self._cache_bytes_limit = max(cache_bytes, 1)
        # The cache holds the contents of positions acked+1 .. cache_end.
        self._buf: list[bytes] = []
        self._head = 0
        self._cache_bytes = 0
        self._inflight_bytes = 0

    # -- views -------------------------------------------------------------

    @property
    def cache_end(self) -> int:
        """The highest position whose contents are in memory."""
        return self.acked + len(self._buf) - self._head

    @property
    def unacked(self) -> int:
        """Stored messages the peer has not acknowledged."""
        return self.stored - self.acked

    @property
    def inflight_bytes(self) -> int:
        """Bytes transmitted on the current link and not yet acknowledged."""
        return self._inflight_bytes

    @property
    def cached_bytes(self) -> int:
        """Bytes of contents held in memory."""
        return self._cache_bytes

    @property
    def outstanding(self) -> bool:
        """Whether transmitted data has not been acknowledged yet."""
        return self.ready and self.sent > self.acked

    # -- events ------------------------------------------------------------

    def on_stored(self, first: int, contents: list[bytes]) -> None:
        """
        Messages at ``first``, ``first + 1``, ... have been committed.
        """
        if first != self.stored + 1:
            raise ValueError(f"stored out of order: {first} after {self.stored}")
        self.stored += len(contents)
        if self.cache_end == first - 1:
            self._append(contents)

    def read_request(self, batch: int) -> tuple[int, int, int] | None:
        """
        Whether to read more contents from the store now.

        :return: ``(after, limit, max_bytes)`` for
            ``IBackend.read_outbound`` (what the cache has room for, in
            messages and in bytes), or ``None``.  At most one read is
            outstanding.
        """
        if self.reading or not self.ready:
            return None
        end = self.cache_end
        if end >= self.stored or end - self.sent >= batch:
            return None
        room = self._cache_messages - (len(self._buf) - self._head)
        if room <= 0 or self._cache_bytes >= self._cache_bytes_limit:
            return None
        self.reading = True
        return (
            end,
            min(room, batch, self.stored - end),
            self._cache_bytes_limit - self._cache_bytes,
        )

    def on_read(self, after: int, contents: list[bytes]) -> int:
        """
        A read requested by :meth:`read_request` returned.  Everything it
        returned fits in the cache (the request said how much room there
        was), unless acknowledgements overtook the read.

        :return: the number of messages added to the cache.
        """
        self.reading = False
        skip = self.cache_end - after
        if skip < 0:
            return 0
        if skip:
            contents = contents[skip:]
        return self._append(contents)

    def take(self) -> tuple[int, list[bytes]]:
        """
        Take what may be transmitted now and advance ``sent``.

        :return: ``(first_position, [contents, ...])``; the list is empty when
            nothing may be sent.
        """
        if not self.ready:
            return 0, []
        limit = min(self.cache_end, self.acked + self.send_window)
        if limit <= self.sent:
            return 0, []
        base = self._head - self.acked - 1
        chunk = self._buf[base + self.sent + 1 : base + limit + 1]
        if self.max_message is not None and max(map(len, chunk)) > self.max_message:
            # The peer would refuse this message: send what precedes it and
            # hold the stream there (see held_at).
            cut = next(
                i for i, item in enumerate(chunk) if len(item) > self.max_message
            )
            self.held_at = self.sent + 1 + cut
            del chunk[cut:]
            if not chunk:
                return 0, []
        budget = self.send_window_bytes - self._inflight_bytes
        total = sum(map(len, chunk))
        if total > budget:
            count = 0
            total = 0
            for item in chunk:
                size = len(item)
                if total + size > budget and (count or self._inflight_bytes):
                    break
                total += size
                count += 1
            del chunk[count:]
            if not chunk:
                return 0, []
        first = self.sent + 1
        self.sent += len(chunk)
        self._inflight_bytes += total
        return first, chunk

    def on_ack(self, delivered: int, received: int) -> tuple[int, bool]:
        """
        The peer acknowledged ``delivered`` (durably delivered) and reports
        holding everything up to ``received``.

        :return: ``(newly_acknowledged_count, progress)``; ``progress`` is
            whether anything moved (for the retransmission timer).
        :raises AckOutOfRange: if the peer acknowledges positions never
            stored.
        """
        if delivered > self.stored or received > self.stored:
            raise AckOutOfRange(
                f"peer acknowledged position {max(delivered, received)} but only "
                f"{self.stored} were ever stored for it"
            )
        progress = False
        if received > self.peer_received:
            self.peer_received = received
            progress = True
        newly = delivered - self.acked
        if newly <= 0:
            return 0, progress
        self._release(delivered)
        return newly, True

    def on_nack(self, expected: int, now: float = 0.0, interval: float = 0.0) -> bool:
        """
        The peer is missing ``expected`` (the link lost frames): transmit
        again from there, unless the stream already went back less than
        ``interval`` seconds before ``now`` (what it sent since then is
        recent: at most one go-back per position per retransmission
        timeout, however many NACKs arrive).

        :return: whether anything will be transmitted again.
        """
        if expected - 1 > self.peer_received and expected - 1 <= self.sent:
            self.peer_received = expected - 1
        return self._go_back(expected - 1, now, interval)

    def retransmit(self, now: float = 0.0, interval: float = 0.0) -> bool:
        """
        The retransmission timer expired: transmit again everything the peer
        has not confirmed receiving.  If the peer confirmed receiving
        everything but has not acknowledged it, its acknowledgement may have
        been lost: transmit the last message again, which the peer answers
        with an ACK at once (a duplicate).  Like :meth:`on_nack`, not within
        ``interval`` seconds of the last go-back.

        :return: whether anything will be transmitted again.
        """
        if self.peer_received < self.sent:
            return self._go_back(self.peer_received, now, interval)
        return self._go_back(self.sent - 1, now, interval)

    def link_ready(
        self,
        resume_after: int,
        peer_window: int,
        peer_window_bytes: int,
        peer_max_message: int | None = None,
    ) -> int:
        """
        The handshake finished: the peer has durably received everything up to
        ``resume_after`` (from :func:`resume_outbound`).  ``peer_max_message``
        is the largest message the peer accepts: a larger one is not sent, and
        the stream holds at it (``held_at`` is its position) until a link to a
        peer that accepts it.

        :return: the number of messages newly acknowledged by the handshake.
        """
        newly = 0
        if resume_after > self.acked:
            newly = resume_after - self.acked
            self._release(resume_after)
        self.ready = True
        self.sent = self.acked
        self.peer_received = self.acked
        self._inflight_bytes = 0
        self.send_window = max(1, min(self._window, peer_window))
        self.send_window_bytes = max(1, min(self._window_bytes, peer_window_bytes))
        self.max_message = peer_max_message
        self.held_at = 0
        self.back_at = -math.inf
        return newly

    def link_lost(self) -> None:
        """
        The link went down; everything unacknowledged will be sent again on
        the next one.
        """
        self.ready = False
        self.sent = self.acked
        self.peer_received = self.acked
        self._inflight_bytes = 0
        self.held_at = 0

    # -- internals ---------------------------------------------------------

    def _append(self, contents: list[bytes]) -> int:
        live = len(self._buf) - self._head
        room = self._cache_messages - live
        if room <= 0 or self._cache_bytes >= self._cache_bytes_limit:
            return 0
        if len(contents) > room:
            contents = contents[:room]
        total = sum(map(len, contents))
        if self._cache_bytes + total > self._cache_bytes_limit:
            budget = self._cache_bytes_limit - self._cache_bytes
            count = 0
            total = 0
            for item in contents:
                if total + len(item) > budget and count:
                    break
                total += len(item)
                count += 1
            contents = contents[:count]
        self._buf.extend(contents)
        self._cache_bytes += total
        return len(contents)

    def _release(self, through: int) -> None:
        count = through - self.acked
        head = self._head
        live = len(self._buf) - head
        popped = min(count, live)
        inflight = max(0, min(count, self.sent - self.acked))
        if inflight:
            self._inflight_bytes -= sum(map(len, self._buf[head : head + inflight]))
        if popped:
            self._cache_bytes -= sum(map(len, self._buf[head : head + popped]))
        if popped >= live:
            self._buf = []
            self._head = 0
            self._cache_bytes = 0
        else:
            self._head = head + popped
            if self._head > 4096 and self._head * 2 > len(self._buf):
                del self._buf[: self._head]
                self._head = 0
        self.acked = through
        if self.sent < through:
            self.sent = through
            self._inflight_bytes = 0
        if self.peer_received < through:
            self.peer_received = through

    def _go_back(self, to: int, now: float, interval: float) -> bool:
        if not self.ready or to < self.acked or to >= self.sent:
            return False
        if now < self.back_at + interval:
            return False
        self.back_at = now
        self.sent = to
        head = self._head
        self._inflight_bytes = sum(map(len, self._buf[head : head + (to - self.acked)]))
        return True


class HeldTotal:
    """
    What the streams from every incarnation of one peer hold, together: at
    most ``messages`` messages and ``bytes`` bytes (one window and one
    frame), whatever the number of incarnations.
    """

    __slots__ = ("bytes", "max_bytes", "max_messages", "messages")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0


class InboundStream:
    """
    The receiver's side of the stream from one incarnation of a peer.

    ``held``: the budget shared with the streams of the peer's other
    incarnations (a budget of its own if omitted).
    """

    __slots__ = (
        "_max_frame_size",
        "_window",
        "_window_bytes",
        "delivered",
        "delivered_bytes",
        "held",
        "held_bytes",
        "incarnation",
        "marked",
        "nacked",
        "queue",
        "starved",
    )

    def __init__(
        self,
        incarnation: str,
        delivered: int,
        *,
        window: int,
        window_bytes: int,
        max_frame_size: int,
        held: HeldTotal | None = None,
    ) -> None:
        self.incarnation = incarnation
        self.marked = delivered
        self.delivered = delivered
        #: Bytes delivered from this stream since it was created here.
        self.delivered_bytes = 0
        self.queue: deque[bytes] = deque()
        self.held_bytes = 0
        self.nacked = 0
        self.starved = False
        self._window = window
        self._window_bytes = window_bytes
        self._max_frame_size = max_frame_size
        if held is None:
            held = HeldTotal(window, window_bytes + max_frame_size)
        self.held = held

    @property
    def received(self) -> int:
        """The highest position held (delivered or queued)."""
        return self.delivered + len(self.queue)

    def on_data(self, first: int, contents: list[bytes]) -> tuple[int, bool, int]:
        """
        Data for positions ``first``, ``first + 1``, ... arrived.

        New messages that do not fit in what the peer's incarnations hold
        together (:class:`HeldTotal`) are dropped, as a lossy link would:
        ``starved`` is set, and the caller asks for them again (NACK) once
        room is made.

        :return: ``(accepted, acknowledge_now, nack_position)``: how many new
            messages were queued for delivery, whether to send an ACK at
            once (the data held duplicates), and a position to NACK (0 for
            none).
        :raises OutOfWindow: if the data goes beyond the announced window.
        """
        last = first + len(contents) - 1
        if last > self.marked + self._window:
            raise OutOfWindow(
                f"position {last} is beyond the window (delivered {self.marked}, "
                f"window {self._window})"
            )
        queue = self.queue
        received = self.delivered + len(queue)
        if first == last == received + 1:
            # The usual frame: the next message, alone.  Queued if it fits
            # in this stream's and the peer's budgets; else the general
            # path below decides.
            size = len(contents[0])
            held = self.held
            if self._room(1, size):
                queue.append(contents[0])
                self.held_bytes += size
                held.messages += 1
                held.bytes += size
                self.nacked = 0
                return 1, False, 0
        if first > received + 1:
            if self.nacked != received + 1:
                self.nacked = received + 1
                return 0, False, received + 1
            return 0, False, 0
        if last <= received:
            return 0, True, 0
        skip = received + 1 - first
        if skip:
            contents = contents[skip:]
        size = sum(map(len, contents))
        if self.held_bytes + size > self._window_bytes + self._max_frame_size:
            raise OutOfWindow(
                f"{self.held_bytes + size} bytes held exceeds the window of "
                f"{self._window_bytes} bytes"
            )
        held = self.held
        if (
            held.messages + len(contents) > held.max_messages
            or held.bytes + size > held.max_bytes
        ):
            # Older incarnations of the peer hold part of the budget: keep
            # what fits, drop the rest (it is sent again).
            room = held.max_messages - held.messages
            count = 0
            size = 0
            for item in contents[: max(room, 0)]:
                if held.bytes + size + len(item) > held.max_bytes:
                    break
                size += len(item)
                count += 1
            contents = contents[:count]
            self.starved = True
            if not contents:
                return 0, skip > 0, 0
        self.queue.extend(contents)
        self.held_bytes += size
        held.messages += len(contents)
        held.bytes += size
        self.nacked = 0
        return len(contents), skip > 0, 0

    def fits_run(self, first: int, contents: list[bytes]) -> int:
        """
        Whether ``contents``, at positions ``first`` on, may be delivered
        straight from the read, never queued: they are the next messages,
        nothing is queued, and :meth:`on_data` would queue them all (within
        the window and both budgets).

        :return: their size in bytes, or -1 if not (then :meth:`on_data`
            decides).
        """
        if self.queue or first != self.delivered + 1:
            return -1
        count = len(contents)
        if first + count - 1 > self.marked + self._window:
            return -1
        size = len(contents[0]) if count == 1 else sum(map(len, contents))
        return size if self._room(count, size) else -1

    def _room(self, count: int, size: int) -> bool:
        """
        Whether ``count`` more messages of ``size`` bytes in all fit in
        what this stream and the peer's incarnations together may hold.
        """
        held = self.held
        return (
            self.held_bytes + size <= self._window_bytes + self._max_frame_size
            and held.messages + count <= held.max_messages
            and held.bytes + size <= held.max_bytes
        )

    def passed(self, count: int, size: int) -> None:
        """
        The first ``count`` of the messages :meth:`fits_run` allowed
        (``size`` bytes) were delivered straight from the read.
        """
        self.delivered += count
        self.delivered_bytes += size
        if count:
            self.nacked = 0

    def pop_delivered(self, count: int = 1) -> None:
        """
        The first ``count`` messages of the queue were delivered.
        """
        if count == 1:
            size = len(self.queue.popleft())
        else:
            popleft = self.queue.popleft
            size = 0
            for _ in range(count):
                size += len(popleft())
        self.held_bytes -= size
        held = self.held
        held.messages -= count
        held.bytes -= size
        self.delivered += count
        self.delivered_bytes += size

    def jump(self, delivered: int) -> None:
        """
        Continue after ``delivered`` (positions the sender no longer has).
        """
        self.held.messages -= len(self.queue)
        self.held.bytes -= self.held_bytes
        self.queue.clear()
        self.held_bytes = 0
        self.delivered = delivered
        self.marked = max(self.marked, delivered)


class NewIncarnations:
    """
    How many new incarnations (new streams) one peer may start: at most
    ``limit`` within any ``period`` seconds.  A peer that loses its store
    comes back once; one that keeps presenting new incarnations is flapping
    (or hostile), and each new one costs a store record and a receive
    window.
    """

    __slots__ = ("limit", "period", "times")

    def __init__(self, limit: int, period: float) -> None:
        self.limit = limit
        self.period = period
        self.times: deque[float] = deque()

    def admit(self, now: float, incarnation: str) -> None:
        """
        Count a new incarnation starting at ``now``.

        :raises TooManyIncarnations: if ``limit`` were already started in
            the ``period`` before ``now`` (this one is then not counted).
        """
        times = self.times
        while times and times[0] <= now - self.period:
            times.popleft()
        if len(times) >= self.limit:
            raise TooManyIncarnations(
                f"new incarnation {incarnation} refused: the peer already "
                f"started {len(times)} new incarnation(s) in the last "
                f"{self.period:g} s (at most {self.limit})"
            )
        times.append(now)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class InboundResume:
    """
    How to continue receiving from a peer after its :class:`Hello`.

    - ``delivered``: the delivery mark to continue from.
    - ``new_stream``: whether this is the first contact with this incarnation.
    - ``lost``: ``(first, last)`` positions the sender has deleted although
      this node has no record of delivering them (only possible when this
      node's store lost committed data), or ``None``.
    """

    delivered: int
    new_stream: bool
    lost: tuple[int, int] | None = None


def resume_inbound(hello: Hello, delivered: int | None, retired: bool) -> InboundResume:
    """
    Decide where the stream from the hello's sender continues.

    :param delivered: this node's delivery mark for ``hello.incarnation``, or
        ``None`` when it has none.
    :param retired: whether ``hello.incarnation`` was replaced by a newer
        incarnation of the same peer.
    :raises StaleIncarnation: for a retired incarnation.
    :raises PeerStoreRegressed: if the peer's store holds fewer positions than
        this node has already delivered from it.
    """
    if retired:
        raise StaleIncarnation(
            f"incarnation {hello.incarnation} was replaced by a newer one"
        )
    start = hello.first_unacked - 1
    if delivered is None:
        return InboundResume(start, True)
    if delivered > hello.last_position:
        raise PeerStoreRegressed(
            f"peer's store ends at position {hello.last_position} but "
            f"{delivered} were already delivered from this incarnation"
        )
    if delivered < start:
        return InboundResume(start, False, (delivered + 1, start))
    return InboundResume(delivered, False)


def resume_outbound(hello: Hello, incarnation: str, acked: int, stored: int) -> int:
    """
    Decide what the hello's sender has durably received from this node.

    :return: the position after which transmission resumes (at least
        ``acked``).
    :raises StoreBehindPeer: if the peer reports more than this node ever
        stored.
    """
    if hello.known_incarnation != incarnation:
        return acked
    if hello.delivered > stored:
        raise StoreBehindPeer(
            f"peer has delivered up to position {hello.delivered} but this "
            f"node's store ends at {stored}"
        )
    return max(acked, hello.delivered)
