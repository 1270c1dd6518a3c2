"""
When one peer's acknowledgements of committed delivery marks go out:
:class:`AckPacer`, one per peer, and :class:`AckSchedule`, one per node.

Each group commit that makes a peer's delivery marks durable is worth an
ACK to that peer; with many busy peers that is one ACK frame per peer per
commit, a large share of a node's work.  The pacer lets the first ACK out
at once (a lone message's acknowledgement is never delayed), then at most
one per ``ack_interval``: what commits make durable meanwhile waits, unless
the acknowledged part would fall a quarter of the sender's window behind,
which goes out at once so the sender never waits for its window.  An ACK is
computed when it is written, so it always carries the latest durable mark:
coalescing drops no information, only frames.  Marks that cover everything
the peer sent go at once too: only a peer with more data on the way, which
has no reason to wait for the ACK, has its ACKs paced.

The ACKs that wait share one timer (the schedule's), not one each: a timer
per waiting ACK is an object that lives about an interval, thousands of
them a second with many peers, and such objects are what makes the garbage
collector's full collections frequent (pauses of 100 ms were measured with
1,000 peers).

ACKs due at once (a commit that makes 1,000 peers' marks durable, a
firing with as many due) are written at most :data:`CHUNK` per reactor
turn: the rest wait in the schedule's queue, one entry per peer, and go on
the next turns, each computed when written (so carrying the newest mark,
and none for a peer whose link went meanwhile).  Writing 1,000 ACKs in one
go holds the reactor for tens of milliseconds, which every message
waiting to be delivered meanwhile would add to its latency.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ilm._session import InboundStream

__all__ = ["CHUNK", "AckPacer", "AckSchedule"]

#: The most ACKs written in one reactor turn.
CHUNK = 64


class AckSchedule:
    """
    The node's owed ACKs and the one timer that writes them when due.  A
    timer fires at the earliest due ACK, but not sooner than an eighth of
    the interval after the previous one (so an ACK may leave that much
    late, and a firing looks at each owed ACK at most eight times per
    interval).

    ACKs due now are written at once while the turn's :data:`CHUNK` lasts,
    and queued for the next turns beyond it.  The count restarts when the
    queue is drained on a later turn, so no turn writes more than a chunk
    (an ACK may thus wait a turn even when few are due).

    :param interval: the node's ``ack_interval``.
    """

    __slots__ = (
        "_clock",
        "_gap",
        "_later",
        "_written",
        "call",
        "fired_at",
        "owed",
        "ready",
        "ready_call",
    )

    def __init__(
        self,
        interval: float,
        *,
        clock: IReactorTime,
        later: Callable[..., IDelayedCall],
    ) -> None:
        self._clock = clock
        self._later = later
        self._gap = interval / 8
        self.owed: deque[AckPacer] = deque()
        self.call: IDelayedCall | None = None
        self.fired_at = float("-inf")
        #: The ACKs due now that wait for a later turn (one entry per
        #: pacer: see ``AckPacer.queued``), and the call that writes them.
        self.ready: deque[AckPacer] = deque()
        self.ready_call: IDelayedCall | None = None
        self._written = 0

    def add(self, pacer: AckPacer) -> None:
        """``pacer`` owes an ACK at ``pacer.due``."""
        self.owed.append(pacer)
        at = max(pacer.due, self.fired_at + self._gap)
        call = self.call
        if call is None:
            self.call = self._later(max(0.0, at - self._clock.seconds()), self._fire)
        elif at < call.getTime():
            call.reset(max(0.0, at - self._clock.seconds()))

    def now(self, pacer: AckPacer) -> None:
        """
        ``pacer`` owes an ACK now: written at once if this turn's chunk is
        not used up, else queued (once) for a later turn.
        """
        pacer.owed = True
        pacer.due = float("-inf")
        if pacer.queued:
            return  # it goes soon, with the newest mark
        if self.ready_call is None and self._written < CHUNK:
            self._write(pacer)
            return
        pacer.queued = True
        self.ready.append(pacer)
        if self.ready_call is None:
            self.ready_call = self._later(0, self._drain)

    def _write(self, pacer: AckPacer) -> None:
        self._written += 1
        pacer.owed = False
        pacer.send()

    def _drain(self) -> None:
        """Write a chunk of the queued ACKs; the rest on the next turn."""
        self.ready_call = None
        self._written = 0
        now = self._clock.seconds()
        ready = self.ready
        while ready and self._written < CHUNK:
            pacer = ready.popleft()
            pacer.queued = False
            # Not owed: sent or dropped (the link went) meanwhile; not due:
            # sent, then paced anew (the timer has it).
            if pacer.owed and pacer.due <= now:
                self._write(pacer)
        if ready:
            self.ready_call = self._later(0, self._drain)

    def _fire(self) -> None:
        self.call = None
        now = self.fired_at = self._clock.seconds()
        owed = self.owed
        earliest = float("inf")
        # A fixed count: writing an ACK cannot add to the queue, but a
        # stale entry (an ACK sent or dropped meanwhile) is simply let go.
        for _ in range(len(owed)):
            pacer = owed.popleft()
            if not pacer.owed:
                continue
            if pacer.due <= now:
                self.now(pacer)
            else:
                owed.append(pacer)
                earliest = min(earliest, pacer.due)
        if owed and earliest != float("inf"):
            at = max(earliest, now + self._gap)
            self.call = self._later(at - now, self._fire)

    def stop(self) -> None:
        """No more ACKs (the node stops or crashed)."""
        for call in (self.call, self.ready_call):
            if call is not None and call.active():
                call.cancel()
        self.call = self.ready_call = None
        for pacer in (*self.owed, *self.ready):
            pacer.owed = pacer.queued = False
        self.owed.clear()
        self.ready.clear()


class AckPacer:
    """
    Paces the ACKs one peer gets after commits.

    :param interval: the shortest time between two paced ACKs (0: every
        commit's marks are acknowledged at once).
    :param schedule: the node's :class:`AckSchedule`.
    :param send: writes an ACK now (and reports it with :meth:`sent`).
    """

    __slots__ = (
        "_clock",
        "_interval",
        "_schedule",
        "acked",
        "acked_bytes",
        "acked_stream",
        "due",
        "owed",
        "queued",
        "send",
        "sent_at",
    )

    def __init__(
        self,
        interval: float,
        *,
        clock: IReactorTime,
        schedule: AckSchedule,
        send: Callable[[], None],
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._schedule = schedule
        self.send = send
        #: Whether a trailing ACK is owed, and when it is due.
        self.owed = False
        self.due = 0.0
        #: Whether the owed ACK waits in the schedule's queue of those due
        #: now (then ``owed`` says whether it is still to be written).
        self.queued = False
        #: When the last ACK with a new mark was written (of any cause).
        self.sent_at = float("-inf")
        #: The stream the last ACK was about, its mark and the bytes
        #: delivered from it by then.
        self.acked_stream: InboundStream | None = None
        self.acked = 0
        self.acked_bytes = 0

    def committed(self, stream: InboundStream, window: int, window_bytes: int) -> None:
        """
        A commit made marks of ``stream`` (the peer's current one) durable;
        ``window`` / ``window_bytes`` are what the peer may send beyond
        what it has had acknowledged.
        """
        if self.owed:
            # A trailing ACK is owed already: it goes early only if the
            # sender's window needs it.
            if self._behind(stream, window, window_bytes):
                self._schedule.now(self)
            return
        due = self.sent_at + self._interval
        if due <= self._clock.seconds() or self._behind(stream, window, window_bytes):
            self._schedule.now(self)
            return
        self.owed = True
        self.due = due
        self._schedule.add(self)

    def _behind(self, stream: InboundStream, window: int, window_bytes: int) -> bool:
        """
        Whether the ACK must go now: what was not acknowledged yet reaches a
        quarter of the window, or the marks cover all the peer sent (nothing
        arrived since: a sender may be waiting for this ACK before sending
        more, as one that awaits each receipt's ``acknowledged`` does), or
        the last ACK was about another stream.
        """
        return (
            stream.marked == stream.received
            or stream is not self.acked_stream
            or (stream.marked - self.acked) * 4 >= window
            or (stream.delivered_bytes - self.acked_bytes) * 4 >= window_bytes
        )

    def resumed(self, stream: InboundStream) -> None:
        """
        The handshake told the peer ``stream``'s mark (its RESUME carries
        it): an ACK repeating it is no news.
        """
        self.acked_stream = stream
        self.acked = stream.marked
        self.acked_bytes = stream.delivered_bytes

    def sent(self, stream: InboundStream) -> None:
        """
        An ACK about ``stream`` was written (or is owed to a paused link),
        whatever asked for it: the owed one is no longer owed.  Only an
        ACK with a new mark starts an interval, so that a lone message
        after one without (the first after a handshake, one answering
        duplicates) is still acknowledged at once.
        """
        if stream is not self.acked_stream or stream.marked > self.acked:
            self.sent_at = self._clock.seconds()
        self.acked_stream = stream
        self.acked = stream.marked
        self.acked_bytes = stream.delivered_bytes
        self.owed = False

    def cancel(self) -> None:
        """No trailing ACK (the link went, or one was just sent)."""
        self.owed = False

    def flush(self) -> None:
        """Write the owed ACK now, if one is (the node stops)."""
        if self.owed:
            self.owed = False
            self.send()
