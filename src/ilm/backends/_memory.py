"""
An :class:`ilm.interfaces.IBackend` that keeps everything in memory.

"Durable" here means: for as long as the :class:`InMemoryStorage` object
lives.  A new :class:`InMemoryBackend` over the same storage sees exactly what
was committed, which is how tests and the simulator restart a node; a new
storage is a node that lost its store.
"""

from __future__ import annotations

import uuid

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ilm._peerid import PeerId
from ilm._store import (
    CommitResult,
    InboundRecord,
    OutboundRecord,
    StoreBatch,
    StoredState,
    check_batch,
    retirement_order,
    within_bytes,
)
from ilm.errors import StoreError
from ilm.interfaces import IBackend


class _Outbox:
    __slots__ = ("acked", "buf", "bytes", "head", "last")

    def __init__(self) -> None:
        self.acked = 0
        self.last = 0
        self.buf: list[bytes] = []
        self.head = 0
        self.bytes = 0


class InMemoryStorage:
    """
    The committed state of one in-memory store.
    """

    def __init__(self) -> None:
        self.incarnation: str | None = None
        self.outboxes: dict[PeerId, _Outbox] = {}
        self.inbound: dict[tuple[PeerId, str], InboundRecord] = {}
        self.commits = 0

    def pending(self, peer_id: PeerId) -> list[bytes]:
        """
        :return: the contents still in the outbox to ``peer_id``, in order.
        """
        box = self.outboxes.get(peer_id)
        return [] if box is None else box.buf[box.head :]

    def state(self) -> StoredState:
        if self.incarnation is None:
            self.incarnation = uuid.uuid4().hex
        return StoredState(
            incarnation=self.incarnation,
            outbound=tuple(
                OutboundRecord(peer_id, box.acked, box.last, box.bytes)
                for peer_id, box in self.outboxes.items()
            ),
            inbound=tuple(self.inbound.values()),
        )

    def apply(self, batch: StoreBatch) -> CommitResult:
        """
        Check, then apply, a batch atomically.

        :raises StoreError: if the batch breaks the store's invariants
            (nothing is applied).
        """
        outboxes = self.outboxes

        def last_position(peer_id: PeerId) -> int:
            box = outboxes.get(peer_id)
            return box.last if box is not None else 0

        check_batch(batch, last_position)
        for peer_id, (_first, contents) in batch.messages.items():
            box = outboxes.get(peer_id)
            if box is None:
                box = outboxes[peer_id] = _Outbox()
            box.buf.extend(contents)
            box.last += len(contents)
            box.bytes += sum(map(len, contents))
        released: dict[PeerId, int] = {}
        for peer_id, position in batch.acked.items():
            box = outboxes.get(peer_id)
            if box is None:
                box = outboxes[peer_id] = _Outbox()
            if position <= box.acked:
                continue
            count = position - box.acked
            head = box.head
            freed = sum(map(len, box.buf[head : head + count]))
            box.head = head + count
            if box.head > 4096 and box.head * 2 > len(box.buf):
                del box.buf[: box.head]
                box.head = 0
            box.acked = position
            box.bytes -= freed
            released[peer_id] = freed
        inbound = self.inbound
        for key in batch.forgotten:
            inbound.pop(key, None)
        for (peer_id, incarnation), delivered in batch.delivered.items():
            old = inbound.get((peer_id, incarnation))
            if old is None:
                inbound[(peer_id, incarnation)] = InboundRecord(
                    peer_id, incarnation, delivered
                )
            elif delivered > old.delivered:
                inbound[(peer_id, incarnation)] = InboundRecord(
                    peer_id, incarnation, delivered, old.retired
                )
        for peer_id, incarnation in sorted(batch.retired, key=retirement_order):
            old = inbound.get((peer_id, incarnation))
            if old is not None and old.retired:
                continue
            # Moved to the end: the dict keeps the order of retirements.
            inbound.pop((peer_id, incarnation), None)
            inbound[(peer_id, incarnation)] = InboundRecord(
                peer_id, incarnation, old.delivered if old is not None else 0, True
            )
        self.commits += 1
        return CommitResult(released)

    def read(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> list[bytes]:
        box = self.outboxes.get(peer_id)
        if box is None:
            return []
        if after < box.acked:
            raise StoreError(
                f"outbox to {peer_id!r}: read after {after}, "
                f"below acknowledged {box.acked}"
            )
        start = box.head + (after - box.acked)
        return within_bytes(box.buf[start : start + limit], max_bytes)


@implementer(IBackend)
class InMemoryBackend:
    """
    A backend that keeps its state in an :class:`InMemoryStorage`.

    :param storage: the storage to use; a new, empty one if omitted.  Pass
        the storage of a previous backend to "restart" with what it
        committed.
    """

    def __init__(self, storage: InMemoryStorage | None = None) -> None:
        self.storage = storage if storage is not None else InMemoryStorage()
        self.closed = False

    def open(self) -> Deferred[StoredState]:
        self.closed = False
        return succeed(self.storage.state())

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        if self.closed:
            return fail(StoreError("the store is closed"))
        try:
            return succeed(self.storage.apply(batch))
        except StoreError:
            return fail()

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        if self.closed:
            return fail(StoreError("the store is closed"))
        try:
            return succeed(self.storage.read(peer_id, after, limit, max_bytes))
        except StoreError:
            return fail()

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)
