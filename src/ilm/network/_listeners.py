"""
The listening side of a :class:`ilm.network.StreamNetwork`: its server
endpoints (parsed when the network is made), listened on with TLS layered
on when configured, and the ports they opened (:class:`Listeners`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from ilm.network._tls import TLSCredentials

__all__ = ["Listeners"]


class Listeners:
    """
    Listens on a network's server endpoints.

    :param endpoints: the server endpoints.
    :param tls: every connection accepted is TLS with these credentials
        (``None``: plain).
    :param clock: the TLS layer's clock.
    """

    def __init__(
        self,
        endpoints: Sequence[IStreamServerEndpoint],
        tls: TLSCredentials | None,
        clock: IReactorTime,
    ) -> None:
        self._endpoints = list(endpoints)
        self._tls = tls
        self._clock = clock
        self._ports: list[IListeningPort] = []

    def listen(self, factory: IProtocolFactory) -> Deferred[list[Failure]]:
        """
        Listen on every endpoint, with ``factory`` (under TLS if
        configured).

        :return: a ``Deferred`` firing, once every endpoint listens or
            failed to, with the failures (none: all listen).  The ports
            opened are kept either way (:meth:`stop` closes them).
        """
        if self._tls is not None:
            factory = TLSMemoryBIOFactory(
                self._tls.creator(), False, factory, clock=self._clock
            )
        listening = [maybeDeferred(e.listen, factory) for e in self._endpoints]

        def listened(results: list[tuple[bool, Any]]) -> list[Failure]:
            self._ports = [value for ok, value in results if ok]
            return [value for ok, value in results if not ok]

        return DeferredList(listening, consumeErrors=True).addCallback(listened)

    def stop(self) -> list[Deferred[Any]]:
        """
        Stop listening.

        :return: a ``Deferred`` per port, firing once it is closed.
        """
        return [maybeDeferred(port.stopListening) for port in self._ports]

    def addresses(self) -> list[IAddress]:
        """The addresses listened on (a port chosen by the system included)."""
        return [port.getHost() for port in self._ports]
