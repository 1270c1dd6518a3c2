"""
The commit path of the SQLite store, on its writer thread: opening the file
(checks, lock, WAL, migration), applying each :class:`ilm.StoreBatch` as one
``BEGIN IMMEDIATE`` transaction, and what it caches between commits (peer
keys, each stream's positions, the largest message stored since opening,
which spares reads a look-up of sizes).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from bisect import bisect_right
from itertools import accumulate, chain, count, islice, repeat
from operator import lshift, or_, sub

from ilm._peerid import PeerId, stored_id
from ilm._store import (
    CommitResult,
    StoreBatch,
    StoredState,
    check_batch,
    retirement_order,
)
from ilm.backends._lifecycle import StoreLifecycle
from ilm.backends._sqlite_file import (
    StoreLock,
    check_directory,
    check_file,
    check_untouched,
    connect,
    create_private,
    sync_directory,
)
from ilm.backends._sqlite_schema import load, log, migrate, store_error
from ilm.errors import StoreError, StoreFull, StoreReadOnly

__all__ = ["SQLiteWriter"]

#: The most rows one outbox ``INSERT`` writes (a power of two), and about
#: the most bytes of contents it binds.
_INSERT_ROWS = 1024
_INSERT_BYTES = 256 * 1024


@functools.cache
def _insert_outbox(rows: int) -> str:
    """
    The text of an ``INSERT`` of ``rows`` outbox rows.  The peer key
    (``?1``) and the time (``?2``) are the same for every row of a batch
    and bound once; each row binds its position and contents.
    """
    values = ",".join(f"(?1,?{2 * i + 3},?2,?{2 * i + 4})" for i in range(rows))
    return (
        f"INSERT INTO outbox (peer_key, position, stored_at, contents) VALUES {values}"
    )


#: An outbox ``INSERT`` of a run of messages in one statement, whatever its
#: length: the contents bound as one BLOB and, per row, where its contents
#: start in it and how long they are, packed into one integer
#: (``start << 32 | length``) of a JSON array that ``json_each`` (built into
#: SQLite since 3.38) turns into rows (``substr`` of an empty BLOB is NULL,
#: hence the ``coalesce``).  SQLite then inserts the whole run
#: in one step, without the GIL: a run of 16,384 messages costs one hand-off
#: of the GIL instead of 16, each of which waits up to the interpreter's
#: switch interval while the reactor thread runs Python.
_INSERT_RUN = (
    "INSERT INTO outbox (peer_key, position, stored_at, contents) "
    "SELECT ?1, ?3 + key, ?2, "
    "coalesce(substr(?4, (value >> 32) + 1, value & 4294967295), x'') "
    "FROM json_each(?5)"
)

#: About the most bytes of contents one run binds (a cached statement keeps
#: the values it last bound).  A larger message is a run of its own.
_RUN_BYTES = 1024 * 1024


def runs_supported(conn: sqlite3.Connection) -> bool:
    """
    Whether this SQLite has ``json_each`` for :data:`_INSERT_RUN` (else
    the outbox is written with multi-row ``VALUES`` inserts).
    """
    try:
        (rows,) = conn.execute("SELECT count(*) FROM json_each('[1,2]')").fetchone()
    except sqlite3.Error:
        return False
    return bool(rows == 2)


def insert_runs(
    conn: sqlite3.Connection, key: int, now: int, first: int, contents: list[bytes]
) -> None:
    """
    Insert ``contents`` into the outbox of ``key`` from position ``first``,
    a run of about :data:`_RUN_BYTES` per statement (:data:`_INSERT_RUN`).
    """
    ends = list(accumulate(map(len, contents), initial=0))
    total = len(contents)
    start = 0
    while start < total:
        base = ends[start]
        stop = bisect_right(ends, base + _RUN_BYTES, start + 1) - 1
        if stop <= start:
            stop = start + 1
        run = contents[start:stop]
        starts = map(sub, ends[start:stop], repeat(base))
        packed = map(or_, map(lshift, starts, repeat(32)), map(len, run))
        conn.execute(
            _INSERT_RUN,
            (key, now, first + start, b"".join(run), f"[{','.join(map(str, packed))}]"),
        )
        start = stop


def insert_outbox(
    conn: sqlite3.Connection,
    key: int,
    now: int,
    first: int,
    contents: list[bytes],
    largest: int,
    max_rows: int,
) -> None:
    """
    Insert ``contents`` into the outbox of ``key`` from position ``first``,
    many rows per statement, where :func:`runs_supported` says no.

    One statement per row (``executemany``) costs more than the row: each
    step gives up the GIL and takes it back, and while the reactor thread
    runs Python, taking it back waits up to the interpreter's switch
    interval (5 ms), so a commit made while ``send_to`` is busy crawled at
    a few rows per millisecond.  A statement here binds at most
    ``max_rows`` rows and about :data:`_INSERT_BYTES` of contents
    (``largest`` is the largest message); its row count is a power of two,
    so that the writer's statement cache holds a few texts, each keeping
    at most that much of what it last bound.
    """
    rows = max_rows
    while rows > 1 and rows * largest > _INSERT_BYTES:
        rows >>= 1
    values = chain.from_iterable(zip(count(first), contents))
    left = len(contents)
    while left:
        step = rows if left >= rows else 1 << (left.bit_length() - 1)
        conn.execute(_insert_outbox(step), [key, now, *islice(values, 2 * step)])
        left -= step


#: The most delivery marks one upsert writes (a power of two).
_MARK_ROWS = 1024


@functools.cache
def _upsert_marks(rows: int) -> str:
    """
    The text of an upsert of ``rows`` delivery marks: each row binds its
    peer key, incarnation and position; a mark only ever moves forward.
    """
    values = ",".join(["(?,?,?,0)"] * rows)
    return (
        "INSERT INTO inbound (peer_key, incarnation, delivered, retired) "
        f"VALUES {values} ON CONFLICT (peer_key, incarnation) DO UPDATE "
        "SET delivered = excluded.delivered WHERE excluded.delivered > delivered"
    )


def upsert_marks(
    conn: sqlite3.Connection, marks: list[tuple[int, str, int]], max_rows: int
) -> None:
    """
    Write the delivery marks ``marks`` (``(peer key, incarnation,
    position)``, one per stream), up to ``max_rows`` per statement: one
    statement for a commit's marks, where ``executemany`` ran one per
    stream (a thousand per commit with a thousand busy peers, each step
    giving up the GIL and taking it back, as :func:`insert_outbox` says).
    A statement's row count is a power of two, so that the writer's
    statement cache holds a few texts; the rows beyond the marks repeat the
    last one, which then changes nothing (a mark moves only forward).
    """
    for start in range(0, len(marks), max_rows):
        chunk = marks[start : start + max_rows]
        rows = 1 << (len(chunk) - 1).bit_length()
        chunk += [chunk[-1]] * (rows - len(chunk))
        conn.execute(_upsert_marks(rows), list(chain.from_iterable(chunk)))


_RELEASED = (
    "SELECT coalesce(sum(length(contents)), 0) FROM outbox "
    "WHERE peer_key = ? AND position <= ?"
)
_DELETE_OUTBOX = "DELETE FROM outbox WHERE peer_key = ? AND position <= ?"
_SAVE_OUTBOUND = (
    "INSERT OR REPLACE INTO outbound (peer_key, acked, last_position, pending_bytes) "
    "VALUES (?, ?, ?, ?)"
)
_RETIRE = (
    "INSERT INTO inbound (peer_key, incarnation, delivered, retired, retired_seq) "
    "VALUES (?, ?, 0, 1, (SELECT coalesce(max(retired_seq), 0) + 1 FROM inbound)) "
    "ON CONFLICT (peer_key, incarnation) DO UPDATE "
    "SET retired = 1, retired_seq = excluded.retired_seq WHERE NOT retired"
)
_FORGET = "DELETE FROM inbound WHERE peer_key = ? AND incarnation = ?"


class SQLiteWriter:
    """
    The writer connection of one SQLite store and what it caches.

    :param path: the store's file.
    :param synchronous: ``"FULL"`` or ``"NORMAL"``.
    :param max_size: the largest size the file may grow to, or ``None``.
    :param life: the store's state (refuses commits after a failed
        ``COMMIT``).
    """

    def __init__(
        self,
        path: str,
        synchronous: str,
        max_size: int | None,
        life: StoreLifecycle,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.max_size = max_size
        self.life = life
        #: Rows per outbox INSERT, within the SQLite's limit on bound values.
        self.insert_rows = _INSERT_ROWS
        #: Whether outbox inserts are runs (:func:`insert_runs`).
        self.insert_runs = False
        #: Delivery marks per upsert, within the same limit.
        self.mark_rows = _MARK_ROWS
        self.lock = StoreLock(path)
        self.conn: sqlite3.Connection | None = None
        self.schema_version = 0
        # Peer id -> key, key -> (acked, last, pending bytes), as of the
        # last successful commit.
        self._keys: dict[PeerId, int] = {}
        self._outbound: dict[int, tuple[int, int, int]] = {}
        # Read by the reader thread: per peer key, the largest message
        # stored since the store was opened, and the last position before
        # that (the sizes of older messages are not known without reading
        # them).  A read whose messages all fit needs no look-up of sizes.
        self.largest: dict[int, int] = {}
        self.sized_after: dict[int, int] = {}

    def apply_max_size(self) -> None:
        conn = self.conn
        assert conn is not None
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        pages = 2**31 - 2 if self.max_size is None else self.max_size // page_size
        conn.execute(f"PRAGMA max_page_count = {max(1, int(pages))}")

    def open(self) -> StoredState:
        path = self.path
        try:
            check_directory(path)
            existed = check_file(path)
            if existed:
                # Before anything is created or changed (the lock file, the
                # WAL switch): a file that is not an ILM store, or one with
                # objects ILM did not create, is refused untouched.
                check_untouched(path)
            self.lock.acquire()
            if not os.path.exists(path):
                create_private(path)
            # A statement cache, though a cached statement keeps the values
            # last bound to it: the writer's texts are fixed (an outbox
            # insert binds the peer key and the time), so it holds the
            # statements of one commit, and the inserts among them at most
            # _INSERT_BYTES each, or one message.  Preparing a 1,024-row
            # insert (13 ms) costs far more than running it (0.5 ms).  Room
            # for every size of both multi-row texts (11 each) and the rest.
            conn = self.conn = connect(path, cached_statements=40)
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode != "wal":
                raise StoreError(f"cannot put {path} in WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            variables = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            rows = _INSERT_ROWS
            while rows > 1 and 2 * rows + 2 > variables:
                rows >>= 1
            self.insert_rows = rows
            self.insert_runs = runs_supported(conn)
            rows = _MARK_ROWS
            while rows > 1 and 3 * rows > variables:
                rows >>= 1
            self.mark_rows = rows
            conn.execute("PRAGMA journal_size_limit = 67108864")
            self.apply_max_size()
            found, version = migrate(conn, path=path)
            if not existed:
                sync_directory(path)
            loaded = load(conn, path)
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
        self.largest = {}
        self.sized_after = {key: last for key, (_, last, _) in loaded.outbound.items()}
        self.life.broken = None
        return loaded.state

    def reload(self) -> StoredState:
        conn = self.conn
        assert conn is not None
        try:
            loaded = load(conn, self.path)
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
                conn = self.conn
                assert conn is not None
                cursor = conn.execute(
                    "INSERT INTO peer (peer_id) VALUES (?)", (stored_id(peer_id),)
                )
                new_key = cursor.lastrowid
                assert new_key is not None
                key = new[peer_id] = new_key
        return key

    def commit(self, batch: StoreBatch) -> CommitResult:
        self.life.check_unbroken()
        conn = self.conn
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
                    changed[key] = (
                        acked,
                        last + len(contents),
                        pending + sum(map(len, contents)),
                    )
                    if contents:
                        size = largest[key] = max(map(len, contents))
                        if self.insert_runs:
                            insert_runs(conn, key, now, first, contents)
                        else:
                            insert_outbox(
                                conn, key, now, first, contents, size, self.insert_rows
                            )
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
                upsert_marks(
                    conn,
                    [
                        (self._key(peer_id, new_keys), incarnation, position)
                        for (peer_id, incarnation), position in batch.delivered.items()
                    ],
                    self.mark_rows,
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
                raise self.life.in_doubt(error, "on disk", path=self.path) from e
            raise error from e
        keys.update(new_keys)
        outbound.update(changed)
        for key, size in largest.items():
            if size > self.largest.get(key, -1):
                self.largest[key] = size
        return CommitResult(released)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back

    def close(self) -> None:
        conn, self.conn = self.conn, None
        try:
            if conn is not None:
                conn.close()
        finally:
            self.lock.release()
