"""
In-memory stream endpoints on a ``Clock``: what the simulator runs the real
stream network (:class:`ilm.network.StreamNetwork`) over, and what the
stream network's own tests use.

A :class:`Switchboard` hands out server and client endpoints by name; a
connection is a :class:`Pipe` whose two ends are transports that carry
bytes through the clock (``latency`` seconds per write).  Unlike
``twisted.test.iosim``, a pipe can lose what is in flight:

- :meth:`Pipe.cut` drops what is in flight and tells both sides the
  connection was lost (a reset); :meth:`Pipe.abort` does the same as if one
  side had aborted;
- :meth:`Pipe.blackhole` drops everything silently from then on (a
  connection that stops carrying bytes); :meth:`Pipe.sever` also hides each
  side's close from the other, so that each side learns of the dead
  connection only through its own timeouts (a half-open connection);
- :meth:`Pipe.stall` stops delivering to one side (a reader that stops
  reading, or a delay); the writer's transport pauses its producer once
  more than ``high_water`` bytes wait, like a full TCP send buffer.

A switchboard can also split and coalesce what it delivers (``chunks``),
as TCP does, and refuse connections between partitioned names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoRouteError,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IListeningPort,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(ITransport, IConsumer, IPushProducer)
class PipeEnd:
    """
    One end of a :class:`Pipe`: the transport its protocol writes to.
    """

    def __init__(self, pipe: Pipe, side: int, host: int, peer: int) -> None:
        self.pipe = pipe
        self.side = side
        self.protocol: IProtocol | None = None
        self.producer: IPushProducer | None = None
        self.producer_paused = False
        self.disconnecting = False
        self.closed = False
        self._host = IPv4Address("TCP", "127.0.0.1", host)
        self._peer = IPv4Address("TCP", "127.0.0.1", peer)
        self.writes = 0

    def write(self, data: bytes) -> None:
        if self.closed or self.disconnecting:
            return
        self.writes += 1
        self.pipe._send(self.side, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.closed or self.disconnecting:
            return
        self.disconnecting = True
        # Like a real transport, a registered producer keeps it open.
        self.pipe._close_when_flushed(
            self.side, waiting_for_producer=self.producer is not None
        )

    def abortConnection(self) -> None:
        if self.closed:
            return
        self.pipe._abort(self.side)

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        # Only streaming (push) producers are registered here.
        self.producer = cast(IPushProducer, producer)

    def unregisterProducer(self) -> None:
        self.producer = None
        if self.disconnecting:
            self.pipe._close_when_flushed(self.side)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.abortConnection()


class Pipe:
    """
    A connection between two protocols, carried through a ``Clock``.  Side
    0 is the client (the end that connected), side 1 the server.

    ``names`` is ``(client's name, server's name)``: the name the client
    endpoint was made with (``None`` if it had none) and the address it
    connected to.
    """

    def __init__(
        self,
        board: Switchboard,
        client: IProtocol,
        server: IProtocol,
        client_port: int,
        server_port: int,
        names: tuple[str | None, str] = (None, ""),
    ) -> None:
        self.board = board
        self.clock = board.clock
        self.names = names
        self.ends = (
            PipeEnd(self, 0, client_port, server_port),
            PipeEnd(self, 1, server_port, client_port),
        )
        self.ends[0].protocol = client
        self.ends[1].protocol = server
        self.queues: tuple[list[bytes], list[bytes]] = ([], [])
        self.calls: list[IDelayedCall | None] = [None, None]
        self.stalled = [False, False]
        self.blackholed = False
        self.severed = False
        self.closed = False
        self.bytes_delivered = [0, 0]
        self.closing: set[int] = set()

    # -- controls ------------------------------------------------------------

    def cut(self) -> None:
        """
        Lose everything in flight; both sides see the connection lost.
        """
        self._lose(Failure(ConnectionLost("cut")), Failure(ConnectionLost("cut")))

    def abort(self, side: int) -> None:
        """
        Side ``side`` aborts the connection (as its kernel would on a reset):
        everything in flight is lost, that side sees ``ConnectionAborted``
        and the other ``ConnectionLost`` (unless the pipe is severed).
        """
        self._abort(side)

    def blackhole(self) -> None:
        """
        From now on, lose every byte in both directions and report nothing
        (a connection that stopped carrying bytes).
        """
        self.blackholed = True
        for queue in self.queues:
            queue.clear()

    def sever(self) -> None:
        """
        Make the connection half-open: every byte is lost from now on (as
        with :meth:`blackhole`), and when one side closes or aborts, only
        that side sees the connection lost; the other finds out through its
        own timeouts.
        """
        self.severed = True
        self.blackhole()

    def stall(self, side: int, stalled: bool = True) -> None:
        """
        Stop (or restart) delivering bytes to ``side``.
        """
        self.stalled[side] = stalled
        if not stalled:
            self._schedule(side)

    def in_flight(self, to_side: int) -> int:
        return sum(map(len, self.queues[to_side]))

    def open_sides(self) -> list[int]:
        """
        :return: the sides whose protocol has not yet seen the connection
            lost.
        """
        return [end.side for end in self.ends if not end.closed]

    # -- internals -------------------------------------------------------------

    def _send(self, from_side: int, data: bytes) -> None:
        if self.closed or self.blackholed or not data:
            return
        to_side = 1 - from_side
        self.queues[to_side].append(data)
        self._schedule(to_side)
        writer = self.ends[from_side]
        if (
            writer.producer is not None
            and not writer.producer_paused
            and self.in_flight(to_side) > self.board.high_water
        ):
            writer.producer_paused = True
            writer.producer.pauseProducing()

    def _schedule(self, to_side: int) -> None:
        if self.calls[to_side] is None and self.queues[to_side] and not self.closed:
            self.calls[to_side] = self.clock.callLater(
                self.board.latency, self._deliver, to_side
            )

    def _deliver(self, to_side: int) -> None:
        self.calls[to_side] = None
        if self.closed or self.stalled[to_side]:
            return
        queue = self.queues[to_side]
        end = self.ends[to_side]
        protocol = end.protocol
        writer = self.ends[1 - to_side]
        assert protocol is not None
        chunks = self.board.chunks
        if chunks is not None and queue:
            pieces = chunks(b"".join(queue))
            queue[:] = pieces
        while queue and not (self.closed or end.closed or self.stalled[to_side]):
            data = queue.pop(0)
            self.bytes_delivered[to_side] += len(data)
            protocol.dataReceived(data)
        if (
            writer.producer is not None
            and writer.producer_paused
            and self.in_flight(to_side) <= self.board.high_water // 2
        ):
            writer.producer_paused = False
            writer.producer.resumeProducing()
        self._check_closing()

    def _close_when_flushed(
        self, side: int, waiting_for_producer: bool = False
    ) -> None:
        if not waiting_for_producer:
            self.closing.add(side)
        self._check_closing()

    def _check_closing(self) -> None:
        for side in sorted(self.closing):
            if not self.queues[1 - side] or self.blackholed:
                self.closing.discard(side)
                done = Failure(ConnectionDone("closed cleanly"))
                if self.severed:
                    self.clock.callLater(0, self._lose_side, side, done)
                else:
                    self.clock.callLater(0, self._lose, done, done)
                return

    def _abort(self, side: int) -> None:
        mine = Failure(ConnectionAborted("aborted"))
        if self.severed:
            self._lose_side(side, mine)
            return
        theirs = Failure(ConnectionLost("reset by peer"))
        self._lose(*((mine, theirs) if side == 0 else (theirs, mine)))

    def _lose_side(self, side: int, reason: Failure) -> None:
        """
        Only ``side`` learns that the connection is gone (it is severed).
        """
        end = self.ends[side]
        if end.closed:
            return
        end.closed = True
        end.producer = None
        call = self.calls[side]
        if call is not None and call.active():
            call.cancel()
        self.calls[side] = None
        self.queues[side].clear()
        if all(e.closed for e in self.ends):
            self.closed = True
            self.board._forget(self)
        assert end.protocol is not None
        end.protocol.connectionLost(reason)

    def _lose(self, client_reason: Failure, server_reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        for side, call in enumerate(self.calls):
            if call is not None and call.active():
                call.cancel()
            self.calls[side] = None
        for queue in self.queues:
            queue.clear()
        self.board._forget(self)
        for end, reason in zip(self.ends, (client_reason, server_reason), strict=True):
            if end.closed:
                continue
            end.closed = True
            end.producer = None
            assert end.protocol is not None
            end.protocol.connectionLost(reason)


@implementer(IListeningPort)
class _Port:
    def __init__(
        self, board: Switchboard, name: str, factory: IProtocolFactory
    ) -> None:
        self.board = board
        self.name = name
        self.factory = factory
        self.port = board._next_port()

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred[None]:
        if self.board.listeners.get(self.name) is self:
            del self.board.listeners[self.name]
            self.factory.doStop()
        return succeed(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


@implementer(IStreamServerEndpoint)
class MemoryServerEndpoint:
    """
    Listens on a name of a :class:`Switchboard`.
    """

    def __init__(self, board: Switchboard, name: str) -> None:
        self.board = board
        self.name = name

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self.name in self.board.listeners:
            return fail(OSError(f"address {self.name!r} in use"))
        port = _Port(self.board, self.name, factory)
        factory.doStart()
        self.board.listeners[self.name] = port
        return succeed(port)

    def __repr__(self) -> str:
        return f"<MemoryServerEndpoint {self.name!r}>"


@implementer(IStreamClientEndpoint)
class MemoryClientEndpoint:
    """
    Connects to a name of a :class:`Switchboard` (after ``latency``); a
    connection is refused if nothing listens on that name, and fails with
    ``NoRouteError`` if ``source`` and the name are partitioned.
    """

    def __init__(self, board: Switchboard, name: str, source: str | None) -> None:
        self.board = board
        self.name = name
        self.source = source

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        board = self.board
        board.attempts[self.name] = board.attempts.get(self.name, 0) + 1
        call = None

        def cancel(d: Deferred[IProtocol]) -> None:
            if call is not None and call.active():
                call.cancel()

        result: Deferred[IProtocol] = Deferred(cancel)

        def arrive() -> None:
            port = board.listeners.get(self.name)
            if self.source is not None and board.partitioned(self.source, self.name):
                result.errback(NoRouteError(self.name))
                return
            if port is None or board.refuse.get(self.name):
                result.errback(ConnectionRefusedError(self.name))
                return
            client_port = board._next_port()
            client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port.port))
            server = port.factory.buildProtocol(
                IPv4Address("TCP", "127.0.0.1", client_port)
            )
            assert client is not None and server is not None
            pipe = Pipe(
                board, client, server, client_port, port.port, (self.source, self.name)
            )
            board.pipes.append(pipe)
            server.makeConnection(pipe.ends[1])
            client.makeConnection(pipe.ends[0])
            result.callback(client)

        call = board.clock.callLater(board.latency, arrive)
        return result

    def __repr__(self) -> str:
        return f"<MemoryClientEndpoint {self.source!r}->{self.name!r}>"


class Switchboard:
    """
    Named in-memory addresses on one clock.

    :param latency: seconds a write (and a connection attempt) takes.
    :param high_water: bytes waiting for a reader beyond which the
        writer's producer is paused (resumed below half of it).
    :param chunks: if given, called with the bytes about to be delivered to
        one side at once, returns them split into the pieces to hand to
        ``dataReceived`` (to split and coalesce writes as TCP does).
    """

    def __init__(
        self,
        clock: IReactorTime,
        latency: float = 0.001,
        high_water: int = 256 * 1024,
        chunks: Callable[[bytes], list[bytes]] | None = None,
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.high_water = high_water
        self.chunks = chunks
        self.listeners: dict[str, _Port] = {}
        self.pipes: list[Pipe] = []
        self.refuse: dict[str, bool] = {}
        self.attempts: dict[str, int] = {}
        self._partitions: set[frozenset[str]] = set()
        self._ports = iter(range(40000, 60000))

    def _next_port(self) -> int:
        return next(self._ports)

    def _forget(self, pipe: Pipe) -> None:
        if pipe in self.pipes:
            self.pipes.remove(pipe)

    def server(self, name: str) -> MemoryServerEndpoint:
        return MemoryServerEndpoint(self, name)

    def client(self, name: str, source: str | None = None) -> MemoryClientEndpoint:
        """
        :param source: the name of the node that will connect with this
            endpoint (for partitions).
        """
        return MemoryClientEndpoint(self, name, source)

    def cut_all(self) -> int:
        pipes = list(self.pipes)
        for pipe in pipes:
            pipe.cut()
        return len(pipes)

    def partition(self, a: str, b: str) -> None:
        """
        Refuse connections between ``a`` and ``b`` (either way) until
        :meth:`heal`; connections already made are not touched.
        """
        self._partitions.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        self._partitions.discard(frozenset((a, b)))

    def partitioned(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._partitions

    def pipes_between(self, a: str, b: str) -> list[Pipe]:
        """
        :return: the open pipes between the nodes named ``a`` and ``b``.
        """
        pair = {a, b}
        return [pipe for pipe in self.pipes if set(pipe.names) == pair]


__all__ = [
    "MemoryClientEndpoint",
    "MemoryServerEndpoint",
    "Pipe",
    "PipeEnd",
    "Switchboard",
]
