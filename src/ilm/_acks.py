"""
When one peer's acknowledgements of committed delivery marks go out:
:class:`AckPacer`.

Each group commit that makes a peer's delivery marks durable is worth an
ACK to that peer; with many busy peers that is one ACK frame per peer per
commit, a large share of a node's work.  The pacer lets the first ACK out
at once (a lone message's acknowledgement is never delayed), then at most
one per ``ack_interval``: what commits make durable meanwhile waits for a
timer, unless the acknowledged part would fall a quarter of the sender's
window behind, which goes out at once so the sender never waits for its
window.  An ACK is computed when it is written, so it always carries the
latest durable mark: coalescing drops no information, only frames.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ilm._session import InboundStream

__all__ = ["AckPacer"]


class AckPacer:
    """
    Paces the ACKs one peer gets after commits.

    :param interval: the shortest time between two paced ACKs (0: every
        commit's marks are acknowledged at once).
    :param send: writes an ACK now (and reports it with :meth:`sent`).
    """

    __slots__ = (
        "_clock",
        "_interval",
        "_later",
        "_send",
        "acked",
        "acked_bytes",
        "acked_stream",
        "call",
        "sent_at",
    )

    def __init__(
        self,
        interval: float,
        *,
        clock: IReactorTime,
        later: Callable[..., IDelayedCall],
        send: Callable[[], None],
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._later = later
        self._send = send
        #: The trailing ACK's timer, while one is owed.
        self.call: IDelayedCall | None = None
        #: When the last ACK (of any cause) was written.
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
        if self.call is not None:
            # A trailing ACK is owed already: it goes early only if the
            # sender's window needs it.
            if self._behind(stream, window, window_bytes):
                self._send()
            return
        interval = self._interval
        now = self._clock.seconds()
        wait = self.sent_at + interval - now
        if wait <= 0 or self._behind(stream, window, window_bytes):
            self._send()
            return
        self.call = self._later(wait, self._due)

    def _behind(self, stream: InboundStream, window: int, window_bytes: int) -> bool:
        """
        Whether what was not acknowledged yet reaches a quarter of the
        window (or the last ACK was about another stream).
        """
        return (
            stream is not self.acked_stream
            or (stream.marked - self.acked) * 4 >= window
            or (stream.delivered_bytes - self.acked_bytes) * 4 >= window_bytes
        )

    def _due(self) -> None:
        self.call = None
        self._send()

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
        self.cancel()

    def cancel(self) -> None:
        """No trailing ACK (the link went, or one was just sent)."""
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()

    def flush(self) -> None:
        """Write the owed ACK now, if one is (the node stops)."""
        if self.call is not None:
            self.cancel()
            self._send()
