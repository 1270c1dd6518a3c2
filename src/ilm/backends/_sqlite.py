"""
An :class:`ilm.interfaces.IBackend` that keeps a node's state in one SQLite
file (the standard library's ``sqlite3``): ILM's default, durable store.

- One writer connection on a dedicated thread applies each
  :class:`ilm.StoreBatch` as one transaction (ILM already groups everything
  that arrives while a commit runs into the next batch).  WAL journal,
  ``synchronous=FULL`` by default: when a commit's Deferred fires, the batch
  is on disk.
- A second, read-only connection on its own thread streams the outbox back
  (``read_outbound``) from a WAL snapshot, so reads do not wait behind
  commits.
- One process per store: an exclusive ``flock`` on ``PATH-lock``, which the
  kernel releases when the process dies, however it dies.
- Opening reads the per-peer state and the delivery marks, never the outbox.

docs/durability.md says what is durable when, what ``synchronous=NORMAL``
risks, and what ILM does on each store error.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from itertools import count
from typing import Any, TypeVar

import attr
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._peerid import PeerId, check_peer_id, id_bytes, id_from_bytes
from ilm._store import (
    MAX_POSITION,
    CommitResult,
    InboundRecord,
    OutboundRecord,
    StoreBatch,
    StoredState,
    check_batch,
    retirement_order,
    valid_incarnation,
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

log = Logger(namespace="ilm.backends.sqlite")

_T = TypeVar("_T")

SCHEMA_VERSION = 2
"""The schema version this version of ILM writes."""

APPLICATION_ID = 0x494C4D31
"""``PRAGMA application_id`` of an ILM store ("ILM1")."""

_SQLITE_HEADER = b"SQLite format 3\x00"

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


def _encode_peer(peer_id: PeerId) -> int | bytes:
    if type(peer_id) is int:
        return peer_id
    return id_bytes(str(peer_id))


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


# -- the backend ----------------------------------------------------------------------

_INSERT_OUTBOX = (
    "INSERT INTO outbox (peer_key, position, stored_at, contents) "
    "VALUES ({key:d}, ?, {now:d}, ?)"
)
"""
The peer key and the time are the same for every row of a batch, so they
are written into the statement and only the position and contents are bound
per row (a third faster than binding four values).  Both are ``int``s
formatted by ``{:d}``: nothing from outside reaches the SQL text.
"""
_RELEASED = (
    "SELECT coalesce(sum(length(contents)), 0) FROM outbox "
    "WHERE peer_key = ? AND position <= ?"
)
_DELETE_OUTBOX = "DELETE FROM outbox WHERE peer_key = ? AND position <= ?"
_SAVE_OUTBOUND = (
    "INSERT OR REPLACE INTO outbound (peer_key, acked, last_position, pending_bytes) "
    "VALUES (?, ?, ?, ?)"
)
_MARK = (
    "INSERT INTO inbound (peer_key, incarnation, delivered, retired) "
    "VALUES (?, ?, ?, 0) ON CONFLICT (peer_key, incarnation) DO UPDATE "
    "SET delivered = excluded.delivered WHERE excluded.delivered > delivered"
)
_RETIRE = (
    "INSERT INTO inbound (peer_key, incarnation, delivered, retired, retired_seq) "
    "VALUES (?, ?, 0, 1, (SELECT coalesce(max(retired_seq), 0) + 1 FROM inbound)) "
    "ON CONFLICT (peer_key, incarnation) DO UPDATE "
    "SET retired = 1, retired_seq = excluded.retired_seq WHERE NOT retired"
)
_FORGET = "DELETE FROM inbound WHERE peer_key = ? AND incarnation = ?"
_READ_LENGTHS = (
    "SELECT length(contents) FROM outbox WHERE peer_key = ? AND position > ? "
    "ORDER BY position LIMIT ?"
)
"""
The sizes of the next messages, to decide how many to read: ``length()`` of
a BLOB comes from the record header, without reading the contents (nor the
overflow pages of a large one).
"""
_READ_OUTBOX = (
    "SELECT position, contents FROM outbox WHERE peer_key = ? AND position > ? "
    "ORDER BY position LIMIT ?"
)

_SYNCHRONOUS = ("FULL", "NORMAL")


class _Lock:
    """
    An exclusive ``flock`` on ``PATH-lock``: one process (and one backend)
    per store.  The kernel drops it when the process dies.
    """

    def __init__(self, store_path: str) -> None:
        self.path = store_path + "-lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise store_error(e, self.path, "cannot create the lock file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = b""
            try:
                holder = os.pread(fd, 32, 0).strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f" by process {holder.decode()}" if holder.isdigit() else ""
                raise StoreLocked(
                    f"{self.path.removesuffix('-lock')} is already open (locked"
                    f"{who}); a store takes one process and one backend at a time"
                ) from e
            raise store_error(e, self.path, "cannot lock") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except OSError:
            pass  # only informative
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def _check_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StoreError(f"cannot open {path}: directory {directory} does not exist")


def _check_file(path: str) -> bool:
    """
    Check that ``path`` can be an ILM store before SQLite touches it.

    :return: whether the file exists (with content).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        header = None
    except IsADirectoryError:
        raise StoreCorrupt(f"{path} is a directory, not an ILM store")
    except OSError as e:
        raise store_error(e, path, "cannot read") from e
    if header and header != _SQLITE_HEADER:
        raise StoreCorrupt(f"{path} is not an SQLite database (so not an ILM store)")
    if not os.access(directory, os.W_OK):
        raise StoreReadOnly(
            f"cannot open {path}: its directory {directory} is not writable "
            f"(SQLite needs to create its -wal and -shm files there)"
        )
    if header is not None and not os.access(path, os.W_OK):
        raise StoreReadOnly(f"cannot open {path}: the file is read-only")
    return bool(header)


def _check_untouched(path: str) -> None:
    """
    Check the existing database at ``path`` without changing anything: read
    its main file alone (``immutable``: no lock, no journal, no WAL or
    shared-memory file is created or read) and refuse it if it is not an
    ILM store, holds objects ILM did not create, or is newer than this ILM.

    What only a write-ahead log holds (the last commits of a node that
    crashed) is not seen here, and the main file alone may not even read
    (a checkpoint that was interrupted): only what the main file shows
    for sure refuses the store here; anything else is left to
    :func:`migrate`, which checks again under the lock, before writing.
    """
    from urllib.parse import quote

    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        schema_version(conn, path, complete=False)
    except sqlite3.Error:
        return
    finally:
        conn.close()


def _create_private(path: str) -> None:
    """
    Create the (empty) database file readable and writable by its owner
    only; SQLite gives its ``-wal`` and ``-shm`` files the same mode.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise store_error(e, path, "cannot create") from e
    os.close(fd)


def _sync_directory(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attr.s(slots=True, auto_attribs=True)
class _Loaded:
    state: StoredState
    keys: dict[PeerId, int]
    outbound: dict[int, tuple[int, int, int]]
    # For inspection: per peer key, the time (ms) its oldest pending message
    # was stored.
    oldest: dict[int, int | None] = attr.ib(factory=dict)


def _position(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_POSITION


def _load(
    conn: sqlite3.Connection,
    path: str,
    oldest: bool = False,
    version: int = SCHEMA_VERSION,
) -> _Loaded:
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
    return _Loaded(
        StoredState(incarnation, tuple(records), tuple(marks)),
        {peer_id: key for key, peer_id in ids.items()},
        outbound,
        stored_at,
    )


@implementer(IBackend)
class SQLiteBackend:
    """
    A durable store in one SQLite file.

    :param path: the store's file (``str`` or ``os.PathLike``); created with
        a fresh incarnation if it does not exist.  SQLite keeps ``PATH-wal``
        and ``PATH-shm`` next to it, and the backend locks ``PATH-lock``.
    :param synchronous: ``"FULL"`` (default): every commit is on disk when
        its Deferred fires.  ``"NORMAL"``: commits survive a crash of the
        application but the last ones can be lost on power loss or an OS
        crash (see docs/durability.md for what that means for ILM).
    :param max_size: if given, the largest size in bytes the database may
        grow to; a commit that would exceed it fails with
        :class:`ilm.errors.StoreFull` (see :meth:`set_max_size`).
    :param reactor: the reactor whose thread pool machinery runs the
        database threads; the global reactor if omitted.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        max_size: int | None = None,
        reactor: Any = None,
    ) -> None:
        self.path = os.fspath(path)
        if not isinstance(self.path, str):
            raise TypeError("path must be a str or os.PathLike[str]")
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise ValueError(f"{self.path!r} is not the path of a file")
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size!r}")
        self.synchronous: str = mode
        self._max_size = max_size
        self._lock = _Lock(self.path)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._threads = StoreThreads(
            reactor, f"sqlite {self.path}", self._reactor_stopping
        )
        self._open = False
        self._closing: Deferred[None] | None = None
        self._broken: StoreError | None = None
        # Owned by the writer thread: peer id -> key, key -> (acked, last,
        # pending bytes), as of the last successful commit.
        self._keys: dict[PeerId, int] = {}
        self._outbound: dict[int, tuple[int, int, int]] = {}
        # Written by the writer thread, read by the reader: per peer key,
        # the largest message stored since the store was opened, and the
        # last position before that (the sizes of older messages are not
        # known without reading them).  A read whose messages all fit
        # needs no look-up of their sizes.
        self._largest: dict[int, int] = {}
        self._sized_after: dict[int, int] = {}
        self.schema_version = 0

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"

    # -- threads ---------------------------------------------------------------

    def _reactor_stopping(self) -> None:
        """
        The reactor is shutting down with the store still open: stop the
        threads (else the process could not exit).  What was committed is
        on disk.  Later calls fail (or, for ``close``, do nothing).
        """
        self._open = False
        self._threads.stop()
        self._lock.release()

    # -- IBackend ----------------------------------------------------------------

    def open(self) -> Deferred[StoredState]:
        """
        Open (creating if needed) the store; see
        :meth:`ilm.interfaces.IBackend.open`.  Fails with
        :class:`ilm.errors.StoreLocked`, :class:`~ilm.errors.StoreReadOnly`,
        :class:`~ilm.errors.StoreCorrupt`,
        :class:`~ilm.errors.StoreSchemaTooNew` or another
        :class:`~ilm.errors.StoreError`.
        """
        if self._closing is not None:
            return fail(StoreError("the store is closing"))
        if self._open:
            return self._threads.on_writer(self._reload)
        self._threads.start()
        self._open = True
        d = self._threads.on_writer(self._open_writer)
        d.addCallback(lambda state: self._threads.on_reader(self._open_reader, state))
        d.addErrback(self._open_failed)
        return d

    def _open_failed(self, reason: Failure) -> Deferred[StoredState]:
        """
        Undo a failed open: close whatever was opened, release the lock,
        stop the threads, then fail with ``reason``.
        """
        d = self._threads.on_writer(self._close_writer)
        d.addBoth(lambda _: self._threads.on_reader(self._close_reader))

        def stopped(_: object) -> Failure:
            self._threads.stop()
            self._open = False
            return reason

        return d.addBoth(stopped)

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        """
        Apply ``batch`` as one transaction; see
        :meth:`ilm.interfaces.IBackend.commit`.
        """
        if not self._open or self._closing is not None:
            return fail(StoreError("the store is closed"))
        return self._threads.on_writer(self._commit, batch)

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        """
        Read stored messages to ``peer_id`` after position ``after``; see
        :meth:`ilm.interfaces.IBackend.read_outbound`.  The sizes are looked
        up first, so no message is read that is not returned.
        """
        if not self._open or self._closing is not None:
            return fail(StoreError("the store is closed"))
        return self._threads.on_reader(self._read, peer_id, after, limit, max_bytes)

    def close(self) -> Deferred[None]:
        """
        Finish what is queued, close the connections and release the lock.
        Commits and reads after this fail with :class:`ilm.errors.StoreError`.
        """
        if self._closing is not None:
            waiter: Deferred[None] = Deferred()

            def done_closing(_: object) -> None:
                waiter.callback(None)

            self._closing.addCallback(done_closing)
            return waiter
        if not self._open:
            return succeed(None)
        closing = self._closing = Deferred()
        errors: list[Failure] = []
        writer = self._threads.on_writer(self._close_writer)
        writer.addErrback(errors.append)
        reader = self._threads.on_reader(self._close_reader)
        reader.addErrback(errors.append)

        def closed(_: object) -> Failure | None:
            self._threads.stop()
            self._open = False
            self._closing = None
            closing.callback(None)
            return errors[0] if errors else None

        return DeferredList([writer, reader]).addCallback(closed)

    def set_max_size(self, max_size: int | None) -> Deferred[None]:
        """
        Change the size limit of an open store (``None``: no limit beyond
        SQLite's own).  Raising it lets commits that failed with
        :class:`ilm.errors.StoreFull` succeed again.
        """
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size!r}")
        self._max_size = max_size
        if not self._open:
            return succeed(None)
        return self._threads.on_writer(self._apply_max_size)

    # -- on the writer thread ----------------------------------------------------------

    def _connect(self, cached_statements: int = 64) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=10.0,
            cached_statements=cached_statements,
        )

    def _apply_max_size(self) -> None:
        conn = self._writer
        assert conn is not None
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        pages = 2**31 - 2 if self._max_size is None else self._max_size // page_size
        conn.execute(f"PRAGMA max_page_count = {max(1, int(pages))}")

    def _open_writer(self) -> StoredState:
        path = self.path
        try:
            _check_directory(path)
            existed = _check_file(path)
            if existed:
                # Before anything is created or changed (the lock file, the
                # WAL switch): a file that is not an ILM store, or one with
                # objects ILM did not create, is refused untouched.
                _check_untouched(path)
            self._lock.acquire()
            if not os.path.exists(path):
                _create_private(path)
            # No statement cache on the writer: a cached statement keeps the
            # values last bound to it, and each commit's outbox insert has
            # its own text (its time and peer key are literals), so 64 of
            # them held up to 64 messages (64 MiB of 1 MiB messages).
            # Preparing the few statements of a commit costs microseconds
            # next to its fsync.
            conn = self._writer = self._connect(cached_statements=0)
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise StoreError(f"cannot put {path} in WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            self._apply_max_size()
            found, version = migrate(conn, path=path)
            if not existed:
                _sync_directory(path)
            loaded = _load(conn, path)
        except BaseException as e:
            raise store_error(e, path, "cannot open") from e
        if found != version:
            log.info(
                "store {path} migrated from schema version {found} to {version}",
                path=path,
                found=found,
                version=version,
                ilm_event="store_migrated",
            )
        self.schema_version = version
        self._keys = loaded.keys
        self._outbound = loaded.outbound
        self._largest = {}
        self._sized_after = {key: last for key, (_, last, _) in loaded.outbound.items()}
        self._broken = None
        return loaded.state

    def _reload(self) -> StoredState:
        conn = self._writer
        assert conn is not None
        try:
            loaded = _load(conn, self.path)
        except BaseException as e:
            raise store_error(e, self.path, "cannot read") from e
        self._keys = loaded.keys
        self._outbound = loaded.outbound
        return loaded.state

    def _key(self, peer_id: PeerId, new: dict[PeerId, int]) -> int:
        key = self._keys.get(peer_id)
        if key is None:
            key = new.get(peer_id)
            if key is None:
                conn = self._writer
                assert conn is not None
                cursor = conn.execute(
                    "INSERT INTO peer (peer_id) VALUES (?)", (_encode_peer(peer_id),)
                )
                new_key = cursor.lastrowid
                assert new_key is not None
                key = new[peer_id] = new_key
        return key

    def _commit(self, batch: StoreBatch) -> CommitResult:
        if self._broken is not None:
            raise self._broken
        conn = self._writer
        assert conn is not None
        keys = self._keys
        outbound = self._outbound
        empty = (0, 0, 0)
        # Check first, as every backend does: a bad batch applies nothing and
        # leaves the store usable.

        def last_position(peer_id: PeerId) -> int:
            key = keys.get(peer_id)
            return outbound.get(key, empty)[1] if key is not None else 0

        check_batch(batch, last_position)
        new_keys: dict[PeerId, int] = {}
        changed: dict[int, tuple[int, int, int]] = {}
        released: dict[PeerId, int] = {}
        largest: dict[int, int] = {}
        execute = conn.execute
        try:
            execute("BEGIN IMMEDIATE")
            if batch.messages:
                now = int(time.time() * 1000)
                for peer_id, (first, contents) in batch.messages.items():
                    key = self._key(peer_id, new_keys)
                    acked, last, pending = outbound.get(key, empty)
                    conn.executemany(
                        _INSERT_OUTBOX.format(key=key, now=now),
                        zip(count(first), contents),
                    )
                    changed[key] = (
                        acked,
                        last + len(contents),
                        pending + sum(map(len, contents)),
                    )
                    if contents:
                        largest[key] = max(map(len, contents))
            for peer_id, position in batch.acked.items():
                key = self._key(peer_id, new_keys)
                acked, last, pending = changed.get(key) or outbound.get(key, empty)
                if position <= acked:
                    if key not in outbound and key not in changed:
                        changed[key] = (acked, last, pending)
                    continue
                (freed,) = execute(_RELEASED, (key, position)).fetchone()
                execute(_DELETE_OUTBOX, (key, position))
                changed[key] = (position, last, pending - freed)
                released[peer_id] = freed
            if changed:
                conn.executemany(
                    _SAVE_OUTBOUND,
                    [(key, *values) for key, values in changed.items()],
                )
            if batch.forgotten:
                conn.executemany(
                    _FORGET,
                    [
                        (self._key(peer_id, new_keys), incarnation)
                        for peer_id, incarnation in batch.forgotten
                    ],
                )
            if batch.delivered:
                conn.executemany(
                    _MARK,
                    [
                        (self._key(peer_id, new_keys), incarnation, position)
                        for (peer_id, incarnation), position in batch.delivered.items()
                    ],
                )
            if batch.retired:
                conn.executemany(
                    _RETIRE,
                    [
                        (self._key(peer_id, new_keys), incarnation)
                        for peer_id, incarnation in sorted(
                            batch.retired, key=retirement_order
                        )
                    ],
                )
        except BaseException as e:
            self._rollback(conn)
            raise store_error(e, self.path, "cannot commit to") from e
        try:
            execute("COMMIT")
        except BaseException as e:
            self._rollback(conn)
            error = store_error(e, self.path, "cannot commit to")
            if not isinstance(error, StoreFull | StoreReadOnly):
                # SQLite may have written the commit and failed to sync it:
                # whether the batch is on disk is unknown.  Say so (its
                # messages may yet be delivered), and, since reusing its
                # positions could collide with it, refuse all further commits;
                # a restart reads the truth from the file.
                in_doubt = StoreInDoubt(
                    f"{error}: whether the batch is on disk is unknown"
                )
                self._broken = StoreError(
                    f"the store {self.path} is in an unknown state after a "
                    f"failed commit ({error}); restart the node"
                )
                self._broken.__cause__ = error
                log.critical(
                    "commit to {path} failed in an unknown state; the store "
                    "refuses further commits until reopened: {error}",
                    path=self.path,
                    error=str(error),
                    ilm_event="store_broken",
                )
                raise in_doubt from e
            raise error from e
        keys.update(new_keys)
        outbound.update(changed)
        for key, size in largest.items():
            if size > self._largest.get(key, -1):
                self._largest[key] = size
        return CommitResult(released)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back

    def _close_writer(self) -> None:
        conn, self._writer = self._writer, None
        try:
            if conn is not None:
                conn.close()
        finally:
            self._lock.release()

    # -- on the reader thread ----------------------------------------------------------

    def _open_reader(self, state: StoredState) -> StoredState:
        try:
            conn = self._reader = self._connect()
            conn.execute("PRAGMA query_only = 1")
        except BaseException as e:
            raise store_error(e, self.path, "cannot open") from e
        return state

    def _read(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> list[bytes]:
        conn = self._reader
        assert conn is not None
        try:
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    "SELECT peer_key, acked FROM outbound JOIN peer USING (peer_key) "
                    "WHERE peer_id = ?",
                    (_encode_peer(peer_id),),
                ).fetchone()
                if row is None:
                    return []
                key, acked = row
                if after < acked:
                    raise StoreError(
                        f"outbox to {peer_id!r}: read after {after}, "
                        f"below acknowledged {acked}"
                    )
                largest = self._largest.get(key)
                if (
                    largest is not None
                    and after >= self._sized_after.get(key, 0)
                    and largest * limit <= max_bytes
                ):
                    # Stored since the store was opened, none larger than
                    # ``largest``: all ``limit`` fit.
                    count = limit
                else:
                    count = 0
                    total = 0
                    for (size,) in conn.execute(_READ_LENGTHS, (key, after, limit)):
                        total += size
                        if total > max_bytes and count:
                            break
                        count += 1
                rows = conn.execute(_READ_OUTBOX, (key, after, count)).fetchall()
            finally:
                conn.execute("COMMIT")
        except BaseException as e:
            raise store_error(e, self.path, "cannot read from") from e
        if rows and (rows[0][0] != after + 1 or rows[-1][0] != after + len(rows)):
            raise StoreCorrupt(
                f"outbox to {peer_id!r} has a gap after position {after}: "
                f"read {rows[0][0]}..{rows[-1][0]} ({len(rows)} rows)"
            )
        return [contents for _, contents in rows]

    def _close_reader(self) -> None:
        conn, self._reader = self._reader, None
        if conn is not None:
            conn.close()


# -- inspection (read-only, no lock) --------------------------------------------


@attr.s(frozen=True, slots=True, auto_attribs=True)
class OutboxReport:
    """
    The outbound stream to one peer, as ``ilm inspect`` shows it.

    ``oldest_stored_at``: when (seconds since the epoch) the oldest pending
    message was committed; ``None`` when nothing is pending.
    """

    peer_id: PeerId
    acked: int
    last_position: int
    pending_bytes: int
    oldest_stored_at: float | None

    @property
    def pending(self) -> int:
        return self.last_position - self.acked


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LockHolder:
    """
    Whether a live process holds a store (its ``PATH-lock``): ``held`` is
    ``None`` when that cannot be told; ``pid`` is the holder's process id
    when known.
    """

    held: bool | None
    pid: int | None = None


def lock_holder(path: str | os.PathLike[str]) -> LockHolder:
    """
    Tell whether a live process holds the store at ``path``, without taking
    or disturbing its lock (a node may be starting at that moment): on
    Linux from ``/proc/locks``, which names the holding process.  Elsewhere
    the lock is tried, shared and released at once (a node that starts in
    that instant would find the store locked and fail).
    """
    lock = os.fspath(path) + "-lock"
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return LockHolder(False)
    except OSError:
        return LockHolder(None)
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return _probe_lock(lock)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            where = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[4])
        except ValueError:
            continue
        if where == wanted:
            return LockHolder(True, pid)
    return LockHolder(False)


def _probe_lock(lock: str) -> LockHolder:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return LockHolder(None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return LockHolder(None)
            holder = os.pread(fd, 32, 0).strip()
            return LockHolder(True, int(holder) if holder.isdigit() else None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return LockHolder(False)
    finally:
        os.close(fd)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StoreReport:
    """
    A read-only snapshot of a store, for ``ilm inspect``.
    """

    path: str
    schema_version: int
    incarnation: str
    outbound: tuple[OutboxReport, ...]
    inbound: tuple[InboundRecord, ...]
    holder: LockHolder = attr.ib(factory=lambda: LockHolder(None))


def inspect_store(path: str | os.PathLike[str]) -> StoreReport:
    """
    Read a store without locking it or changing it (it may belong to a
    running node): one consistent snapshot, every value checked as when a
    node opens it, and whether a live process holds it.

    :raises StoreError: no store at ``path``;
        :class:`ilm.errors.StoreCorrupt`: not an ILM store, objects ILM did
        not create, a bad row;
        :class:`ilm.errors.StoreSchemaTooNew`: written by a newer ILM.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise StoreError(f"no ILM store at {path}")
    with open(path, "rb") as f:
        if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
            raise StoreCorrupt(f"{path} is not an SQLite database, not an ILM store")
    holder = lock_holder(path)
    if not holder.held:
        # Nobody writes it: check the main file alone first, so that a
        # foreign database is not touched (a read-only connection to a WAL
        # database may create its -shm file).
        _check_untouched(path)
    from urllib.parse import quote

    uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0)
    except sqlite3.Error as e:
        raise store_error(e, path, "cannot open") from e
    try:
        conn.execute("BEGIN")
        version = schema_version(conn, path)
        if version == 0:
            raise StoreError(f"{path} is an empty database, not yet an ILM store")
        loaded = _load(conn, path, oldest=True, version=version)
        conn.execute("COMMIT")
    except BaseException as e:
        raise store_error(e, path, "cannot inspect") from e
    finally:
        conn.close()
    outbound = []
    for record in loaded.state.outbound:
        stamp = loaded.oldest.get(loaded.keys[record.peer_id])
        outbound.append(
            OutboxReport(
                record.peer_id,
                record.acked,
                record.last_position,
                record.pending_bytes,
                None if stamp is None else stamp / 1000,
            )
        )
    return StoreReport(
        path,
        version,
        loaded.state.incarnation,
        tuple(outbound),
        loaded.state.inbound,
        holder,
    )


def reincarnate_store(path: str | os.PathLike[str]) -> tuple[str, str]:
    """
    Give the store at ``path`` a new incarnation, as a store restored from a
    backup needs (docs/durability.md): peers then take its outbox for a new
    stream instead of positions they have already delivered.  Takes the
    store's lock (so it refuses a store a live process holds, with
    :class:`ilm.errors.StoreLocked`), checks the store as opening does, and
    commits the change durably.

    :return: ``(old incarnation, new incarnation)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise StoreError(f"no ILM store at {path}")
    if not _check_file(path):
        raise StoreError(f"no ILM store at {path}")
    _check_untouched(path)
    lock = _Lock(path)
    lock.acquire()
    try:
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        except sqlite3.Error as e:
            raise store_error(e, path, "cannot open") from e
        try:
            conn.execute("PRAGMA synchronous = FULL")
            version = schema_version(conn, path)
            if version == 0:
                raise StoreError(f"{path} is an empty database, not an ILM store")
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = _load(conn, path, version=version).state.incarnation
                new = uuid.uuid4().hex
                conn.execute(
                    "UPDATE ilm_meta SET value = ? WHERE key = 'incarnation'", (new,)
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except BaseException as e:
            raise store_error(e, path, "cannot reincarnate") from e
        finally:
            conn.close()
    finally:
        lock.release()
    log.warn(
        "store {path} reincarnated: incarnation {old} replaced by {new}",
        path=path,
        old=old,
        new=new,
        ilm_event="store_reincarnated",
    )
    return old, new
