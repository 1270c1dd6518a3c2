"""
In-memory stream endpoints for testing the stream network on a ``Clock``.

A :class:`Switchboard` hands out server and client endpoints by name; a
connection is a :class:`Pipe` whose two ends are transports that carry
bytes through the clock (``latency`` seconds per write).  Unlike
``twisted.test.iosim``, a pipe can lose what is in flight: :meth:`Pipe.cut`
drops it and tells both sides the connection was lost, and
:meth:`Pipe.blackhole` drops everything silently (a half-open
connection).  A stalled reader makes the writer's transport pause its
producer, like a full TCP send buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import (
    IConsumer,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm import PeerId
from ilm.interfaces import IFrameReceiver


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

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.closed or self.disconnecting:
            return
        if self.producer is not None:
            # Like a real transport: a registered producer keeps it open.
            self.disconnecting = True
            self.pipe._close_when_flushed(self.side, waiting_for_producer=True)
            return
        self.disconnecting = True
        self.pipe._close_when_flushed(self.side)

    def abortConnection(self) -> None:
        if self.closed:
            return
        self.pipe._abort(self.side)

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer

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
    A connection between two protocols, carried through a ``Clock``.
    """

    def __init__(
        self,
        board: Switchboard,
        client: IProtocol,
        server: IProtocol,
        client_port: int,
        server_port: int,
    ) -> None:
        self.board = board
        self.clock = board.clock
        self.ends = (
            PipeEnd(self, 0, client_port, server_port),
            PipeEnd(self, 1, server_port, client_port),
        )
        self.ends[0].protocol = client
        self.ends[1].protocol = server
        self.queues: tuple[list[bytes], list[bytes]] = ([], [])
        self.calls: list[Any] = [None, None]
        self.stalled = [False, False]
        self.blackholed = False
        self.closed = False
        self.bytes_delivered = [0, 0]
        self.closing: set[int] = set()

    # -- controls ------------------------------------------------------------

    def cut(self) -> None:
        """
        Lose everything in flight; both sides see the connection lost.
        """
        self._lose(Failure(ConnectionLost("cut")), Failure(ConnectionLost("cut")))

    def blackhole(self) -> None:
        """
        From now on, lose every byte in both directions and report nothing
        (a half-open connection).
        """
        self.blackholed = True
        for queue in self.queues:
            queue.clear()

    def stall(self, side: int, stalled: bool = True) -> None:
        """
        Stop (or restart) delivering bytes to ``side``.
        """
        self.stalled[side] = stalled
        if not stalled:
            self._schedule(side)

    def in_flight(self, to_side: int) -> int:
        return sum(map(len, self.queues[to_side]))

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
        protocol = self.ends[to_side].protocol
        writer = self.ends[1 - to_side]
        while queue and not self.closed and not self.stalled[to_side]:
            data = queue.pop(0)
            self.bytes_delivered[to_side] += len(data)
            assert protocol is not None
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
        for side in list(self.closing):
            if not self.queues[1 - side] or self.blackholed:
                self.closing.discard(side)
                done = Failure(ConnectionDone("closed cleanly"))
                self.clock.callLater(0, self._lose, done, done)
                return

    def _abort(self, side: int) -> None:
        mine = Failure(ConnectionAborted("aborted"))
        theirs = Failure(ConnectionLost("reset by peer"))
        self._lose(*((mine, theirs) if side == 0 else (theirs, mine)))

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
        for end, reason in zip(self.ends, (client_reason, server_reason), strict=True):
            end.closed = True
            end.producer = None
            assert end.protocol is not None
            end.protocol.connectionLost(reason)
        self.board.pipes.remove(self)


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


@implementer(IStreamClientEndpoint)
class MemoryClientEndpoint:
    def __init__(self, board: Switchboard, name: str) -> None:
        self.board = board
        self.name = name

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
            if port is None or board.refuse.get(self.name):
                result.errback(ConnectionRefusedError(self.name))
                return
            client_port = board._next_port()
            client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port.port))
            server = port.factory.buildProtocol(
                IPv4Address("TCP", "127.0.0.1", client_port)
            )
            assert client is not None and server is not None
            pipe = Pipe(board, client, server, client_port, port.port)
            board.pipes.append(pipe)
            server.makeConnection(pipe.ends[1])
            client.makeConnection(pipe.ends[0])
            result.callback(client)

        call = board.clock.callLater(board.latency, arrive)
        return result


class Switchboard:
    """
    Named in-memory addresses on one ``Clock``.
    """

    def __init__(
        self, clock: Clock, latency: float = 0.001, high_water: int = 256 * 1024
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.high_water = high_water
        self.listeners: dict[str, _Port] = {}
        self.pipes: list[Pipe] = []
        self.refuse: dict[str, bool] = {}
        self.attempts: dict[str, int] = {}
        self._ports = iter(range(40000, 60000))

    def _next_port(self) -> int:
        return next(self._ports)

    def server(self, name: str) -> MemoryServerEndpoint:
        return MemoryServerEndpoint(self, name)

    def client(self, name: str) -> MemoryClientEndpoint:
        return MemoryClientEndpoint(self, name)

    def cut_all(self) -> int:
        pipes = list(self.pipes)
        for pipe in pipes:
            pipe.cut()
        return len(pipes)


@implementer(IFrameReceiver)
class RecordingReceiver:
    """
    An :class:`IFrameReceiver` that records every event, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.frames: dict[PeerId, list[bytes]] = {}
        self.on_frame: Callable[[PeerId, bytes], None] | None = None

    def link_established(self, peer_id: PeerId) -> None:
        self.events.append(("established", peer_id))

    def link_lost(self, peer_id: PeerId, reason: Failure) -> None:
        self.events.append(("lost", peer_id, reason))

    def frame_received(self, peer_id: PeerId, frame: bytes) -> None:
        self.events.append(("frame", peer_id, frame))
        self.frames.setdefault(peer_id, []).append(frame)
        if self.on_frame is not None:
            self.on_frame(peer_id, frame)

    def link_paused(self, peer_id: PeerId) -> None:
        self.events.append(("paused", peer_id))

    def link_resumed(self, peer_id: PeerId) -> None:
        self.events.append(("resumed", peer_id))

    def kinds(self, peer_id: PeerId | None = None) -> list[str]:
        return [
            event[0] for event in self.events if peer_id is None or event[1] == peer_id
        ]

    def lost_reasons(self) -> list[Failure]:
        return [event[2] for event in self.events if event[0] == "lost"]


class RawPeer(Protocol):
    """
    A hand-driven peer: records what it receives, writes what it is told.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason
