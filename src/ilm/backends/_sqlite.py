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
:class:`SQLiteBackend` is the facade over its parts: the schema
(``_sqlite_schema``), the file and its lock (``_sqlite_file``), the commit
path (``_sqlite_commit``), the reads (``_sqlite_reads``) and inspection
(``_sqlite_inspect``).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ilm._peerid import PeerId
from ilm._store import CommitResult, StoreBatch, StoredState
from ilm.backends._lifecycle import StoreLifecycle
from ilm.backends._sqlite_commit import SQLiteWriter
from ilm.backends._sqlite_file import LockHolder, lock_holder
from ilm.backends._sqlite_inspect import (
    OutboxReport,
    StoreReport,
    inspect_store,
    reincarnate_store,
)
from ilm.backends._sqlite_reads import SQLiteReader
from ilm.backends._sqlite_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    log,
    migrate,
    schema_version,
    store_error,
)
from ilm.backends._threads import StoreThreads
from ilm.interfaces import IBackend

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "LockHolder",
    "OutboxReport",
    "SQLiteBackend",
    "StoreReport",
    "inspect_store",
    "lock_holder",
    "log",
    "migrate",
    "reincarnate_store",
    "schema_version",
    "store_error",
]

_SYNCHRONOUS = ("FULL", "NORMAL")


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
        self._threads = StoreThreads(
            reactor, f"sqlite {self.path}", self._reactor_stopping
        )
        self._life = StoreLifecycle(
            self._threads, f"the store {self.path}", log, self._released
        )
        self._writes = SQLiteWriter(self.path, mode, max_size, self._life)
        self._reads = SQLiteReader(self._writes)

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"

    @property
    def schema_version(self) -> int:
        """The schema version of the store, once opened."""
        return self._writes.schema_version

    @property
    def _writer(self) -> sqlite3.Connection | None:
        """The writer connection (replaced by tests that inject faults)."""
        return self._writes.conn

    @_writer.setter
    def _writer(self, conn: sqlite3.Connection | None) -> None:
        self._writes.conn = conn

    def _reactor_stopping(self) -> None:
        """
        The reactor is shutting down with the store still open: stop the
        threads (else the process could not exit).  What was committed is
        on disk.  Later calls fail (or, for ``close``, do nothing).
        """
        self._life.stop()

    def _released(self) -> None:
        self._writes.lock.release()

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
        threads = self._threads

        def open_writer() -> Deferred[StoredState]:
            d = threads.on_writer(self._writes.open)
            d.addCallback(lambda state: threads.on_reader(self._reads.open, state))
            return d.addErrback(
                self._life.undo_open, self._writes.close, self._reads.close
            )

        return self._life.open(open_writer, self._writes.reload)

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        """
        Apply ``batch`` as one transaction; see
        :meth:`ilm.interfaces.IBackend.commit`.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        return self._threads.on_writer(self._writes.commit, batch)

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        """
        Read stored messages to ``peer_id`` after position ``after``; see
        :meth:`ilm.interfaces.IBackend.read_outbound`.  The sizes are looked
        up first, so no message is read that is not returned.
        """
        refused = self._life.refuse()
        if refused is not None:
            return refused
        return self._threads.on_reader(
            self._reads.read, peer_id, after, limit, max_bytes
        )

    def close(self) -> Deferred[None]:
        """
        Finish what is queued, close the connections and release the lock.
        Commits and reads after this fail with :class:`ilm.errors.StoreError`.
        """
        return self._life.close(self._writes.close, self._reads.close)

    def set_max_size(self, max_size: int | None) -> Deferred[None]:
        """
        Change the size limit of an open store (``None``: no limit beyond
        SQLite's own).  Raising it lets commits that failed with
        :class:`ilm.errors.StoreFull` succeed again.
        """
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size!r}")
        self._writes.max_size = max_size
        if not self._life.opened:
            return succeed(None)
        return self._threads.on_writer(self._writes.apply_max_size)
