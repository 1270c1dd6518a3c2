"""
The SQLite store's schema: its versioned tables and their migrations, the
check that a file holds exactly what ILM created, how peer ids are stored,
how ``sqlite3``'s and the OS's errors map to
:class:`ilm.errors.StoreError` subclasses, and :func:`load`, which reads
(and checks) a store's state but the outbox.
"""

from __future__ import annotations

import errno
import functools
import sqlite3
import uuid
from collections.abc import Callable, Mapping

import attr
from twisted.logger import Logger

from ilm._peerid import PeerId, check_peer_id, id_from_bytes
from ilm._store import (
    MAX_POSITION,
    InboundRecord,
    OutboundRecord,
    StoredState,
    valid_incarnation,
)
from ilm.errors import (
    ILMError,
    InvalidPeerId,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreReadOnly,
    StoreSchemaTooNew,
)

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Loaded",
    "expected_objects",
    "load",
    "log",
    "migrate",
    "schema_objects",
    "schema_version",
    "store_error",
]

log = Logger(namespace="ilm.backends.sqlite")
"""The SQLite store's logger (one object, which the simulator listens to)."""

SCHEMA_VERSION = 2
"""The schema version this version of ILM writes."""

APPLICATION_ID = 0x494C4D31
"""``PRAGMA application_id`` of an ILM store ("ILM1")."""

Migration = Callable[[sqlite3.Connection], None]
"""A step that takes the schema from version ``v`` to ``v + 1``."""


def _create_v1(conn: sqlite3.Connection) -> None:
    """
    Version 0 (an empty file) to 1: create the tables.

    - ``ilm_schema``: one row, the schema version.
    - ``ilm_meta``: key/value settings of the store (``incarnation``).
    - ``peer``: a small integer key per peer id.  An ``int`` id is stored as
      an INTEGER and a ``str`` id as its UTF-8 bytes (a BLOB): SQLite
      compares values of different storage classes as different, so ``1``
      and ``"1"`` stay different peers.
    - ``outbound``: per peer, the stream's ``acked``, ``last_position`` and
      ``pending_bytes``.
    - ``outbox``: the stored messages not yet acknowledged, keyed by
      ``(peer_key, position)``, with the time (ms since the epoch) of the
      commit that stored them.
    - ``inbound``: the delivery mark per ``(peer_key, incarnation)``, and
      whether that incarnation is retired.
    """
    run_statements(
        conn,
        f"""
        PRAGMA application_id = {APPLICATION_ID};
        CREATE TABLE ilm_schema (version INTEGER NOT NULL);
        CREATE TABLE ilm_meta (
            key TEXT PRIMARY KEY,
            value NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE peer (
            peer_key INTEGER PRIMARY KEY,
            peer_id BLOB NOT NULL UNIQUE
        );
        CREATE TABLE outbound (
            peer_key INTEGER PRIMARY KEY,
            acked INTEGER NOT NULL,
            last_position INTEGER NOT NULL,
            pending_bytes INTEGER NOT NULL
        );
        CREATE TABLE outbox (
            peer_key INTEGER NOT NULL,
            position INTEGER NOT NULL,
            stored_at INTEGER NOT NULL,
            contents BLOB NOT NULL,
            PRIMARY KEY (peer_key, position)
        ) WITHOUT ROWID;
        CREATE TABLE inbound (
            peer_key INTEGER NOT NULL,
            incarnation TEXT NOT NULL,
            delivered INTEGER NOT NULL,
            retired INTEGER NOT NULL,
            PRIMARY KEY (peer_key, incarnation)
        ) WITHOUT ROWID;
        INSERT INTO ilm_schema (version) VALUES (0);
        """,
    )


def _add_retired_order(conn: sqlite3.Connection) -> None:
    """
    Version 1 to 2: ``inbound.retired_seq``, the order in which incarnations
    were retired (1, 2, 3, ... across the store; 0 for current ones, and for
    the retirements of version 1, whose order is unknown), so that the
    oldest retired records can be forgotten first.
    """
    conn.execute(
        "ALTER TABLE inbound ADD COLUMN retired_seq INTEGER NOT NULL DEFAULT 0"
    )


def run_statements(conn: sqlite3.Connection, script: str) -> None:
    """
    Run the ``;``-separated statements of ``script`` (which holds no ``;``
    inside a literal) in the current transaction.  (``executescript`` would
    commit the transaction first, so a migration could half-apply.)
    """
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


MIGRATIONS: Mapping[int, Migration] = {0: _create_v1, 1: _add_retired_order}
"""``MIGRATIONS[v]`` takes a store from schema version ``v`` to ``v + 1``."""


SchemaObject = tuple[str, str, str, str | None]
"""An entry of ``sqlite_master``: type, name, table, SQL (whitespace folded)."""


def schema_objects(conn: sqlite3.Connection) -> set[SchemaObject]:
    """
    :return: every object of the database's schema (tables, indexes,
        triggers, views), except the statistics tables of ``ANALYZE``.
    """
    return {
        (kind, name, table, " ".join(sql.split()) if sql is not None else None)
        for kind, name, table, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
        )
        if not name.startswith("sqlite_stat")
    }


_EXPECTED: dict[int, frozenset[SchemaObject]] = {}


def expected_objects(
    version: int, migrations: Mapping[int, Migration] = MIGRATIONS
) -> frozenset[SchemaObject]:
    """
    :return: the schema objects ILM creates for ``version``: those of a
        scratch database taken there by ``migrations``.
    """
    cached = _EXPECTED.get(version) if migrations is MIGRATIONS else None
    if cached is not None:
        return cached
    scratch = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for step in range(version):
            migrations[step](scratch)
        objects = frozenset(schema_objects(scratch))
    finally:
        scratch.close()
    if migrations is MIGRATIONS:
        _EXPECTED[version] = objects
    return objects


def schema_version(
    conn: sqlite3.Connection,
    path: str = "the database",
    migrations: Mapping[int, Migration] = MIGRATIONS,
    *,
    complete: bool = True,
) -> int:
    """
    :return: the schema version of the open database: 0 for an empty one.
    :raises StoreCorrupt: if it holds anything but is not an ILM store, or
        holds objects (tables, indexes, triggers, views) that ILM did not
        create: a trigger can delete or change what ILM writes; or (unless
        ``complete`` is false) lacks some that ILM created.
    :raises StoreSchemaTooNew: if it is an ILM store newer than this ILM.
    """
    objects = schema_objects(conn)
    if not objects:
        return 0
    (application_id,) = conn.execute("PRAGMA application_id").fetchone()
    tables = {name for kind, name, _, _ in objects if kind == "table"}
    if "ilm_schema" not in tables or application_id != APPLICATION_ID:
        raise StoreCorrupt(
            f"{path} is an SQLite database but not an ILM store (application id "
            f"0x{application_id & 0xFFFFFFFF:08x}, tables "
            f"{', '.join(sorted(tables)) or 'none'}); it was not modified"
        )
    row = conn.execute("SELECT version FROM ilm_schema").fetchone()
    if row is None or type(row[0]) is not int or row[0] < 0:
        raise StoreCorrupt(f"{path}: the store's schema version is unreadable: {row!r}")
    version: int = row[0]
    if version > SCHEMA_VERSION or version > max(migrations, default=-1) + 1:
        raise StoreSchemaTooNew(version, SCHEMA_VERSION)
    expected = expected_objects(version, migrations)
    extra = objects - expected
    missing = expected - objects if complete else set()
    if extra or missing:
        names = sorted(f"{kind} {name!r}" for kind, name, _, _ in extra)
        gone = sorted(f"{kind} {name!r}" for kind, name, _, _ in missing)
        raise StoreCorrupt(
            f"{path}: the schema is not what ILM created for version {version}"
            + (f"; objects ILM did not create: {', '.join(names)}" if names else "")
            + (f"; missing or altered: {', '.join(gone)}" if gone else "")
            + "; refusing to use it (nothing was written)"
        )
    return version


def migrate(
    conn: sqlite3.Connection,
    migrations: Mapping[int, Migration] = MIGRATIONS,
    target: int = SCHEMA_VERSION,
    path: str = "the database",
) -> tuple[int, int]:
    """
    Bring the schema of ``conn`` (in autocommit mode) up to ``target``, in
    one transaction: either every step applies or none does.  A new store
    also gets its incarnation in that transaction.  The schema found is
    checked first (:func:`schema_version`): nothing is written to a
    database that is not an ILM store or holds objects ILM did not create.

    :return: ``(version found, version now)``.
    :raises StoreSchemaTooNew: if the store is newer than ``target``.
    :raises StoreCorrupt: if the file is not an ILM store.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        try:
            found = version = schema_version(conn, path, migrations)
        except StoreSchemaTooNew as e:
            raise StoreSchemaTooNew(e.found, target) from None
        if version > target:
            raise StoreSchemaTooNew(version, target)
        while version < target:
            step = migrations.get(version)
            if step is None:
                raise StoreError(f"no migration from schema version {version}")
            step(conn)
            version += 1
            conn.execute("UPDATE ilm_schema SET version = ?", (version,))
        if found == 0:
            conn.execute(
                "INSERT INTO ilm_meta (key, value) VALUES ('incarnation', ?)",
                (uuid.uuid4().hex,),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found, version


# -- peer ids -------------------------------------------------------------------


def _decode_peer(value: object, bad: Callable[[str], StoreCorrupt]) -> PeerId:
    """
    A peer id as stored (an INTEGER, or the UTF-8 bytes of a ``str``),
    checked like any peer id.

    :param bad: makes the error, naming the file and the row.
    """
    candidate: object
    if type(value) is int:
        candidate = value
    elif type(value) is bytes:
        try:
            candidate = id_from_bytes(value)
        except InvalidPeerId as e:
            raise bad(f"peer id {value!r} is not valid: {e}") from None
    else:
        raise bad(f"peer id of unexpected type {type(value).__name__}")
    try:
        return check_peer_id(candidate)
    except (TypeError, ILMError) as e:
        raise bad(f"peer id {candidate!r} is not a valid peer id: {e}") from None


# -- errors ------------------------------------------------------------------------


def store_error(exc: BaseException, path: str, doing: str) -> StoreError:
    """
    Translate an exception raised by ``sqlite3`` or the OS into the matching
    :class:`ilm.errors.StoreError` subclass, by SQLite's (primary) error
    code or ``errno``.
    """
    if isinstance(exc, StoreError):
        return exc
    kind: type[StoreError] = StoreError
    detail = str(exc)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == sqlite3.SQLITE_FULL:
            kind = StoreFull
        elif primary == sqlite3.SQLITE_READONLY:
            kind = StoreReadOnly
        elif primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            kind = StoreCorrupt
        elif primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            kind = StoreLocked
        elif primary == sqlite3.SQLITE_PERM:
            kind = StoreReadOnly
        if name:
            detail = f"{detail} ({name})"
    elif isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
            kind = StoreFull
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            kind = StoreReadOnly
    error = kind(f"{doing} {path}: {detail}")
    error.__cause__ = exc
    return error


@attr.s(slots=True, auto_attribs=True)
class Loaded:
    state: StoredState
    keys: dict[PeerId, int]
    outbound: dict[int, tuple[int, int, int]]
    # For inspection: per peer key, the time (ms) its oldest pending message
    # was stored.
    oldest: dict[int, int | None] = attr.ib(factory=dict)


def _position(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_POSITION


def load(
    conn: sqlite3.Connection,
    path: str,
    oldest: bool = False,
    version: int = SCHEMA_VERSION,
) -> Loaded:
    """
    Read everything but the outbox (in the current transaction, or one of
    its own), checking every value it returns: a row that a damaged or
    tampered store could hold and that ILM would misread is a
    :class:`StoreCorrupt` naming the file and the row.

    :param oldest: also look up when each outbox's oldest message was
        stored (for ``ilm inspect``).
    :param version: the schema version of the store (``ilm inspect`` reads
        older ones as they are).
    """
    by_retirement = "retired_seq, " if version >= 2 else ""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:

        def bad(where: str, what: str) -> StoreCorrupt:
            return StoreCorrupt(f"{path}: {where}: {what}")

        row = conn.execute(
            "SELECT value FROM ilm_meta WHERE key = 'incarnation'"
        ).fetchone()
        if row is None or not valid_incarnation(row[0]):
            raise bad(
                "table ilm_meta, row 'incarnation'",
                f"the store's incarnation is missing or not 32 hex digits: {row!r}",
            )
        incarnation: str = row[0]
        ids: dict[int, PeerId] = {}
        for key, value in conn.execute("SELECT peer_key, peer_id FROM peer"):
            ids[key] = _decode_peer(
                value, functools.partial(bad, f"table peer, row with peer_key {key!r}")
            )
        outbound: dict[int, tuple[int, int, int]] = {}
        records = []
        stored_at: dict[int, int | None] = {}
        for key, acked, last, pending in conn.execute(
            "SELECT peer_key, acked, last_position, pending_bytes FROM outbound "
            "ORDER BY peer_key"
        ):
            if (
                key not in ids
                or not (_position(acked) and _position(last) and acked <= last)
                or type(pending) is not int
                or pending < 0
            ):
                raise bad(
                    f"table outbound, row with peer_key {key!r}",
                    f"bad outbound record {(key, acked, last, pending)!r}",
                )
            first, final = conn.execute(
                "SELECT min(position), max(position) FROM outbox WHERE peer_key = ?",
                (key,),
            ).fetchone()
            if (first, final) != ((acked + 1, last) if last > acked else (None, None)):
                raise bad(
                    f"table outbox, peer {ids[key]!r}",
                    f"the outbox holds positions {first}..{final}, but its state "
                    f"says {acked + 1}..{last}",
                )
            outbound[key] = (acked, last, pending)
            records.append(OutboundRecord(ids[key], acked, last, pending))
            if oldest:
                found = conn.execute(
                    "SELECT stored_at FROM outbox WHERE peer_key = ? "
                    "ORDER BY position LIMIT 1",
                    (key,),
                ).fetchone()
                stored_at[key] = None if found is None else found[0]
        marks = []
        for key, peer_incarnation, delivered, retired in conn.execute(
            "SELECT peer_key, incarnation, delivered, retired FROM inbound "
            f"ORDER BY peer_key, retired DESC, {by_retirement}incarnation"
        ):
            where = (
                f"table inbound, row (peer_key {key!r}, incarnation "
                f"{peer_incarnation!r})"
            )
            if key not in ids:
                raise bad(where, f"no peer with peer_key {key!r}")
            if not valid_incarnation(peer_incarnation):
                raise bad(where, "the incarnation is not 32 lowercase hex digits")
            if not _position(delivered) or retired not in (0, 1):
                raise bad(where, f"bad delivery mark {(delivered, retired)!r}")
            marks.append(
                InboundRecord(ids[key], peer_incarnation, delivered, bool(retired))
            )
    finally:
        if own:
            conn.execute("COMMIT")
    return Loaded(
        StoredState(incarnation, tuple(records), tuple(marks)),
        {peer_id: key for key, peer_id in ids.items()},
        outbound,
        stored_at,
    )
