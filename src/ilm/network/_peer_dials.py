"""
The dialling side of a :class:`ilm.network.StreamNetwork`: its configured
peers (:func:`peer_endpoints`, checked when the network is made) and
:class:`PeerDials`, which decides which of them are dialled now and drives
the :class:`ilm.network._dialler.Dialler` (one ``ClientService`` per
peer) accordingly.

A configured peer is dialled while the network runs and has no link with
it that the peer initiated (:meth:`ilm.network._links.LinkTable.wanted`).
A gateway on a store shared by several gateways narrows that: after
:meth:`PeerDials.hold`, a peer is dialled only between
:meth:`PeerDials.dial` and :meth:`PeerDials.stop_dialling`, as its
ownership guard says (a gateway dials a peer only while it owns the
peer's stream: docs/scaling.md, "Dialling peers").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)

from ilm._backoff import Backoff
from ilm._peerid import PeerId, check_peer_id
from ilm.errors import ConfigurationError
from ilm.network._counters import NetworkCounters
from ilm.network._dial_failure import DialFailure
from ilm.network._dialler import Dialler
from ilm.network._endpoints import PeerAddresses, client_endpoints
from ilm.network._handshake import PreSharedKeys
from ilm.network._tls import TLSCredentials

__all__ = ["PeerDials", "peer_endpoints"]

Endpoints = dict[PeerId, list[tuple[IStreamClientEndpoint, str]]]


def peer_endpoints(
    reactor: Any,
    local_id: PeerId,
    keys: PreSharedKeys | None,
    peers: Mapping[PeerId, PeerAddresses],
) -> Endpoints:
    """
    The client endpoints of each configured peer, parsed (each with its
    description for the log).

    :raises ConfigurationError: for a malformed endpoint, for this node's
        own id, or for a peer without a key when keys are used.
    """
    endpoints = {}
    for peer_id, addresses in peers.items():
        peer_id = check_peer_id(peer_id)
        if peer_id == local_id:
            raise ConfigurationError("a node does not dial itself")
        if keys is not None and keys.key_for(peer_id) is None:
            raise ConfigurationError(f"peer {peer_id!r} is dialled but has no key")
        endpoints[peer_id] = client_endpoints(reactor, peer_id, addresses)
    return endpoints


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class PeerDials:
    """
    Dials a network's configured peers: each while it is wanted, and once
    held only those it is told to dial.

    :ivar endpoints: each configured peer's client endpoints
        (:func:`peer_endpoints`).
    :ivar linkable: whether the network would dial a peer now (it is
        running and has no link with the peer that the peer initiated).
    :ivar moot: whether a failed attempt to reach a peer is moot (another
        connection is the link, or the network is stopping).
    :ivar refused_for: how long links with a peer are still refused.

    The others configure the :class:`Dialler` (``reconnect`` is its
    backoff between attempts, ``uniform`` the jitter's random numbers).
    """

    endpoints: Endpoints
    tls: TLSCredentials | None
    clock: IReactorTime
    reconnect: Backoff
    uniform: Callable[[], float]
    counters: NetworkCounters
    factory_for: Callable[[PeerId], IProtocolFactory]
    linkable: Callable[[PeerId], bool]
    moot: Callable[[PeerId], bool]
    refused_for: Callable[[PeerId], float]
    #: The peers to dial, once held; ``None``: every one.
    _chosen: set[PeerId] | None = attr.ib(default=None, init=False)
    _dialler: Dialler = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._dialler = Dialler(
            endpoints=self.endpoints,
            tls=self.tls,
            clock=self.clock,
            reconnect=self.reconnect,
            uniform=self.uniform,
            counters=self.counters,
            factory_for=self.factory_for,
            wanted=self._wanted,
            moot=self.moot,
            refused_for=self.refused_for,
        )

    def peers(self) -> frozenset[PeerId]:
        """The configured peers (whether dialled now or not)."""
        return frozenset(self.endpoints)

    # -- the dialler's life --------------------------------------------------

    def start(self) -> None:
        """Start dialling the peers wanted (the network listens now)."""
        self._dialler.start()

    def stop(self) -> list[Deferred[Any]]:
        """
        Stop every dial.

        :return: a ``Deferred`` per dial still stopping.
        """
        return self._dialler.stop()

    def abort(self) -> None:
        """Stop every dial without waiting for anything."""
        self._dialler.abort()

    def link_error(self, peer_id: PeerId) -> DialFailure | None:
        """Why the attempts to reach ``peer_id`` have been failing."""
        return self._dialler.link_error(peer_id)

    def linked(self, peer_id: PeerId) -> None:
        """A link with ``peer_id`` is up: its dial errors are over."""
        self._dialler.linked(peer_id)

    def schedule_sync(self, peer_id: PeerId) -> None:
        """Whether ``peer_id`` is wanted may have changed: dial it, or not."""
        self._dialler.schedule_sync(peer_id)

    # -- which peers are dialled ---------------------------------------------

    def hold(self) -> None:
        """
        Dial none of the configured peers until told to (:meth:`dial`):
        for a gateway on a shared store, which dials a peer only while it
        owns the peer's stream.  Call it before the network starts.
        """
        if self._chosen is None:
            self._chosen = set()
            for peer_id in self.endpoints:
                self._dialler.schedule_sync(peer_id)

    def dial(self, peer_id: PeerId) -> None:
        """
        After :meth:`hold`: dial ``peer_id`` (a configured peer) from now
        on, keeping its link up as without the hold.
        """
        if self._chosen is not None and peer_id in self.endpoints:
            self._chosen.add(peer_id)
            self._dialler.schedule_sync(peer_id)

    def stop_dialling(self, peer_id: PeerId) -> None:
        """
        After :meth:`hold`: dial ``peer_id`` no more.  An attempt in
        progress is abandoned, and a link this node dialled is closed
        cleanly; a link the peer dialled stays.
        """
        if self._chosen is not None and peer_id in self._chosen:
            self._chosen.discard(peer_id)
            self._dialler.schedule_sync(peer_id)

    def _wanted(self, peer_id: PeerId) -> bool:
        chosen = self._chosen
        return (chosen is None or peer_id in chosen) and self.linkable(peer_id)
