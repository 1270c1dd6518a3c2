"""
A node's rows in the PostgreSQL store: its record (key and incarnation),
the keys of its peers (created with their lease and outbound rows in a
transaction of their own), and the state a node reads when it opens.
Used on the writer thread only.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import attr
from twisted.logger import Logger

from ilm._peerid import PeerId
from ilm._store import InboundRecord, OutboundRecord, StoredState, valid_incarnation
from ilm.backends._pg_connections import PostgresConnections
from ilm.backends._pg_schema import _Conn, migrate, rollback, store_error
from ilm.backends._pg_sql import Statements, decode_id, id_columns, id_value
from ilm.errors import StoreCorrupt, StoreError

__all__ = ["PostgresNode"]

log = Logger(namespace="ilm.backends.postgres")


@attr.s(slots=True, auto_attribs=True)
class _Loaded:
    state: StoredState
    keys: dict[PeerId, int]


class PostgresNode:
    """
    One logical node's rows in a PostgreSQL store.

    :param node_id: the node.
    :param schema: the PostgreSQL schema (migrated on :meth:`open`).
    :param sql: the statements for that schema.
    :param connections: the store's connections (the writer is used).
    """

    def __init__(
        self,
        node_id: PeerId,
        schema: str,
        sql: Statements,
        connections: PostgresConnections,
    ) -> None:
        self.node_id = node_id
        self.schema = schema
        self.sql = sql
        self.connections = connections
        self.schema_version = 0
        # Set by the writer thread when opening; read elsewhere afterwards.
        self.key = 0
        self.incarnation = ""
        # Owned by the writer thread: peer id -> key (keys never change).
        self.keys: dict[PeerId, int] = {}

    @property
    def where(self) -> str:
        return self.connections.where

    def open(self) -> StoredState:
        """Migrate the schema, find or create the node's row, read its state."""
        try:
            conn = self.connections.writer_conn()
            found, version = migrate(conn, self.schema)
            self.key, self.incarnation = self._node(conn)
            loaded = self._load(conn)
        except StoreError:
            raise
        except Exception as e:
            raise store_error(e, self.where, "cannot open") from e
        if found != version:
            log.info(
                "PostgreSQL store {schema} migrated from schema version {found} "
                "to {version}",
                schema=self.schema,
                found=found,
                version=version,
                ilm_event="store_migrated",
            )
        self.schema_version = version
        self.keys = loaded.keys
        return loaded.state

    def reload(self) -> StoredState:
        """Read the node's state again."""
        try:
            loaded = self._load(self.connections.writer_conn())
        except StoreError:
            raise
        except Exception as e:
            raise store_error(e, self.where, "cannot read") from e
        self.keys.update(loaded.keys)
        return loaded.state

    def _node(self, conn: _Conn) -> tuple[int, str]:
        """The node's key and incarnation, creating its row if needed."""
        int_id, str_id = id_columns(self.node_id)
        sql = self.sql
        conn.execute(sql.insert_node, (int_id, str_id, uuid.uuid4().hex))
        is_int = type(self.node_id) is int
        row = conn.execute(
            sql.select_node[is_int], (id_value(self.node_id),)
        ).fetchone()
        if row is None:
            raise StoreCorrupt(f"the record of node {self.node_id!r} vanished")
        key, incarnation = row
        if not valid_incarnation(incarnation):
            raise StoreCorrupt(f"the node's incarnation is bad: {incarnation!r}")
        return int(key), incarnation

    def _load(self, conn: _Conn) -> _Loaded:
        """
        Read everything of this node but the outbox, from one snapshot,
        checking each outbox's first and last position against its record.
        """
        sql = self.sql
        node = self.key
        conn.execute(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            ids = {
                key: decode_id(int_id, str_id)
                for key, int_id, str_id in conn.execute(sql.load_peers, (node,))
            }
            records = []
            for key, acked, last, pending, first, final in conn.execute(
                sql.load_outbound, (node,)
            ):
                if key not in ids or not 0 <= acked <= last or pending < 0:
                    raise StoreCorrupt(
                        f"bad outbound record {(key, acked, last, pending)!r}"
                    )
                expected = (acked + 1, last) if last > acked else (None, None)
                if (first, final if last > acked else None) != expected:
                    raise StoreCorrupt(
                        f"the outbox to {ids[key]!r} holds positions {first}..{final}, "
                        f"but its record says {acked + 1}..{last}"
                    )
                records.append(OutboundRecord(ids[key], acked, last, pending))
            marks = []
            for key, incarnation, delivered, retired in conn.execute(
                sql.load_inbound, (node,)
            ):
                if key not in ids or delivered < 0:
                    raise StoreCorrupt(f"bad delivery mark {(key, delivered)!r}")
                marks.append(InboundRecord(ids[key], incarnation, delivered, retired))
        finally:
            rollback(conn)
        return _Loaded(
            StoredState(self.incarnation, tuple(records), tuple(marks)),
            {peer_id: key for key, peer_id in ids.items()},
        )

    def ensure_keys(self, peer_ids: Iterable[PeerId]) -> dict[PeerId, int]:
        """
        The keys of ``peer_ids``, creating in their own transaction (with
        their lease and outbound rows) those that do not exist yet.
        """
        keys = self.keys
        missing = sorted(
            (p for p in set(peer_ids) if p not in keys),
            key=lambda p: (type(p) is str, p),  # one order for every gateway
        )
        if missing:
            sql = self.sql
            node = self.key

            def create(conn: _Conn) -> dict[PeerId, int]:
                self.connections.begin(conn)
                found: dict[PeerId, int] = {}
                for peer_id in missing:
                    columns = id_columns(peer_id)
                    row = conn.execute(sql.insert_peer, (node, *columns)).fetchone()
                    if row is None:  # another gateway created it first
                        row = conn.execute(
                            sql.select_peer[type(peer_id) is int],
                            (node, id_value(peer_id)),
                        ).fetchone()
                    if row is None:
                        raise StoreCorrupt(f"the key of peer {peer_id!r} vanished")
                    found[peer_id] = int(row[0])
                with conn.pipeline():
                    for statement in sql.insert_stream_rows:
                        with conn.cursor() as cursor:
                            cursor.executemany(
                                statement, [(node, key) for key in found.values()]
                            )
                return found

            keys.update(self.connections.interaction("cannot write to", create))
        return keys
