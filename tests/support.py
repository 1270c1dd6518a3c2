"""
Shared fixtures for the messenger tests: a cluster of ILM nodes on one
``Clock`` and one in-memory network, with crash, restart and store loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ilm import ILM, Config, Message, PeerId
from ilm.testing import (
    InMemoryBackend,
    InMemoryNetwork,
    InMemoryStorage,
    advance_until,
    crash,
)


class Recorder:
    """
    A delivery target that records what it is given, and can be told to fail.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.failures_left = 0
        self.fail_from: dict[PeerId, int] = {}
        self.attempts = 0
        self.hold: Deferred[None] | None = None

    def __call__(self, message: Message) -> Deferred[None] | None:
        self.attempts += 1
        if self.failures_left or self.fail_from.get(message.source_id):
            if self.fail_from.get(message.source_id):
                self.fail_from[message.source_id] -= 1
            else:
                self.failures_left -= 1
            raise RuntimeError(f"delivery target refused message {message.message_id}")
        if self.hold is not None:
            hold = self.hold

            def taken(_: object) -> None:
                self.messages.append(message)

            return hold.addCallback(taken)
        self.messages.append(message)
        return None

    def from_peer(self, peer_id: PeerId) -> list[bytes]:
        return [m.contents for m in self.messages if m.source_id == peer_id]

    def ids_from(self, peer_id: PeerId) -> list[int]:
        return [m.message_id for m in self.messages if m.source_id == peer_id]


class Cluster:
    """
    Several ILM nodes on one ``Clock`` and ``InMemoryNetwork``.
    """

    def __init__(self, config: Config | None = None, **network: Any) -> None:
        self.clock = Clock()
        self.network = InMemoryNetwork(self.clock, **network)
        self.config = config or Config()
        self.storages: dict[PeerId, InMemoryStorage] = {}
        self.recorders: dict[PeerId, Recorder] = {}
        self.nodes: dict[PeerId, ILM] = {}
        self.backends: dict[PeerId, InMemoryBackend] = {}

    def start(self, peer_id: PeerId, backend: Any = None) -> ILM:
        storage = self.storages.setdefault(peer_id, InMemoryStorage())
        recorder = self.recorders.setdefault(peer_id, Recorder())
        if backend is None:
            backend = InMemoryBackend(storage)
        self.backends[peer_id] = backend
        node = ILM(
            backend,
            recorder,
            self.network.add_peer(peer_id),
            config=self.config,
            clock=self.clock,
        )
        node.startService()
        self.nodes[peer_id] = node
        self.clock.advance(0)
        return node

    def crash(self, peer_id: PeerId) -> None:
        crash(self.nodes.pop(peer_id), self.network)

    def lose_store(self, peer_id: PeerId) -> None:
        self.storages[peer_id] = InMemoryStorage()

    def run_until(
        self, predicate: Callable[[], object], timeout: float = 600.0
    ) -> float:
        return advance_until(self.clock, predicate, timeout)

    def received(self, receiver: PeerId, sender: PeerId) -> list[bytes]:
        return self.recorders[receiver].from_peer(sender)

    def outbox(self, sender: PeerId, receiver: PeerId) -> list[bytes]:
        return self.storages[sender].pending(receiver)


def numbered(count: int, start: int = 0, prefix: bytes = b"m") -> list[bytes]:
    return [prefix + b"%d" % i for i in range(start, start + count)]
