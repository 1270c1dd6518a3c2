"""
The dialler: one ``ClientService`` per configured peer, started exactly
when this node wants to dial that peer, with the whole workaround that
using ``ClientService`` for links needs, in one place.

The missing transition
    ``ClientService``'s state machine (``twisted.application.internet._Core``)
    has no transition for a connection lost while ``prepareConnection``'s
    Deferred is pending, nor after it failed: the loss raises
    ``automat.NoTransition`` from ``connectionLost``
    (``tests/test_stream_service.py``,
    ``PrepareConnectionPitfallTests.test_connection_lost_during_prepare_connection``,
    documents it and fails the day Twisted has the transition).  The link
    handshake (authentication, then the election of the link) can fail or
    be cut at any moment, so it cannot run in ``prepareConnection``.

The workaround
    It runs inside the client endpoint instead: :class:`_LinkEndpoint`'s
    ``connect`` fires only once the connection is authenticated and chosen
    as the link, fails (the transport aborted) if the handshake fails or
    times out, and aborts the connection if cancelled.  ``ClientService``
    is handed a :class:`_Watcher` whose transport (:class:`_LinkTransport`)
    closes the link cleanly and which is told when the link is lost, so
    that ``ClientService`` redials.  Each failed attempt is reported with
    why (:meth:`Dialler.failed`): logged once per change of reason, kept for
    ``StreamNetwork.link_error``.

    ``ClientService`` must not be started or stopped from inside its own
    machine's callbacks (a re-entrancy ``RuntimeError`` in current Automat):
    :meth:`Dialler.schedule_sync` hops one reactor turn first.

    ``ClientService`` logs every retry at info level through its class
    attribute ``_log``; :class:`_DialService`'s ``_log`` turns those events
    into debug-level ``dial_retry`` events with plain fields.

Once Twisted has the transitions (a connection lost, or
``prepareConnection`` failed, while preparing: abort and count a failed
attempt), this module shrinks to ``ClientService(endpoint, ILMFactory(...),
retryPolicy=..., clock=..., prepareConnection=lambda p: p.when_open())``
per peer and the synchronisation of wanted peers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attr
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
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
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from ilm._backoff import Backoff
from ilm._peerid import PeerId
from ilm.network._counters import NetworkCounters
from ilm.network._dial_failure import DialFailure, dial_reason
from ilm.network._log import internal_error, log
from ilm.network._protocol import ILMProtocol
from ilm.network._tls import TLSCredentials
from ilm.network._waiters import chain

__all__ = ["Dialler"]


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
    connection if cancelled.  Each failure is reported to the dialler
    (:meth:`Dialler.failed`) with why it failed.

    A peer with several addresses (several gateways of one node) has them
    dialled in turn: each ``connect`` uses the next one, so that the next
    address is tried after a failed attempt and after a lost link.
    """

    def __init__(
        self,
        dialler: Dialler,
        peer_id: PeerId,
        endpoints: Sequence[tuple[IStreamClientEndpoint, str]],
    ) -> None:
        self._dialler = dialler
        self.peer_id = peer_id
        self._endpoints = list(endpoints)
        self._next = 0
        self.description = self._endpoints[0][1]

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        dialler = self._dialler
        factory = dialler.factory_for(self.peer_id)
        endpoint, description = self._endpoints[self._next]
        self._next = (self._next + 1) % len(self._endpoints)
        self.description = description
        wait = dialler.refused_for(self.peer_id)
        if wait:
            # A protocol violation closed the last link: dial again only once
            # the refusal has passed (cancelling the wait cancels the dial).
            attempt: Deferred[Any] = deferLater(dialler.clock, wait, lambda: None)
            attempt.addCallback(lambda _: endpoint.connect(factory))
        else:
            attempt = endpoint.connect(factory)

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
                dialler.failed(self.peer_id, failure.value, description)
            return failure

        attempt.addCallback(connected)
        attempt.addCallback(opened)
        attempt.addErrback(failed)
        return attempt

    def __repr__(self) -> str:
        return f"<link endpoint to {self.peer_id!r} via {self.description}>"


class _Dial:
    __slots__ = ("service", "stopping")

    def __init__(self, service: ClientService) -> None:
        self.service = service
        self.stopping: Deferred[None] | None = None


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class Dialler:
    """
    Dials the configured peers: one ``ClientService`` per peer, running
    exactly while :attr:`wanted` says so.

    :ivar endpoints: each peer's client endpoints (one or more, dialled in
        turn), each with its description (the configured string, or the
        endpoint's type) for the log.
    :ivar factory_for: the protocol factory of a connection to a peer.
    :ivar wanted: whether this node is to dial a peer now (it is running,
        has no link to the peer that the peer initiated, and, once dials
        are held, was told to dial it: :class:`ilm.network._peer_dials.PeerDials`).
    :ivar moot: whether a failed attempt to reach a peer is moot (another
        connection is the link, or the node is stopping).
    :ivar refused_for: how long links with a peer are still refused.
    """

    endpoints: Mapping[PeerId, Sequence[tuple[IStreamClientEndpoint, str]]]
    tls: TLSCredentials | None
    clock: IReactorTime
    reconnect: Backoff
    uniform: Callable[[], float]
    counters: NetworkCounters
    factory_for: Callable[[PeerId], IProtocolFactory]
    wanted: Callable[[PeerId], bool]
    moot: Callable[[PeerId], bool]
    refused_for: Callable[[PeerId], float]
    _dials: dict[PeerId, _Dial] = attr.ib(factory=dict, init=False)
    _errors: dict[PeerId, DialFailure] = attr.ib(factory=dict, init=False)

    def start(self) -> None:
        """
        Make one ``ClientService`` per peer, and start those wanted.
        """
        for peer_id in self.endpoints:
            self._dials[peer_id] = _Dial(self._service(peer_id))
            self.sync(peer_id)

    def _service(self, peer_id: PeerId) -> ClientService:
        endpoints = []
        for endpoint, description in self.endpoints[peer_id]:
            if self.tls is not None:
                endpoint = wrapClientTLS(self.tls.creator(), endpoint, clock=self.clock)
            endpoints.append((endpoint, description))
        backoff = self.reconnect
        uniform = self.uniform
        return _DialService(
            _LinkEndpoint(self, peer_id, endpoints),
            _WatcherFactory(),
            retryPolicy=lambda attempt: backoff.delay(attempt, uniform()),
            clock=self.clock,
        )

    def stop(self) -> list[Deferred[Any]]:
        """
        Stop every dial.

        :return: a ``Deferred`` per service still stopping.
        """
        waits: list[Deferred[Any]] = []
        for dial in self._dials.values():
            if dial.service.running:
                waits.append(dial.service.stopService())
            elif dial.stopping is not None:
                waits.append(chain(dial.stopping))
        return waits

    def abort(self) -> None:
        """
        Stop every dial without waiting for anything.
        """
        for dial in self._dials.values():
            if dial.service.running:
                dial.service.stopService()

    def link_error(self, peer_id: PeerId) -> DialFailure | None:
        return self._errors.get(peer_id)

    def linked(self, peer_id: PeerId) -> None:
        """
        A link with ``peer_id`` is up: its dial errors are over.
        """
        self._errors.pop(peer_id, None)

    def schedule_sync(self, peer_id: PeerId) -> None:
        if peer_id in self._dials:
            # One reactor turn later: ClientService must not be started or
            # stopped from inside its own state machine's callbacks.
            self.clock.callLater(0, self._guarded_sync, peer_id)

    def _guarded_sync(self, peer_id: PeerId) -> None:
        try:
            self.sync(peer_id)
        except Exception:
            internal_error("synchronising a dialer")

    def sync(self, peer_id: PeerId) -> None:
        """
        Dial ``peer_id`` exactly when it is :attr:`wanted`.
        """
        dial = self._dials.get(peer_id)
        if dial is None or dial.stopping is not None:
            return
        wanted = self.wanted(peer_id)
        service = dial.service
        if wanted and not service.running:
            service.startService()
        elif not wanted and service.running:
            stopping = dial.stopping = service.stopService()

            def stopped(result: object) -> None:
                dial.stopping = None
                if isinstance(result, Failure):
                    log.failure(
                        "stopping the dialer of {peer_id!r} failed",
                        result,
                        peer_id=peer_id,
                        ilm_event="internal_error",
                    )
                self.schedule_sync(peer_id)

            stopping.addBoth(stopped)

    def failed(self, peer_id: PeerId, error: BaseException, endpoint: str) -> None:
        """
        An attempt to reach ``peer_id`` (at ``endpoint``) failed with
        ``error``: count it, log why once per change of reason (repeats at
        debug level), and keep it for :meth:`link_error`.
        """
        kind, reason = dial_reason(error)
        fields = dict(peer_id=peer_id, kind=kind, reason=reason, endpoint=endpoint)
        if self.moot(peer_id):
            # Another connection is the link (a simultaneous dial), or the
            # node is stopping: nothing is wrong.
            log.debug(
                "an attempt to reach {peer_id!r} ended: {reason}",
                ilm_event="dial_ended",
                **fields,
            )
            return
        self.counters.dial_failed(reason)
        current = self._errors.get(peer_id)
        if current is not None and current.reason == reason:
            self._errors[peer_id] = attr.evolve(current, attempts=current.attempts + 1)
            log.debug(
                "still cannot reach {peer_id!r} ({attempts} attempts): {reason}",
                attempts=current.attempts + 1,
                ilm_event="dial_failed_again",
                **fields,
            )
            return
        self._errors[peer_id] = DialFailure(reason, kind, self.clock.seconds(), 1)
        level = LogLevel.info if kind == "ConnectionLost" else LogLevel.warn
        log.emit(
            level,
            "cannot link to peer {peer_id!r} at {endpoint}: {reason}; retrying "
            "(logged again when the reason changes)",
            ilm_event="dial_failed",
            **fields,
        )
