"""
Test helpers for the stream network: a frame receiver that records every
event, and a hand-driven raw peer.

The in-memory stream endpoints themselves (:class:`Switchboard`,
:class:`Pipe`) live in :mod:`ilm.simulation._pipes`, where the simulator
uses them too; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm import PeerId
from ilm.interfaces import IFrameReceiver
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
