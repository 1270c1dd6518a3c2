"""
The PostgreSQL store's schema: its versioned tables and their migrations,
the connection type, and how psycopg's errors map to
:class:`ilm.errors.StoreError` subclasses.

A PostgreSQL schema (``ilm`` by default) holds the tables; it is migrated
in one transaction under a transaction-level advisory lock, so gateways
starting together migrate once.  Several logical nodes may share it: every
table is keyed by the node first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ilm.errors import (
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreReadOnly,
    StoreSchemaTooNew,
)

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

__all__ = [
    "APPLICATION",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "migrate",
    "psycopg",
    "quote_schema",
    "rollback",
    "schema_version",
    "store_error",
]

SCHEMA_VERSION = 2
"""The schema version this version of ILM writes."""

APPLICATION = "ILM1"
"""What ``ilm_schema.application`` holds in an ILM schema."""

_LOCK_CLASS = 0x494C4D31
"""First key of the advisory lock that serialises migrations ("ILM1")."""


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


def _add_gateways_v2(conn: _Conn, s: str) -> None:
    """
    Version 1 to 2: the liveness of each gateway process.

    - ``gateway``: per (node, gateway name), until when (database time)
      that gateway is known to be running and reaching the database
      (``expires_at``, refreshed every third of its lease duration) and
      when it last opened the store (``opened_at``).  A gateway whose row
      has expired may have its writer sessions ended when they block
      another gateway's write (:mod:`ilm.backends._pg_liveness`).
    """
    conn.execute(
        (
            f"CREATE TABLE {s}.gateway ("
            f" node_key integer NOT NULL REFERENCES {s}.node,"
            f" name text NOT NULL CHECK (length(name) BETWEEN 1 AND 255),"
            f" expires_at timestamptz NOT NULL, opened_at timestamptz NOT NULL,"
            f" PRIMARY KEY (node_key, name))"
        ).encode()
    )


MIGRATIONS: Mapping[int, Migration] = {0: _create_v1, 1: _add_gateways_v2}
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
        rollback(conn)
        raise
    return found, version


def rollback(conn: _Conn) -> None:
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


# -- errors ------------------------------------------------------------------


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
