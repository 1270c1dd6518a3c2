"""
Test helpers for the stream network: a frame receiver that records every
event, a hand-driven raw peer, and a raw peer that authenticates by hand
and then writes (tagged) link frames of its own choosing.

The in-memory stream endpoints themselves (:class:`Switchboard`,
:class:`Pipe`) live in :mod:`ilm.simulation._pipes`, where the simulator
uses them too; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm import PeerId
from ilm._peerid import id_order_key
from ilm.interfaces import IFrameReceiver
from ilm.network import PreSharedKeys, _wire
from ilm.network._handshake import LinkHandshake
from ilm.simulation._pipes import (
    MemoryClientEndpoint,
    MemoryServerEndpoint,
    Pipe,
    PipeEnd,
    Switchboard,
)

__all__ = [
    "MemoryClientEndpoint",
    "MemoryServerEndpoint",
    "Pipe",
    "PipeEnd",
    "RawLink",
    "RawPeer",
    "RecordingReceiver",
    "Switchboard",
]


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


class RawLink(RawPeer):
    """
    A raw peer that runs the link handshake by hand as node ``local``
    towards ``remote`` (with the key they share), sends LINK_UP if it has
    the smaller id, and then lets the test write link frames of its choice:
    :meth:`frame` and :meth:`data` tag them as the link requires (unless
    ``frame_integrity`` is off on both sides).  Frames received once
    authenticated are checked and collected in :attr:`frames`.

    :ivar authenticated: fires once the handshake is done (and LINK_UP
        sent when this side decides).
    :ivar answer_pings: whether PINGs are answered (as a live peer does).
    """

    def __init__(
        self,
        local: PeerId,
        remote: PeerId,
        key: bytes,
        *,
        frame_integrity: bool = True,
    ) -> None:
        super().__init__()
        self.local = local
        self.remote = remote
        self.handshake = LinkHandshake(
            local,
            remote,
            keys=PreSharedKeys({remote: key}),
            certificates=False,
            frame_integrity=frame_integrity,
        )
        self._parser = _wire.FrameParser(1 << 22)
        self._sealer: _wire.FrameSealer | None = None
        self.frames: list[tuple[int, bytes]] = []
        self.authenticated: Deferred[RawLink] = Deferred()
        self.answer_pings = True

    def connectionMade(self) -> None:
        assert self.transport is not None
        for frame in self.handshake.start():
            self.transport.write(frame)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._parser.feed(data)
        while (frame := self._parser.next_frame()) is not None:
            kind, body = frame
            if self.handshake.done:
                self.frames.append((kind, body))
                if kind == _wire.LINK_PING and self.answer_pings:
                    assert self.transport is not None
                    self.transport.write(self.frame(_wire.LINK_PONG, body))
                continue
            assert self.transport is not None
            for reply in self.handshake.receive(kind, body, lambda: self.remote):
                self.transport.write(reply)
            if self.handshake.done:
                keys = self.handshake.frame_keys
                if keys is not None:
                    self._sealer = _wire.FrameSealer(keys[0])
                    self._parser.opener = _wire.FrameOpener(keys[1])
                if id_order_key(self.local) < id_order_key(self.remote):
                    self.transport.write(self.frame(_wire.LINK_UP))
                self.authenticated.callback(self)

    def frame(self, kind: int, body: bytes = b"") -> bytes:
        """
        :return: the next link frame as this link sends it (tagged if the
            link is); write it next, or the tags of later frames fail.
        """
        if self._sealer is not None:
            return self._sealer.seal(kind, body)
        return _wire.encode_frame(kind, body)

    def data(self, session_frame: bytes) -> bytes:
        """
        :return: a DATA link frame carrying ``session_frame``.
        """
        return self.frame(_wire.CARRY, session_frame)

    def send(self, *frames: bytes) -> None:
        """
        Write link frames (made with :meth:`frame` or :meth:`data`, or raw
        bytes).
        """
        assert self.transport is not None
        self.transport.writeSequence(list(frames))

    def kinds(self) -> list[int]:
        return [kind for kind, _ in self.frames]
