"""
The commit path of the PostgreSQL store (on the writer thread): one
``READ COMMITTED`` transaction per batch in two round trips.  One pipeline
holds every statement (the lease checks under ``FOR SHARE``; per peer, one
statement that locks the stream's row, moves its end and inserts all its
new messages from one ``bytea`` array; one per acknowledgement; the
marks), whose results are checked before the second, ``COMMIT``.  The
server assigns positions under the row lock, so nothing is read before it
is written.  A failure *of* ``COMMIT`` is
:class:`ilm.errors.StoreInDoubt`: the store then refuses commits until it
is opened again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ilm._peerid import PeerId
from ilm._store import StoreBatch, batch_problems, retirement_order
from ilm.backends._lifecycle import StoreLifecycle
from ilm.backends._ownership import Fenced
from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_leases import PostgresLeases
from ilm.backends._pg_node import PostgresNode
from ilm.backends._pg_schema import _Conn
from ilm.backends._pg_sql import encode_hint
from ilm.errors import StoreCorrupt, StoreError

__all__ = ["PostgresCommitter", "check_batch_entries"]

_INSERT_CHUNK_BYTES = 16 * 1024 * 1024
"""New messages are sent in arrays of at most this many content bytes."""

Applied = tuple[dict[PeerId, int], dict[PeerId, tuple[int, int]]]
"""What a commit did: the bytes released and the positions given, per peer."""


def check_batch_entries(batch: StoreBatch, *, check_first: bool = True) -> None:
    """
    Refuse a batch that no store could hold, whatever it holds
    (:func:`ilm._store.batch_problems`), before anything is sent to the
    database.

    :param check_first: whether ``messages`` entries carry a first position
        to check (``commit``); ``commit_shared`` ignores it.
    :raises StoreError: naming the first bad entry.
    """
    problems = batch_problems(batch, positions=check_first)
    for peer_id, (_first, contents) in batch.messages.items():
        # psycopg would store a str as text in a bytea column.
        if not isinstance(contents, list) or not all(
            type(c) is bytes for c in contents
        ):
            problems.setdefault(peer_id, "messages that are not a list of bytes")
    if problems:
        peer_id, problem = next(iter(problems.items()))
        raise StoreError(
            f"batch refused: {problem} for peer {peer_id!r} cannot be stored"
        )


def _chunks(contents: list[bytes]) -> Iterable[list[bytes]]:
    """``contents`` in runs of at most :data:`_INSERT_CHUNK_BYTES` bytes."""
    start = size = 0
    for i, item in enumerate(contents):
        if size and size + len(item) > _INSERT_CHUNK_BYTES:
            yield contents[start:i]
            start, size = i, 0
        size += len(item)
    if start < len(contents):
        yield contents[start:]


class PostgresCommitter:
    """
    Applies batches to one node's PostgreSQL store, fenced by the leases
    this gateway holds.

    :param channel: the ``NOTIFY`` channel of append hints.
    :param life: the store's state (refuses commits after a failed
        ``COMMIT``).
    """

    def __init__(
        self,
        node: PostgresNode,
        connections: PostgresConnections,
        leases: PostgresLeases,
        life: StoreLifecycle,
        *,
        gateway: str,
        channel: str,
    ) -> None:
        self.node = node
        self.connections = connections
        self.leases = leases
        self.life = life
        self.gateway = gateway
        self.channel = channel

    def commit(self, batch: StoreBatch, shared: bool) -> Applied:
        """
        Apply ``batch``: :return: the bytes released and the positions given,
        per peer.
        """
        self.life.check_unbroken()
        check_batch_entries(batch, check_first=not shared)
        peers = [
            *batch.messages,
            *batch.acked,
            *(p for p, _ in batch.delivered),
            *(p for p, _ in batch.retired),
            *(p for p, _ in batch.forgotten),
        ]
        if not peers:
            return {}, {}
        keys = self.node.ensure_keys(peers)
        epoch = self.leases.epoch
        expected: dict[int, tuple[PeerId, int]] = {}
        for peer_id in (
            *batch.acked,
            *(p for p, _ in batch.delivered),
            *(p for p, _ in batch.retired),
            *(p for p, _ in batch.forgotten),
        ):
            expected[keys[peer_id]] = (peer_id, epoch(peer_id))
        fenced = sorted(expected)
        outbound = sorted({keys[p]: p for p in (*batch.messages, *batch.acked)}.items())
        sql = self.node.sql
        node = self.node.key

        def body(conn: _Conn) -> Applied:
            appended: list[tuple[PeerId, int, int, Any]] = []
            acknowledged: list[tuple[PeerId, int, Any]] = []
            with conn.pipeline():
                self.connections.begin(conn)
                # Stream rows are locked in key order, by every gateway.
                for key, peer_id in outbound:
                    if peer_id in batch.messages:
                        first, contents = batch.messages[peer_id]
                        for chunk in _chunks(contents) if contents else [contents]:
                            values = {
                                "n": node,
                                "k": key,
                                "count": len(chunk),
                                "bytes": sum(map(len, chunk)),
                                "contents": chunk,
                                "channel": self.channel,
                                "hint": self._hint(peer_id) if chunk else "",
                                "gateway": self.gateway,
                            }
                            cursor = conn.execute(sql.append, values)
                            appended.append((peer_id, first, len(chunk), cursor))
                    if peer_id in batch.acked:
                        values = {"n": node, "k": key, "new": batch.acked[peer_id]}
                        cursor = conn.execute(sql.acknowledge, values)
                        acknowledged.append((peer_id, batch.acked[peer_id], cursor))
                self._bookkeeping(conn, batch, keys)
                # The lease rows last, right before the pipeline's sync: a
                # gateway stopped while sending the pipeline (a large batch
                # goes out in several writes) then holds no lease row lock,
                # which no server timeout would release (the session is not
                # idle in a transaction until the sync).  Fencing holds in
                # any order: the epochs are checked before COMMIT, under
                # the share lock that a take-over waits for.
                leases = (
                    conn.execute(sql.lock_leases, (node, fenced)) if fenced else None
                )
                lease_rows = leases.fetchall() if leases is not None else []
                bases = [(p, f, n, c.fetchone()) for p, f, n, c in appended]
                acks = [(p, a, c.fetchone()) for p, a, c in acknowledged]
            # Everything is written but not committed: check it.
            lost: dict[PeerId, tuple[int, str | None]] = {}
            for key, epoch, owner in lease_rows:
                peer_id, want = expected[key]
                if epoch != want or (want and owner != self.gateway):
                    lost[peer_id] = (epoch, owner)
            if lost:
                raise Fenced(lost)
            if len(lease_rows) != len(fenced):
                raise StoreCorrupt("a stream's lease row is missing")
            return self._check_writes(bases, acks, shared)

        def doubt(error: StoreError) -> StoreError:
            return self.life.in_doubt(error)

        try:
            return self.connections.interaction(
                "cannot commit to", body, in_doubt=doubt
            )
        except Fenced as e:
            self.leases.drop(e.streams)
            raise

    def _bookkeeping(
        self, conn: _Conn, batch: StoreBatch, keys: Mapping[PeerId, int]
    ) -> None:
        """
        Queue the forgotten records, delivery marks and retirements of
        ``batch``, in that order (see :class:`ilm.StoreBatch`).
        """
        sql = self.node.sql
        node = self.node.key
        if batch.forgotten:
            with conn.cursor() as cursor:
                cursor.executemany(
                    sql.forget,
                    sorted(
                        (node, keys[peer_id], incarnation)
                        for peer_id, incarnation in batch.forgotten
                    ),
                )
        if batch.delivered:
            with conn.cursor() as cursor:
                cursor.executemany(
                    sql.mark,
                    sorted(
                        (node, keys[peer_id], incarnation, position)
                        for (peer_id, incarnation), position in batch.delivered.items()
                    ),
                )
        if batch.retired:
            with conn.cursor() as cursor:
                cursor.executemany(
                    sql.retire,
                    [
                        (node, keys[peer_id], incarnation)
                        for peer_id, incarnation in sorted(
                            batch.retired, key=retirement_order
                        )
                    ],
                )

    @staticmethod
    def _check_writes(
        bases: list[tuple[PeerId, int, int, Any]],
        acks: list[tuple[PeerId, int, Any]],
        shared: bool,
    ) -> Applied:
        """
        Check what the server reported of a commit's writes, before
        ``COMMIT``: each peer's messages went right after its last position
        (unless ``shared``), no acknowledgement goes beyond what is stored.
        :return: the bytes released and the positions given, per peer.
        """
        positions: dict[PeerId, tuple[int, int]] = {}
        for peer_id, first, count, row in bases:
            if row is None:
                raise StoreCorrupt(f"the outbound row of {peer_id!r} is missing")
            base = row[0]
            if peer_id in positions:  # a further chunk
                start, _ = positions[peer_id]
                positions[peer_id] = (start, base + count)
                continue
            if not shared and first != base + 1:
                raise StoreError(
                    f"outbox to {peer_id!r}: batch starts at {first}, "
                    f"store ends at {base}"
                )
            positions[peer_id] = (base + 1, base + count)
        released: dict[PeerId, int] = {}
        for peer_id, position, row in acks:
            if row is None:
                raise StoreCorrupt(f"the outbound row of {peer_id!r} is missing")
            acked, last, freed = row
            if position > last:
                raise StoreError(
                    f"outbox to {peer_id!r}: acknowledgement {position} beyond {last}"
                )
            if position > acked:
                released[peer_id] = int(freed)
        return released, {p: r for p, r in positions.items() if r[1] >= r[0]}

    def _hint(self, peer_id: PeerId) -> str:
        return f"{self.node.key}:{encode_hint(peer_id)}"
