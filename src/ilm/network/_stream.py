"""
ILM over stream endpoints: :class:`StreamNetwork`, the
:class:`ilm.interfaces.INetwork` facade of the stream network.

A :class:`StreamNetwork` listens on server endpoints (``serverFromString``
strings such as ``tcp:9000`` or ``unix:/run/ilm.sock``, or endpoint objects)
and keeps a link to each configured peer alive.  Every connection runs the
link handshake (:mod:`ilm.network._handshake`): nothing reaches ILM, in
either direction, before the peer is authenticated.  TLS, when configured,
is layered on any of these endpoints.  ``docs/architecture-network.md``
draws the pieces:

- :mod:`ilm.network._protocol`: :class:`ILMProtocol`, one connection
  (framing, handshake driving, keepalive, flow control), which talks to this
  facade through :class:`IConnectionOwner` only;
- :mod:`ilm.network._links`: the connections and the link per peer, with
  :mod:`ilm.network._election` (what an authenticated connection becomes,
  one link per peer, pure) applied, and closing a link;
- :mod:`ilm.network._peer_dials`: the configured peers and which of them
  are dialled now (all, or after ``hold_dials`` only those told), driving
  :mod:`ilm.network._dialler` (one ``ClientService`` per peer, and the
  workaround ``ClientService`` needs for links);
- :mod:`ilm.network._listeners`: the server endpoints listened on;
- :mod:`ilm.network._refusal` (the hold after a violation, shared with the
  in-memory network), :mod:`ilm.network._refusal_log` (counted and
  rate-limited refusals), :mod:`ilm.network._admission` (caps on
  unauthenticated connections), :mod:`ilm.network._settings`,
  :mod:`ilm.network._endpoints`, :mod:`ilm.network._dial_failure`.

Why a dial failed
    Each failed attempt is classified (connection refused, host unreachable,
    DNS failure, TLS failure, the peer refused our key proof, handshake
    timeout, ...).  The reason is logged once per change of reason
    (``dial_failed``, at warn level) and kept for
    :meth:`StreamNetwork.link_error`; repeats are logged at debug level.

Strangers
    Refusals of connections that have not authenticated (and of links that
    break the rules) are counted (:meth:`StreamNetwork.stats`) and logged
    through a rate limiter keyed by the event and the source address.
    Unauthenticated connections are capped in total and per source address.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._backoff import Backoff
from ilm._logging import EventLimiter
from ilm._peerid import PeerId, check_peer_id, id_order_key
from ilm._status import NetworkStats
from ilm.errors import ConnectionLimitReached
from ilm.interfaces import IFrameReceiver, INetwork
from ilm.network._admission import Admission
from ilm.network._counters import NetworkCounters
from ilm.network._dial_failure import DialFailure
from ilm.network._endpoints import (
    PeerAddresses,
    address_text,
    server_endpoint,
)
from ilm.network._handshake import KeySearchBudget, PreSharedKeys
from ilm.network._links import LinkTable
from ilm.network._listeners import Listeners
from ilm.network._log import log
from ilm.network._peer_dials import PeerDials, peer_endpoints
from ilm.network._protocol import (
    ConnectionContext,
    IConnectionOwner,
    ILMFactory,
    ILMProtocol,
)
from ilm.network._refusal import RefusalPolicy
from ilm.network._refusal_log import RefusalLog
from ilm.network._settings import LinkSettings
from ilm.network._tls import TLSCredentials
from ilm.network._waiters import chain

__all__ = [
    "Backoff",
    "DialFailure",
    "ILMFactory",
    "ILMProtocol",
    "LinkSettings",
    "StreamNetwork",
    "log",
]


@implementer(INetwork, IConnectionOwner)
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
        ``IStreamClientEndpoint``), or to a list or tuple of them: the
        addresses of a node served by several gateways, dialled in turn (the
        next one after a failed attempt or a lost link).  Peers that only
        dial this node need no entry, only credentials.
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
        peers: Mapping[PeerId, PeerAddresses] | None = None,
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
        self.settings = settings = settings if settings is not None else LinkSettings()
        if random_bytes is None:
            import os

            random_bytes = os.urandom
        uniform = random if random is not None else _random.random
        # Endpoint strings are parsed now, not when the network starts: a
        # malformed one fails here, naming the option, instead of inside a
        # start-up callback where nobody would see it.
        self._listeners = Listeners(
            [server_endpoint(reactor, d) for d in listen], tls, reactor
        )
        endpoints = peer_endpoints(reactor, self.local_id, keys, peers or {})
        self._receiver: IFrameReceiver | None = None
        self._running = False
        self._stopping: Deferred[None] | None = None
        self._counters = NetworkCounters()
        self._refusal: RefusalPolicy[PeerId] = RefusalPolicy(
            settings.refusal, settings.refusal_reset, reactor.seconds, uniform
        )
        self._table = LinkTable(
            local_id=self.local_id,
            clock=reactor,
            counters=self._counters,
            refusal=self._refusal,
            running=lambda: self._running,
            report=self._report,
            sync=lambda peer_id: self._dials.schedule_sync(peer_id),
            linked=lambda peer_id: self._dials.linked(peer_id),
        )
        self._protocols = self._table.connections
        self._links = self._table.links
        self._admission = Admission(
            settings.max_unauthenticated, settings.max_unauthenticated_per_host
        )
        # Refusals and other events strangers and peers can repeat at will.
        self._limiter = EventLimiter(
            log,
            reactor,
            interval=settings.refusal_log_interval,
            max_keys=settings.refusal_log_sources,
        )
        self.key_search_budget = KeySearchBudget(
            settings.key_search_rate, reactor.seconds
        )
        self.context = ConnectionContext(
            local_id=self.local_id,
            keys=keys,
            tls=tls,
            settings=settings,
            clock=reactor,
            key_search=self.key_search_budget.take,
            random_bytes=random_bytes,
            refusals=RefusalLog(self._limiter, self._counters),
        )
        self._dials = PeerDials(
            endpoints=endpoints,
            tls=tls,
            clock=reactor,
            reconnect=settings.reconnect,
            uniform=uniform,
            counters=self._counters,
            factory_for=lambda peer_id: ILMFactory(self, peer_id),
            linkable=self._table.wanted,
            moot=lambda peer_id: peer_id in self._links or not self._running,
            refused_for=self._refusal.refused_for,
        )

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
        done: Deferred[None] = Deferred()

        def listened(failures: list[Failure]) -> None:
            if failures:
                self._running = False
                self.stop().addBoth(lambda _: done.errback(failures[0]))
                return
            self._dials.start()
            log.info(
                "node {local_id!r} listening on {addresses}, dialling {peers}",
                local_id=self.local_id,
                addresses=[address_text(a)[1] for a in self.listening_addresses()],
                peers=sorted(self._dials.peers(), key=id_order_key),
                ilm_event="network_started",
            )
            done.callback(None)

        self._listeners.listen(ILMFactory(self, None)).addCallback(listened)
        return done

    def stop(self) -> Deferred[None]:
        """
        Stop listening and dialling, and close every connection cleanly (what
        was written is delivered; a connection that has not closed within
        ``close_grace`` is aborted).  ``link_lost`` is reported for every
        link before the returned ``Deferred`` fires; nothing after.
        """
        if self._stopping is not None:
            return chain(self._stopping)
        self._running = False
        waits = self._listeners.stop()
        waits.extend(self._dials.stop())
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
        return chain(stopping)

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
        closing = self._listeners.stop()
        self._dials.abort()
        for protocol in list(self._protocols):
            protocol.close(ConnectionDone("aborted"), abort=True)
        done: Deferred[None] = Deferred()
        DeferredList(closing, consumeErrors=True).addCallback(
            lambda _: done.callback(None)
        )
        return done

    @property
    def max_frame_size(self) -> int:
        """The largest ILM frame a link carries (``settings.max_frame_size``)."""
        return self.settings.max_frame_size

    def connected_peers(self) -> frozenset[PeerId]:
        return frozenset(self._links)

    def send_frames(self, peer_id: PeerId, frames: Sequence[bytes]) -> None:
        protocol = self._links.get(peer_id)
        if protocol is not None:
            protocol.send_session_frames(frames)

    def close_link(self, peer_id: PeerId, reason: Exception) -> None:
        """
        Close the link to ``peer_id`` at once; ``link_lost`` is reported
        before this returns.  After a :class:`ProtocolViolation`, links
        with the peer are refused for a while (``LinkSettings.refusal``).
        """
        self._table.close_link(peer_id, reason)

    # -- reading -------------------------------------------------------------

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
        return self._dials.link_error(peer_id)

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

    def hold_dials(self) -> None:
        """
        Dial none of the configured peers until told to (:meth:`dial`):
        for a gateway on a shared store, which dials a peer only while it
        owns the peer's stream.  Call it before :meth:`start`.
        """
        self._dials.hold()

    def dial(self, peer_id: PeerId) -> None:
        """
        After :meth:`hold_dials`: dial ``peer_id`` (a configured peer) from
        now on, keeping its link up as without the hold.
        """
        self._dials.dial(peer_id)

    def stop_dialling(self, peer_id: PeerId) -> None:
        """
        After :meth:`hold_dials`: dial ``peer_id`` no more.  An attempt in
        progress is abandoned, and a link this node dialled is closed
        cleanly; a link the peer dialled stays.
        """
        self._dials.stop_dialling(peer_id)

    def dialled_peers(self) -> frozenset[PeerId]:
        """
        The peers this network dials (those given in ``peers``), for ILM's
        start line.
        """
        return self._dials.peers()

    def listening_addresses(self) -> list[IAddress]:
        """
        :return: the addresses this node listens on (to learn a port chosen
            by the system with ``tcp:0``).
        """
        return self._listeners.addresses()

    def connections(self) -> tuple[ILMProtocol, ...]:
        """
        :return: the connections open now (in their handshake, held, or
            links), in the order they were made.
        """
        return tuple(self._protocols)

    def flush_log(self) -> None:
        """
        Log now the summaries of rate-limited events (refusals) that the
        limiter would log at the end of its interval.
        """
        self._limiter.flush()

    def link(self, peer_id: PeerId) -> ILMProtocol | None:
        """
        :return: the connection that is the link with ``peer_id`` (``None``:
            no link).
        """
        return self._links.get(peer_id)

    # -- IConnectionOwner ----------------------------------------------------

    def connection_made(self, connection: ILMProtocol) -> bool:
        self._protocols[connection] = None
        if not self._running:
            return False
        if connection.initiated:
            return True
        limit = self._admission.admit(connection, connection.host)
        if limit is None:
            return True
        connection.refused(ConnectionLimitReached(f"refused at once: {limit}"))
        return False

    def frame_receiver(self) -> IFrameReceiver | None:
        return self._receiver

    def authenticated(self, connection: ILMProtocol) -> None:
        self._admission.release(connection)
        self._table.authenticated(connection)

    def link_up_received(self, connection: ILMProtocol) -> None:
        self._table.link_up_received(connection)

    def detached(self, connection: ILMProtocol, was: str, reason: object) -> None:
        self._admission.release(connection)
        self._table.detached(connection, was, reason)

    def connection_lost(
        self, connection: ILMProtocol, was: str, reason: Failure
    ) -> None:
        self._admission.release(connection)
        self._table.connection_lost(connection, was, reason)

    def link_paused(self, connection: ILMProtocol) -> None:
        self._report("link_paused", connection.peer_id)

    def link_resumed(self, connection: ILMProtocol) -> None:
        self._report("link_resumed", connection.peer_id)

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

    def __repr__(self) -> str:
        return f"<StreamNetwork {self.local_id!r}>"
