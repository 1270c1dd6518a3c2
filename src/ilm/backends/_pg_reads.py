"""
Reads of the PostgreSQL store (on the reader thread, each one read-only
snapshot): runs of an outbox for transmission, a stream's committed
outbound record, and the streams no live lease covers.  Not fenced: any
gateway may read.
"""

from __future__ import annotations

from collections.abc import Iterable

from ilm._peerid import PeerId, check_peer_id
from ilm._store import MAX_POSITION, OutboundRecord
from ilm.backends._lifecycle import check_read_after, checked_run
from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_node import PostgresNode
from ilm.backends._pg_schema import _Conn
from ilm.backends._pg_sql import decode_id, id_columns, id_value
from ilm.errors import ILMError, StoreError

__all__ = ["PostgresReads", "checked_peer_id", "read_problem"]


def checked_peer_id(peer_id: object) -> PeerId:
    """:raises StoreError: if ``peer_id`` is not a peer id."""
    try:
        checked = check_peer_id(peer_id)
    except (TypeError, ILMError) as e:
        raise StoreError(f"invalid peer id {peer_id!r}: {e}") from e
    return checked


def read_problem(after: object, limit: object, max_bytes: object) -> str | None:
    """What is wrong with the arguments of a read, or ``None``."""
    if not (type(after) is int and 0 <= after <= MAX_POSITION):
        return f"after {after!r}"
    if type(limit) is not int or limit < 0:
        return f"limit {limit!r}"
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        return f"max_bytes {max_bytes!r}"
    return None


class PostgresReads:
    """The reads of one node's PostgreSQL store."""

    def __init__(self, node: PostgresNode, connections: PostgresConnections) -> None:
        self.node = node
        self.connections = connections

    def _read_key(self, conn: _Conn, peer_id: PeerId) -> tuple[int, int] | None:
        """The key and acked position of ``peer_id``'s recorded stream."""
        row = conn.execute(
            self.node.sql.read_acked[type(peer_id) is int],
            (self.node.key, id_value(peer_id)),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def read(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int | None
    ) -> list[bytes]:
        peer_id = checked_peer_id(peer_id)
        if limit == 0:
            return []
        sql = self.node.sql

        def body(conn: _Conn) -> list[tuple[int, bytes]]:
            conn.execute(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            found = self._read_key(conn, peer_id)
            if found is None:
                return []
            key, acked = found
            check_read_after(peer_id, after, acked)
            if max_bytes is None:
                return conn.execute(
                    sql.read_outbox, (self.node.key, key, after, limit)
                ).fetchall()
            return conn.execute(
                sql.read_outbox_bytes,
                (self.node.key, key, after, limit, max_bytes),
            ).fetchall()

        return checked_run(peer_id, after, self.connections.reading(body))

    def outbound_state(self, peer_id: PeerId) -> OutboundRecord | None:
        peer_id = checked_peer_id(peer_id)
        row = self.connections.reading(
            lambda conn: conn.execute(
                self.node.sql.outbound_of[type(peer_id) is int],
                (self.node.key, id_value(peer_id)),
            ).fetchone()
        )
        return None if row is None else OutboundRecord(peer_id, *row)

    def claimable(self, limit: int, peers: Iterable[PeerId] = ()) -> list[PeerId]:
        ints: list[int] = []
        strs: list[bytes] = []
        for peer_id in peers:
            int_id, str_id = id_columns(peer_id)
            if int_id is not None:
                ints.append(int_id)
            elif str_id is not None:
                strs.append(str_id)
        rows = self.connections.reading(
            lambda conn: conn.execute(
                self.node.sql.claimable, (self.node.key, ints, strs, limit)
            ).fetchall()
        )
        return [decode_id(int_id, str_id) for int_id, str_id in rows]
