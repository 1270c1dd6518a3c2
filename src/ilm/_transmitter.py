"""
The transmitting half of one peer's outbound side: :class:`Transmitter`.

It writes what the window allows as MESSAGES frames with
``INetwork.send_frames``, reads from ``IBackend.read_outbound`` what the
outbound stream's cache lacks (retried with the shared
:class:`ilm._backoff.Backoff` when the store fails), and runs the
retransmission timer.  The decisions (what to send, when to retransmit)
are the pure :class:`ilm._session.OutboundStream`'s.  It knows nothing of
sends, commits or receipts: :class:`ilm._sender.PeerSender` owns it and
calls :meth:`pump` when there is something new to send, :meth:`progressed`
when an ACK moved the window, and the link and stop methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ilm import _frames
from ilm._backoff import Backoff, Retry
from ilm._config import Config
from ilm._nodelog import NodeLogging, log
from ilm._peer import READY, PeerSession
from ilm.errors import StoreError
from ilm.interfaces import IBackend, INetwork

__all__ = ["Transmitter", "TransmitterHost"]


class TransmitterHost(NodeLogging, Protocol):
    """
    What a :class:`Transmitter` needs of the node around it.
    """

    def later(
        self, delay: float, function: Callable[..., object], *args: object
    ) -> IDelayedCall:
        """Call ``function`` after ``delay`` seconds, logging what it raises."""


class Transmitter:
    """
    Sends one peer's stored messages as the window allows, and sends them
    again when they time out.

    :param session: the peer's protocol state (its outbound stream and
        link phase).
    :param frame_target: the size MESSAGES frames are cut to.
    """

    __slots__ = (
        "_backend",
        "_clock",
        "_config",
        "_frame_target",
        "_host",
        "_network",
        "out",
        "peer_id",
        "read_call",
        "read_retry",
        "retransmit_call",
        "retransmit_retry",
        "retransmitted",
        "sent_high",
        "session",
    )

    def __init__(
        self,
        session: PeerSession,
        *,
        network: INetwork,
        backend: IBackend,
        host: TransmitterHost,
        clock: IReactorTime,
        config: Config,
        frame_target: int,
    ) -> None:
        self.session = session
        self.peer_id = session.peer_id
        out = self.out = session.out
        self._network = network
        self._backend = backend
        self._host = host
        self._clock = clock
        self._config = config
        self._frame_target = frame_target
        self.retransmit_call: IDelayedCall | None = None
        self.retransmit_retry = Retry(
            Backoff.exact(config.retransmit_timeout, config.max_retransmit_timeout)
        )
        self.read_call: IDelayedCall | None = None
        self.read_retry = Retry(
            Backoff.exact(config.store_retry, config.max_store_retry)
        )
        #: Messages sent again since the node started (``peer_status()``).
        self.retransmitted = 0
        # The highest position transmitted since start: a chunk below it
        # is a retransmission.
        self.sent_high = out.acked

    def pump(self) -> None:
        """
        Transmit what the window allows; read from the store what the
        stream's cache lacks.
        """
        session = self.session
        if session.link != READY or session.paused:
            return
        out = self.out
        first, chunk = out.take()
        if out.held_at and not session.hold_reported:
            session.hold_reported = True
            self._host.limited(
                ("message_too_large_for_peer", self.peer_id),
                LogLevel.error,
                "message {position} to {peer_id!r} is larger than the {limit} bytes "
                "that peer accepts: its stream waits there until the peer "
                "accepts larger messages",
                position=out.held_at,
                peer_id=self.peer_id,
                limit=out.max_message,
                ilm_event="message_too_large_for_peer",
            )
        if chunk:
            last = first + len(chunk) - 1
            if first <= self.sent_high:
                self.retransmitted += min(last, self.sent_high) - first + 1
            if last > self.sent_high:
                self.sent_high = last
            self._network.send_frames(
                self.peer_id,
                _frames.encode_messages(first, chunk, self._frame_target),
            )
            if self.retransmit_call is None:
                self.retransmit_call = self._host.later(
                    self.retransmit_retry.next_delay, self._retransmit
                )
        if self.read_call is None:
            request = out.read_request(self._config.read_batch)
            if request is not None:
                after, limit, max_bytes = request
                try:
                    d = self._backend.read_outbound(
                        self.peer_id, after, limit, max_bytes
                    )
                except Exception:
                    d = fail()
                d.addCallbacks(
                    self._read_done,
                    self._read_failed,
                    callbackArgs=(after,),
                    errbackArgs=(after,),
                )
                d.addErrback(self._host.unexpected, "reading the outbox")

    def _read_done(self, contents: list[bytes], after: int) -> None:
        out = self.out
        out.on_read(after, contents)
        if contents:
            # Only a read that returned something ends the backoff: an
            # outbox that keeps answering nothing (a damaged or tampered
            # store) is asked again ever more slowly.
            self.read_retry.succeeded()
        if not contents and out.cache_end < out.stored and after >= out.acked:
            self._read_failed(
                Failure(
                    StoreError(
                        f"outbox to {self.peer_id!r} returned nothing after "
                        f"position {after} though {out.stored} are stored"
                    )
                ),
            )
            return
        self.pump()

    def _read_failed(self, reason: Failure, after: int | None = None) -> None:
        out = self.out
        out.reading = False
        if after is not None and after < out.acked:
            # An acknowledgement overtook this read (it was committed while
            # the read was in flight, as a store whose reads run apart from
            # its commits allows) and the store refused to read below it.
            # Nothing is wrong with the store: read again from the new point.
            log.debug(
                "outbox read to {peer_id!r} after {after} overtaken by the "
                "acknowledgement of {acked}; reading again",
                peer_id=self.peer_id,
                after=after,
                acked=out.acked,
            )
            self.pump()
            return
        delay = self.read_retry.failed()
        self._host.limited(
            ("outbox_read_failed", self.peer_id),
            LogLevel.critical,
            "reading the outbox to {peer_id!r} failed; retrying in {delay:.2f}s",
            reason,
            peer_id=self.peer_id,
            delay=delay,
            ilm_event="outbox_read_failed",
        )
        self.read_call = self._host.later(delay, self._read_retry)

    def _read_retry(self) -> None:
        self.read_call = None
        self.pump()

    def _retransmit(self) -> None:
        self.retransmit_call = None
        if self.session.link != READY:
            return
        out = self.out
        if out.retransmit(self._clock.seconds(), self._config.retransmit_timeout):
            log.debug(
                "retransmitting to {peer_id!r} from position {position}",
                peer_id=self.peer_id,
                position=out.sent + 1,
            )
            self.retransmit_retry.failed()
            self.pump()
        elif out.outstanding:
            self.retransmit_call = self._host.later(
                self.retransmit_retry.next_delay, self._retransmit
            )

    def progressed(self) -> None:
        """
        An ACK moved the window: the retransmission timer starts again
        from the shortest delay, if anything is still in flight.
        """
        self.retransmit_retry.succeeded()
        call = self.retransmit_call
        if call is not None:
            if call.active():
                call.cancel()
            self.retransmit_call = None
        if self.out.outstanding:
            self.retransmit_call = self._host.later(
                self.retransmit_retry.next_delay, self._retransmit
            )

    def on_nack(self, expected: int) -> None:
        """
        The peer's NACK: it expects ``expected`` next.
        """
        if self.out.on_nack(
            expected, self._clock.seconds(), self._config.retransmit_timeout
        ):
            self.pump()

    def link_lost(self) -> None:
        """
        The link went: nothing in flight to time out any more.
        """
        call, self.retransmit_call = self.retransmit_call, None
        if call is not None and call.active():
            call.cancel()
        self.retransmit_retry.succeeded()

    def cancel_timers(self) -> None:
        for call in (self.retransmit_call, self.read_call):
            if call is not None and call.active():
                call.cancel()
        self.retransmit_call = self.read_call = None
