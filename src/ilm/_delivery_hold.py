"""
:class:`DeliveryHold`: one peer's deliveries held behind a failed delivery.

When the delivery target refuses a message, that peer's later messages
wait (in order) and the refused one is offered again after the shared
:class:`ilm._backoff.Backoff`, or after the target's ``retry_after`` when
it gave one (bounded by :data:`MAX_RETRY_AFTER`).  The hold knows since
when and why it holds, for ``peer_status``, and logs each failure
(rate-limited per peer).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ilm._backoff import Backoff, Retry
from ilm._nodelog import NodeLogging
from ilm._peerid import PeerId
from ilm.errors import DeliveryFailed

__all__ = ["MAX_RETRY_AFTER", "DeliveryHold", "one_line"]

#: The longest wait a delivery target's ``retry_after`` (an HTTP
#: ``Retry-After``) can impose before the next attempt, in seconds.
MAX_RETRY_AFTER = 3600.0


def one_line(reason: object) -> str:
    """
    A failure or an error in one line: its type and its message.
    """
    error = reason.value if isinstance(reason, Failure) else reason
    if isinstance(error, BaseException):
        text = str(error).strip()
        kind = type(error).__name__
        line = f"{kind}: {text}" if text else kind
    else:
        line = str(error)
    return " ".join(line.split())


class DeliveryHold:
    """
    The hold of one peer's deliveries.

    :param retry_now: offers the held message again (the deliverer's
        ``deliver``), called when the retry timer fires.
    :param allowed: whether deliveries may be retried (the node runs).
    """

    __slots__ = (
        "_allowed",
        "_clock",
        "_later",
        "_log",
        "_peer_id",
        "_retry_now",
        "call",
        "failures",
        "reason",
        "retry",
        "since",
    )

    def __init__(
        self,
        peer_id: PeerId,
        *,
        clock: IReactorTime,
        later: Callable[..., IDelayedCall],
        log: NodeLogging,
        backoff: Backoff,
        retry_now: Callable[[], None],
        allowed: Callable[[], bool],
    ) -> None:
        self._peer_id = peer_id
        self._clock = clock
        self._later = later
        self._log = log
        self._retry_now = retry_now
        self._allowed = allowed
        self.retry = Retry(backoff)
        #: The retry timer while one is set.
        self.call: IDelayedCall | None = None
        #: Deliveries failed since start.
        self.failures = 0
        #: Since when, and why, deliveries are held (``None`` when not).
        self.since: float | None = None
        self.reason: str | None = None

    def failed(self, reason: Failure, message_id: int) -> None:
        """
        The delivery of ``message_id`` failed: hold, log, set the retry
        timer (unless deliveries are no longer allowed).
        """
        self.failures += 1
        if not self.retry.failures:
            self.since = self._clock.seconds()
        self.reason = one_line(reason)
        delay = self.retry.failed()
        error = reason.value
        if isinstance(error, DeliveryFailed) and error.retry_after is not None:
            # The target said when to come back (an HTTP Retry-After): wait
            # at least that long, but never longer than MAX_RETRY_AFTER, so
            # a wrong header cannot hold the stream for days.
            delay = max(delay, min(error.retry_after, MAX_RETRY_AFTER))
        self._log.limited(
            ("delivery_failed", self._peer_id),
            LogLevel.critical,
            "delivery of message {message_id} from {peer_id!r} failed; later "
            "messages from it wait; retrying in {delay:.2f}s",
            reason,
            message_id=message_id,
            peer_id=self._peer_id,
            delay=delay,
            ilm_event="delivery_failed",
        )
        if self._allowed():
            self.call = self._later(delay, self._fire)

    def _fire(self) -> None:
        self.call = None
        self._retry_now()

    def release(self) -> None:
        """
        A delivery succeeded after failures: the hold is over.
        """
        self.retry.succeeded()
        self.since = None
        self.reason = None

    def stop(self) -> None:
        """
        Retry no more (the node stops): cancel the retry timer.
        """
        call, self.call = self.call, None
        if call is not None and call.active():
            call.cancel()
