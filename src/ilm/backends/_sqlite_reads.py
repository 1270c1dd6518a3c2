"""
Reads of the SQLite store's outbox, on its reader thread: a read-only
connection reading from a WAL snapshot, so reads do not wait behind
commits.  The sizes are looked up first (unless the writer's cache says
every message fits), so no message is read that is not returned.
"""

from __future__ import annotations

import sqlite3

from ilm._peerid import PeerId, stored_id
from ilm._store import StoredState
from ilm.backends._lifecycle import check_read_after, checked_run
from ilm.backends._sqlite_commit import SQLiteWriter
from ilm.backends._sqlite_file import connect
from ilm.backends._sqlite_schema import store_error

__all__ = ["SQLiteReader"]

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


class SQLiteReader:
    """
    The reader connection of one SQLite store.

    :param writer: the store's writer, whose size cache the reads use.
    """

    def __init__(self, writer: SQLiteWriter) -> None:
        self.path = writer.path
        self.writer = writer
        self.conn: sqlite3.Connection | None = None

    def open(self, state: StoredState) -> StoredState:
        try:
            conn = self.conn = connect(self.path)
            conn.execute("PRAGMA query_only = 1")
        except BaseException as e:
            raise store_error(e, self.path, "cannot open") from e
        return state

    def read(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> list[bytes]:
        conn = self.conn
        assert conn is not None
        try:
            conn.execute("BEGIN")
            try:
                row = conn.execute(
                    "SELECT peer_key, acked FROM outbound JOIN peer USING (peer_key) "
                    "WHERE peer_id = ?",
                    (stored_id(peer_id),),
                ).fetchone()
                if row is None:
                    return []
                key, acked = row
                check_read_after(peer_id, after, acked)
                largest = self.writer.largest.get(key)
                if (
                    largest is not None
                    and after >= self.writer.sized_after.get(key, 0)
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
        return checked_run(peer_id, after, rows)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
