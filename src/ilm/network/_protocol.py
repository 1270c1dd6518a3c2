"""
:class:`ILMProtocol`: one stream connection.  It frames bytes, drives the
link handshake (through :class:`ilm.network._opening.LinkOpening`), keeps
the link alive (:class:`ilm.network._keepalive.Keepalive`) and is its
transport's ``IPushProducer``;
what the connection means to the node (whether to admit it, what it
becomes once authenticated, what a lost link changes) is its owner's
business, asked through the narrow :class:`IConnectionOwner` interface.

The connection's states are in :mod:`ilm.network._states`.  Session frames
of an open link go from :meth:`ILMProtocol.dataReceived` straight to the
owner's :class:`ilm.interfaces.IFrameReceiver`, one plain method call per
frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attr
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

import ilm.network._wire as _wire
from ilm._peerid import PeerId
from ilm.errors import (
    LinkTimeout,
    ProtocolViolation,
    TLSHandshakeFailed,
)
from ilm.interfaces import IFrameReceiver
from ilm.network._endpoints import address_text
from ilm.network._handshake import LinkHandshake, PreSharedKeys
from ilm.network._keepalive import Keepalive
from ilm.network._log import log
from ilm.network._opening import LinkOpening
from ilm.network._refusal_log import RefusalLog
from ilm.network._settings import LinkSettings
from ilm.network._states import AUTHENTICATED, CLOSED, HANDSHAKING, OPEN
from ilm.network._tls import TLSCredentials, tls_error_text
from ilm.network._waiters import ConnectionWaiters
from ilm.network._writer import LinkWriter

__all__ = ["ConnectionContext", "IConnectionOwner", "ILMFactory", "ILMProtocol"]

_CONNECTION_DONE = Failure(ConnectionDone())


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class ConnectionContext:
    """
    What every connection of a network shares: who this node is, how it
    proves it, its limits, its clock and its refusal log.
    """

    local_id: PeerId
    keys: PreSharedKeys | None
    tls: TLSCredentials | None
    settings: LinkSettings
    clock: IReactorTime
    key_search: Callable[[int], bool]
    random_bytes: Callable[[int], bytes]
    refusals: RefusalLog

    def handshake(self, destination: PeerId | None) -> LinkHandshake:
        """
        :return: the link handshake of a new connection: dialled to
            ``destination``, or incoming (``None``).
        """
        return LinkHandshake(
            self.local_id,
            destination,
            keys=self.keys,
            certificates=self.tls is not None,
            frame_integrity=self.settings.frame_integrity,
            key_search=self.key_search,
            random_bytes=self.random_bytes,
        )


class IConnectionOwner(Interface):
    """
    What an :class:`ILMProtocol` tells the network that owns it, and the
    little it asks.
    """

    context = Attribute("The :class:`ConnectionContext` of every connection.")

    def connection_made(connection: ILMProtocol) -> bool:
        """
        ``connection`` is connected: track it.

        :return: whether to go on; if not (the node is stopping, or an
            admission cap is reached) the connection aborts at once.
        """

    def authenticated(connection: ILMProtocol) -> None:
        """
        ``connection`` completed its link handshake (``peer_id`` is set):
        choose what it becomes.
        """

    def link_up_received(connection: ILMProtocol) -> None:
        """
        The deciding peer sent LINK_UP on ``connection``.
        """

    def detached(connection: ILMProtocol, was: str, reason: object) -> None:
        """
        ``connection`` (in state ``was``) stops being usable: closed by
        this node, or lost.
        """

    def connection_lost(connection: ILMProtocol, was: str, reason: Failure) -> None:
        """
        ``connection``'s transport is gone (it was in state ``was``).
        """

    def link_paused(connection: ILMProtocol) -> None:
        """
        The link's transport buffer is full: stop sending to its peer.
        """

    def link_resumed(connection: ILMProtocol) -> None:
        """
        The link's transport buffer drained.
        """

    def frame_receiver() -> IFrameReceiver | None:
        """
        :return: where session frames go (asked once per read, then one
            ``frame_received`` call per frame, or one ``frames_received``
            call for the frames of the read where the receiver has it).
        """


@implementer(IPushProducer)
class ILMProtocol(Protocol):
    """
    One connection of a :class:`StreamNetwork`: runs the link handshake,
    then carries ILM session frames, keepalives and backpressure.

    :ivar peer_id: the authenticated peer (``None`` until authenticated).
    :ivar initiated: whether this node dialled the connection.
    :ivar destination: the peer this node dialled (``None``: incoming).
    :ivar state: see :mod:`ilm.network._states`.
    """

    def __init__(self, owner: IConnectionOwner, destination: PeerId | None) -> None:
        context: ConnectionContext = owner.context
        self._owner = owner
        self._context = context
        self.destination = destination
        self.initiated = destination is not None
        self.peer_id: PeerId | None = None
        self.state = HANDSHAKING
        self._parser = _wire.FrameParser()
        self._writer = LinkWriter(context.settings.max_unsent_bytes)
        self._opening = LinkOpening(
            context.handshake(destination),
            local_id=context.local_id,
            keys=context.keys,
            tls=context.tls,
            timeout=context.settings.handshake_timeout,
            writer=self._writer,
            parser=self._parser,
        )
        self._waiters: ConnectionWaiters[ILMProtocol] = ConnectionWaiters(
            self._abort_quietly
        )
        self._clock = context.clock
        self._settings = context.settings
        self._grace_call: IDelayedCall | None = None
        self._keepalive = Keepalive(
            context.settings,
            self._writer,
            self._later,
            self._send,
            lambda reason: self.fail(LinkTimeout(reason)),
        )
        self._producing = False
        self._close_reason: BaseException | None = None
        self.host = "?"
        self.address = "?"

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self._writer.attach(self.transport)  # type: ignore[arg-type]
        self._guard(self._connection_made)

    def _connection_made(self) -> None:
        try:
            self.host, self.address = address_text(self.transport.getPeer())  # type: ignore[union-attr]
        except Exception:
            pass
        if not self._owner.connection_made(self):
            self.state = CLOSED
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        # ILM coalesces its writes itself and waits on small ACK frames:
        # Nagle's algorithm would hold those back for a delayed ACK (40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except Exception:
                pass
        try:
            self._opening.start(self._later, self._handshake_expired)
        except ProtocolViolation as violation:
            self.fail(violation)

    def dataReceived(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self._keepalive.received = True
        if self._writer.paused and self._writer.read(len(data)):
            self._stop_reading()
        parser = self._parser
        parser.feed(data)
        next_frame = parser.next_frame
        try:
            while True:
                state = self.state
                if state == OPEN:
                    if self._session_frames():
                        return
                    continue
                if state == CLOSED:
                    return
                frame = next_frame()
                if frame is None:
                    return
                self._frame(*frame)
        except ProtocolViolation as violation:
            self.fail(violation)
        except Exception:
            self._internal_error()

    def _session_frames(self) -> bool:
        """
        The data path: the session frames of this read straight to ILM, in
        one ``frames_received`` call where the receiver has it, else one
        ``frame_received`` each; link frames between them in their order.
        A frame that fails its checks still fails the link, after what came
        before it was handed over.

        :return: whether everything read was parsed (else the link's state
            changed, and the caller goes on by state).
        """
        receiver = self._owner.frame_receiver()
        many = getattr(receiver, "frames_received", None)
        frames_of = self._parser.frames_of
        frames: list[bytes] = []
        try:
            while self.state == OPEN:
                other = frames_of(_wire.CARRY, frames)
                if frames:
                    taken, frames = frames, []
                    if receiver is not None:
                        self._hand(receiver, many, taken)
                if other is None:
                    return True
                if self.state != OPEN:
                    return False
                self._keepalive.link_frame(*other)
            return False
        finally:
            if frames and receiver is not None and self.state == OPEN:
                self._hand(receiver, many, frames)

    def _hand(
        self,
        receiver: IFrameReceiver,
        many: Callable[[PeerId, list[bytes]], None] | None,
        frames: list[bytes],
    ) -> None:
        """Give ``frames`` to ILM (one by one while the link stays open)."""
        peer = self.peer_id
        assert peer is not None
        if many is not None and len(frames) > 1:
            many(peer, frames)
            return
        for frame in frames:
            if self.state != OPEN:
                return
            receiver.frame_received(peer, frame)

    def _guard(self, function: Callable[..., object], *args: object) -> None:
        """
        Run ``function`` (a timer's, or a transport callback's); anything it
        raises is logged and closes this connection, never reaching the
        reactor.
        """
        try:
            function(*args)
        except Exception:
            self._internal_error()

    def _later(
        self, delay: float, function: Callable[..., object], *args: object
    ) -> IDelayedCall:
        return self._clock.callLater(delay, self._guard, function, *args)

    def _internal_error(self) -> None:
        """
        Log the exception being handled as an internal error and close the
        connection: a bug must cost one link, never the node.
        """
        log.failure(
            "internal error on the link to {peer_id!r}; closing it",
            peer_id=self.peer_id,
            ilm_event="internal_error",
        )
        try:
            self.fail(ProtocolViolation("internal error"), logged=True)
        except Exception:
            log.failure(
                "closing the link to {peer_id!r} after an internal error failed",
                peer_id=self.peer_id,
                ilm_event="internal_error",
            )

    def _frame(self, kind: int, body: bytes) -> None:
        opening = self._opening
        if self.state == HANDSHAKING:
            peer_id = opening.receive(kind, body, self.transport)
            if opening.refusal is not None:
                # Refused after replying (our proof must reach the peer).
                self.fail(opening.refusal, flush=True)
            elif peer_id is not None:
                self.state = AUTHENTICATED
                self.peer_id = peer_id
                self._owner.authenticated(self)
            return
        # AUTHENTICATED: only the decider's LINK_UP may come now.
        assert self.peer_id is not None
        opening.link_up(kind, body, self.peer_id)
        self._owner.link_up_received(self)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        was = self.state
        self.state = CLOSED
        self._cancel_timers()
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
        if was == HANDSHAKING and not self.initiated:
            # An incoming connection lost in its handshake: if TLS failed,
            # it is refused (and logged) as for any other refusal.
            text = tls_error_text(reason.value)
            if text is not None:
                self.refused(TLSHandshakeFailed(text))
        self._waiters.lost = True
        self._owner.connection_lost(self, was, reason)
        self._waiters.connection_lost(
            reason,
            # Why this dialled connection never became the link, for its
            # dialer: this node's own reason, or what the loss means.
            lambda: self._close_reason or self._opening.never_linked(was, reason),
        )

    # -- link life ---------------------------------------------------------

    def open(self, announce: bool) -> None:
        """
        This connection is now the link: raise the frame limit, start
        keepalives and flow control; send LINK_UP if this node decided.
        """
        self.state = OPEN
        self._cancel_timers()
        self._parser.limit = _wire.frame_limit(
            self._settings.max_frame_size, tagged=self._writer.sealer is not None
        )
        if announce:
            self._send(_wire.LINK_UP)
        self._keepalive.start(self.peer_id)
        transport = self.transport
        if transport is not None and not self._producing:
            try:
                transport.registerProducer(self, True)  # type: ignore[attr-defined]
                self._producing = True
            except RuntimeError:
                pass
        self._waiters.opened(self)

    def when_open(self) -> Deferred[ILMProtocol]:
        """
        :return: a ``Deferred`` firing with this protocol once it is the
            link, or failing when the connection is lost first (with why:
            this node's refusal, a TLS failure, or what the peer's closing
            it at that stage means).  Cancelling it aborts the connection.
        """
        return self._waiters.when_open(self if self.state == OPEN else None)

    def when_lost(self) -> Deferred[None]:
        """
        :return: a ``Deferred`` firing once the connection is closed.
        """
        return self._waiters.when_lost()

    def watch(self, watcher: IProtocol) -> None:
        """
        Forward this connection's ``connectionLost`` to ``watcher``.
        """
        self._waiters.watch(watcher)

    def send_session_frames(self, frames: Iterable[bytes]) -> None:
        """
        Send ILM session frames, each in a CARRY link frame, all in one
        ``writeSequence``.
        """
        if self.state == OPEN and self._writer.send_session_frames(frames):
            self._stop_reading()

    def _send(self, kind: int, body: bytes = b"") -> None:
        """
        Send one link frame once authenticated (tagged if the link is).
        """
        if self._writer.send(kind, body):
            self._stop_reading()

    def _stop_reading(self) -> None:
        """
        The peer neither reads nor stops sending while the link is paused:
        stop reading from it until it reads.
        """
        flow = self._writer
        if flow.reading_stopped or self.state != OPEN:
            return
        flow.reading_stopped = True
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()
        self._context.refusals.reading_stopped(
            self.peer_id, flow.unsent, flow.unread, self._settings.idle_timeout
        )

    # -- closing -----------------------------------------------------------

    def fail(
        self, violation: Exception, logged: bool = False, flush: bool = False
    ) -> None:
        """
        Close this connection because of ``violation``, counted and logged
        as a structured event (rate-limited per source address); the peer
        is told nothing.  A connection this node dialled that never became
        the link is logged by its dialer instead (once per change of
        reason).

        :param logged: the reason is logged already (an internal error: not
            counted as a refusal either).
        :param flush: close cleanly (what was written is sent first)
            instead of aborting.
        """
        if self.state == CLOSED:
            return
        if not logged:
            dialling = self.initiated and self.state != OPEN
            self.refused(violation, log=not dialling)
        self._close_reason = violation
        self.close(violation, abort=not flush)

    def refused(self, violation: BaseException, log: bool = True) -> None:
        """
        Count this connection's refusal for ``violation`` and, unless
        ``log`` is false, log it (rate-limited per source address).
        """
        self._context.refusals.refused(self, violation, log=log)

    @property
    def local_id(self) -> PeerId:
        """This node's id."""
        return self._context.local_id

    @property
    def claimed_id(self) -> PeerId | None:
        """The id the peer claims (``None``: it claimed none yet)."""
        return self._opening.claimed_id

    def close(self, reason: Exception, abort: bool) -> None:
        """
        Close this connection: at once (``abort``), or cleanly (what was
        written is delivered) within ``close_grace``.
        """
        if self.state == CLOSED:
            return
        was = self.state
        self.state = CLOSED
        self._cancel_timers()
        self._owner.detached(self, was, reason)
        transport = self.transport
        if transport is None or self._waiters.lost:
            return
        if abort:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self._producing:
            self._producing = False
            transport.unregisterProducer()  # type: ignore[attr-defined]
        if self._writer.reading_stopped:
            self._resume_reading()
        transport.loseConnection()
        self._grace_call = self._later(self._settings.close_grace, self._abort_quietly)

    def _abort_quietly(self) -> None:
        self._grace_call = None
        if self.state != CLOSED:
            self.close(ConnectionDone("connection cancelled"), abort=True)
        elif not self._waiters.lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_timers(self) -> None:
        self._opening.cancel()
        self._keepalive.stop()

    def _handshake_expired(self) -> None:
        self._opening.expired()
        if self.state in (HANDSHAKING, AUTHENTICATED):
            self.fail(self._opening.timed_out(self.state))

    # -- flow control (IPushProducer) ---------------------------------------

    def pauseProducing(self) -> None:
        if self.state == OPEN and not self._writer.paused:
            self._writer.pause()
            self._owner.link_paused(self)

    def resumeProducing(self) -> None:
        if self.state == OPEN and self._writer.paused:
            if self._writer.reading_stopped:
                self._resume_reading()
            token = self._writer.resume()
            if token is not None:
                self._send(_wire.LINK_PONG, _wire.encode_token(token))
            self._owner.link_resumed(self)

    def stopProducing(self) -> None:
        self._producing = False

    def _resume_reading(self) -> None:
        self._writer.reading_stopped = False
        resume = getattr(self.transport, "resumeProducing", None)
        if resume is not None:
            resume()

    def __repr__(self) -> str:
        return (
            f"<ILMProtocol {'to' if self.initiated else 'from'} "
            f"{self.peer_id if self.peer_id is not None else self.destination!r} "
            f"{self.state}>"
        )


class ILMFactory(Factory):
    """
    Builds :class:`ILMProtocol` instances for an :class:`IConnectionOwner`
    (a :class:`StreamNetwork`): responders (``destination=None``) for its
    listening endpoints, and initiators towards ``destination`` for its
    dialers.
    """

    noisy = False

    def __init__(self, network: IConnectionOwner, destination: PeerId | None) -> None:
        self.network = network
        self.destination = destination

    def buildProtocol(self, addr: IAddress | None) -> ILMProtocol:
        protocol = ILMProtocol(self.network, self.destination)
        protocol.factory = self
        return protocol
