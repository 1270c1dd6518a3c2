"""
A TCP relay in front of one demo node: the fixed address its peer dials,
forwarding each connection to wherever the node's current process listens,
and the driver's way to cut the link.

Why a relay, rather than asking a node to drop its connection: a cut made
outside both nodes is what a real network fault looks like to them (a reset
arrives with no warning, in the middle of whatever was being written or
read), it needs no test hook in the nodes, and the driver knows exactly when
and how often it cut.  It also gives the peer one address that outlives the
node's processes, though each restarted process listens on a new ephemeral
port.

A cut aborts both sides of every relayed connection (``abortConnection``:
an RST, no FIN, buffered data dropped).  When one side closes on its own the
other is closed the same way: cleanly after a clean close, aborted after
anything else.  Each direction is flow-controlled: a side whose outgoing
buffer is full pauses reading from the other.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

_CONNECTION_DONE = Failure(ConnectionDone())


class _Side(Protocol):
    """
    One TCP connection of a relayed pair.
    """

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.closed = False

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.setTcpNoDelay(True)
        self.pair.side_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.pair.forward(self, data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.closed = True
        self.pair.side_lost(self, reason)

    def close(self, abort: bool) -> None:
        if self.closed or self.transport is None:
            return
        if abort:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            self.transport.loseConnection()


class _Pair:
    """
    A connection the peer made to the relay (``inbound``) and the relay's
    connection to the node (``outbound``, once made).
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.inbound = _Side(self)
        self.outbound: _Side | None = None
        self.connecting: Deferred[Any] | None = None
        self.linked = False

    def side_made(self, side: _Side) -> None:
        if side is not self.inbound:
            return
        # Read nothing until the node's side is connected.
        transport: Any = side.transport
        transport.pauseProducing()
        port = self.relay.target
        if port is None:
            if self.relay.hold:
                self.relay.waiting.add(self)
            else:
                side.close(abort=True)
            return
        self.connect(port)

    def connect(self, port: int) -> None:
        """
        Connect the node's side, to ``port``.
        """
        endpoint = TCP4ClientEndpoint(self.relay.reactor, "127.0.0.1", port, timeout=5)
        self.outbound = _Side(self)
        self.connecting = endpoint.connect(_OneConnection(self.outbound))
        self.connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, _: object) -> None:
        self.connecting = None
        outbound = self.outbound
        assert outbound is not None
        if self.inbound.closed:
            outbound.close(abort=True)
            return
        self.linked = True
        inbound_transport: Any = self.inbound.transport
        outbound_transport: Any = outbound.transport
        inbound_transport.registerProducer(outbound_transport, True)
        outbound_transport.registerProducer(inbound_transport, True)
        inbound_transport.resumeProducing()

    def _failed(self, reason: Failure) -> None:
        self.connecting = None
        self.outbound = None
        self.inbound.close(abort=True)

    def forward(self, side: _Side, data: bytes) -> None:
        other = self.outbound if side is self.inbound else self.inbound
        if other is not None and not other.closed and other.transport is not None:
            other.transport.write(data)

    def side_lost(self, side: _Side, reason: Failure) -> None:
        self.relay.waiting.discard(self)
        other = self.outbound if side is self.inbound else self.inbound
        if other is not None:
            other.close(abort=not reason.check(ConnectionDone))
        if self.connecting is not None:
            self.connecting.cancel()
        if self.inbound.closed and (self.outbound is None or self.outbound.closed):
            self.relay.pairs.discard(self)

    def cut(self) -> None:
        self.inbound.close(abort=True)
        if self.outbound is not None:
            self.outbound.close(abort=True)


class _OneConnection(Factory):
    def __init__(self, side: _Side) -> None:
        self.side = side

    def buildProtocol(self, addr: object) -> Protocol:
        return self.side


class _RelayFactory(Factory):
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: object) -> Protocol:
        pair = _Pair(self.relay)
        self.relay.pairs.add(pair)
        return pair.inbound


class Relay:
    """
    A TCP relay on the loopback interface, in front of one node.

    ``target`` is the port the node's current process listens on, ``None``
    while it is down: connections are then refused with a reset, or with
    ``hold``, kept waiting (unread) until :meth:`retarget` names the port of
    the node's next process, so that the peer's link comes up as soon as
    the node is back, whatever the peer's redial backoff.

    :param reactor: an ``IReactorTCP``.
    """

    def __init__(self, reactor: Any, hold: bool = False) -> None:
        self.reactor = reactor
        self.hold = hold
        self.target: int | None = None
        self.pairs: set[_Pair] = set()
        self.waiting: set[_Pair] = set()
        self._port: IListeningPort = reactor.listenTCP(
            0, _RelayFactory(self), interface="127.0.0.1"
        )

    @property
    def port(self) -> int:
        """The port peers dial."""
        port: int = self._port.getHost().port  # type: ignore[attr-defined]
        return port

    def retarget(self, port: int | None) -> None:
        """
        Relay to ``port`` from now on (``None``: the node is down), and
        connect the connections held waiting.
        """
        self.target = port
        if port is None:
            return
        waiting, self.waiting = self.waiting, set()
        for pair in waiting:
            if not pair.inbound.closed:
                pair.connect(port)

    def linked(self) -> int:
        """
        :return: how many connections are relayed end to end right now.
        """
        return sum(1 for pair in self.pairs if pair.linked)

    def cut(self) -> int:
        """
        Abort every relayed connection, both sides.

        :return: how many were relayed end to end.
        """
        linked = self.linked()
        for pair in list(self.pairs):
            pair.cut()
        return linked

    def close(self) -> Deferred[None]:
        """
        Stop listening and abort every connection.
        """
        self.target = None
        self.hold = False
        self.cut()
        done: Deferred[None] = Deferred()
        stopped = self._port.stopListening()
        if stopped is None:
            done.callback(None)
        else:
            stopped.addBoth(lambda _: done.callback(None))
        return done
