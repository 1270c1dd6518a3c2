"""
ILM over stream endpoints: :class:`ILMProtocol`, :class:`ILMFactory` and
:class:`StreamNetwork`, the :class:`ilm.interfaces.INetwork` built on them.

A :class:`StreamNetwork` listens on server endpoints (``serverFromString``
strings such as ``tcp:9000`` or ``unix:/run/ilm.sock``, or endpoint objects)
and keeps a link to each configured peer alive with a ``ClientService``
(``clientFromString`` strings or endpoint objects).  Every connection runs
the link handshake (:mod:`ilm.network._handshake`): nothing reaches ILM, in
either direction, before the peer is authenticated.  TLS, when configured,
is layered on any of these endpoints.

One link per peer
    When two nodes dial each other at once, the node with the smaller id
    decides which connection becomes the link and says so with a LINK_UP
    frame; the other node reports a link only on LINK_UP.  If both
    connections authenticate, the one initiated by the smaller id wins (the
    smaller node holds the other until its own dial succeeds or fails); a
    connection authenticated while a link exists replaces it if it was
    initiated by the same node as the link (that node redialled: it has
    lost the old one), and is closed otherwise.  A node does not dial a peer
    while it has a link to it that the peer initiated.  ILM therefore sees
    one ``link_established`` per link.

Why not ``prepareConnection``
    ``ClientService``'s state machine has no transition for a connection
    lost while ``prepareConnection`` is pending, or after it failed (see
    ``tests/test_stream_service.py``).  The handshake therefore runs inside
    the client endpoint (:class:`_LinkEndpoint`): ``ClientService`` is handed
    a connection only once its link is up, with its own timeout, and a
    failed handshake aborts the transport and counts as a failed attempt.

Why a dial failed
    Each failed attempt is classified (connection refused, host unreachable,
    DNS failure, TLS failure, the peer refused our key proof, handshake
    timeout, ...).  The reason is logged once per change of reason
    (``dial_failed``, at warn level) and kept for
    :meth:`StreamNetwork.link_error`; repeats are logged at debug level.
    ``ClientService`` logs every retry at info level ("Scheduling retry N
    to connect <endpoint object>") through its class attribute ``_log``;
    the dialers use :class:`_DialService`, whose ``_log`` is a ``Logger``
    with its own observer that turns exactly those events into debug-level
    ``dial_retry`` events with plain fields (and passes anything else on
    unchanged), so no global log filter is needed.

Strangers
    Refusals of connections that have not authenticated (and of links that
    break the rules) go through an :class:`ilm._logging.EventLimiter` keyed
    by the event and the source address: the first in full, then one
    summary per ``LinkSettings.refusal_log_interval``.  Unauthenticated
    connections are capped in total and per source address
    (``LinkSettings.max_unauthenticated``, ``max_unauthenticated_per_host``);
    a connection beyond the caps is aborted as soon as it is accepted.

A peer that never reads
    Once a link is paused (its transport's buffer is full), a PONG is not
    written but kept (only the latest); the bytes written to the peer and
    received from it while paused are counted, and once either passes
    ``LinkSettings.max_unsent_bytes`` the link stops reading from the peer
    until its buffer drains.  A link that stays so for ``idle_timeout`` is
    dropped (:class:`ilm.errors.LinkTimeout`).
"""

from __future__ import annotations

import itertools
import random as _random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attr
from twisted.application.internet import ClientService
from twisted.internet import error as _error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import clientFromString, serverFromString, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    globalLogPublisher,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from ilm._backoff import Backoff
from ilm._logging import EventLimiter
from ilm._peerid import PeerId, check_peer_id, id_order_key
from ilm._status import NetworkStats
from ilm.errors import (
    ConfigurationError,
    ConnectionLimitReached,
    LinkTimeout,
    ProtocolViolation,
    TLSHandshakeFailed,
    UnexpectedFrame,
)
from ilm.interfaces import IFrameReceiver, INetwork
from ilm.network import _wire
from ilm.network._counters import REFUSAL_HOLD, NetworkCounters, refusal_reason
from ilm.network._handshake import (
    KeySearchBudget,
    LinkHandshake,
    PreSharedKeys,
    shown,
)
from ilm.network._tls import TLSCredentials, certificate_identity, tls_error_text

log = Logger(namespace="ilm.network.stream")

_DEFAULT_MAX_FRAME = 1024 * 1024 + 4096


def _positive(instance: object, attribute: attr.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class LinkSettings:
    """
    Limits and timings of stream links (seconds).

    - ``max_frame_size``: the largest ILM session frame accepted; at least
      the node's ``Config.max_frame_size`` (ILM refuses to run over a
      network with a smaller limit).  A longer length prefix
      closes the link (:class:`ilm.errors.FrameTooLarge`) before anything is
      buffered.  Before authentication the limit is 1 KiB.
    - ``handshake_timeout``: a connection must be authenticated and chosen
      as the link within this time, else it is aborted
      (:class:`ilm.errors.LinkTimeout`).
    - ``keepalive_interval``: a PING goes out after an interval in which
      nothing was sent; the peer answers PONG.
    - ``idle_timeout``: a link on which nothing at all arrived for this long
      is dead (a half-open connection) and is aborted
      (:class:`ilm.errors.LinkTimeout`).
    - ``close_grace``: how long a clean close may take before the
      connection is aborted.
    - ``frame_integrity``: on links authenticated by pre-shared keys
      without TLS, every frame after the handshake carries a 16-byte tag
      (keyed BLAKE2b over a frame counter, the type and the body) so that
      a frame altered, dropped, replayed, reordered or injected on the way
      closes the link (:class:`ilm.errors.FrameAuthenticationFailed`).
      Both nodes must use the same value: a link between nodes that differ
      is refused (:class:`ilm.errors.FrameIntegrityMismatch`), never
      downgraded.  TLS links ignore it (TLS protects its frames).
    - ``max_unsent_bytes``: once a link is paused (its transport's buffer
      is full: the peer is not reading), what this node writes to the peer
      and what it receives from it are counted; once either passes this
      many bytes the node stops reading from the peer (so that it can
      neither provoke more replies nor keep the link alive by sending)
      until the buffer drains, and drops the link if that takes
      ``idle_timeout`` (:class:`ilm.errors.LinkTimeout`).  While paused,
      PONGs are not written: only the latest is kept, and sent when the
      link resumes.  What a paused link holds is thus at most the
      transport's buffer when it paused (64 KiB for TCP, plus the write
      that filled it) and ``max_unsent_bytes`` more.
    - ``max_unauthenticated``, ``max_unauthenticated_per_host``: at most
      this many incoming connections may be in their handshake at once, in
      total and from one source address (host); a connection beyond either
      is aborted as soon as it is accepted
      (:class:`ilm.errors.ConnectionLimitReached`, logged rate-limited),
      so that strangers cannot take every file descriptor.  Connections
      over a UNIX socket all count as one source.
    - ``key_search_rate``: key trials per second (one HMAC each) that the
      node may spend trying a stranger's failed proof against every
      configured key to name the node that made it
      (:class:`ilm.errors.SpoofedPeer`); beyond it the refusal is reported
      as :class:`ilm.errors.AuthenticationFailed` without the search.
      Searches happen only with at most 256 keys.  0 turns them off.
    - ``refusal_log_interval``, ``refusal_log_sources``: refusals of
      connections (failed authentication, spoofed ids, handshake timeouts,
      TLS failures, connection caps, violations) are logged in full the
      first time for each (event, source address), then summarised once
      per interval; at most ``refusal_log_sources`` keys are tracked (the
      rest share one), so they produce at most ``2 * (refusal_log_sources
      + 1)`` lines per interval.
    - ``reconnect``: the :class:`Backoff` between connection attempts.
    - ``refusal``: the :class:`Backoff` after ILM closed a link to a peer
      for a protocol violation: for that long, this node neither dials the
      peer nor accepts its connections, growing with each violation in a row
      (a peer refused for good, say for a stale incarnation, is retried
      slowly instead of every few milliseconds).  The count starts again
      once a link has stayed up for ``refusal_reset``.
    """

    max_frame_size: int = attr.ib(default=_DEFAULT_MAX_FRAME, validator=_positive)
    handshake_timeout: float = attr.ib(default=10.0, validator=_positive)
    keepalive_interval: float = attr.ib(default=5.0, validator=_positive)
    idle_timeout: float = attr.ib(default=15.0, validator=_positive)
    close_grace: float = attr.ib(default=5.0, validator=_positive)
    reconnect: Backoff = attr.ib(factory=Backoff)
    refusal: Backoff = attr.ib(factory=lambda: Backoff(initial=0.5, maximum=60.0))
    refusal_reset: float = attr.ib(default=60.0, validator=_positive)
    frame_integrity: bool = True
    max_unsent_bytes: int = attr.ib(default=1024 * 1024, validator=_positive)
    max_unauthenticated: int = attr.ib(default=64, validator=_positive)
    max_unauthenticated_per_host: int = attr.ib(default=8, validator=_positive)
    key_search_rate: float = 1024.0
    refusal_log_interval: float = attr.ib(default=60.0, validator=_positive)
    refusal_log_sources: int = attr.ib(default=32, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.key_search_rate < 0:
            raise ValueError(
                f"key_search_rate must not be negative, not {self.key_search_rate!r}"
            )
        if self.idle_timeout < 2 * self.keepalive_interval:
            raise ValueError(
                "idle_timeout must be at least twice keepalive_interval, or a "
                "live but quiet peer would be taken for dead"
            )


def _check_port(endpoint: object, description: str, server: bool) -> None:
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not (0 if server else 1) <= port <= 65535:
        raise ValueError(f"port {port} is out of range")


def _server_endpoint(
    reactor: Any, description: str | IStreamServerEndpoint
) -> IStreamServerEndpoint:
    """
    A listening endpoint from ``serverFromString`` syntax (or as given).

    :raises ConfigurationError: naming the string and what is wrong with it.
    """
    if not isinstance(description, str):
        return description
    try:
        endpoint = serverFromString(reactor, description)
        _check_port(endpoint, description, server=True)
    except Exception as e:
        raise ConfigurationError(
            f"listen endpoint {description!r} is not valid: {_reason(e)} "
            f"(expected serverFromString syntax, such as 'tcp:9001' or "
            f"'tcp:9001:interface=127.0.0.1')"
        ) from None
    return endpoint  # type: ignore[no-any-return]


def _client_endpoint(
    reactor: Any, peer_id: PeerId, description: str | IStreamClientEndpoint
) -> IStreamClientEndpoint:
    """
    A peer's endpoint from ``clientFromString`` syntax (or as given).

    :raises ConfigurationError: naming the peer, the string and what is
        wrong with it.
    """
    if not isinstance(description, str):
        if not IStreamClientEndpoint.providedBy(description):
            raise ConfigurationError(
                f"the endpoint of peer {peer_id!r} must be a string or an "
                f"IStreamClientEndpoint, not {type(description).__name__}"
            )
        return description
    try:
        endpoint = clientFromString(reactor, description)
        _check_port(endpoint, description, server=False)
    except Exception as e:
        raise ConfigurationError(
            f"endpoint of peer {peer_id!r}, {description!r}, is not valid: "
            f"{_reason(e)} (expected clientFromString syntax, such as "
            f"'tcp:host=10.0.0.2:port=9001')"
        ) from None
    return endpoint  # type: ignore[no-any-return]


def _reason(error: Exception) -> str:
    if isinstance(error, TypeError) and "missing" in str(error):
        # clientFromString("tcp:host=h") -> "__init__() missing 1 required
        # positional argument: 'port'"
        return "a required part is missing (" + str(error).split("missing ", 1)[1] + ")"
    return str(error) or type(error).__name__


def _address_text(address: object) -> tuple[str, str]:
    """
    :return: ``(host, "host:port")`` of a peer address as plain strings
        (``host`` keys the per-source caps and log limits; a UNIX socket's
        peers are all one source, ``"unix"``).
    """
    if isinstance(address, IPv4Address):
        return address.host, f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return address.host, f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        raw = address.name
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return "unix", f"unix:{name}" if name else "unix"
    text = str(address)
    return text, text


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DialFailure:
    """
    Why this node's attempts to reach a peer have been failing
    (:meth:`StreamNetwork.link_error`).

    :ivar reason: what went wrong, in words (``"connection refused: ..."``,
        ``"the peer refused our key proof: ..."``).
    :ivar kind: the error's type name (``"ConnectionRefusedError"``,
        ``"AuthenticationFailed"``, ...).
    :ivar since: when the first attempt that failed for this reason (in a
        row) failed, in seconds on the network's clock (the reactor's: Unix
        time).
    :ivar attempts: how many attempts in a row failed for this reason.
    """

    reason: str
    kind: str
    since: float
    attempts: int


def _dial_reason(error: BaseException) -> tuple[str, str]:
    """
    :return: ``(kind, reason)`` for an attempt to reach a peer that failed
        with ``error``.
    """
    kind = type(error).__name__
    detail = str(error).strip().rstrip(".")
    if isinstance(error, _error.ConnectionRefusedError):
        return kind, "connection refused: nothing listens at the peer's address"
    if isinstance(error, _error.DNSLookupError):
        return kind, f"the peer's host name cannot be resolved (DNS): {detail}"
    if isinstance(error, _error.NoRouteError):
        return kind, "the peer's host is unreachable (no route)"
    if isinstance(error, _error.TCPTimedOutError | _error.TimeoutError):
        return kind, (
            "the connection attempt timed out: the peer's host is unreachable "
            "or drops connections"
        )
    if isinstance(error, _error.ConnectError):
        return kind, f"cannot connect to the peer: {detail or kind}"
    if isinstance(error, TLSHandshakeFailed):
        return kind, f"TLS handshake failed: {detail}"
    if isinstance(error, _PeerClosedHandshake):
        return error.kind, str(error)
    if isinstance(error, LinkTimeout):
        return kind, detail
    if isinstance(error, ProtocolViolation):
        return kind, f"this node refused the peer: {detail}"
    return kind, detail or kind


class _PeerClosedHandshake(ConnectionLost):
    """
    The peer closed a connection this node dialled before it became the
    link; the message says what that most likely means at that stage.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0])


@provider(ILogObserver)
def _demote_retries(event: LogEvent) -> None:
    """
    The observer of the dialers' ``ClientService`` logger: its "Scheduling
    retry" event becomes a debug-level ``dial_retry`` event with plain
    fields (the reason of each failure is logged by the network, once per
    change); any other event passes unchanged.
    """
    if str(event.get("log_format", "")).startswith("Scheduling retry"):
        endpoint = event.get("endpoint")
        event = {
            key: value
            for key, value in event.items()
            if key not in ("endpoint", "log_source", "log_logger")
        }
        event.update(
            log_format="retry {attempt} to reach peer {peer_id!r} in {delay:.3f} s",
            log_level=LogLevel.debug,
            log_namespace=log.namespace,
            peer_id=getattr(endpoint, "peer_id", None),
            ilm_event="dial_retry",
        )
    globalLogPublisher(event)


class _DialService(ClientService):
    """
    ``ClientService`` whose own log events go through
    :func:`_demote_retries`: with a peer down, its "Scheduling retry N to
    connect <object at 0x...>" line would otherwise reach the log at info
    level on every attempt.
    """

    _log = Logger(observer=_demote_retries)


_CONNECTION_DONE = Failure(ConnectionDone())

# Protocol states.
_HANDSHAKING = "handshaking"
_AUTHENTICATED = "authenticated"  # waiting for LINK_UP, or held by the decider
_OPEN = "open"
_CLOSED = "closed"


def _guarded(doing: str, function: Callable[..., object], *args: object) -> None:
    """
    Run a network timer's ``function``; log anything it raises (as an
    ``internal_error`` event) instead of letting it reach the reactor.
    """
    try:
        function(*args)
    except Exception:
        log.failure(
            "internal error while {doing}", doing=doing, ilm_event="internal_error"
        )


@implementer(IPushProducer)
class ILMProtocol(Protocol):
    """
    One connection of a :class:`StreamNetwork`: runs the link handshake,
    then carries ILM session frames, keepalives and backpressure.

    :ivar peer_id: the authenticated peer (``None`` until authenticated).
    :ivar initiated: whether this node dialled the connection.
    """

    def __init__(self, network: StreamNetwork, destination: PeerId | None) -> None:
        self._network = network
        self.destination = destination
        self.initiated = destination is not None
        self.peer_id: PeerId | None = None
        self.state = _HANDSHAKING
        self._handshake = LinkHandshake(
            network.local_id,
            destination,
            keys=network._keys,
            certificates=network._tls is not None,
            frame_integrity=network.settings.frame_integrity,
            key_search=network._key_budget.take,
            random_bytes=network._random_bytes,
        )
        self._parser = _wire.FrameParser()
        self._sealer: _wire.FrameSealer | None = None
        self._clock = network._clock
        self._settings = network.settings
        self._handshake_call: IDelayedCall | None = None
        self._keepalive_call: IDelayedCall | None = None
        self._grace_call: IDelayedCall | None = None
        self._received = False
        self._sent = False
        self._silent_ticks = 0
        self._tokens = itertools.count(1)
        self._opened: list[Deferred[ILMProtocol]] = []
        self._lost: list[Deferred[None]] = []
        self._connection_lost = False
        self._watchers: list[IProtocol] = []
        self._producing = False
        self._paused = False
        # While paused: the PONG owed (only the latest), the bytes written
        # since the pause, and whether reading from the peer is stopped.
        self._pending_pong: int | None = None
        self._unsent = 0
        self._unread = 0
        self._reading_stopped = False
        self._close_reason: BaseException | None = None
        self._host = "?"
        self._address = "?"

    # -- connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self._guard(self._connection_made)

    def _connection_made(self) -> None:
        network = self._network
        network._protocols[self] = None
        try:
            self._host, self._address = _address_text(
                self.transport.getPeer()  # type: ignore[union-attr]
            )
        except Exception:
            pass
        if not network._running:
            self.state = _CLOSED
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if not self.initiated and not network._admit(self):
            self.state = _CLOSED
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
        self._handshake_call = self._later(
            self._settings.handshake_timeout, self._handshake_expired
        )
        try:
            frames = self._handshake.start()
        except ProtocolViolation as violation:
            self.fail(violation)
            return
        if frames:
            self._write(frames)

    def dataReceived(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self._received = True
        if self._paused:
            self._count_unread(len(data))
        parser = self._parser
        parser.feed(data)
        next_frame = parser.next_frame
        try:
            while True:
                state = self.state
                if state == _OPEN:
                    # The data path: session frames straight to ILM.
                    receiver = self._network._receiver
                    peer = self.peer_id
                    assert peer is not None
                    while self.state == _OPEN:
                        frame = next_frame()
                        if frame is None:
                            return
                        kind, body = frame
                        if kind == _wire.CARRY and body and receiver is not None:
                            receiver.frame_received(peer, body)
                        else:
                            self._open_frame(kind, body)
                    continue
                if state == _CLOSED:
                    return
                frame = next_frame()
                if frame is None:
                    return
                self._frame(*frame)
        except ProtocolViolation as violation:
            self.fail(violation)
        except Exception:
            self._internal_error()

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

    def _open_frame(self, kind: int, body: bytes) -> None:
        if kind == _wire.LINK_PING:
            token = _wire.decode_token(body, "LINK_PING")
            if self._paused:
                # The peer is not reading: owe it one PONG (the latest),
                # written when the link resumes, instead of one per PING.
                self._pending_pong = token
            else:
                self._send(_wire.LINK_PONG, _wire.encode_token(token))
        elif kind == _wire.LINK_PONG:
            _wire.decode_token(body, "LINK_PONG")
        elif kind == _wire.CARRY:
            _wire.decode_carry(body)
        else:
            raise UnexpectedFrame(
                f"{_wire.FRAME_NAMES[kind]} frame on a link that is up"
            )

    def _frame(self, kind: int, body: bytes) -> None:
        if self.state == _HANDSHAKING:
            handshake = self._handshake
            replies = handshake.receive(kind, body, self._certificate_identity)
            if replies:
                self._write(replies)
            if handshake.refusal is not None:
                # Refused after replying (our proof must reach the peer).
                self.fail(handshake.refusal, flush=True)
                return
            if handshake.done:
                keys = handshake.frame_keys
                if keys is not None:
                    self._sealer = _wire.FrameSealer(keys[0])
                    self._parser.opener = _wire.FrameOpener(keys[1])
                self.state = _AUTHENTICATED
                self.peer_id = handshake.peer_id
                self._network._release(self)
                self._network._authenticated(self)
            return
        # _AUTHENTICATED: only the decider's LINK_UP may come now.
        if kind == _wire.LINK_UP and not self._network._decides(self):
            _wire.check_empty(body, "LINK_UP")
            self._network._link_up_received(self)
            return
        raise UnexpectedFrame(
            f"{_wire.FRAME_NAMES[kind]} frame while waiting for the link to be chosen"
        )

    def _certificate_identity(self) -> PeerId:
        tls = self._network._tls
        assert tls is not None
        return certificate_identity(self.transport, tls)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self._connection_lost = True
        was = self.state
        self.state = _CLOSED
        self._cancel_timers()
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
        network = self._network
        network._release(self)
        if was == _HANDSHAKING and not self.initiated:
            self._tls_refused(reason)
        network._connection_lost(self, was, reason)
        opened, self._opened = self._opened, []
        if opened:
            failure = Failure(self._open_failure(was, reason))
            for d in opened:
                if not d.called:
                    d.errback(failure)
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.connectionLost(reason)
        waiters, self._lost = self._lost, []
        for waiter in waiters:
            waiter.callback(None)

    def _tls_refused(self, reason: Failure) -> None:
        """
        An incoming connection lost in its handshake: if TLS failed, log why
        (rate-limited), as for any other refusal.
        """
        text = tls_error_text(reason.value)
        if text is not None:
            self._refuse(TLSHandshakeFailed(text))

    def _open_failure(self, was: str, reason: Failure) -> BaseException:
        """
        Why this dialled connection never became the link, for the dialer.
        """
        if self._close_reason is not None:
            return self._close_reason
        tls = tls_error_text(reason.value)
        if tls is not None:
            return TLSHandshakeFailed(tls)
        if was == _HANDSHAKING:
            stage = self._handshake.state
            if stage == "await ACCEPT":
                if self._network._keys is not None:
                    return _PeerClosedHandshake(
                        f"the peer refused our key proof: it holds another key "
                        f"for node {self._network.local_id!r}, or does not "
                        f"know that id",
                        "AuthenticationFailed",
                    )
                return _PeerClosedHandshake(
                    "the peer refused the link after the TLS handshake",
                    "AuthenticationFailed",
                )
            if stage == "await CHALLENGE":
                refusing = (
                    "did not accept this node's certificate"
                    if self._network._tls is not None
                    else "refuses connections"
                )
                return _PeerClosedHandshake(
                    f"the peer closed the connection without answering our "
                    f"HELLO: it {refusing}, speaks another version of the "
                    f"stream transport, has too many connections in their "
                    f"handshake, or is not an ILM node",
                    "ConnectionLost",
                )
        if was == _AUTHENTICATED:
            return _PeerClosedHandshake(
                "the peer closed the connection after both sides authenticated: "
                "it chose another connection as the link, or refuses links from "
                "this node for a while after a protocol violation",
                "ConnectionLost",
            )
        value = reason.value
        return value if isinstance(value, BaseException) else ConnectionLost()

    # -- link life ---------------------------------------------------------

    def open(self, announce: bool) -> None:
        """
        This connection is now the link: raise the frame limit, start
        keepalives and flow control; send LINK_UP if this node decided.
        """
        self.state = _OPEN
        self._cancel_timers()
        self._parser.limit = _wire.frame_limit(
            self._settings.max_frame_size, tagged=self._sealer is not None
        )
        if announce:
            self._send(_wire.LINK_UP)
        self._keepalive_call = self._later(
            self._settings.keepalive_interval, self._keepalive
        )
        transport = self.transport
        if transport is not None and not self._producing:
            try:
                transport.registerProducer(self, True)  # type: ignore[attr-defined]
                self._producing = True
            except RuntimeError:
                pass
        opened, self._opened = self._opened, []
        for d in opened:
            if not d.called:
                d.callback(self)

    def when_open(self) -> Deferred[ILMProtocol]:
        """
        :return: a ``Deferred`` firing with this protocol once it is the
            link, or failing when the connection is lost first (with why:
            this node's refusal, a TLS failure, or what the peer's closing
            it at that stage means).  Cancelling it aborts the connection.
        """
        if self.state == _OPEN:
            return succeed(self)
        d: Deferred[ILMProtocol] = Deferred(lambda _: self._abort_quietly())
        if self._connection_lost:
            d.errback(Failure(ConnectionDone("connection lost before the link was up")))
            return d
        self._opened.append(d)
        return d

    def when_lost(self) -> Deferred[None]:
        """
        :return: a ``Deferred`` firing once the connection is closed.
        """
        if self._connection_lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        return d

    def watch(self, watcher: IProtocol) -> None:
        """
        Forward this connection's ``connectionLost`` to ``watcher``.
        """
        self._watchers.append(watcher)

    def send_session_frames(self, frames: Iterable[bytes]) -> None:
        """
        Send ILM session frames, all in one ``writeSequence``.
        """
        if self.state != _OPEN:
            return
        parts: list[bytes] = []
        sealer = self._sealer
        if sealer is not None:
            extend = parts.extend
            data_parts = sealer.carry_parts
            for frame in frames:
                extend(data_parts(frame))
        else:
            header = _wire.carry_header
            append = parts.append
            for frame in frames:
                append(header(len(frame)))
                append(frame)
        if parts:
            self._sent = True
            if self._paused:
                self._count_unsent(sum(map(len, parts)))
            self.transport.writeSequence(parts)  # type: ignore[union-attr]

    def _send(self, kind: int, body: bytes = b"") -> None:
        """
        Send one link frame once authenticated (tagged if the link is).
        """
        sealer = self._sealer
        frame = (
            sealer.seal(kind, body)
            if sealer is not None
            else _wire.encode_frame(kind, body)
        )
        self._write([frame])

    def _write(self, frames: list[bytes]) -> None:
        self._sent = True
        transport = self.transport
        if transport is not None:
            if self._paused:
                self._count_unsent(sum(map(len, frames)))
            if len(frames) == 1:
                transport.write(frames[0])
            else:
                transport.writeSequence(frames)

    def _count_unsent(self, size: int) -> None:
        """
        ``size`` more bytes are written while the link is paused: past
        ``max_unsent_bytes``, stop reading from the peer.
        """
        self._unsent += size
        if self._unsent > self._settings.max_unsent_bytes:
            self._stop_reading()

    def _count_unread(self, size: int) -> None:
        """
        ``size`` more bytes arrived while the link is paused (the peer sends
        but does not read): past ``max_unsent_bytes``, stop reading from it,
        whatever the layer above writes in reply.
        """
        self._unread += size
        if self._unread > self._settings.max_unsent_bytes:
            self._stop_reading()

    def _stop_reading(self) -> None:
        if self._reading_stopped or self.state != _OPEN:
            return
        self._reading_stopped = True
        pause = getattr(self.transport, "pauseProducing", None)
        if pause is not None:
            pause()
        self._network._limiter.emit(
            ("link_reading_stopped", self.peer_id),
            LogLevel.warn,
            "peer {peer_id!r} is not reading ({unsent} bytes written to it and "
            "{unread} received from it since its link paused): this node stops "
            "reading from it until it reads, for at most {timeout} s",
            peer_id=self.peer_id,
            unsent=self._unsent,
            unread=self._unread,
            timeout=self._settings.idle_timeout,
            ilm_event="link_reading_stopped",
        )

    # -- closing -----------------------------------------------------------

    def fail(
        self, violation: Exception, logged: bool = False, flush: bool = False
    ) -> None:
        """
        Close this connection because of ``violation``, logged as a
        structured event (rate-limited per source address); the peer is
        told nothing.  A connection this node dialled that never became the
        link is reported by its dialer instead (once per change of reason).

        :param flush: close cleanly (what was written is sent first)
            instead of aborting.
        """
        if self.state == _CLOSED:
            return
        if not logged:
            dialling = self.initiated and self.state != _OPEN
            self._refuse(violation, log=not dialling)
        self._close_reason = violation
        self.close(violation, abort=not flush)

    def _refuse(self, violation: BaseException, log: bool = True) -> None:
        """
        Count this connection's refusal for ``violation`` and, unless
        ``log`` is false, log it (rate-limited per source address).
        """
        event = refusal_reason(violation)
        self._network._counters.refused(event)
        if not log:
            return
        self._network._limiter.emit(
            (event, self._host),
            LogLevel.error,
            "closing {direction} connection from {address} ({who}): {kind}: {reason}",
            direction="outgoing" if self.initiated else "incoming",
            address=self._address,
            host=self._host,
            who=self._who(),
            kind=type(violation).__name__,
            reason=str(violation),
            peer_id=self.peer_id,
            claimed_id=self._handshake.claimed_id,
            ilm_event=event,
        )

    def close(self, reason: Exception, abort: bool) -> None:
        """
        Close this connection: at once (``abort``), or cleanly (what was
        written is delivered) within ``close_grace``.
        """
        if self.state == _CLOSED:
            return
        was = self.state
        self.state = _CLOSED
        self._cancel_timers()
        self._network._release(self)
        self._network._detached(self, was, reason)
        transport = self.transport
        if transport is None or self._connection_lost:
            return
        if abort:
            transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self._producing:
            self._producing = False
            transport.unregisterProducer()  # type: ignore[attr-defined]
        if self._reading_stopped:
            self._resume_reading()
        transport.loseConnection()
        self._grace_call = self._later(self._settings.close_grace, self._abort_quietly)

    def _abort_quietly(self) -> None:
        self._grace_call = None
        if self.state != _CLOSED:
            self.close(ConnectionDone("connection cancelled"), abort=True)
        elif not self._connection_lost and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_timers(self) -> None:
        for name in ("_handshake_call", "_keepalive_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def _handshake_expired(self) -> None:
        self._handshake_call = None
        if self.state in (_HANDSHAKING, _AUTHENTICATED):
            stage = (
                self._handshake.state
                if self.state == _HANDSHAKING
                else "waiting for the link to be chosen"
            )
            self.fail(
                LinkTimeout(
                    f"link handshake not complete within "
                    f"{self._settings.handshake_timeout} s (state: {stage})"
                )
            )

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self.state != _OPEN:
            return
        settings = self._settings
        if self._received and not self._reading_stopped:
            self._received = False
            self._silent_ticks = 0
        else:
            self._received = False
            self._silent_ticks += 1
            silent = self._silent_ticks * settings.keepalive_interval
            if silent >= settings.idle_timeout:
                if self._reading_stopped:
                    reason = (
                        f"peer {self.peer_id!r} read nothing of the "
                        f"{self._unsent} bytes waiting for it for "
                        f"{settings.idle_timeout} s while this node had stopped "
                        f"reading from it"
                    )
                else:
                    reason = (
                        f"nothing received from {self.peer_id!r} for "
                        f"{settings.idle_timeout} s: the link is dead (half-open)"
                    )
                self.fail(LinkTimeout(reason))
                return
        if not self._sent and not self._paused:
            self._send(_wire.LINK_PING, _wire.encode_token(next(self._tokens)))
        self._sent = False
        self._keepalive_call = self._later(settings.keepalive_interval, self._keepalive)

    # -- flow control (IPushProducer) ---------------------------------------

    def pauseProducing(self) -> None:
        if self.state == _OPEN and not self._paused:
            self._paused = True
            self._unsent = self._unread = 0
            self._network._report("link_paused", self.peer_id)

    def resumeProducing(self) -> None:
        if self.state == _OPEN and self._paused:
            self._paused = False
            self._unsent = self._unread = 0
            if self._reading_stopped:
                self._resume_reading()
            token, self._pending_pong = self._pending_pong, None
            if token is not None:
                self._send(_wire.LINK_PONG, _wire.encode_token(token))
            self._network._report("link_resumed", self.peer_id)

    def stopProducing(self) -> None:
        self._producing = False

    def _resume_reading(self) -> None:
        self._reading_stopped = False
        resume = getattr(self.transport, "resumeProducing", None)
        if resume is not None:
            resume()

    # -- logging helpers ---------------------------------------------------

    def _who(self) -> str:
        if self.peer_id is not None:
            return f"peer {self.peer_id!r}"
        claimed = self._handshake.claimed_id
        if claimed is not None:
            return f"claiming to be {shown(claimed)}, not authenticated"
        return "not authenticated"

    def __repr__(self) -> str:
        return (
            f"<ILMProtocol {'to' if self.initiated else 'from'} "
            f"{self.peer_id if self.peer_id is not None else self.destination!r} "
            f"{self.state}>"
        )


class ILMFactory(Factory):
    """
    Builds :class:`ILMProtocol` instances for a :class:`StreamNetwork`:
    responders (``destination=None``) for its listening endpoints, and
    initiators towards ``destination`` for its dialers.
    """

    noisy = False

    def __init__(self, network: StreamNetwork, destination: PeerId | None) -> None:
        self.network = network
        self.destination = destination

    def buildProtocol(self, addr: IAddress | None) -> ILMProtocol:
        protocol = ILMProtocol(self.network, self.destination)
        protocol.factory = self
        return protocol


class _Watcher(Protocol):
    """
    What ``ClientService`` holds for a link: told when the link's connection
    is lost; its transport closes the link cleanly.
    """


class _WatcherFactory(Factory):
    noisy = False
    protocol = _Watcher


def _service_stopped() -> ConnectionDone:
    return ConnectionDone("reconnection service stopped")


class _LinkTransport:
    """
    The transport ``ClientService`` sees: closing it closes the link
    cleanly (with the grace period), whatever the real transport needs.
    """

    def __init__(self, protocol: ILMProtocol) -> None:
        self._protocol = protocol

    def loseConnection(self) -> None:
        self._protocol.close(_service_stopped(), abort=False)

    def abortConnection(self) -> None:
        self._protocol.close(_service_stopped(), abort=True)

    def getPeer(self) -> IAddress:
        return self._protocol.transport.getPeer()  # type: ignore[union-attr,no-any-return]

    def getHost(self) -> IAddress:
        return self._protocol.transport.getHost()  # type: ignore[union-attr,no-any-return]


@implementer(IStreamClientEndpoint)
class _LinkEndpoint:
    """
    A client endpoint whose connections are links: ``connect`` fires only
    once the connection is authenticated and chosen as the link, fails (the
    transport aborted) if the handshake fails or times out, and aborts the
    connection if cancelled.  Each failure is reported to the network
    (:meth:`StreamNetwork._dial_failed`) with why it failed.
    """

    def __init__(
        self,
        network: StreamNetwork,
        peer_id: PeerId,
        endpoint: IStreamClientEndpoint,
        description: str,
    ) -> None:
        self._network = network
        self.peer_id = peer_id
        self._endpoint = endpoint
        self.description = description

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        wait = self._network._refused_for(self.peer_id)
        if wait:
            # A protocol violation closed the last link: dial again only once
            # the refusal has passed (cancelling the wait cancels the dial).
            attempt: Deferred[Any] = deferLater(
                self._network._clock, wait, lambda: None
            )
            attempt.addCallback(
                lambda _: self._endpoint.connect(
                    ILMFactory(self._network, self.peer_id)
                )
            )
        else:
            attempt = self._endpoint.connect(ILMFactory(self._network, self.peer_id))

        def connected(protocol: ILMProtocol) -> Deferred[ILMProtocol]:
            return protocol.when_open()

        def opened(protocol: ILMProtocol) -> IProtocol | None:
            watcher = protocolFactory.buildProtocol(protocol.transport.getPeer())  # type: ignore[union-attr]
            if watcher is None:
                refused = ConnectionDone("reconnection service refused")
                protocol.close(refused, abort=False)
                return None
            watcher.makeConnection(_LinkTransport(protocol))  # type: ignore[arg-type]
            protocol.watch(watcher)
            return watcher

        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError) and failure.value is not None:
                self._network._dial_failed(self.peer_id, failure.value, self)
            return failure

        attempt.addCallback(connected)
        attempt.addCallback(opened)
        attempt.addErrback(failed)
        return attempt

    def __repr__(self) -> str:
        return f"<link endpoint to {self.peer_id!r} via {self.description}>"


class _Dialer:
    __slots__ = ("endpoint", "service", "stopping")

    def __init__(self, endpoint: IStreamClientEndpoint, service: ClientService) -> None:
        self.endpoint = endpoint
        self.service = service
        self.stopping: Deferred[None] | None = None


@implementer(INetwork)
class StreamNetwork:
    """
    An :class:`ilm.interfaces.INetwork` over stream endpoints.

    :param local_id: this node's id.
    :param listen: server endpoints to accept links on: strings for
        ``serverFromString`` (``"tcp:9000:interface=127.0.0.1"``,
        ``"unix:/run/ilm.sock"``, any endpoint plugin) or
        ``IStreamServerEndpoint`` objects.
    :param peers: peer id to the client endpoint to dial it (a string for
        ``clientFromString`` such as ``"tcp:host=10.0.0.2:port=9000"``, or an
        ``IStreamClientEndpoint``).  Peers that only dial this node need no
        entry, only credentials.
    :param keys: pre-shared keys (:class:`PreSharedKeys` or a mapping of
        peer id to key) for the challenge-response authentication.
    :param tls: :class:`TLSCredentials`: every link is mutual TLS and peers
        are identified by their certificates.  ``keys`` and ``tls`` may be
        combined (both are then checked); at least one is required.
    :param settings: :class:`LinkSettings`.
    :param reactor: the reactor (time, and the endpoints named by strings);
        the global reactor if omitted.
    """

    def __init__(
        self,
        local_id: PeerId,
        *,
        listen: Sequence[str | IStreamServerEndpoint] = (),
        peers: Mapping[PeerId, str | IStreamClientEndpoint] | None = None,
        keys: PreSharedKeys | Mapping[PeerId, bytes] | None = None,
        tls: TLSCredentials | None = None,
        settings: LinkSettings | None = None,
        reactor: Any = None,
        random_bytes: Callable[[int], bytes] | None = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.local_id: PeerId = check_peer_id(local_id)
        if keys is not None and not isinstance(keys, PreSharedKeys):
            keys = PreSharedKeys(keys)
        if keys is None and tls is None:
            raise ValueError(
                "StreamNetwork needs keys (pre-shared keys) or tls (certificates): "
                "links are always authenticated"
            )
        self._keys: PreSharedKeys | None = keys
        self._tls = tls
        self.settings = settings if settings is not None else LinkSettings()
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        if random_bytes is None:
            import os

            random_bytes = os.urandom
        self._random_bytes = random_bytes
        self._uniform = random if random is not None else _random.random
        # Endpoint strings are parsed now, not when the network starts: a
        # malformed one fails here, naming the option, instead of inside a
        # start-up callback where nobody would see it.
        self._listen: list[IStreamServerEndpoint] = [
            _server_endpoint(reactor, description) for description in listen
        ]
        self._peer_endpoints: dict[PeerId, IStreamClientEndpoint] = {}
        self._peer_descriptions: dict[PeerId, str] = {}
        for peer_id, endpoint in (peers or {}).items():
            peer_id = check_peer_id(peer_id)
            if peer_id == self.local_id:
                raise ConfigurationError("a node does not dial itself")
            if keys is not None and keys.key_for(peer_id) is None:
                raise ConfigurationError(f"peer {peer_id!r} is dialled but has no key")
            self._peer_endpoints[peer_id] = _client_endpoint(reactor, peer_id, endpoint)
            self._peer_descriptions[peer_id] = (
                endpoint if isinstance(endpoint, str) else type(endpoint).__name__
            )
        self._receiver: IFrameReceiver | None = None
        self._running = False
        self._stopping: Deferred[None] | None = None
        self._ports: list[IListeningPort] = []
        self._dialers: dict[PeerId, _Dialer] = {}
        # An ordered set (dict keys): stop() and abort() close connections in
        # the order they were made, not in an order that depends on object
        # addresses, so a run on a Clock replays exactly.
        self._protocols: dict[ILMProtocol, None] = {}
        self._links: dict[PeerId, ILMProtocol] = {}
        self._held: dict[PeerId, ILMProtocol] = {}
        # After violations: per peer, how many in a row, and until when its
        # links are refused; and when each current link came up.
        self._refusals: dict[PeerId, int] = {}
        self._refused_until: dict[PeerId, float] = {}
        self._linked_at: dict[PeerId, float] = {}
        self._local_key = id_order_key(self.local_id)
        settings = self.settings
        # Refusals and other events strangers and peers can repeat at will.
        self._limiter = EventLimiter(
            log,
            reactor,
            interval=settings.refusal_log_interval,
            max_keys=settings.refusal_log_sources,
        )
        self._key_budget = KeySearchBudget(settings.key_search_rate, reactor.seconds)
        # Incoming connections still in their handshake, and their source.
        self._unauthenticated: dict[ILMProtocol, str] = {}
        self._unauthenticated_hosts: Counter[str] = Counter()
        self._dial_errors: dict[PeerId, DialFailure] = {}
        self._counters = NetworkCounters()

    # -- INetwork ------------------------------------------------------------

    def start(self, receiver: IFrameReceiver) -> Deferred[None]:
        """
        Listen on every server endpoint and start dialling every peer.

        :return: a ``Deferred`` firing once every endpoint listens, or
            failing (after closing those that did) if one cannot.
        """
        if self._receiver is not None or self._stopping is not None:
            raise RuntimeError("StreamNetwork.start called twice")
        self._receiver = receiver
        self._running = True
        factory: IProtocolFactory = ILMFactory(self, None)
        if self._tls is not None:
            factory = TLSMemoryBIOFactory(
                self._tls.creator(), False, factory, clock=self._clock
            )
        listening = [
            maybeDeferred(endpoint.listen, factory) for endpoint in self._listen
        ]
        done: Deferred[None] = Deferred()

        def listened(results: list[tuple[bool, Any]]) -> None:
            failures = [value for ok, value in results if not ok]
            self._ports = [value for ok, value in results if ok]
            if failures:
                self._running = False
                stopped = self.stop()
                stopped.addBoth(lambda _: done.errback(failures[0]))
                return
            for peer_id in self._peer_endpoints:
                self._dialers[peer_id] = self._make_dialer(peer_id)
                self._sync_dialer(peer_id)
            log.info(
                "node {local_id!r} listening on {addresses}, dialling {peers}",
                local_id=self.local_id,
                addresses=[_address_text(a)[1] for a in self.listening_addresses()],
                peers=sorted(self._peer_endpoints, key=id_order_key),
                ilm_event="network_started",
            )
            done.callback(None)

        DeferredList(listening, consumeErrors=True).addCallback(listened)
        return done

    def stop(self) -> Deferred[None]:
        """
        Stop listening and dialling, and close every connection cleanly (what
        was written is delivered; a connection that has not closed within
        ``close_grace`` is aborted).  ``link_lost`` is reported for every
        link before the returned ``Deferred`` fires; nothing after.
        """
        if self._stopping is not None:
            return self._chain(self._stopping)
        self._running = False
        waits: list[Deferred[Any]] = []
        for port in self._ports:
            waits.append(maybeDeferred(port.stopListening))
        for dialer in self._dialers.values():
            if dialer.service.running:
                waits.append(dialer.service.stopService())
            elif dialer.stopping is not None:
                waits.append(self._chain(dialer.stopping))
        for protocol in list(self._protocols):
            waits.append(protocol.when_lost())
            protocol.close(ConnectionDone("node stopping"), abort=False)
        stopping: Deferred[None] = Deferred()
        self._stopping = stopping

        def finished(_: object) -> None:
            self._receiver = None
            self._limiter.stop()
            log.info(
                "node {local_id!r} network stopped",
                local_id=self.local_id,
                ilm_event="network_stopped",
            )
            stopping.callback(None)

        DeferredList(waits, consumeErrors=True).addCallback(finished)
        return self._chain(stopping)

    @property
    def max_frame_size(self) -> int:
        """The largest ILM frame a link carries (``settings.max_frame_size``)."""
        return self.settings.max_frame_size

    def connected_peers(self) -> frozenset[PeerId]:
        return frozenset(self._links)

    def can_link(self, peer_id: PeerId) -> bool:
        """
        Whether a link to ``peer_id`` can ever be authenticated: it has a
        pre-shared key (when keys are used), and its certificate is pinned
        or a certificate authority is trusted (when TLS is used).  ILM
        refuses sends to other peers with :class:`ilm.errors.UnknownPeer`.
        """
        if peer_id == self.local_id:
            return False
        if self._keys is not None and self._keys.key_for(peer_id) is None:
            return False
        return self._tls is None or self._tls.can_identify(peer_id)

    def link_error(self, peer_id: PeerId) -> DialFailure | None:
        """
        Why this node's attempts to reach ``peer_id`` have been failing:
        the reason of the last failed attempt, since when attempts fail for
        that reason and how many did; ``None`` while a link to the peer is
        up, before any attempt failed, and for peers this node does not
        dial.
        """
        return self._dial_errors.get(peer_id)

    def stats(self) -> NetworkStats:
        """
        :return: this network's counters since it was created: connections
            and links open now, links established and lost, refusals by
            reason (the name of the log event that reports each:
            ``authentication_failed``, ``spoofed_peer``,
            ``tls_handshake_failed``, ``link_timeout``,
            ``link_protocol_violation``, ``frame_authentication_failed``,
            ``frame_integrity_mismatch``, ``connection_limit``, and
            ``refusal_hold`` for a connection refused while its peer is held
            off after a violation) and failed dials by ``DialFailure.reason``.
            Refusals are counted before the log's rate limit: every one.
        """
        return self._counters.snapshot(len(self._protocols), len(self._links))

    def dialled_peers(self) -> frozenset[PeerId]:
        """
        The peers this network dials (those given in ``peers``), for ILM's
        start line.
        """
        return frozenset(self._peer_endpoints)

    def send_frames(self, peer_id: PeerId, frames: Sequence[bytes]) -> None:
        protocol = self._links.get(peer_id)
        if protocol is not None:
            protocol.send_session_frames(frames)

    def close_link(self, peer_id: PeerId, reason: Exception) -> None:
        """
        Close the link to ``peer_id`` at once; ``link_lost`` is reported
        before this returns.
        """
        protocol = self._links.get(peer_id)
        if protocol is None:
            return
        hold = 0.0
        if isinstance(reason, ProtocolViolation):
            now = self._clock.seconds()
            count = self._refusals.get(peer_id, 0) + 1
            if now - self._linked_at.get(peer_id, now) >= self.settings.refusal_reset:
                count = 1
            self._refusals[peer_id] = count
            hold = self.settings.refusal.delay(count, self._uniform())
            self._refused_until[peer_id] = now + hold
            self._counters.refused(refusal_reason(reason))
        log.warn(
            "closing the link to {peer_id!r}: {kind}: {reason}; its links are "
            "refused for {hold:.2f}s",
            peer_id=peer_id,
            kind=type(reason).__name__,
            reason=str(reason),
            hold=hold,
            ilm_event="link_closed",
        )
        protocol.close(reason, abort=True)

    def _refused_for(self, peer_id: PeerId) -> float:
        """
        :return: how long links to ``peer_id`` are still refused (0 if not).
        """
        until = self._refused_until.get(peer_id)
        if until is None:
            return 0.0
        left = until - self._clock.seconds()
        if left <= 0:
            del self._refused_until[peer_id]
            return 0.0
        return left

    # -- introspection -------------------------------------------------------

    def listening_addresses(self) -> list[IAddress]:
        """
        :return: the addresses this node listens on (to learn a port chosen
            by the system with ``tcp:0``).
        """
        return [port.getHost() for port in self._ports]

    def abort(self) -> Deferred[None]:
        """
        Drop everything at once, as if the process died: stop listening and
        dialling and abort every connection, without any clean close;
        ``link_lost`` is reported to nobody.  For crash tests.

        :return: a ``Deferred`` firing once the listening endpoints are
            closed (so that a restarted node can listen on them again).
        """
        self._running = False
        self._receiver = None
        self._stopping = succeed(None)
        self._limiter.stop()
        closing = [maybeDeferred(port.stopListening) for port in self._ports]
        for dialer in self._dialers.values():
            if dialer.service.running:
                dialer.service.stopService()
        for protocol in list(self._protocols):
            protocol.close(ConnectionDone("aborted"), abort=True)
        done: Deferred[None] = Deferred()
        DeferredList(closing, consumeErrors=True).addCallback(
            lambda _: done.callback(None)
        )
        return done

    # -- dialling ------------------------------------------------------------

    def _make_dialer(self, peer_id: PeerId) -> _Dialer:
        endpoint = self._peer_endpoints[peer_id]
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls.creator(), endpoint, clock=self._clock)
        link_endpoint = _LinkEndpoint(
            self, peer_id, endpoint, self._peer_descriptions[peer_id]
        )
        backoff = self.settings.reconnect
        uniform = self._uniform
        service = _DialService(
            link_endpoint,
            _WatcherFactory(),
            retryPolicy=lambda attempt: backoff.delay(attempt, uniform()),
            clock=self._clock,
        )
        return _Dialer(link_endpoint, service)

    def _schedule_sync(self, peer_id: PeerId) -> None:
        if peer_id in self._dialers:
            # One reactor turn later: ClientService must not be started or
            # stopped from inside its own state machine's callbacks.
            self._clock.callLater(
                0, _guarded, "synchronising a dialer", self._sync_dialer, peer_id
            )

    def _sync_dialer(self, peer_id: PeerId) -> None:
        """
        Dial ``peer_id`` exactly when there is no link to it, or when the
        link is this node's own connection.
        """
        dialer = self._dialers.get(peer_id)
        if dialer is None or dialer.stopping is not None:
            return
        link = self._links.get(peer_id)
        wanted = self._running and (link is None or link.initiated)
        service = dialer.service
        if wanted and not service.running:
            service.startService()
        elif not wanted and service.running:
            stopping = dialer.stopping = service.stopService()

            def stopped(result: object) -> None:
                dialer.stopping = None
                if isinstance(result, Failure):
                    log.failure(
                        "stopping the dialer of {peer_id!r} failed",
                        result,
                        peer_id=peer_id,
                        ilm_event="internal_error",
                    )
                self._schedule_sync(peer_id)

            stopping.addBoth(stopped)

    def _dial_failed(
        self, peer_id: PeerId, error: BaseException, endpoint: _LinkEndpoint
    ) -> None:
        """
        An attempt to reach ``peer_id`` failed with ``error``: log why once
        per change of reason (repeats at debug level), and keep it for
        :meth:`link_error`.
        """
        kind, reason = _dial_reason(error)
        fields = dict(
            peer_id=peer_id,
            kind=kind,
            reason=reason,
            endpoint=endpoint.description,
        )
        if peer_id in self._links or not self._running:
            # Another connection is the link (a simultaneous dial), or the
            # node is stopping: nothing is wrong.
            log.debug(
                "an attempt to reach {peer_id!r} ended: {reason}",
                ilm_event="dial_ended",
                **fields,
            )
            return
        self._counters.dial_failed(reason)
        current = self._dial_errors.get(peer_id)
        if current is not None and current.reason == reason:
            self._dial_errors[peer_id] = attr.evolve(
                current, attempts=current.attempts + 1
            )
            log.debug(
                "still cannot reach {peer_id!r} ({attempts} attempts): {reason}",
                attempts=current.attempts + 1,
                ilm_event="dial_failed_again",
                **fields,
            )
            return
        self._dial_errors[peer_id] = DialFailure(reason, kind, self._clock.seconds(), 1)
        level = LogLevel.info if kind == "ConnectionLost" else LogLevel.warn
        log.emit(
            level,
            "cannot link to peer {peer_id!r} at {endpoint}: {reason}; retrying "
            "(logged again when the reason changes)",
            ilm_event="dial_failed",
            **fields,
        )

    # -- unauthenticated connections -----------------------------------------

    def _admit(self, protocol: ILMProtocol) -> bool:
        """
        Count a new incoming connection as unauthenticated, or refuse it
        (logged, rate-limited) if that would pass the caps.
        """
        host = protocol._host
        settings = self.settings
        total = len(self._unauthenticated)
        from_host = self._unauthenticated_hosts[host]
        if total >= settings.max_unauthenticated:
            limit = f"{total} unauthenticated connections are open (the limit)"
        elif from_host >= settings.max_unauthenticated_per_host:
            limit = (
                f"{from_host} unauthenticated connections from {host} are open "
                f"(the limit per source address)"
            )
        else:
            self._unauthenticated[protocol] = host
            self._unauthenticated_hosts[host] += 1
            return True
        protocol._refuse(ConnectionLimitReached(f"refused at once: {limit}"))
        return False

    def _release(self, protocol: ILMProtocol) -> None:
        """
        ``protocol`` is no longer an unauthenticated incoming connection.
        """
        host = self._unauthenticated.pop(protocol, None)
        if host is not None:
            left = self._unauthenticated_hosts[host] - 1
            if left > 0:
                self._unauthenticated_hosts[host] = left
            else:
                del self._unauthenticated_hosts[host]

    # -- link choice ---------------------------------------------------------

    def _decides(self, protocol: ILMProtocol) -> bool:
        """
        Whether this node chooses the link with ``protocol``'s peer (it has
        the smaller id).
        """
        assert protocol.peer_id is not None
        return self._local_key < id_order_key(protocol.peer_id)

    def _authenticated(self, protocol: ILMProtocol) -> None:
        peer_id = protocol.peer_id
        assert peer_id is not None
        log.debug(
            "{direction} connection authenticated as {peer_id!r}",
            direction="outgoing" if protocol.initiated else "incoming",
            peer_id=peer_id,
        )
        if not self._running:
            protocol.close(ConnectionDone("node stopping"), abort=True)
            return
        if self._refused_for(peer_id):
            self._counters.refused(REFUSAL_HOLD)
            log.debug(
                "refusing a connection with {peer_id!r} for now (protocol violation)",
                peer_id=peer_id,
                ilm_event="refusal_hold",
            )
            protocol.close(
                ConnectionDone("refused after a protocol violation"), abort=True
            )
            return
        if not self._decides(protocol):
            return  # wait for the peer's LINK_UP
        current = self._links.get(peer_id)
        if current is not None:
            if protocol.initiated or current.initiated == protocol.initiated:
                self._replace(current, protocol, announce=True)
            else:
                self._duplicate(protocol, current)
            return
        held = self._held.pop(peer_id, None)
        if protocol.initiated:
            if held is not None:
                self._duplicate(held, protocol)
            self._make_link(protocol, announce=True)
            return
        if held is not None:
            self._duplicate(held, protocol)
        if self._dialling(peer_id):
            # Our own connection to this peer is being set up; it wins if it
            # succeeds (the connection initiated by the smaller id wins).
            self._held[peer_id] = protocol
            return
        self._make_link(protocol, announce=True)

    def _dialling(self, peer_id: PeerId) -> bool:
        return any(
            p.initiated and p.destination == peer_id and p.state == _HANDSHAKING
            for p in self._protocols
        )

    def _link_up_received(self, protocol: ILMProtocol) -> None:
        peer_id = protocol.peer_id
        assert peer_id is not None
        if not self._running:
            protocol.close(ConnectionDone("node stopping"), abort=True)
            return
        current = self._links.get(peer_id)
        if current is not None:
            self._replace(current, protocol, announce=False)
        else:
            self._make_link(protocol, announce=False)

    def _duplicate(self, loser: ILMProtocol, winner: ILMProtocol) -> None:
        log.info(
            "closing a duplicate {direction} connection with {peer_id!r}: the "
            "{winner} connection is the link",
            direction="outgoing" if loser.initiated else "incoming",
            peer_id=loser.peer_id,
            winner="outgoing" if winner.initiated else "incoming",
            ilm_event="duplicate_link",
        )
        loser.close(ConnectionDone("duplicate connection"), abort=False)

    def _replace(self, old: ILMProtocol, new: ILMProtocol, announce: bool) -> None:
        log.info(
            "a new {direction} connection with {peer_id!r} replaces its link",
            direction="outgoing" if new.initiated else "incoming",
            peer_id=new.peer_id,
            ilm_event="link_replaced",
        )
        old.close(ConnectionDone("replaced by a newer connection"), abort=False)
        self._make_link(new, announce=announce)

    def _make_link(self, protocol: ILMProtocol, announce: bool) -> None:
        peer_id = protocol.peer_id
        assert peer_id is not None
        self._links[peer_id] = protocol
        self._counters.link_established()
        self._linked_at[peer_id] = self._clock.seconds()
        self._dial_errors.pop(peer_id, None)
        protocol.open(announce)
        log.info(
            "link with {peer_id!r} established ({direction})",
            peer_id=peer_id,
            direction="outgoing" if protocol.initiated else "incoming",
            ilm_event="link_established",
        )
        self._report("link_established", peer_id)
        if not protocol.initiated:
            self._schedule_sync(peer_id)

    def _detached(self, protocol: ILMProtocol, was: str, reason: object) -> None:
        """
        ``protocol`` stops being usable (closed by this node, or lost).
        """
        if was == _HANDSHAKING and protocol.initiated:
            self._clock.callLater(
                0,
                _guarded,
                "releasing a held connection",
                self._release_held,
                protocol.destination,
            )
        peer_id = protocol.peer_id
        if peer_id is None:
            return
        if self._held.get(peer_id) is protocol:
            del self._held[peer_id]
        if self._links.get(peer_id) is protocol:
            del self._links[peer_id]
            self._counters.link_lost()
            failure = reason if isinstance(reason, Failure) else Failure(reason)
            log.info(
                "link with {peer_id!r} lost: {reason}",
                peer_id=peer_id,
                reason=failure.getErrorMessage(),
                ilm_event="link_lost",
            )
            self._report("link_lost", peer_id, failure)
            if not protocol.initiated:
                self._schedule_sync(peer_id)

    def _release_held(self, peer_id: PeerId | None) -> None:
        if peer_id is None or peer_id not in self._held or self._dialling(peer_id):
            return
        held = self._held.pop(peer_id)
        if held.state == _AUTHENTICATED and self._running:
            self._make_link(held, announce=True)

    def _connection_lost(
        self, protocol: ILMProtocol, was: str, reason: Failure
    ) -> None:
        self._protocols.pop(protocol, None)
        if was != _CLOSED:
            self._detached(protocol, was, reason)

    # -- reporting -----------------------------------------------------------

    def _report(self, event: str, *args: object) -> None:
        receiver = self._receiver
        if receiver is None:
            return
        try:
            getattr(receiver, event)(*args)
        except Exception:
            log.failure(
                "the frame receiver raised from {event}",
                event=event,
                ilm_event="internal_error",
            )

    @staticmethod
    def _chain(d: Deferred[None]) -> Deferred[None]:
        result: Deferred[None] = Deferred()

        def fire(value: object) -> object:
            result.callback(None)
            return value

        if d.called:
            return succeed(None)
        d.addBoth(fire)
        return result

    def __repr__(self) -> str:
        return f"<StreamNetwork {self.local_id!r}>"


__all__ = [
    "Backoff",
    "DialFailure",
    "ILMFactory",
    "ILMProtocol",
    "LinkSettings",
    "StreamNetwork",
]
