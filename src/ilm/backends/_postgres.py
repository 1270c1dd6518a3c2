"""
An :class:`ilm.interfaces.IBackend` that keeps a node's state in PostgreSQL,
shared by every gateway process of that node, with leases and fencing
(:class:`ilm.backends.IStreamOwnership`).

- Driver: psycopg 3 (synchronous API) on dedicated Twisted thread pools: one
  writer thread and connection (commits, leases), one reader thread and
  connection (outbox reads), and, if :meth:`PostgresBackend.watch` is used,
  one listening connection read by the reactor (``LISTEN``, hints only).
- Every commit is one ``READ COMMITTED`` transaction in two round trips:
  one pipeline holding every statement (the lease checks under ``FOR
  SHARE``; per peer, one statement that locks the stream's row, moves its
  end and inserts all its new messages from one ``bytea`` array; one per
  acknowledgement; the marks), whose results are checked before the
  second, ``COMMIT``.  The server assigns positions under the row lock, so
  nothing is read before it is written.  Serialization failures and
  deadlocks (SQLSTATE 40001, 40P01) before ``COMMIT`` are retried a
  bounded number of times.  A failure *of* ``COMMIT`` (a lost connection,
  an error) is :class:`ilm.errors.StoreInDoubt`: the backend then refuses
  commits until it is opened again.
- Schema: a PostgreSQL schema (``ilm`` by default) holding versioned
  tables, migrated in one transaction under a transaction-level advisory
  lock.  Several logical nodes may share it: every table is keyed by the
  node first.

docs/scaling.md explains the design, the failure cases and the figures.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attr
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._logging import EventLimiter
from ilm._peerid import MAX_INT_ID, PeerId, check_peer_id, id_bytes, id_from_bytes
from ilm._store import (
    CommitResult,
    InboundRecord,
    OutboundRecord,
    StoreBatch,
    StoredState,
    batch_problems,
    retirement_order,
)
from ilm.backends._ownership import (
    Fenced,
    IStreamOwnership,
    LeaseHeld,
    Renewal,
    SharedCommitResult,
    StreamTaken,
)
from ilm.backends._threads import StoreThreads
from ilm.errors import (
    ILMError,
    InvalidPeerId,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreInDoubt,
    StoreLocked,
    StoreReadOnly,
    StoreSchemaTooNew,
)
from ilm.interfaces import IBackend

try:
    import psycopg
    from psycopg import sql as _sql
except ImportError:  # pragma: no cover - the "postgres" extra is not installed
    psycopg = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from psycopg import Connection

    _Conn = Connection[tuple[Any, ...]]
else:
    _Conn = Any

log = Logger(namespace="ilm.backends.postgres")

_T = TypeVar("_T")

SCHEMA_VERSION = 1
"""The schema version this version of ILM writes."""

APPLICATION = "ILM1"
"""What ``ilm_schema.application`` holds in an ILM schema."""

_LOCK_CLASS = 0x494C4D31
"""First key of the advisory lock that serialises migrations ("ILM1")."""

MAX_POSITION = 2**63 - 1
"""The highest position a store holds (``bigint``)."""

RETRIED_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure and deadlock: the transaction is run again."""

_INCARNATION = re.compile(r"[0-9a-f]{32}")

_INSERT_CHUNK_BYTES = 16 * 1024 * 1024
"""New messages are sent in arrays of at most this many content bytes."""


# -- schema and migrations -----------------------------------------------------

Migration = Callable[[_Conn, str], None]
"""A step from schema version ``v`` to ``v + 1``: ``step(conn, schema)``
where ``schema`` is the quoted schema name, run inside the migration
transaction."""


def _create_v1(conn: _Conn, s: str) -> None:
    """
    Version 0 (an empty schema) to 1: create the tables.

    - ``ilm_schema``: one row, the application marker and schema version.
    - ``node``: a small key per logical node id, and its incarnation.  An
      ``int`` id is ``int_id``, a ``str`` id its UTF-8 bytes in ``str_id``
      (exactly one is set), so ``1`` and ``"1"`` stay different nodes.
    - ``peer``: a key per (node, peer id), peer ids stored as node ids are.
      Created with the peer's ``lease`` and ``outbound`` rows, in a
      transaction of its own, so that every later transaction finds the
      rows it must lock.
    - ``lease``: per stream, the owning gateway, the epoch and the expiry.
    - ``outbound``: per stream, ``acked``, ``last_position`` and
      ``pending_bytes``; ``recorded`` says whether a message or
      acknowledgement was ever stored (what ``open`` reports).
    - ``outbox``: each message not yet acknowledged, keyed by (node, peer,
      position), with the time of the commit that stored it.  No foreign
      key: it would cost a trigger call per stored message.
    - ``inbound``: the delivery mark per (node, peer, incarnation) and
      whether that incarnation is retired.
    """
    ids = (
        "int_id bigint CHECK (int_id >= 0), "
        "str_id bytea CHECK (octet_length(str_id) BETWEEN 1 AND 255), "
        "CHECK ((int_id IS NULL) <> (str_id IS NULL))"
    )
    statements = [
        "CREATE TABLE {s}.ilm_schema (application text NOT NULL, "
        "version integer NOT NULL)",
        "CREATE TABLE {s}.node ("
        " node_key integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " incarnation text NOT NULL CHECK (incarnation ~ '^[0-9a-f]{32}$'),"
        " created_at timestamptz NOT NULL DEFAULT now(), " + ids + ","
        " UNIQUE (int_id), UNIQUE (str_id))",
        "CREATE TABLE {s}.peer ("
        " node_key integer NOT NULL REFERENCES {s}.node,"
        " peer_key bigint GENERATED ALWAYS AS IDENTITY, " + ids + ","
        " PRIMARY KEY (node_key, peer_key),"
        " UNIQUE (node_key, int_id), UNIQUE (node_key, str_id))",
        "CREATE TABLE {s}.lease ("
        " node_key integer NOT NULL, peer_key bigint NOT NULL,"
        " owner text, epoch bigint NOT NULL CHECK (epoch >= 0),"
        " expires_at timestamptz NOT NULL, acquired_at timestamptz,"
        " PRIMARY KEY (node_key, peer_key),"
        " FOREIGN KEY (node_key, peer_key) REFERENCES {s}.peer)",
        "CREATE TABLE {s}.outbound ("
        " node_key integer NOT NULL, peer_key bigint NOT NULL,"
        " recorded boolean NOT NULL, acked bigint NOT NULL,"
        " last_position bigint NOT NULL, pending_bytes bigint NOT NULL,"
        " PRIMARY KEY (node_key, peer_key),"
        " FOREIGN KEY (node_key, peer_key) REFERENCES {s}.peer,"
        " CHECK (0 <= acked AND acked <= last_position AND pending_bytes >= 0))",
        "CREATE TABLE {s}.outbox ("
        " node_key integer NOT NULL, peer_key bigint NOT NULL,"
        " position bigint NOT NULL, stored_at timestamptz NOT NULL DEFAULT now(),"
        " contents bytea NOT NULL,"
        " PRIMARY KEY (node_key, peer_key, position))",
        "CREATE TABLE {s}.inbound ("
        " node_key integer NOT NULL, peer_key bigint NOT NULL,"
        " incarnation text NOT NULL CHECK (incarnation ~ '^[0-9a-f]{32}$'),"
        " delivered bigint NOT NULL CHECK (delivered >= 0),"
        " retired boolean NOT NULL,"
        " retired_seq bigint NOT NULL DEFAULT 0,"
        " PRIMARY KEY (node_key, peer_key, incarnation),"
        " FOREIGN KEY (node_key, peer_key) REFERENCES {s}.peer)",
        "CREATE SEQUENCE {s}.retirement",
        "INSERT INTO {s}.ilm_schema (application, version) VALUES ('ILM1', 0)",
    ]
    for statement in statements:
        conn.execute(statement.replace("{s}", s).encode())


MIGRATIONS: Mapping[int, Migration] = {0: _create_v1}
"""``MIGRATIONS[v]`` takes a schema from version ``v`` to ``v + 1``."""


def quote_schema(schema: str) -> str:
    """
    :return: ``schema`` as a quoted SQL identifier.
    :raises ValueError: if it cannot be a PostgreSQL schema name.
    """
    if (
        not isinstance(schema, str)
        or not 1 <= len(schema.encode("utf-8", "surrogatepass")) <= 63
        or "\x00" in schema
    ):
        raise ValueError(f"schema must be a name of 1 to 63 bytes, not {schema!r}")
    return _sql.Identifier(schema).as_string(None)


def schema_version(conn: _Conn, schema: str) -> int | None:
    """
    :return: the version of the ILM schema named ``schema``: ``None`` if no
        such schema exists, 0 if it exists and is empty.
    :raises StoreCorrupt: if it holds tables but is not an ILM schema.
    """
    row = conn.execute(
        "SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,)
    ).fetchone()
    if row is None:
        return None
    tables = {
        name
        for (name,) in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = %s "
            "AND relkind IN ('r', 'p', 'v', 'm', 'f')",
            (row[0],),
        )
    }
    if not tables:
        return 0
    if "ilm_schema" not in tables:
        raise StoreCorrupt(
            f"the PostgreSQL schema {schema!r} holds tables but is not an ILM store"
        )
    rows = conn.execute(
        f"SELECT application, version FROM {quote_schema(schema)}.ilm_schema".encode()
    ).fetchall()
    if len(rows) != 1 or rows[0][0] != APPLICATION:
        raise StoreCorrupt(
            f"the PostgreSQL schema {schema!r} is not an ILM store "
            f"(its ilm_schema table holds {rows[:2]!r})"
        )
    version = rows[0][1]
    if type(version) is not int or version < 0:
        raise StoreCorrupt(f"the store's schema version is unreadable: {version!r}")
    return version


def migrate(
    conn: _Conn,
    schema: str,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    target: int = SCHEMA_VERSION,
) -> tuple[int, int]:
    """
    Bring the ILM schema ``schema`` up to ``target`` over ``conn`` (in
    autocommit mode), in one transaction: every step applies or none does.
    Concurrent openers wait on a transaction-level advisory lock, so two
    gateways starting together migrate once.

    :return: ``(version found, version now)``.
    :raises StoreSchemaTooNew: if the schema is newer than ``target`` (it
        is left untouched).
    :raises StoreCorrupt: if ``schema`` holds tables but is not ILM's.
    """
    s = quote_schema(schema)
    conn.execute("BEGIN")
    try:
        conn.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, schema)
        )
        version = schema_version(conn, schema)
        if version is None:
            conn.execute(f"CREATE SCHEMA {s}".encode())
            version = 0
        found = version
        if version > target:
            raise StoreSchemaTooNew(version, target)
        while version < target:
            step = migrations.get(version)
            if step is None:
                raise StoreError(f"no migration from schema version {version}")
            step(conn, s)
            version += 1
            conn.execute(f"UPDATE {s}.ilm_schema SET version = %s".encode(), (version,))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return found, version


def _rollback(conn: _Conn) -> None:
    """
    Roll back whatever transaction ``conn`` has open; a broken connection
    is closed (the server rolls back a transaction whose connection dies).
    """
    try:
        if conn.closed or conn.broken:
            conn.close()
        elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()


# -- ids -----------------------------------------------------------------------


def _id_columns(peer_id: PeerId) -> tuple[int | None, bytes | None]:
    """``(int_id, str_id)`` of a node or peer id."""
    if type(peer_id) is int:
        return peer_id, None
    return None, id_bytes(str(peer_id))


def _decode_id(int_id: object, str_id: object) -> PeerId:
    if type(int_id) is int and str_id is None:
        return int_id
    if int_id is None and isinstance(str_id, bytes | bytearray | memoryview):
        try:
            return id_from_bytes(bytes(str_id))
        except InvalidPeerId as e:
            raise StoreCorrupt(f"a stored peer id is not valid: {e}") from None
    raise StoreCorrupt(f"a peer id is stored as neither int nor str: {int_id!r}")


def _encode_hint(peer_id: PeerId) -> str:
    """A peer id as a notification payload: ``i<decimal>`` or ``s<hex>``."""
    if type(peer_id) is int:
        return f"i{peer_id}"
    return "s" + id_bytes(str(peer_id)).hex()


def _decode_hint(payload: str) -> PeerId | None:
    try:
        if payload[:1] == "i":
            value = int(payload[1:])
            return value if 0 <= value <= MAX_INT_ID else None
        if payload[:1] == "s":
            return id_from_bytes(bytes.fromhex(payload[1:]))
    except ValueError:
        pass
    return None


# -- batches -------------------------------------------------------------------


def _position(value: object, low: int = 0) -> bool:
    return type(value) is int and low <= value <= MAX_POSITION


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


# -- errors --------------------------------------------------------------------


_BY_SQLSTATE: Mapping[str, type[StoreError]] = {
    "53100": StoreFull,  # disk_full
    "25006": StoreReadOnly,  # read_only_sql_transaction (a standby, or read-only)
    "42501": StoreReadOnly,  # insufficient_privilege
    "55P03": StoreLocked,  # lock_not_available (lock_timeout)
    "40001": StoreLocked,  # serialization_failure, retries exhausted
    "40P01": StoreLocked,  # deadlock_detected, retries exhausted
    "XX001": StoreCorrupt,  # data_corrupted
    "XX002": StoreCorrupt,  # index_corrupted
    "42P01": StoreCorrupt,  # undefined_table: a damaged ILM schema
    "42703": StoreCorrupt,  # undefined_column: likewise
}


def store_error(exc: BaseException, where: str, doing: str) -> StoreError:
    """
    Translate an exception raised by psycopg into the matching
    :class:`ilm.errors.StoreError` subclass, by its SQLSTATE, with the
    original as ``__cause__``.  A lost connection (no SQLSTATE, or class 08)
    is a plain :class:`ilm.errors.StoreError`.
    """
    if isinstance(exc, StoreError):
        return exc
    kind: type[StoreError] = StoreError
    detail = str(exc).strip() or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        kind = _BY_SQLSTATE.get(sqlstate, StoreError)
        detail = f"{detail} (SQLSTATE {sqlstate})"
    error = kind(f"{doing} {where}: {detail}")
    error.__cause__ = exc
    return error


# -- the backend ---------------------------------------------------------------


@attr.s(slots=True, auto_attribs=True)
class _Held:
    """A lease this backend holds, with its local delivery window."""

    epoch: int
    valid_until: float
    deliver_from: float = 0.0


@attr.s(slots=True, auto_attribs=True)
class _Loaded:
    state: StoredState
    keys: dict[PeerId, int]


def _by_id(template: str) -> dict[bool, bytes]:
    """
    ``template`` with ``{id}`` as the condition on an id: per "is the id an
    ``int``", ``int_id = %s`` or ``str_id = %s`` (both indexed).
    """
    return {
        True: template.replace("{id}", "int_id = %s").encode(),
        False: template.replace("{id}", "str_id = %s").encode(),
    }


def _id_value(peer_id: PeerId) -> int | bytes:
    """The ``int_id`` or ``str_id`` value of an id (see :func:`_by_id`)."""
    if type(peer_id) is int:
        return peer_id
    return id_bytes(str(peer_id))


class _Sql:
    """The statements, with the schema name written in."""

    def __init__(self, s: str) -> None:
        self.insert_node = (
            f"INSERT INTO {s}.node (int_id, str_id, incarnation) VALUES (%s, %s, %s) "
            f"ON CONFLICT DO NOTHING"
        ).encode()
        self.select_node = _by_id(
            f"SELECT node_key, incarnation FROM {s}.node WHERE {{id}}"
        )
        self.insert_peer = (
            f"INSERT INTO {s}.peer (node_key, int_id, str_id) VALUES (%s, %s, %s) "
            f"ON CONFLICT DO NOTHING RETURNING peer_key"
        ).encode()
        self.select_peer = _by_id(
            f"SELECT peer_key FROM {s}.peer WHERE node_key = %s AND {{id}}"
        )
        self.insert_stream_rows = [
            (
                f"INSERT INTO {s}.lease (node_key, peer_key, owner, epoch, expires_at) "
                f"VALUES (%s, %s, NULL, 0, '-infinity') ON CONFLICT DO NOTHING"
            ).encode(),
            (
                f"INSERT INTO {s}.outbound (node_key, peer_key, recorded, acked, "
                f"last_position, pending_bytes) VALUES (%s, %s, false, 0, 0, 0) "
                f"ON CONFLICT DO NOTHING"
            ).encode(),
        ]
        self.lock_leases = (
            f"SELECT peer_key, epoch, owner FROM {s}.lease "
            f"WHERE node_key = %s AND peer_key = ANY(%s::bigint[]) "
            f"ORDER BY peer_key FOR SHARE"
        ).encode()
        self.append = (
            f"WITH grown AS (UPDATE {s}.outbound SET recorded = true, "
            f"last_position = last_position + %(count)s, "
            f"pending_bytes = pending_bytes + %(bytes)s "
            f"WHERE node_key = %(n)s AND peer_key = %(k)s "
            f"RETURNING last_position - %(count)s AS base), "
            f"stored AS (INSERT INTO {s}.outbox "
            f"(node_key, peer_key, position, contents) "
            f"SELECT %(n)s, %(k)s, grown.base + t.o, t.c FROM grown, "
            f"unnest(%(contents)b::bytea[]) WITH ORDINALITY AS t(c, o)), "
            f"hint AS (SELECT pg_notify(%(channel)s, %(hint)s) FROM {s}.lease "
            f"WHERE node_key = %(n)s AND peer_key = %(k)s AND owner IS NOT NULL "
            f"AND owner <> %(gateway)s AND expires_at > now()) "
            f"SELECT base, (SELECT count(*) FROM hint) FROM grown"
        ).encode()
        """
        Appends a run of messages to a peer's outbox where it ends: the
        ``UPDATE`` locks the stream's row (so appends from every gateway
        queue up), moves its end and returns where it was, which the
        ``INSERT`` uses; one statement, whatever the number of messages.
        If another gateway owns the stream, it is notified (at commit).
        """
        self.acknowledge = (
            f"WITH prev AS (SELECT acked, last_position FROM {s}.outbound "
            f"WHERE node_key = %(n)s AND peer_key = %(k)s FOR UPDATE), "
            f"freed AS (DELETE FROM {s}.outbox b USING prev "
            f"WHERE b.node_key = %(n)s AND b.peer_key = %(k)s "
            f"AND b.position > prev.acked AND b.position <= %(new)s "
            f"RETURNING octet_length(b.contents) AS size), "
            f"total AS (SELECT coalesce(sum(size), 0)::bigint AS bytes FROM freed), "
            f"saved AS (UPDATE {s}.outbound o SET recorded = true, "
            f"acked = greatest(o.acked, %(new)s), "
            f"pending_bytes = o.pending_bytes - total.bytes FROM total "
            f"WHERE o.node_key = %(n)s AND o.peer_key = %(k)s "
            f"AND (NOT o.recorded OR o.acked < %(new)s)) "
            f"SELECT prev.acked, prev.last_position, total.bytes FROM prev, total"
        ).encode()
        """
        Records an acknowledgement: deletes the messages it covers (from the
        old acknowledged point on, so the scan skips what earlier deletions
        left for vacuum) and returns the stream's previous ``acked`` and
        ``last_position`` (to check the acknowledgement against) and the
        bytes freed.
        """
        self.mark = (
            f"INSERT INTO {s}.inbound AS i (node_key, peer_key, incarnation, "
            f"delivered, retired) VALUES (%s, %s, %s, %s, false) "
            f"ON CONFLICT (node_key, peer_key, incarnation) DO UPDATE "
            f"SET delivered = excluded.delivered WHERE i.delivered < excluded.delivered"
        ).encode()
        self.retire = (
            f"INSERT INTO {s}.inbound AS i (node_key, peer_key, incarnation, "
            f"delivered, retired, retired_seq) "
            f"VALUES (%s, %s, %s, 0, true, nextval('{s}.retirement')) "
            f"ON CONFLICT (node_key, peer_key, incarnation) DO UPDATE "
            f"SET retired = true, retired_seq = excluded.retired_seq "
            f"WHERE NOT i.retired"
        ).encode()
        """Retires an incarnation; ``retired_seq`` keeps the order."""
        self.forget = (
            f"DELETE FROM {s}.inbound "
            f"WHERE node_key = %s AND peer_key = %s AND incarnation = %s"
        ).encode()
        self.lock_lease = (
            f"SELECT owner, epoch, "
            f"CASE WHEN expires_at > now() "
            f"THEN extract(epoch FROM expires_at - now())::float8 ELSE 0.0 END "
            f"FROM {s}.lease WHERE node_key = %s AND peer_key = %s FOR UPDATE"
        ).encode()
        self.take = (
            f"UPDATE {s}.lease SET owner = %s, epoch = epoch + 1, "
            f"expires_at = now() + make_interval(secs => %s), acquired_at = now() "
            f"WHERE node_key = %s AND peer_key = %s RETURNING epoch"
        ).encode()
        self.stream_outbound = (
            f"SELECT recorded, acked, last_position, pending_bytes FROM {s}.outbound "
            f"WHERE node_key = %s AND peer_key = %s"
        ).encode()
        self.stream_inbound = (
            f"SELECT incarnation, delivered, retired FROM {s}.inbound "
            f"WHERE node_key = %s AND peer_key = %s "
            f"ORDER BY retired DESC, retired_seq, incarnation"
        ).encode()
        self.renew = (
            f"UPDATE {s}.lease l SET expires_at = now() + make_interval(secs => %s) "
            f"FROM unnest(%s::bigint[], %s::bigint[]) AS h(k, e) "
            f"WHERE l.node_key = %s AND l.peer_key = h.k AND l.epoch = h.e "
            f"AND l.owner = %s RETURNING l.peer_key"
        ).encode()
        self.release = (
            f"UPDATE {s}.lease l SET owner = NULL, expires_at = now() "
            f"FROM unnest(%s::bigint[], %s::bigint[]) AS h(k, e) "
            f"WHERE l.node_key = %s AND l.peer_key = h.k AND l.epoch = h.e "
            f"AND l.owner = %s RETURNING l.peer_key"
        ).encode()
        self.claimable = (
            f"SELECT p.int_id, p.str_id FROM {s}.lease l "
            f"JOIN {s}.outbound o USING (node_key, peer_key) "
            f"JOIN {s}.peer p USING (node_key, peer_key) "
            f"WHERE l.node_key = %s AND (l.owner IS NULL OR l.expires_at <= now()) "
            f"AND o.last_position > o.acked ORDER BY l.peer_key LIMIT %s"
        ).encode()
        self.load_peers = (
            f"SELECT peer_key, int_id, str_id FROM {s}.peer WHERE node_key = %s"
        ).encode()
        self.load_outbound = (
            f"SELECT o.peer_key, o.acked, o.last_position, o.pending_bytes, "
            f"(SELECT position FROM {s}.outbox b WHERE b.node_key = o.node_key "
            f"AND b.peer_key = o.peer_key AND b.position > o.acked "
            f"ORDER BY position LIMIT 1), "
            f"(SELECT position FROM {s}.outbox b WHERE b.node_key = o.node_key "
            f"AND b.peer_key = o.peer_key ORDER BY position DESC LIMIT 1) "
            f"FROM {s}.outbound o WHERE o.node_key = %s AND o.recorded "
            f"ORDER BY o.peer_key"
        ).encode()
        self.load_inbound = (
            f"SELECT peer_key, incarnation, delivered, retired FROM {s}.inbound "
            f"WHERE node_key = %s "
            f"ORDER BY peer_key, retired DESC, retired_seq, incarnation"
        ).encode()
        self.read_acked = _by_id(
            f"SELECT o.peer_key, o.acked FROM {s}.peer p "
            f"JOIN {s}.outbound o USING (node_key, peer_key) "
            f"WHERE p.node_key = %s AND p.{{id}} AND o.recorded"
        )
        self.read_outbox = (
            f"SELECT position, contents FROM {s}.outbox WHERE node_key = %s "
            f"AND peer_key = %s AND position > %s ORDER BY position LIMIT %s"
        ).encode()
        self.read_outbox_bytes = (
            f"SELECT position, contents FROM ("
            f"SELECT position, contents, row_number() OVER w AS n, "
            f"sum(octet_length(contents)) OVER w AS total FROM {s}.outbox "
            f"WHERE node_key = %s AND peer_key = %s AND position > %s "
            f"WINDOW w AS (ORDER BY position ROWS UNBOUNDED PRECEDING) "
            f"ORDER BY position LIMIT %s) r "
            f"WHERE n = 1 OR total <= %s ORDER BY position"
        ).encode()
        self.outbound_of = _by_id(
            f"SELECT o.acked, o.last_position, o.pending_bytes FROM {s}.peer p "
            f"JOIN {s}.outbound o USING (node_key, peer_key) "
            f"WHERE p.node_key = %s AND p.{{id}} AND o.recorded"
        )


@implementer(IBackend, IStreamOwnership)
class PostgresBackend:
    """
    A node's durable store in PostgreSQL, shareable by several gateway
    processes of that node.

    :param dsn: a libpq connection string (``"host=... dbname=..."``) or URI
        (``"postgresql://user@host/db"``).
    :param node_id: the logical node whose state this is (an ILM node id).
        Several nodes may share one database and schema.
    :param gateway: this process's name among the node's gateways, recorded
        as the owner of the streams it takes (1 to 255 characters; unique per
        live process).
    :param schema: the PostgreSQL schema holding ILM's tables (created if
        missing; default ``"ilm"``).
    :param lease_duration: seconds a stream lease lasts without renewal
        (default 5).
    :param lock_timeout: the longest a transaction waits for a row lock
        (default 10 s); reaching it fails the operation with
        :class:`ilm.errors.StoreLocked`.
    :param retries: how many times a transaction is run in all when it
        meets a serialization failure or a deadlock (default 5).
    :param connect_timeout: seconds to establish a connection (default 10).
    :param network_timeout: seconds after which a silent connection (a
        partition, a dead server) is declared lost through TCP keepalives
        and ``tcp_user_timeout`` (default 30), unless the DSN sets them.
    :param prepare_threshold: psycopg's; ``None`` disables server-side
        prepared statements (for a pooler that cannot carry them).
    :param reactor: the reactor running the threads; the global one if
        omitted.
    :param monotonic: the local clock of lease deadlines.
    """

    def __init__(
        self,
        dsn: str,
        *,
        node_id: PeerId,
        gateway: str,
        schema: str = "ilm",
        lease_duration: float = 5.0,
        lock_timeout: float = 10.0,
        retries: int = 5,
        connect_timeout: float = 10.0,
        network_timeout: float = 30.0,
        prepare_threshold: int | None = 5,
        reactor: Any = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if psycopg is None:  # pragma: no cover
            raise ImportError(
                "PostgresBackend needs psycopg 3: pip install 'ilm[postgres]'"
            )
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, not {type(dsn).__name__}")
        self.node_id: PeerId = check_peer_id(node_id)
        if not isinstance(gateway, str) or not 1 <= len(gateway) <= 255:
            raise ValueError(
                f"gateway must be a name of 1 to 255 characters: {gateway!r}"
            )
        if "\x00" in gateway:
            raise ValueError("gateway names cannot hold NUL characters")
        for name, value in (
            ("lease_duration", lease_duration),
            ("lock_timeout", lock_timeout),
            ("connect_timeout", connect_timeout),
            ("network_timeout", network_timeout),
        ):
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if type(retries) is not int or retries < 1:
            raise ValueError(f"retries must be at least 1, not {retries!r}")
        self.gateway = gateway
        self.schema = schema
        self._s = quote_schema(schema)
        self.lease_duration = float(lease_duration)
        self.lock_timeout = float(lock_timeout)
        self.retries = retries
        self.connect_timeout = connect_timeout
        self.network_timeout = network_timeout
        self.prepare_threshold = prepare_threshold
        self._dsn = dsn
        self._monotonic = monotonic
        self._sql = _Sql(self._s)
        self._channel = (
            "ilm_"
            + hashlib.sha256(schema.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        )
        self._writer: _Conn | None = None
        self._reader: _Conn | None = None
        self._threads = StoreThreads(
            reactor, f"postgres {gateway}", self._reactor_stopping
        )
        self._listener: _Listener | None = None
        self._open = False
        self._closing: Deferred[None] | None = None
        self._broken: StoreError | None = None
        self._limiter: EventLimiter | None = None
        # Set by the writer thread when opening; read elsewhere afterwards.
        self._node_key = 0
        self._incarnation = ""
        # Owned by the writer thread: peer id -> key (keys never change).
        self._keys: dict[PeerId, int] = {}
        # Owned by the reader thread: the same, learned independently.
        self._read_keys: dict[PeerId, int] = {}
        # Written by the writer thread only, replaced whole (read by others).
        self._held: dict[PeerId, _Held] = {}
        self.schema_version = 0
        self.retried = 0
        """Transactions run again after a serialization failure or deadlock."""
        self.reconnected = 0
        """Transactions run again on a new connection after losing theirs."""

    def __repr__(self) -> str:
        return (
            f"PostgresBackend(node_id={self.node_id!r}, gateway={self.gateway!r}, "
            f"schema={self.schema!r})"
        )

    @property
    def _where(self) -> str:
        return f"the PostgreSQL store {self.schema!r} of node {self.node_id!r}"

    # -- threads ---------------------------------------------------------------

    def _start_pools(self) -> None:
        self._threads.start()
        self._limiter = EventLimiter(log, self._threads.reactor)

    def _reactor_stopping(self) -> None:
        """
        The reactor is shutting down with the store open: stop the threads
        (else the process could not exit).  What was committed is
        committed; leases run out by themselves.
        """
        self._open = False
        self._stop_listener()
        self._stop_pools()

    def _stop_pools(self) -> None:
        self._threads.stop()
        if self._limiter is not None:
            self._limiter.stop()
            self._limiter = None

    def _usable(self) -> StoreError | None:
        if not self._open or self._closing is not None:
            return StoreError(f"{self._where} is closed")
        return None

    # -- connections (on their threads) ----------------------------------------

    def _connect(self, role: str) -> _Conn:
        options: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(self.connect_timeout)),
            "application_name": f"ilm {role} {self.gateway}"[:63],
        }
        given = psycopg.conninfo.conninfo_to_dict(self._dsn)
        timeout = self.network_timeout
        for key, value in (
            ("keepalives", 1),
            ("keepalives_idle", max(1, int(timeout / 3))),
            ("keepalives_interval", max(1, int(timeout / 9))),
            ("keepalives_count", 3),
            ("tcp_user_timeout", int(timeout * 1000)),
        ):
            if key not in given:
                options[key] = value
        try:
            conn = psycopg.connect(self._dsn, **options)
        except psycopg.Error as e:
            raise store_error(e, self._where, "cannot connect to") from e
        conn.prepare_threshold = self.prepare_threshold
        return conn

    def _writer_conn(self) -> _Conn:
        conn = self._writer
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._writer = None
            conn = self._writer = self._connect("writer")
        return conn

    def _reader_conn(self) -> _Conn:
        conn = self._reader
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            self._reader = None
            conn = self._reader = self._connect("reader")
        return conn

    def _begin(self, conn: _Conn) -> None:
        conn.execute(b"BEGIN ISOLATION LEVEL READ COMMITTED")
        conn.execute(
            f"SET LOCAL lock_timeout = {int(self.lock_timeout * 1000):d}".encode()
        )

    def _retried(self, doing: str, sqlstate: str, attempt: int) -> None:
        """Count and log (rate-limited, in the reactor thread) one retry."""
        self.retried += 1
        limiter = self._limiter
        if limiter is None:
            return
        self._threads.reactor.callFromThread(
            limiter.emit,
            ("store_retried", sqlstate),
            LogLevel.info,
            "PostgreSQL transaction ({doing}) met SQLSTATE {sqlstate}; "
            "running it again (attempt {attempt})",
            doing=doing,
            sqlstate=sqlstate,
            attempt=attempt,
            ilm_event="store_retried",
        )

    def _interaction(
        self,
        doing: str,
        body: Callable[[_Conn], _T],
        *,
        in_doubt: Callable[[StoreError, BaseException], StoreError] | None = None,
    ) -> _T:
        """
        Run ``body(conn)`` in a transaction on the writer connection and
        commit it: the interaction wrapper.  ``body`` begins the
        transaction and does everything but ``COMMIT``.  A serialization
        failure or deadlock before ``COMMIT`` rolls back and runs ``body``
        again, at most :attr:`retries` times in all, after a short random
        pause; any other error rolls back and is raised as a
        :class:`ilm.errors.StoreError`.  A failure of ``COMMIT`` itself is
        never retried: it goes to ``in_doubt(error, exc)``, which returns
        the error to raise.


        A connection found lost before ``COMMIT`` was sent (the server
        restarted or failed over since the last transaction, a pooler
        dropped it) is replaced and ``body`` run once more: the lost
        transaction can never commit, so nothing can be applied twice.
        """
        attempt = 0
        reconnected = False
        while True:
            attempt += 1
            conn = self._writer_conn()
            try:
                result = body(conn)
            except StoreError:
                _rollback(conn)
                raise
            except Exception as e:
                lost = conn.broken
                _rollback(conn)
                sqlstate = getattr(e, "sqlstate", None)
                if sqlstate in RETRIED_SQLSTATES and attempt < self.retries:
                    assert isinstance(sqlstate, str)
                    self._retried(doing, sqlstate, attempt + 1)
                    time.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                if lost and not reconnected:
                    reconnected = True
                    self.reconnected += 1
                    continue
                raise store_error(e, self._where, doing) from e
            try:
                conn.execute(b"COMMIT", prepare=False)
            except Exception as e:
                _rollback(conn)
                error = store_error(e, self._where, doing)
                if in_doubt is not None:
                    raise in_doubt(error, e) from e
                raise error from e
            return result

    # -- IBackend --------------------------------------------------------------

    def open(self) -> Deferred[StoredState]:
        """
        Connect, create or migrate the schema, create the node's record
        (with a fresh incarnation) if it has none, and read the node's
        state; see :meth:`ilm.interfaces.IBackend.open`.  On an open
        backend, read the state again (and accept commits again after
        :class:`ilm.errors.StoreInDoubt`).  Fails with
        :class:`ilm.errors.StoreReadOnly`, :class:`~ilm.errors.StoreCorrupt`,
        :class:`~ilm.errors.StoreSchemaTooNew` or another
        :class:`~ilm.errors.StoreError`.
        """
        if self._closing is not None:
            return fail(StoreError(f"{self._where} is closing"))
        if self._open:
            return self._threads.on_writer(self._reload)
        self._start_pools()
        self._open = True
        d = self._threads.on_writer(self._open_writer)
        d.addErrback(self._open_failed)
        return d

    def _open_failed(self, reason: Failure) -> Deferred[StoredState]:
        d = self._threads.on_writer(self._close_writer, False)
        d.addBoth(lambda _: self._threads.on_reader(self._close_reader))

        def stopped(_: object) -> Failure:
            self._stop_pools()
            self._open = False
            return reason

        return d.addBoth(stopped)

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        """
        Apply ``batch`` as one transaction; see
        :meth:`ilm.interfaces.IBackend.commit`.  Each peer's new messages
        must start right after its last stored position; bookkeeping entries
        are fenced (:class:`ilm.backends.Fenced`; see
        :class:`ilm.backends.IStreamOwnership`).
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        d = self._threads.on_writer(self._commit, batch, False)
        return d.addCallback(lambda applied: CommitResult(applied[0]))

    def commit_shared(self, batch: StoreBatch) -> Deferred[SharedCommitResult]:
        """
        Apply ``batch`` appending its messages wherever each outbox ends;
        see :meth:`ilm.backends.IStreamOwnership.commit_shared`.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        d = self._threads.on_writer(self._commit, batch, True)
        return d.addCallback(lambda applied: SharedCommitResult(*applied))

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int | None = None
    ) -> Deferred[list[bytes]]:
        """
        Read stored messages to ``peer_id`` after position ``after``: at
        most ``limit`` of them and, if ``max_bytes`` is given, stopping
        before their total size would exceed it (but always at least one
        when any is there); see
        :meth:`ilm.interfaces.IBackend.read_outbound`.  Not fenced.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        if not _position(after) or type(limit) is not int or limit < 0:
            return fail(StoreError(f"bad read: after {after!r}, limit {limit!r}"))
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
            return fail(StoreError(f"bad read: max_bytes {max_bytes!r}"))
        return self._threads.on_reader(self._read, peer_id, after, limit, max_bytes)

    def close(self) -> Deferred[None]:
        """
        Release the leases this backend holds (so other gateways may take
        the streams at once), finish what is queued and close the
        connections.  Commits and reads after this fail with
        :class:`ilm.errors.StoreError`.
        """
        if self._closing is not None:
            waiter: Deferred[None] = Deferred()
            self._closing.addCallback(lambda _: waiter.callback(None))
            return waiter
        if not self._open:
            return succeed(None)
        closing = self._closing = Deferred()
        self._stop_listener()
        errors: list[Failure] = []
        writer = self._threads.on_writer(self._close_writer, True)
        writer.addErrback(errors.append)
        reader = self._threads.on_reader(self._close_reader)
        reader.addErrback(errors.append)

        def closed(_: object) -> Failure | None:
            self._stop_pools()
            self._open = False
            self._closing = None
            closing.callback(None)
            return errors[0] if errors else None

        return DeferredList([writer, reader]).addCallback(closed)

    # -- IStreamOwnership ------------------------------------------------------

    def acquire(self, peer_id: PeerId, take_over: bool = True) -> Deferred[StreamTaken]:
        """
        Take the stream of ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.acquire`.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        try:
            peer_id = self._checked(peer_id)
        except StoreError:
            return fail()
        return self._threads.on_writer(self._acquire, peer_id, bool(take_over))

    def renew(self) -> Deferred[Renewal]:
        """
        Extend every lease this backend holds; see
        :meth:`ilm.backends.IStreamOwnership.renew`.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        return self._threads.on_writer(self._renew)

    def release(self, peer_id: PeerId) -> Deferred[bool]:
        """
        Give up the stream of ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.release`.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        return self._threads.on_writer(self._release, [peer_id])

    def holds(self, peer_id: PeerId) -> bool:
        """
        Whether this backend holds ``peer_id``'s stream within its local
        deadline; see :meth:`ilm.backends.IStreamOwnership.holds`.
        """
        held = self._held.get(peer_id)
        if held is None:
            return False
        return held.deliver_from <= self._monotonic() < held.valid_until

    def delivery_window(self, peer_id: PeerId) -> tuple[float, float] | None:
        """
        When this backend may deliver for ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.delivery_window`.
        """
        held = self._held.get(peer_id)
        return None if held is None else (held.deliver_from, held.valid_until)

    def owned(self) -> frozenset[PeerId]:
        """
        The streams this backend holds; see
        :meth:`ilm.backends.IStreamOwnership.owned`.
        """
        return frozenset(self._held)

    def epoch(self, peer_id: PeerId) -> int:
        """
        :return: the epoch this backend's writes for ``peer_id`` carry: its
            grant's, or 0 for a stream it does not hold.
        """
        held = self._held.get(peer_id)
        return 0 if held is None else held.epoch

    def claimable(self, limit: int = 1000) -> Deferred[list[PeerId]]:
        """
        Streams with messages waiting and no live lease; see
        :meth:`ilm.backends.IStreamOwnership.claimable`.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        return self._threads.on_reader(self._claimable, int(limit))

    def outbound_state(self, peer_id: PeerId) -> Deferred[OutboundRecord | None]:
        """
        The committed outbound record of ``peer_id``; see
        :meth:`ilm.backends.IStreamOwnership.outbound_state`.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        return self._threads.on_reader(self._outbound_state, peer_id)

    def watch(self, callback: Callable[[PeerId], None]) -> Deferred[None]:
        """
        Call ``callback(peer_id)`` when another gateway appends to a stream
        this one owns; see :meth:`ilm.backends.IStreamOwnership.watch`.
        A lost listening connection is logged and re-established (with
        backoff to 30 s); hints sent meanwhile are lost.
        """
        unusable = self._usable()
        if unusable is not None:
            return fail(unusable)
        if self._listener is not None:
            self._listener.callback = callback
            return succeed(None)
        listener = self._listener = _Listener(self, callback)

        def failed(reason: Failure) -> Failure:
            if self._listener is listener:
                self._listener = None
            return reason

        return listener.start().addErrback(failed)

    def _stop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()

    # -- on the writer thread --------------------------------------------------

    def _checked(self, peer_id: object) -> PeerId:
        try:
            checked = check_peer_id(peer_id)
        except (TypeError, ILMError) as e:
            raise StoreError(f"invalid peer id {peer_id!r}: {e}") from e
        return checked

    def _open_writer(self) -> StoredState:
        try:
            conn = self._writer_conn()
            found, version = migrate(conn, self.schema)
            self._node_key, self._incarnation = self._node(conn)
            loaded = self._load(conn)
        except StoreError:
            raise
        except Exception as e:
            raise store_error(e, self._where, "cannot open") from e
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
        self._keys = loaded.keys
        self._broken = None
        return loaded.state

    def _reload(self) -> StoredState:
        try:
            loaded = self._load(self._writer_conn())
        except StoreError:
            raise
        except Exception as e:
            raise store_error(e, self._where, "cannot read") from e
        self._keys.update(loaded.keys)
        self._broken = None
        return loaded.state

    def _node(self, conn: _Conn) -> tuple[int, str]:
        """The node's key and incarnation, creating its row if needed."""
        int_id, str_id = _id_columns(self.node_id)
        sql = self._sql
        conn.execute(sql.insert_node, (int_id, str_id, uuid.uuid4().hex))
        is_int = type(self.node_id) is int
        row = conn.execute(
            sql.select_node[is_int], (_id_value(self.node_id),)
        ).fetchone()
        if row is None:
            raise StoreCorrupt(f"the record of node {self.node_id!r} vanished")
        key, incarnation = row
        if type(incarnation) is not str or not _INCARNATION.fullmatch(incarnation):
            raise StoreCorrupt(f"the node's incarnation is bad: {incarnation!r}")
        return int(key), incarnation

    def _load(self, conn: _Conn) -> _Loaded:
        """
        Read everything of this node but the outbox, from one snapshot,
        checking each outbox's first and last position against its record.
        """
        sql = self._sql
        node = self._node_key
        conn.execute(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            ids = {
                key: _decode_id(int_id, str_id)
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
            _rollback(conn)
        return _Loaded(
            StoredState(self._incarnation, tuple(records), tuple(marks)),
            {peer_id: key for key, peer_id in ids.items()},
        )

    def _ensure_keys(self, peer_ids: Iterable[PeerId]) -> dict[PeerId, int]:
        """
        The keys of ``peer_ids``, creating in their own transaction (with
        their lease and outbound rows) those that do not exist yet.
        """
        keys = self._keys
        missing = sorted(
            (p for p in set(peer_ids) if p not in keys),
            key=lambda p: (type(p) is str, p),  # one order for every gateway
        )
        if missing:
            sql = self._sql
            node = self._node_key

            def create(conn: _Conn) -> dict[PeerId, int]:
                self._begin(conn)
                found: dict[PeerId, int] = {}
                for peer_id in missing:
                    columns = _id_columns(peer_id)
                    row = conn.execute(sql.insert_peer, (node, *columns)).fetchone()
                    if row is None:  # another gateway created it first
                        row = conn.execute(
                            sql.select_peer[type(peer_id) is int],
                            (node, _id_value(peer_id)),
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

            keys.update(self._interaction("cannot write to", create))
        return keys

    def _commit(
        self, batch: StoreBatch, shared: bool
    ) -> tuple[dict[PeerId, int], dict[PeerId, tuple[int, int]]]:
        """
        Apply ``batch``: :return: the bytes released and the positions given,
        per peer.
        """
        if self._broken is not None:
            raise self._broken
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
        keys = self._ensure_keys(peers)
        held = self._held
        expected: dict[int, tuple[PeerId, int]] = {}
        for peer_id in (
            *batch.acked,
            *(p for p, _ in batch.delivered),
            *(p for p, _ in batch.retired),
            *(p for p, _ in batch.forgotten),
        ):
            mine = held.get(peer_id)
            expected[keys[peer_id]] = (peer_id, 0 if mine is None else mine.epoch)
        fenced = sorted(expected)
        outbound = sorted({keys[p]: p for p in (*batch.messages, *batch.acked)}.items())
        sql = self._sql
        node = self._node_key

        def body(
            conn: _Conn,
        ) -> tuple[dict[PeerId, int], dict[PeerId, tuple[int, int]]]:
            appended: list[tuple[PeerId, int, int, Any]] = []
            acknowledged: list[tuple[PeerId, int, Any]] = []
            with conn.pipeline():
                self._begin(conn)
                leases = (
                    conn.execute(sql.lock_leases, (node, fenced)) if fenced else None
                )
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
                                "channel": self._channel,
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

        def doubt(error: StoreError, exc: BaseException) -> StoreError:
            return self._in_doubt(error)

        try:
            return self._interaction("cannot commit to", body, in_doubt=doubt)
        except Fenced as e:
            self._drop(e.streams)
            raise

    def _bookkeeping(
        self, conn: _Conn, batch: StoreBatch, keys: Mapping[PeerId, int]
    ) -> None:
        """
        Queue the forgotten records, delivery marks and retirements of
        ``batch``, in that order (see :class:`ilm.StoreBatch`).
        """
        sql = self._sql
        node = self._node_key
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
    ) -> tuple[dict[PeerId, int], dict[PeerId, tuple[int, int]]]:
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
        return f"{self._node_key}:{_encode_hint(peer_id)}"

    def _in_doubt(self, error: StoreError) -> StoreError:
        """
        ``COMMIT`` failed: the batch may or may not be applied.  Refuse
        every later commit until reopened (reusing the batch's positions
        could collide with it), log it, and return the error to raise.
        """
        in_doubt = StoreInDoubt(f"{error}: whether the batch was committed is unknown")
        in_doubt.__cause__ = error
        broken = StoreError(
            f"{self._where} is in an unknown state after a failed commit "
            f"({error}); restart the node (or open the backend again)"
        )
        broken.__cause__ = error
        self._broken = broken
        log.critical(
            "commit to {where} failed in an unknown state; the store refuses "
            "further commits until reopened: {error}",
            where=self._where,
            error=str(error),
            ilm_event="store_broken",
        )
        return in_doubt

    def _drop(self, streams: Iterable[PeerId]) -> None:
        held = dict(self._held)
        for peer_id in streams:
            held.pop(peer_id, None)
        self._held = held

    def _acquire(self, peer_id: PeerId, take_over: bool) -> StreamTaken:
        key = self._ensure_keys([peer_id])[peer_id]
        sql = self._sql
        node = self._node_key
        mine = self._held.get(peer_id)
        started = [0.0]

        def body(conn: _Conn) -> StreamTaken:
            started[0] = self._monotonic()
            with conn.pipeline():
                self._begin(conn)
                row = conn.execute(sql.lock_lease, (node, key)).fetchone()
            if row is None:
                raise StoreCorrupt(f"the lease row of {peer_id!r} is missing")
            owner, epoch, remaining = row
            live = owner is not None and remaining > 0
            ours = mine is not None and owner == self.gateway and epoch == mine.epoch
            if live and not ours and not take_over:
                raise LeaseHeld(peer_id, owner, epoch, remaining)
            with conn.pipeline():
                taken = conn.execute(
                    sql.take, (self.gateway, self.lease_duration, node, key)
                )
                out = conn.execute(sql.stream_outbound, (node, key))
                marks = conn.execute(sql.stream_inbound, (node, key))
                (new_epoch,) = taken.fetchone() or (None,)
                out_row = out.fetchone()
                mark_rows = marks.fetchall()
            outbound = None
            if out_row is not None and out_row[0]:
                outbound = OutboundRecord(peer_id, *out_row[1:])
            return StreamTaken(
                peer_id=peer_id,
                epoch=int(new_epoch),
                previous_owner=owner,
                previous_epoch=epoch,
                deliver_after=float(remaining) if live and not ours else 0.0,
                valid_until=started[0] + self.lease_duration,
                outbound=outbound,
                inbound=tuple(
                    InboundRecord(peer_id, incarnation, delivered, retired)
                    for incarnation, delivered, retired in mark_rows
                ),
            )

        def doubt(error: StoreError, exc: BaseException) -> StoreError:
            return StoreError(f"{error}: whether the stream was taken is unknown")

        try:
            taken = self._interaction("cannot take a stream in", body, in_doubt=doubt)
        except StoreError:
            self._drop([peer_id])
            raise
        # Measured after the answer arrived, so never before the previous
        # lease's expiry (which was ``deliver_after`` after the grant began).
        deliver_from = self._monotonic() + taken.deliver_after
        held = _Held(taken.epoch, taken.valid_until, deliver_from)
        self._held = {**self._held, peer_id: held}
        return taken

    def _renew(self) -> Renewal:
        held = self._held
        started = self._monotonic()
        if not held:
            return Renewal(frozenset(), frozenset(), started + self.lease_duration)
        keys = self._keys
        by_key = {keys[p]: p for p in held}
        peer_keys = sorted(by_key)
        epochs = [held[by_key[k]].epoch for k in peer_keys]
        sql = self._sql

        def body(conn: _Conn) -> set[int]:
            nonlocal started
            started = self._monotonic()
            with conn.pipeline():
                self._begin(conn)
                cursor = conn.execute(
                    sql.renew,
                    (
                        self.lease_duration,
                        peer_keys,
                        epochs,
                        self._node_key,
                        self.gateway,
                    ),
                )
                return {k for (k,) in cursor.fetchall()}

        renewed_keys = self._interaction("cannot renew leases in", body)
        valid_until = started + self.lease_duration
        now = dict(self._held)
        renewed, lost = set(), set()
        for key, peer_id in by_key.items():
            if key in renewed_keys:
                mine = now.get(peer_id)
                if mine is not None and mine.epoch == held[peer_id].epoch:
                    now[peer_id] = _Held(mine.epoch, valid_until, mine.deliver_from)
                renewed.add(peer_id)
            else:
                now.pop(peer_id, None)
                lost.add(peer_id)
        self._held = now
        return Renewal(frozenset(renewed), frozenset(lost), valid_until)

    def _release(self, peer_ids: Sequence[PeerId]) -> bool:
        held = self._held
        mine = [p for p in peer_ids if p in held]
        self._drop(peer_ids)
        if not mine:
            return False
        keys = self._keys
        pairs = sorted((keys[p], held[p].epoch) for p in mine)
        sql = self._sql

        def body(conn: _Conn) -> int:
            with conn.pipeline():
                self._begin(conn)
                cursor = conn.execute(
                    sql.release,
                    (
                        [k for k, _ in pairs],
                        [e for _, e in pairs],
                        self._node_key,
                        self.gateway,
                    ),
                )
                return len(cursor.fetchall())

        return self._interaction("cannot release leases in", body) > 0

    def _close_writer(self, release: bool) -> None:
        conn = self._writer
        try:
            if release and self._held and conn is not None and not conn.broken:
                try:
                    self._release(list(self._held))
                except StoreError as e:
                    log.warn(
                        "could not release the leases of {where} on closing "
                        "(they expire by themselves): {error}",
                        where=self._where,
                        error=str(e),
                        ilm_event="lease_release_failed",
                    )
        finally:
            self._held = {}
            conn, self._writer = self._writer, None
            if conn is not None:
                conn.close()

    # -- on the reader thread --------------------------------------------------

    def _read_key(self, conn: _Conn, peer_id: PeerId) -> tuple[int, int] | None:
        """The key and acked position of ``peer_id``'s recorded stream."""
        row = conn.execute(
            self._sql.read_acked[type(peer_id) is int],
            (self._node_key, _id_value(peer_id)),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def _reading(self, body: Callable[[_Conn], _T]) -> _T:
        """
        Run ``body(conn)`` on the reader connection (read-only, one
        snapshot), replacing the connection once if it is found lost.
        """
        reconnected = False
        while True:
            conn = self._reader_conn()
            try:
                return body(conn)
            except StoreError:
                raise
            except Exception as e:
                if conn.broken and not reconnected:
                    reconnected = True
                    self.reconnected += 1
                    continue
                raise store_error(e, self._where, "cannot read from") from e
            finally:
                _rollback(conn)

    def _read(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int | None
    ) -> list[bytes]:
        peer_id = self._checked(peer_id)
        if limit == 0:
            return []
        sql = self._sql

        def body(conn: _Conn) -> list[tuple[int, bytes]]:
            conn.execute(b"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            found = self._read_key(conn, peer_id)
            if found is None:
                return []
            key, acked = found
            if after < acked:
                raise StoreError(
                    f"outbox to {peer_id!r}: read after {after}, "
                    f"below acknowledged {acked}"
                )
            if max_bytes is None:
                return conn.execute(
                    sql.read_outbox, (self._node_key, key, after, limit)
                ).fetchall()
            return conn.execute(
                sql.read_outbox_bytes,
                (self._node_key, key, after, limit, max_bytes),
            ).fetchall()

        rows = self._reading(body)
        if rows and (rows[0][0] != after + 1 or rows[-1][0] != after + len(rows)):
            raise StoreCorrupt(
                f"outbox to {peer_id!r} has a gap after position {after}: "
                f"read {rows[0][0]}..{rows[-1][0]} ({len(rows)} rows)"
            )
        return [bytes(contents) for _, contents in rows]

    def _outbound_state(self, peer_id: PeerId) -> OutboundRecord | None:
        peer_id = self._checked(peer_id)
        row = self._reading(
            lambda conn: conn.execute(
                self._sql.outbound_of[type(peer_id) is int],
                (self._node_key, _id_value(peer_id)),
            ).fetchone()
        )
        return None if row is None else OutboundRecord(peer_id, *row)

    def _claimable(self, limit: int) -> list[PeerId]:
        rows = self._reading(
            lambda conn: conn.execute(
                self._sql.claimable, (self._node_key, limit)
            ).fetchall()
        )
        return [_decode_id(int_id, str_id) for int_id, str_id in rows]

    def _close_reader(self) -> None:
        conn, self._reader = self._reader, None
        if conn is not None:
            conn.close()


@implementer(IReadDescriptor)
class _Listener:
    """
    The ``LISTEN`` connection of a :class:`PostgresBackend`: read by the
    reactor (no thread), it turns notifications of appends into
    ``callback(peer_id)`` calls.  Connection and ``LISTEN`` happen on the
    reader thread; a lost connection is re-established with backoff.
    """

    def __init__(
        self, backend: PostgresBackend, callback: Callable[[PeerId], None]
    ) -> None:
        self.backend = backend
        self.callback = callback
        self.conn: _Conn | None = None
        # A duplicate of the connection's socket, watched by the reactor:
        # libpq closes its own descriptor as soon as it sees the connection
        # fail, and the reactor must still be able to unregister ours.
        self.fd = -1
        self.stopped = False
        self.retry = 0.5
        self.pending: Any = None
        self.prefix = f"{backend._node_key}:"

    def start(self) -> Deferred[None]:
        backend = self.backend

        def connect() -> _Conn:
            conn = backend._connect("listener")
            try:
                conn.execute(
                    b"LISTEN " + _sql.Identifier(backend._channel).as_bytes(None)
                )
            except BaseException as e:
                conn.close()
                raise store_error(e, backend._where, "cannot listen to") from e
            return conn

        def listening(conn: _Conn) -> None:
            if self.stopped:
                conn.close()
                return
            self.conn = conn
            self.fd = os.dup(conn.pgconn.socket)
            self.retry = 0.5
            backend._threads.reactor.addReader(self)

        return backend._threads.on_reader(connect).addCallback(listening)

    def stop(self) -> None:
        self.stopped = True
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        conn, self.conn = self.conn, None
        if conn is not None:
            self.backend._threads.reactor.removeReader(self)
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        conn.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "ilm-postgres-listener"

    def doRead(self) -> Failure | None:
        conn = self.conn
        if conn is None:
            return None
        try:
            conn.pgconn.consume_input()
            hints = []
            while (notice := conn.pgconn.notifies()) is not None:
                hints.append(notice.extra.decode("utf-8", "replace"))
        except psycopg.Error:
            return Failure()
        for payload in hints:
            if not payload.startswith(self.prefix):
                continue  # another node sharing the schema
            peer_id = _decode_hint(payload[len(self.prefix) :])
            if peer_id is None:
                continue
            try:
                self.callback(peer_id)
            except Exception:
                log.failure(
                    "an append hint's callback failed", ilm_event="internal_error"
                )
        return None

    def connectionLost(self, reason: Failure) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            self._close(conn)
        if self.stopped:
            return
        backend = self.backend
        limiter = backend._limiter
        if limiter is not None:
            limiter.emit(
                "listener_lost",
                LogLevel.warn,
                "lost the PostgreSQL connection listening for append hints of "
                "{where}; reconnecting in {delay} s (polling covers meanwhile): "
                "{error}",
                where=backend._where,
                delay=self.retry,
                error=reason.getErrorMessage(),
                ilm_event="listener_lost",
            )
        delay, self.retry = self.retry, min(self.retry * 2, 30.0)

        def again() -> None:
            self.pending = None
            if self.stopped or backend._usable() is not None:
                return
            self.start().addErrback(self.connectionLost)

        self.pending = backend._threads.reactor.callLater(delay, again)


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresBackend", "migrate", "store_error"]
