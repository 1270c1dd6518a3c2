"""
The simulator's SQLite store: each node's store is a real
:class:`ilm.backends.SQLiteBackend` file, driven deterministically on the
simulation's clock.

Every operation ILM calls (``open``, ``commit``, ``read_outbound``,
``close``) is handed to SQLite after a latency drawn from the seed, in the
order SQLite's own threads would run it (commits, and the close after
them, in call order on the writer; reads in call order on the reader); the
:class:`ilm.simulation.Gate` waits for SQLite's thread to finish it, and
hands the result to ILM between steps of the clock.  No two operations run
at once, so a seed replays exactly.

A crash (:meth:`SimulatedSQLiteBackend.crash`) cancels what has not yet
reached SQLite.  A commit in flight is either given to SQLite now (it
lands, or meets the store fault in force) or never given to it, as the
seed decides; then the backend is closed at once, which releases the lock
and commits nothing more.  A restarted node opens the same file.  Losing
the store deletes the file (with its ``-wal``, ``-shm`` and ``-lock``).

Injected commit failures are real SQLite errors, so ILM sees the typed
errors the backend gives in production: for that commit the store is made
full (its size is capped at what it holds: ``StoreFull`` when a commit
needs room), read-only (``PRAGMA query_only``: ``StoreReadOnly``), or its
``COMMIT`` fails with an I/O error after writing the transaction or before
(``StoreInDoubt``; the backend then refuses all commits until reopened).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from ilm._peerid import PeerId
from ilm._store import CommitResult, StoreBatch, StoredState
from ilm.backends._sqlite import SQLiteBackend, inspect_store, migrate
from ilm.interfaces import IBackend
from ilm.simulation._gate import Gate
from ilm.simulation._store import SimulatedOperations, StoreListener

STORE_FAULTS = ("full", "read_only", "io_error")
"""How an injected commit failure breaks the store (see the module doc)."""


def create_store(path: str, incarnation: str) -> None:
    """
    Create an empty ILM store at ``path`` with the schema's own migrations,
    and give it ``incarnation`` (drawn from the seed, so that runs replay).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn)
        conn.execute(
            "UPDATE ilm_meta SET value = ? WHERE key = 'incarnation'", (incarnation,)
        )
    finally:
        conn.close()


class _FailingCommit:
    """
    A writer connection whose next ``COMMIT`` fails with an I/O error (after
    committing, if ``write``: ``written`` then says so); later statements go
    to the real connection.
    """

    def __init__(self, real: sqlite3.Connection, write: bool) -> None:
        self.real = real
        self.write = write
        self.failed = False
        self.written = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            if self.write:
                self.real.execute("COMMIT")
                self.written = True
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
            error.sqlite_errorname = "SQLITE_IOERR_FSYNC"  # type: ignore[attr-defined]
            raise error
        return self.real.execute(sql, *args)


class SQLiteStore:
    """
    One durable store of the simulation: an SQLite file in a directory of
    its own.

    :ivar backend: the backend last opened on it.
    """

    def __init__(self, directory: str, incarnation: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "store.sqlite")
        self.incarnation = incarnation
        self.random = random.Random(incarnation)
        self.backend: SimulatedSQLiteBackend | None = None
        self.outbox_cache: dict[PeerId, int] | None = None

    def durable_outbox(self) -> dict[PeerId, int]:
        """
        :return: per peer, the number of messages in the file's outbox.
        """
        if self.outbox_cache is None:
            report = inspect_store(self.path)
            self.outbox_cache = {
                box.peer_id: box.pending for box in report.outbound if box.pending
            }
        return dict(self.outbox_cache)

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"


@implementer(IBackend)
class SimulatedSQLiteBackend(SimulatedOperations):
    """
    An :class:`ilm.backends.SQLiteBackend` on ``store``'s file, whose
    operations take simulated time on ``clock`` and reach SQLite one at a
    time through a :class:`Gate`; it can be crashed (see the module doc).

    :param synchronous: the SQLite backend's ``synchronous`` setting.
    """

    def __init__(
        self,
        store: SQLiteStore,
        clock: IReactorTime,
        listener: StoreListener,
        latency: Callable[[], float],
        synchronous: str = "NORMAL",
    ) -> None:
        self.store = store
        store.backend = self
        self.clock = clock
        self.listener = listener
        self.latency = latency
        self.gate = Gate()
        self.inner = SQLiteBackend(
            store.path, synchronous=synchronous, reactor=self.gate
        )
        self.commits_fail = False
        self.crashed = False
        self.closed = False
        self.in_flight: StoreBatch | None = None
        self._in_flight_fails = False
        self._calls: list[IDelayedCall] = []
        # When SQLite's writer and reader threads are next free.
        self._writer_free = 0.0
        self._reader_free = 0.0

    def __repr__(self) -> str:
        return f"<SimulatedSQLiteBackend {self.store.path}>"

    # -- scheduling ------------------------------------------------------------

    def _at(self, when: float, function: Callable[[], None]) -> None:
        def run() -> None:
            self._calls.remove(call)
            function()

        call = self.clock.callLater(max(0.0, when - self.clock.seconds()), run)
        self._calls.append(call)

    def _on_writer(self, function: Callable[[], None]) -> None:
        when = self._writer_free = max(
            self.clock.seconds() + self.latency(), self._writer_free
        )
        self._at(when, function)

    def _on_reader(self, function: Callable[[], None]) -> None:
        when = self._reader_free = max(
            self.clock.seconds() + self.latency(), self._reader_free
        )
        self._at(when, function)

    def _hand_over(self, result: object, d: Deferred[Any]) -> None:
        """
        Give ILM ``result`` at the next settle (unless this node crashes
        first).
        """
        done = fail(result) if isinstance(result, Failure) else succeed(result)
        self.gate.hold(done, self).chainDeferred(d)

    def settle(self) -> bool:
        """
        Hand finished operations' results to ILM, in call order.
        """
        return self.gate.settle()

    # -- IBackend --------------------------------------------------------------

    def open(self) -> Deferred[StoredState]:
        d: Deferred[StoredState] = Deferred()

        def run() -> None:
            result = self.gate.wait(self.inner.open())
            if not isinstance(result, Failure):
                self.listener.opened(self, result)
            self._hand_over(result, d)

        self._on_writer(run)
        return d

    def commit(self, batch: StoreBatch) -> Deferred[CommitResult]:
        d: Deferred[CommitResult] = Deferred()
        batch, latency, fails = self._begin_commit(batch)
        self._in_flight_fails = fails

        def run() -> None:
            self.in_flight = None
            self._hand_over(self._commit_now(batch, fails), d)

        when = self._writer_free = max(
            self.clock.seconds() + latency, self._writer_free
        )
        self._at(when, run)
        return d

    def read_outbound(
        self, peer_id: PeerId, after: int, limit: int, max_bytes: int
    ) -> Deferred[list[bytes]]:
        d: Deferred[list[bytes]] = Deferred()

        def run() -> None:
            result = self.gate.wait(
                self.inner.read_outbound(peer_id, after, limit, max_bytes)
            )
            self._hand_over(result, d)

        self._on_reader(run)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def run() -> None:
            self.closed = True
            result = self.gate.wait(self.inner.close())
            self._hand_over(result, d)

        # SQLite closes after what is queued on both of its threads.
        when = max(
            self.clock.seconds() + self.latency(), self._writer_free, self._reader_free
        )
        self._writer_free = self._reader_free = when
        self._at(when, run)
        return d

    # -- the store -----------------------------------------------------------------

    def _commit_now(self, batch: StoreBatch, fails: bool) -> CommitResult | Failure:
        """
        Give ``batch`` to SQLite now (with a store fault in force if
        ``fails``) and wait for the outcome.
        """
        fault = self.store.random.choice(STORE_FAULTS) if fails else None
        failing: _FailingCommit | None = None
        if fault is not None:
            self.listener.fault_injected(self, fault)
            if fault == "io_error":
                failing = self._io_error(self.store.random.random() < 0.5)
            else:
                self._fault(fault, True)
        result = self.gate.wait(self.inner.commit(batch))
        if failing is not None:
            self.inner._writer = failing.real
        elif fault is not None:
            self._fault(fault, False)
        if isinstance(result, Failure):
            self.listener.commit_failed(self, result)
        written = failing is not None and failing.written
        if written or not isinstance(result, Failure):
            self.store.outbox_cache = None
            self.listener.landed(self, batch)
        return result

    def _io_error(self, write: bool) -> _FailingCommit:
        """
        Make the next ``COMMIT`` fail with an I/O error, after writing the
        transaction (``write``: its sync failed) or before.  The backend
        then cannot tell whether the batch is on disk, and refuses all later
        work until reopened.
        """
        real = self.inner._writer
        assert real is not None
        failing = _FailingCommit(real, write)
        self.inner._writer = failing  # type: ignore[assignment]
        return failing

    def _fault(self, fault: str, on: bool) -> None:
        inner = self.inner
        if fault == "full":
            self._wait(inner.set_max_size(1 if on else None))
        else:

            def query_only() -> None:
                assert inner._writer is not None
                inner._writer.execute(f"PRAGMA query_only = {int(on)}")

            self._wait(inner._threads.on_writer(query_only))

    def _wait(self, d: Deferred[Any]) -> None:
        """
        Wait for an operation that must not fail.
        """
        result = self.gate.wait(d)
        if isinstance(result, Failure):
            result.raiseException()

    def crash(self, land: bool) -> bool:
        """
        Die at once: cancel what has not reached SQLite, land a commit in
        flight (``land``) or drop it, and close SQLite at once.

        :return: whether a commit was in flight.
        """
        batch = self._stop_everything()
        if batch is not None and land:
            self._commit_now(batch, self._in_flight_fails)
        self._abandon()
        return batch is not None

    def release(self) -> None:
        """
        The run is over (or the store is being deleted): stop everything
        and close SQLite, landing nothing more.
        """
        self._stop_everything()
        self._abandon()

    def _abandon(self) -> None:
        """
        Close SQLite as the death of the process would: nothing is queued
        (operations reach SQLite one at a time), so this only closes the
        connections and releases the lock.
        """
        if not self.closed:
            self.closed = True
            self._wait(self.inner.close())

    def durable_outbox(self) -> dict[PeerId, int]:
        """
        :return: per peer, the number of messages in the file's outbox.
        """
        return self.store.durable_outbox()


class SQLiteStoreModel:
    """
    A :class:`StoreModel` whose stores are SQLite files
    (:class:`SimulatedSQLiteBackend`).

    :param directory: where the stores' directories are made (the system's
        temporary directory if ``None``).
    :param synchronous: the backends' ``synchronous`` setting: ``NORMAL``
        (default) survives the crashes the simulator makes (of the process,
        not of the machine) and spares an fsync per commit.
    """

    name = "sqlite"

    def __init__(self, directory: str | None = None, synchronous: str = "NORMAL"):
        self.directory = directory
        self.synchronous = synchronous

    def new_store(self, incarnation: str) -> SQLiteStore:
        directory = tempfile.mkdtemp(prefix="ilm-sim-", dir=self.directory)
        store = SQLiteStore(directory, incarnation)
        create_store(store.path, incarnation)
        return store

    def open_backend(
        self,
        store: object,
        clock: IReactorTime,
        listener: StoreListener,
        latency: Callable[[], float],
    ) -> SimulatedSQLiteBackend:
        if not isinstance(store, SQLiteStore):
            raise TypeError(f"expected an SQLiteStore, not {type(store).__name__}")
        return SimulatedSQLiteBackend(
            store, clock, listener, latency, synchronous=self.synchronous
        )

    def discard(self, store: object) -> None:
        """
        The store is lost, or the run is over: close any backend still open
        on it and delete its files.
        """
        if not isinstance(store, SQLiteStore):
            raise TypeError(f"expected an SQLiteStore, not {type(store).__name__}")
        if store.backend is not None:
            store.backend.release()
        shutil.rmtree(store.directory, ignore_errors=True)
