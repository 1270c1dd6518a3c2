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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ilm._session import InboundStream

__all__ = ["AckPacer", "AckSchedule"]


class AckSchedule:
    """
    The node's owed ACKs and the one timer that writes them when due.  A
    timer fires at the earliest due ACK, but not sooner than an eighth of
    the interval after the previous one (so an ACK may leave that much
    late, and a firing looks at each owed ACK at most eight times per
    interval).

    :param interval: the node's ``ack_interval``.
    """

    __slots__ = ("_clock", "_gap", "_later", "call", "fired_at", "owed")

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

    def add(self, pacer: AckPacer) -> None:
        """``pacer`` owes an ACK at ``pacer.due``."""
        self.owed.append(pacer)
        at = max(pacer.due, self.fired_at + self._gap)
        call = self.call
        if call is None:
            self.call = self._later(max(0.0, at - self._clock.seconds()), self._fire)
        elif at < call.getTime():
            call.reset(max(0.0, at - self._clock.seconds()))

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
                pacer.owed = False
                pacer.send()
            else:
                owed.append(pacer)
                earliest = min(earliest, pacer.due)
        if owed and earliest != float("inf"):
            at = max(earliest, now + self._gap)
            self.call = self._later(at - now, self._fire)

    def stop(self) -> None:
        """No more ACKs (the node stops or crashed)."""
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()
        self.owed.clear()


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
                self.send()
            return
        due = self.sent_at + self._interval
        if due <= self._clock.seconds() or self._behind(stream, window, window_bytes):
            self.send()
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
