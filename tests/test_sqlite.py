"""
The SQLite backend's own guarantees, on real files: schema versions and
migrations, the typed error for each store fault (read-only, full, corrupt,
newer schema, locked by another live process) with nothing committed lost,
recovery after a writer process is SIGKILLed mid-commit, and what opening
does and does not read.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ilm import StoreBatch
from ilm.backends import SQLiteBackend, _sqlite_commit, _sqlite_file, _sqlite_reads
from ilm.backends._sqlite import (
    MIGRATIONS,
    SCHEMA_VERSION,
    inspect_store,
    migrate,
    schema_version,
    store_error,
)
from ilm.errors import (
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreInDoubt,
    StoreLocked,
    StoreReadOnly,
    StoreSchemaTooNew,
)

from .test_backends import summary

ROOT = Path(__file__).resolve().parent.parent


def child(script: str, *args: str) -> subprocess.Popen[str]:
    """
    Start a Python child process running ``script`` with ``args``.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def died(process: subprocess.Popen[str]) -> str:
    """
    Kill ``process`` (if needed) and return what it wrote to stderr.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=30)
    return f"child process ended ({process.returncode}): {err}"


def kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(30)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def make_read_only(case: SynchronousTestCase, path: str) -> None:
    """
    Make ``path`` (a file or a directory) read-only for this process, even
    when it runs as root (with ``chattr +i``); skip the test if that is not
    possible here.
    """
    if os.geteuid() != 0:
        mode = os.stat(path).st_mode
        os.chmod(path, mode & ~0o222)
        case.addCleanup(os.chmod, path, mode)
    else:
        done = subprocess.run(["chattr", "+i", path], capture_output=True)
        if done.returncode != 0:
            raise SkipTest(f"cannot make {path} immutable: {done.stderr!r}")
        case.addCleanup(subprocess.run, ["chattr", "-i", path], check=True)
    if os.access(path, os.W_OK):
        raise SkipTest(f"cannot make {path} read-only here")


class FailingSync:
    """
    A writer connection whose COMMIT fails with an I/O error, after writing
    the transaction (``written``: only its sync failed) or before.
    """

    def __init__(self, real: sqlite3.Connection, written: bool) -> None:
        self.real = real
        self.written = written

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            if self.written:
                self.real.execute("COMMIT")
            error = sqlite3.OperationalError("disk I/O error")
            error.sqlite_errorcode = sqlite3.SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
            raise error
        return self.real.execute(sql, *args)


class StoreCase(TestCase):
    def store_path(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.join(directory, "store.sqlite")

    def trace_statements(
        self, *modules: Any, variables: int | None = None
    ) -> list[str]:
        """
        Record every statement of the connections that ``modules`` (their
        ``connect``) open from now on; with ``variables``, those connections
        bind at most that many values per statement.
        """
        statements: list[str] = []
        connect = _sqlite_file.connect

        def traced(path: str, **kwargs: Any) -> sqlite3.Connection:
            conn = connect(path, **kwargs)
            if variables is not None:
                conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
            conn.set_trace_callback(statements.append)
            return conn

        for module in modules:
            self.patch(module, "connect", traced)
        return statements

    async def opened(self, path: str, **kwargs: Any) -> tuple[SQLiteBackend, Any]:
        backend = SQLiteBackend(path, **kwargs)
        state = await backend.open()
        self.addCleanup(backend.close)
        return backend, state

    async def filled(self, path: str) -> Any:
        """
        Create a store at ``path`` holding some of everything; return its
        state summary.
        """
        backend, _ = await self.opened(path)
        await backend.commit(
            StoreBatch(
                messages={2: (1, [b"a" * 100] * 30), "2": (1, [b"b"])},
                delivered={(3, "c" * 32): 17},
            )
        )
        await backend.commit(StoreBatch(acked={2: 10}, retired={(3, "d" * 32)}))
        state = await backend.open()
        await backend.close()
        return summary(state)

    async def assert_intact(self, path: str, expected: Any) -> None:
        """
        The store at ``path`` opens with the state ``expected`` and its outbox
        reads back whole.
        """
        backend, state = await self.opened(path)
        self.assertEqual(summary(state), expected)
        self.assertEqual(
            await backend.read_outbound(2, 10, 100, 1 << 30), [b"a" * 100] * 20
        )
        await backend.close()


class SchemaTests(StoreCase):
    async def test_new_store_schema(self) -> None:
        """
        A new store is at the current schema version, carries ILM's
        application id, and is in WAL mode with synchronous=FULL by default
        or NORMAL on request.
        """
        path = self.store_path()
        backend, _ = await self.opened(path)
        self.assertEqual(backend.schema_version, SCHEMA_VERSION)
        conn = backend._writer
        assert conn is not None
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone(), (2,))
        await backend.close()
        backend, _ = await self.opened(path, synchronous="normal")
        conn = backend._writer
        assert conn is not None
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone(), (1,))
        self.assertRaises(ValueError, SQLiteBackend, path, synchronous="OFF")
        self.assertRaises(ValueError, SQLiteBackend, "")
        self.assertRaises(ValueError, SQLiteBackend, ":memory:")

    def test_migration_framework(self) -> None:
        """
        migrate() runs each step from the store's version to the target in
        one transaction: a v1 -> v2 step applies and is recorded, keeping the
        data; a failing step leaves the store exactly at its old version.
        """
        path = self.store_path()
        conn = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(conn.close)
        self.assertEqual(migrate(conn, target=1), (0, 1))
        incarnation = conn.execute("SELECT value FROM ilm_meta").fetchone()

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("ALTER TABLE outbound ADD COLUMN half INTEGER")
            raise RuntimeError("migration step failed")

        self.assertRaises(
            RuntimeError, migrate, conn, {**MIGRATIONS, 1: broken}, target=2
        )
        self.assertEqual(schema_version(conn), 1)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(outbound)")]
        self.assertNotIn("half", columns)

        def add_priority(conn: sqlite3.Connection) -> None:
            conn.execute("ALTER TABLE outbound ADD COLUMN priority INTEGER")

        with_priority = {**MIGRATIONS, 1: add_priority}
        self.assertEqual(migrate(conn, with_priority, 2), (1, 2))
        self.assertEqual(schema_version(conn, migrations=with_priority), 2)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(outbound)")]
        self.assertIn("priority", columns)
        self.assertEqual(
            conn.execute("SELECT value FROM ilm_meta").fetchone(), incarnation
        )
        self.assertEqual(migrate(conn, {**MIGRATIONS, 1: add_priority}, 2), (2, 2))

    async def test_version_1_store_is_migrated(self) -> None:
        """
        A store written with schema version 1 (before retirements were
        ordered) opens: it is migrated to the current version in one
        transaction, keeps all its data, lists its old retirements (their
        order unknown, by incarnation id) before any made since, and can
        forget them.
        """
        path = self.store_path()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, target=1)
        conn.execute("INSERT INTO peer (peer_key, peer_id) VALUES (1, 3)")
        conn.execute(
            "INSERT INTO inbound VALUES (1, ?, 4, 1), (1, ?, 9, 1), (1, ?, 12, 0)",
            ("e" * 32, "b" * 32, "c" * 32),
        )
        conn.close()
        backend, state = await self.opened(path)
        self.assertEqual(backend.schema_version, SCHEMA_VERSION)
        self.assertEqual(
            [(r.incarnation, r.delivered, r.retired) for r in state.inbound],
            [("b" * 32, 9, True), ("e" * 32, 4, True), ("c" * 32, 12, False)],
        )
        await backend.commit(StoreBatch(retired={(3, "c" * 32)}))
        await backend.commit(StoreBatch(forgotten={(3, "b" * 32)}))
        state = await backend.open()
        self.assertEqual(
            [r.incarnation for r in state.inbound if r.retired], ["e" * 32, "c" * 32]
        )

    async def test_schema_too_new(self) -> None:
        """
        A store written by a newer ILM is refused with StoreSchemaTooNew
        (by the backend and by inspect_store) and left untouched.
        """
        path = self.store_path()
        expected = await self.filled(path)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE ilm_schema SET version = ?", (SCHEMA_VERSION + 1,))
        conn.close()
        error = await self.assertFailure(SQLiteBackend(path).open(), StoreSchemaTooNew)
        self.assertEqual(
            (error.found, error.supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION)
        )
        self.assertRaises(StoreSchemaTooNew, inspect_store, path)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE ilm_schema SET version = ?", (SCHEMA_VERSION,))
        conn.close()
        await self.assert_intact(path, expected)


class FaultTests(StoreCase):
    async def test_not_a_database(self) -> None:
        """
        A file that is not an SQLite database, or an SQLite database that is
        not an ILM store, is refused with StoreCorrupt and not modified; so
        is a directory.
        """
        path = self.store_path()
        garbage = os.urandom(8192)
        Path(path).write_bytes(garbage)
        await self.assertFailure(SQLiteBackend(path).open(), StoreCorrupt)
        self.assertEqual(Path(path).read_bytes(), garbage)
        other = self.store_path()
        conn = sqlite3.connect(other)
        conn.execute("CREATE TABLE notes (text)")
        conn.commit()
        conn.close()
        await self.assertFailure(SQLiteBackend(other).open(), StoreCorrupt)
        self.assertRaises(StoreCorrupt, inspect_store, other)
        directory = self.store_path()
        os.mkdir(directory)
        await self.assertFailure(SQLiteBackend(directory).open(), StoreCorrupt)

    async def test_inconsistent_state(self) -> None:
        """
        A store whose per-peer state disagrees with its outbox (here: it
        claims more positions than the outbox holds) is refused at open with
        StoreCorrupt rather than trusted; repaired, it opens intact.
        """
        path = self.store_path()
        expected = await self.filled(path)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE outbound SET last_position = 31 WHERE last_position = 30")
        conn.close()
        error = await self.assertFailure(SQLiteBackend(path).open(), StoreCorrupt)
        self.assertIn("holds positions 11..30", str(error))
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE outbound SET last_position = 30 WHERE last_position = 31")
        conn.close()
        await self.assert_intact(path, expected)

    async def test_damaged_pages(self) -> None:
        """
        Garbage written over the pages of a store's outbox is reported as
        StoreCorrupt when the store is opened or read, never returned as
        messages; the lock is released so the file can be repaired.
        """
        path = self.store_path()
        backend, _ = await self.opened(path)
        await backend.commit(StoreBatch(messages={2: (1, [b"x" * 500] * 400)}))
        await backend.close()
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(4096 * 8)
            f.write(os.urandom(size - 4096 * 9))
        backend = SQLiteBackend(path)
        try:
            await backend.open()
        except StoreCorrupt:
            pass
        else:
            self.addCleanup(backend.close)
            read = backend.read_outbound(2, 0, 1000, 1 << 30)
            await self.assertFailure(read, StoreCorrupt)
            await backend.close()
        # Nothing holds the lock after a failed open or a close: opening
        # again meets the damage, not a lock.
        again = SQLiteBackend(path)
        try:
            await again.open()
        except StoreCorrupt:
            pass
        else:
            await again.close()

    async def test_read_only_file(self) -> None:
        """
        A read-only store file is refused with StoreReadOnly; once writable
        again it opens with everything it held.
        """
        path = self.store_path()
        expected = await self.filled(path)
        make_read_only(self, path)
        error = await self.assertFailure(SQLiteBackend(path).open(), StoreReadOnly)
        self.assertIn("read-only", str(error))
        # inspect never writes, so it works on a read-only store.
        self.assertEqual(inspect_store(path).outbound[0].pending, 20)
        await self.undo_read_only(path)
        await self.assert_intact(path, expected)

    async def undo_read_only(self, path: str) -> None:
        """
        Undo make_read_only for ``path`` now (the cleanups registered by it
        run again harmlessly at the end).
        """
        if os.geteuid() != 0:
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
        else:
            subprocess.run(["chattr", "-i", path], check=True)

    async def test_read_only_directory(self) -> None:
        """
        A store whose directory is read-only (SQLite could not create its
        -wal and -shm files) is refused with StoreReadOnly, as is a new store
        in a read-only directory; nothing is lost.
        """
        path = self.store_path()
        expected = await self.filled(path)
        directory = os.path.dirname(path)
        make_read_only(self, directory)
        await self.assertFailure(SQLiteBackend(path).open(), StoreReadOnly)
        new = os.path.join(directory, "new.sqlite")
        await self.assertFailure(SQLiteBackend(new).open(), StoreReadOnly)
        self.assertFalse(os.path.exists(new))
        await self.undo_read_only(directory)
        await self.assert_intact(path, expected)

    async def test_full(self) -> None:
        """
        A commit that would grow the store past ``max_size`` fails with
        StoreFull and applies nothing (not even the parts that fit); smaller
        commits still succeed; raising the limit lets the big one through.
        """
        path = self.store_path()
        backend, _ = await self.opened(path, max_size=64 * 1024)
        await backend.commit(StoreBatch(messages={2: (1, [b"s" * 100] * 5)}))
        big = StoreBatch(
            messages={2: (6, [b"b" * 1000] * 200), 3: (1, [b"t"])},
            acked={2: 2},
            delivered={(4, "e" * 32): 8},
        )
        error = await self.assertFailure(backend.commit(big), StoreFull)
        self.assertIn("SQLITE_FULL", str(error))
        state = await backend.open()
        self.assertEqual(summary(state), ({(int, 2): (0, 5, 500)}, {}))
        await backend.commit(StoreBatch(messages={2: (6, [b"small"])}))
        await backend.set_max_size(None)
        big.messages[2] = (7, big.messages[2][1])
        result = await backend.commit(big)
        self.assertEqual(result.released_bytes, {2: 200})
        backend, state = await self.reopen(backend, path)
        self.assertEqual(
            summary(state),
            (
                {(int, 2): (2, 206, 300 + 5 + 200_000), (int, 3): (0, 1, 1)},
                {(int, 4, "e" * 32): (8, False)},
            ),
        )

    async def test_failed_commit_sync_is_in_doubt(self) -> None:
        """
        A commit whose COMMIT fails with an I/O error fails with
        StoreInDoubt (a StoreError): whether it was applied is unknown, so
        ILM must not tell the senders their messages were not stored, and
        the store refuses further commits until reopened.  Whether SQLite wrote
        the batch (its sync failed) or not, the error is the same, and the
        reopened store holds what was written.  (Found
        by the simulator: a plain StoreError, "nothing applied", made ILM
        refuse sends that were delivered after the restart.)
        """
        for written in (True, False):
            path = self.store_path()
            backend, _ = await self.opened(path)
            real = backend._writer
            assert real is not None
            backend._writer = FailingSync(real, written)  # type: ignore[assignment]
            error = await self.assertFailure(
                backend.commit(StoreBatch(messages={2: (1, [b"one"])})), StoreInDoubt
            )
            self.assertIsInstance(error, StoreError)
            self.assertIn("unknown", str(error))
            backend._writer = real
            # Until reopened, the store builds nothing on the guess: later
            # commits fail too.
            later = await self.assertFailure(
                backend.commit(StoreBatch(messages={2: (1, [b"two"])})), StoreError
            )
            self.assertIn("restart the node", str(later))
            backend, state = await self.reopen(backend, path)
            stored = [(o.peer_id, o.last_position) for o in state.outbound]
            self.assertEqual(stored, [(2, 1)] if written else [])
            await backend.close()

    async def reopen(self, backend: SQLiteBackend, path: str) -> tuple[Any, Any]:
        await backend.close()
        return await self.opened(path)

    async def test_full_filesystem(self) -> None:
        """
        On a real filesystem that fills up (a 1 MiB tmpfs; skipped where it
        cannot be mounted), commits fail with StoreFull, and everything
        committed before is still there after a reopen.
        """
        mountpoint = self.mktemp()
        os.makedirs(mountpoint)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mountpoint],
            capture_output=True,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr!r}")
        self.addCleanup(subprocess.run, ["umount", "-l", mountpoint], check=True)
        path = os.path.join(mountpoint, "store.sqlite")
        backend, _ = await self.opened(path)
        stored = 0
        for _ in range(100):
            batch = StoreBatch(messages={2: (stored + 1, [b"f" * 1000] * 50)})
            try:
                await backend.commit(batch)
            except StoreFull:
                break
            stored += 50
        else:
            self.fail("a 1 MiB filesystem took 5 MB")
        self.assertGreater(stored, 0)
        backend, state = await self.reopen(backend, path)
        self.assertEqual(summary(state)[0], {(int, 2): (0, stored, stored * 1000)})
        read = await backend.read_outbound(2, stored - 1, 5, 1 << 30)
        self.assertEqual(read, [b"f" * 1000])

    async def test_locked_by_this_process(self) -> None:
        """
        A second backend on a store already open in this process is refused
        with StoreLocked; once the first closes, it opens.
        """
        path = self.store_path()
        first, _ = await self.opened(path)
        error = await self.assertFailure(SQLiteBackend(path).open(), StoreLocked)
        self.assertIn(f"process {os.getpid()}", str(error))
        await first.close()
        await self.opened(path)

    async def test_locked_by_another_process(self) -> None:
        """
        A store held by another live process is refused with StoreLocked
        (naming that process); when that process is SIGKILLed the kernel
        drops its lock and the store opens with everything committed.
        """
        path = self.store_path()
        expected = await self.filled(path)
        holder = child(
            """
            import sys
            from twisted.internet import defer, task
            from ilm.backends import SQLiteBackend

            async def main(reactor):
                await SQLiteBackend(sys.argv[1], reactor=reactor).open()
                print("open", flush=True)
                await defer.Deferred()

            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
            """,
            path,
        )
        self.addCleanup(kill, holder)
        assert holder.stdout is not None
        if holder.stdout.readline() != "open\n":
            self.fail(died(holder))
        error = await self.assertFailure(SQLiteBackend(path).open(), StoreLocked)
        self.assertIn(f"process {holder.pid}", str(error))
        kill(holder)
        self.assertEqual(holder.returncode, -signal.SIGKILL)
        await self.assert_intact(path, expected)

    async def test_writer_killed_mid_commit(self) -> None:
        """
        A child process commits batches in a loop (messages, deletions by
        acknowledgement, delivery marks) and is SIGKILLed while committing,
        twice.  Each time the store passes SQLite's integrity check, reopens,
        and holds every commit the child saw fire, plus at most the one in
        progress, never part of one.
        """
        path = self.store_path()
        writer = """
            import sys
            from twisted.internet import defer, task
            from ilm import StoreBatch
            from ilm.backends import SQLiteBackend

            def contents(position):
                return b"%d:" % position + b"x" * (position * 7 % 900)

            async def main(reactor):
                backend = SQLiteBackend(sys.argv[1], reactor=reactor)
                state = await backend.open()
                records = {r.peer_id: r for r in state.outbound}
                last = records[2].last_position if 2 in records else 0
                mark = max([r.delivered for r in state.inbound] + [0])
                step = 0
                while True:
                    step += 1
                    count = 1 + step * 37 % 300
                    batch = StoreBatch(
                        messages={2: (last + 1, [contents(last + 1 + i)
                                                 for i in range(count)])},
                        acked={2: max(0, last - 500)},
                        delivered={(3, "a" * 32): mark + 1},
                    )
                    await backend.commit(batch)
                    last += count
                    mark += 1
                    print(step, last, max(0, last - count - 500), mark, flush=True)

            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
        """
        for _round in range(2):
            process = child(writer, path)
            self.addCleanup(kill, process)
            assert process.stdout is not None
            line = ""
            for _ in range(40):
                line = process.stdout.readline()
                if not line:
                    self.fail(died(process))
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            # The child went on committing while we read: the last complete
            # line it wrote before dying is the last commit it saw fire.
            for rest in process.stdout.read().splitlines(keepends=True):
                if rest.endswith("\n"):
                    line = rest
            kill(process)
            step, last, acked, mark = map(int, line.split())
            conn = sqlite3.connect(path)
            check = conn.execute("PRAGMA integrity_check").fetchall()
            conn.close()
            self.assertEqual(check, [("ok",)])
            backend, state = await self.opened(path)
            [out] = state.outbound
            [inbound] = state.inbound
            # Every commit the child saw fire is there; the one it was in
            # the middle of is there entirely or not at all.
            following = 1 + (step + 1) * 37 % 300
            if out.last_position == last:
                self.assertEqual((out.acked, inbound.delivered), (acked, mark))
            else:
                self.assertEqual(out.last_position, last + following)
                self.assertEqual(
                    (out.acked, inbound.delivered), (max(0, last - 500), mark + 1)
                )
            read: list[bytes] = []
            while len(read) < out.last_position - out.acked:
                chunk = await backend.read_outbound(
                    2, out.acked + len(read), 1000, 1 << 30
                )
                self.assertTrue(chunk)
                read.extend(chunk)
            expected = [
                b"%d:" % p + b"x" * (p * 7 % 900)
                for p in range(out.acked + 1, out.last_position + 1)
            ]
            self.assertEqual(read, expected)
            self.assertEqual(out.pending_bytes, sum(map(len, expected)))
            await backend.close()


class OpenTests(StoreCase):
    async def test_open_does_not_read_the_outbox(self) -> None:
        """
        Opening a store with messages pending runs no statement that reads
        message contents: only per-peer state, marks and index bounds.
        """
        path = self.store_path()
        await self.filled(path)
        statements = self.trace_statements(_sqlite_commit, _sqlite_reads)
        backend, state = await self.opened(path)
        self.assertEqual(state.outbound[0].last_position, 30)
        self.assertTrue(any("FROM outbox" in s for s in statements), statements)
        self.assertFalse([s for s in statements if "contents" in s], statements)
        statements.clear()
        self.assertEqual(len(await backend.read_outbound(2, 10, 5, 1 << 30)), 5)
        self.assertTrue([s for s in statements if "contents" in s])

    async def test_store_stays_consistent_after_a_failed_commit_sync(self) -> None:
        """
        If COMMIT itself fails with an I/O error (the batch may or may not be
        on disk), the backend refuses all further commits with a StoreError
        telling to restart, instead of reusing positions that may be taken;
        a reopened backend reads the truth from the file.
        """
        path = self.store_path()
        backend, _ = await self.opened(path)
        await backend.commit(StoreBatch(messages={2: (1, [b"one"])}))
        real = backend._writer
        assert real is not None

        class FailingCommit:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def execute(self, sql: str, *args: Any) -> Any:
                if sql == "COMMIT":
                    real.execute("COMMIT")
                    error = sqlite3.OperationalError("disk I/O error")
                    error.sqlite_errorcode = sqlite3.SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
                    error.sqlite_errorname = "SQLITE_IOERR_FSYNC"  # type: ignore[attr-defined]
                    raise error
                return real.execute(sql, *args)

        backend._writer = FailingCommit()  # type: ignore[assignment]
        error = await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (2, [b"two"])})), StoreError
        )
        self.assertIn("SQLITE_IOERR_FSYNC", str(error))
        backend._writer = real
        again = await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (2, [b"two again"])})), StoreError
        )
        self.assertIn("restart", str(again))
        backend, state = await self.reopen(backend, path)
        self.assertEqual(summary(state)[0], {(int, 2): (0, 2, 6)})
        self.assertEqual(
            await backend.read_outbound(2, 0, 5, 1 << 30), [b"one", b"two"]
        )

    async def reopen(self, backend: SQLiteBackend, path: str) -> tuple[Any, Any]:
        await backend.close()
        return await self.opened(path)

    def test_reactor_stops_with_the_store_open(self) -> None:
        """
        A process whose reactor stops while a store is still open exits
        (the backend's threads stop with the reactor) instead of hanging.
        """
        path = self.store_path()
        process = child(
            """
            import sys
            from twisted.internet import defer, task
            from ilm import StoreBatch
            from ilm.backends import SQLiteBackend

            async def main(reactor):
                backend = SQLiteBackend(sys.argv[1], reactor=reactor)
                await backend.open()
                await backend.commit(StoreBatch(messages={2: (1, [b"x"])}))
                print("committed", flush=True)

            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
            """,
            path,
        )
        self.addCleanup(kill, process)
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("the process did not exit after its reactor stopped")
        self.assertEqual((process.returncode, out), (0, "committed\n"), err)


class ReactorShutdownTests(StoreCase):
    async def test_threads_stop_with_the_reactor(self) -> None:
        """
        When the reactor shuts down with the store open, the backend's
        threads stop; afterwards commit fails with StoreError, close is a
        no-op, and what was committed is there for the next opener.
        """
        path = self.store_path()
        backend, _ = await self.opened(path)
        await backend.commit(StoreBatch(messages={2: (1, [b"kept"])}))
        backend._reactor_stopping()
        self.assertFalse(backend._threads.running)
        await self.assertFailure(
            backend.commit(StoreBatch(messages={2: (2, [b"x"])})), StoreError
        )
        await backend.close()
        _, state = await self.opened(path)
        self.assertEqual(summary(state)[0], {(int, 2): (0, 1, 4)})


class ErrorMappingTests(SynchronousTestCase):
    def test_sqlite_codes(self) -> None:
        """
        sqlite3 errors map to the StoreError subclass of their primary
        SQLite error code; OS errors by errno; the original is the cause.
        """
        cases = [
            (sqlite3.SQLITE_FULL, StoreFull),
            (sqlite3.SQLITE_IOERR_SHORT_READ, StoreError),
            (sqlite3.SQLITE_READONLY_DBMOVED, StoreReadOnly),
            (sqlite3.SQLITE_CORRUPT, StoreCorrupt),
            (sqlite3.SQLITE_NOTADB, StoreCorrupt),
            (sqlite3.SQLITE_BUSY, StoreLocked),
        ]
        for code, kind in cases:
            error = sqlite3.OperationalError("boom")
            error.sqlite_errorcode = code  # type: ignore[attr-defined]
            error.sqlite_errorname = f"CODE_{code}"  # type: ignore[attr-defined]
            mapped = store_error(error, "/x", "cannot commit to")
            self.assertIs(type(mapped), kind, code)
            self.assertIs(mapped.__cause__, error)
            self.assertIn(f"CODE_{code}", str(mapped))
        for number, kind in [
            (errno.ENOSPC, StoreFull),
            (errno.EROFS, StoreReadOnly),
            (errno.EACCES, StoreReadOnly),
            (errno.EIO, StoreError),
        ]:
            mapped = store_error(OSError(number, "x"), "/x", "cannot open")
            self.assertIs(type(mapped), kind, number)
        locked = StoreLocked("held")
        self.assertIs(store_error(locked, "/x", "cannot open"), locked)


def snapshot(directory: str) -> dict[str, tuple[int, bytes]]:
    """
    Every file of ``directory``: its mode and contents.
    """
    files = {}
    for name in sorted(os.listdir(directory)):
        full = os.path.join(directory, name)
        files[name] = (os.stat(full).st_mode, Path(full).read_bytes())
    return files


class PermissionTests(StoreCase):
    async def test_files_are_private_whatever_the_umask(self) -> None:
        """
        With a permissive umask (0), a new store's database, its -wal and
        -shm files (SQLite gives them the database's mode) and its lock
        file are created readable and writable by their owner only (0600).
        ILM creates no directory for a store: it must exist.
        """
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        path = self.store_path()
        backend, _ = await self.opened(path)
        await backend.commit(StoreBatch(messages={2: (1, [b"secret"])}))
        for suffix in ("", "-wal", "-shm", "-lock"):
            mode = os.stat(path + suffix).st_mode & 0o777
            self.assertEqual(mode, 0o600, (suffix, oct(mode)))
        await backend.close()
        nowhere = os.path.join(self.mktemp(), "store.sqlite")
        await self.assertFailure(SQLiteBackend(nowhere).open(), StoreError)
        self.assertFalse(os.path.exists(os.path.dirname(nowhere)))


class CraftedStoreTests(StoreCase):
    async def crafted(self, *statements: str, checkpoint: bool = True) -> str:
        """
        A real store, then changed behind ILM's back by ``statements``;
        closed (its log checkpointed into the file) unless ``checkpoint``
        is false, in which case the changes stay in its write-ahead log.
        """
        path = self.store_path()
        backend, _ = await self.opened(path)
        await backend.commit(
            StoreBatch(messages={2: (1, [b"m"])}, delivered={(3, "c" * 32): 4})
        )
        await backend.close()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        for statement in statements:
            conn.execute(statement)
        if checkpoint:
            conn.close()
        else:
            # Leave the changes in the log, as a crashed writer would: copy
            # the files while the connection still holds them.
            copy = self.store_path()
            for suffix in ("", "-wal"):
                Path(copy + suffix).write_bytes(Path(path + suffix).read_bytes())
            conn.close()
            return copy
        return path

    async def test_bad_rows_are_named(self) -> None:
        """
        A negative peer id, a peer id that is not UTF-8, a delivery mark
        whose incarnation is not 32 hex digits, a mark beyond 2**63 - 1's
        range of types, and a bad store incarnation are each refused at
        open with StoreCorrupt naming the file, the table and the row (and
        by ``inspect_store`` too); nothing is loaded.
        """
        cases = [
            ("UPDATE peer SET peer_id = -5 WHERE peer_id = 2", "table peer", "-5"),
            (
                "UPDATE peer SET peer_id = x'ff' WHERE peer_id = 3",
                "table peer",
                "not valid UTF-8",
            ),
            (
                "UPDATE inbound SET incarnation = 'not-hex-not-hex-not-hex-not-hex!'",
                "table inbound, row (peer_key 2, incarnation "
                "'not-hex-not-hex-not-hex-not-hex!')",
                "32 lowercase hex",
            ),
            (
                "UPDATE inbound SET delivered = 'four'",
                "table inbound",
                "bad delivery mark",
            ),
            (
                "UPDATE ilm_meta SET value = 'Z' || substr(value, 2) "
                "WHERE key = 'incarnation'",
                "table ilm_meta",
                "32 hex digits",
            ),
        ]
        for statement, where, what in cases:
            path = await self.crafted(statement)
            error = await self.assertFailure(SQLiteBackend(path).open(), StoreCorrupt)
            message = str(error)
            self.assertIn(path, message)
            self.assertIn(where, message)
            self.assertIn(what, message)
            error = self.assertRaises(StoreCorrupt, inspect_store, path)
            self.assertIn(where, str(error))

    async def test_foreign_objects_refused_untouched(self) -> None:
        """
        A store holding a trigger (here: one that deletes every new outbox
        row, which would lose acknowledged sends), a view, an extra table,
        an extra index or a changed table is refused at open with
        StoreCorrupt naming the object, before anything is written: the
        directory's files (modes and bytes) are exactly as they were, and
        no lock file is made.
        """
        cases = [
            (
                "CREATE TRIGGER eat AFTER INSERT ON outbox BEGIN "
                "DELETE FROM outbox WHERE position = new.position; END",
                "trigger 'eat'",
            ),
            ("CREATE VIEW pending AS SELECT * FROM outbox", "view 'pending'"),
            ("CREATE TABLE notes (text)", "table 'notes'"),
            ("CREATE INDEX by_time ON outbox (stored_at)", "index 'by_time'"),
            ("ALTER TABLE outbound ADD COLUMN extra INTEGER", "table 'outbound'"),
        ]
        for statement, name in cases:
            path = await self.crafted(statement)
            os.unlink(path + "-lock")
            before = snapshot(os.path.dirname(path))
            error = await self.assertFailure(SQLiteBackend(path).open(), StoreCorrupt)
            self.assertIn(path, str(error))
            self.assertIn(name, str(error))
            self.assertEqual(snapshot(os.path.dirname(path)), before)
            self.assertRaises(StoreCorrupt, inspect_store, path)
            self.assertEqual(snapshot(os.path.dirname(path)), before)

    async def test_foreign_trigger_in_the_log_refused_before_writing(self) -> None:
        """
        A trigger that is only in the write-ahead log (not yet in the main
        file, which is all that is read before the lock is taken) is found
        under the lock, before the first write: the store is refused and
        what it holds is unchanged (SQLite may fold its log into the main
        file when the connection closes; the contents stay the same).
        """
        path = await self.crafted(
            "CREATE TRIGGER eat AFTER INSERT ON outbox BEGIN "
            "DELETE FROM outbox WHERE position = new.position; END",
            checkpoint=False,
        )
        reference = self.store_path()
        for suffix in ("", "-wal"):
            Path(reference + suffix).write_bytes(Path(path + suffix).read_bytes())
        error = await self.assertFailure(SQLiteBackend(path).open(), StoreCorrupt)
        self.assertIn("trigger 'eat'", str(error))

        def dump(file: str) -> list[str]:
            conn = sqlite3.connect(file)
            try:
                return list(conn.iterdump())
            finally:
                conn.close()

        self.assertEqual(dump(path), dump(reference))
        self.assertTrue(any("TRIGGER eat" in line for line in dump(path)))

    async def test_foreign_database_is_not_modified(self) -> None:
        """
        Pointing a store at another application's SQLite database (in
        rollback-journal mode, or in WAL mode) is refused with StoreCorrupt
        naming the file; nothing changes: no WAL switch, no lock file, no
        journal or -wal/-shm file, the same bytes and mode.
        """
        for journal in ("DELETE", "WAL"):
            directory = self.mktemp()
            os.makedirs(directory)
            path = os.path.join(directory, "app.db")
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute(f"PRAGMA journal_mode = {journal}")
            conn.execute("CREATE TABLE customers (name TEXT, balance INTEGER)")
            conn.execute("INSERT INTO customers VALUES ('ada', 10)")
            conn.close()
            os.chmod(path, 0o640)
            before = snapshot(directory)
            error = await self.assertFailure(SQLiteBackend(path).open(), StoreCorrupt)
            self.assertIn(path, str(error))
            self.assertIn("not an ILM store", str(error))
            self.assertIn("customers", str(error))
            self.assertEqual(snapshot(directory), before, journal)
            self.assertRaises(StoreCorrupt, inspect_store, path)
            self.assertEqual(snapshot(directory), before, journal)


class _OutboxCase(StoreCase):
    """Commits of messages to peer 2, traced, and what reads back."""

    async def committed(
        self, path: str, batches: list[list[bytes]]
    ) -> tuple[SQLiteBackend, list[str]]:
        """
        Commit ``batches`` of messages to peer 2 in a new store at ``path``;
        the backend and the outbox inserts its writer ran.
        """
        statements = self.trace_statements(_sqlite_commit)
        backend, _ = await self.opened(path)
        first = 1
        for contents in batches:
            await backend.commit(StoreBatch(messages={2: (first, contents)}))
            first += len(contents)
        inserts = [s for s in statements if s.startswith("INSERT INTO outbox")]
        return backend, inserts

    async def read_all(self, backend: SQLiteBackend, count: int) -> list[bytes]:
        found: list[bytes] = []
        while len(found) < count:
            found += await backend.read_outbound(2, len(found), 5000, 1 << 30)
        return found


class OutboxRunTests(_OutboxCase):
    """
    Where SQLite has ``json_each``, a commit writes a peer's messages in
    runs: one statement for about 1 MiB of contents, whatever the count
    (every statement gives up the GIL and takes it back); every message
    reads back at its position, empty ones too.
    """

    async def test_runs_here(self) -> None:
        """The SQLite under test has ``json_each``."""
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        self.assertTrue(_sqlite_commit.runs_supported(conn))

    async def test_small_messages(self) -> None:
        """
        Batches of up to 20,000 small messages take one statement each;
        empty messages and a lone one are stored as they are.
        """
        sizes = [1, 2, 1024, 20_000]
        batches = [[b"%d-%d" % (n, i) for i in range(n)] for n in sizes]
        batches.append([b"", b"x", b"", b""])
        batches.append([b""])
        backend, inserts = await self.committed(self.store_path(), batches)
        expected = [m for batch in batches for m in batch]
        self.assertEqual(await self.read_all(backend, len(expected)), expected)
        self.assertEqual(len(inserts), len(batches))

    async def test_large_messages(self) -> None:
        """
        Runs stop at about 1 MiB of contents, at least one message: a
        message larger than that is a run of its own.
        """
        big = 1024 * 1024 + 1
        batches = [
            [bytes([i]) * 300_000 for i in range(7)],
            [b"a" * big, b"b", b"c" * big],
        ]
        backend, inserts = await self.committed(self.store_path(), batches)
        expected = [m for batch in batches for m in batch]
        self.assertEqual(await self.read_all(backend, len(expected)), expected)
        # 3 + 3 + 1 messages, then each of the last three alone (b"b" with
        # the message after it would pass 1 MiB).
        self.assertEqual(len(inserts), 6)


class OutboxInsertTests(_OutboxCase):
    """
    Where SQLite lacks ``json_each``, messages are written to the outbox
    many rows per statement (a statement per row costs a GIL hand-off per
    row), in statements whose row counts are powers of two, within SQLite's
    limit on bound values and a bound on the bytes one statement binds;
    every message reads back at its position.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(_sqlite_commit, "runs_supported", lambda conn: False)

    async def test_small_messages(self) -> None:
        """
        3,000 small messages take a few statements (1,024 rows, then the
        powers of two of the rest); batches of other sizes too.
        """
        sizes = [1, 2, 3, 255, 1023, 1024, 1025, 3000]
        batches = [[b"%d-%d" % (n, i) for i in range(n)] for n in sizes]
        backend, inserts = await self.committed(self.store_path(), batches)
        expected = [m for batch in batches for m in batch]
        self.assertEqual(await self.read_all(backend, len(expected)), expected)
        per_batch = [(n >> 10) + bin(n & 1023).count("1") for n in sizes]
        self.assertEqual(len(inserts), sum(per_batch))

    async def test_large_messages(self) -> None:
        """
        Large messages take fewer rows per statement: about 256 KiB bound
        at a time, at least one message.
        """
        batches = [
            [bytes([i]) * 100_000 for i in range(7)],
            [bytes([i]) * 300_000 for i in range(3)],
        ]
        backend, inserts = await self.committed(self.store_path(), batches)
        expected = [m for batch in batches for m in batch]
        self.assertEqual(await self.read_all(backend, len(expected)), expected)
        # 2 + 2 + 2 + 1 rows, then 1 + 1 + 1.
        self.assertEqual(len(inserts), 7)

    async def test_few_bound_values(self) -> None:
        """
        An SQLite built to bind fewer values per statement gets statements
        of fewer rows.
        """
        self.trace_statements(_sqlite_commit, variables=99)
        backend, _ = await self.opened(self.store_path())
        contents = [b"m%d" % i for i in range(100)]
        await backend.commit(StoreBatch(messages={2: (1, contents)}))
        self.assertEqual(await self.read_all(backend, 100), contents)


class MarkUpsertTests(StoreCase):
    """
    A commit's delivery marks are written by one statement (up to 1,024
    marks, the row count a power of two, padded with the last mark), not
    one statement per stream; a mark still only moves forward.
    """

    async def traced(self) -> tuple[SQLiteBackend, list[str], str]:
        """A new store whose writer's statements are recorded; its path."""
        statements = self.trace_statements(_sqlite_commit)
        path = self.store_path()
        backend, _ = await self.opened(path)
        return backend, statements, path

    @staticmethod
    def upserts(statements: list[str]) -> list[str]:
        return [s for s in statements if s.startswith("INSERT INTO inbound")]

    async def reopened_marks(
        self, backend: SQLiteBackend, path: str
    ) -> dict[tuple[Any, str], int]:
        await backend.close()
        _, state = await self.opened(path)
        return {(r.peer_id, r.incarnation): r.delivered for r in state.inbound}

    async def test_one_statement_per_commit(self) -> None:
        """
        1,000 streams' marks take one statement; 1,500 take two (1,024,
        then 476 padded to 512); a commit that moves some marks back and
        others forward moves only those forward.
        """
        backend, statements, path = await self.traced()
        marks = {(peer, "a" * 32): peer * 3 for peer in range(2, 1002)}
        await backend.commit(StoreBatch(delivered=marks))
        self.assertEqual(len(self.upserts(statements)), 1)
        statements.clear()
        more = {(peer, "b" * 32): peer for peer in range(2, 1502)}
        await backend.commit(StoreBatch(delivered=more))
        self.assertEqual(len(self.upserts(statements)), 2)
        mixed = {
            (peer, "a" * 32): peer * 3 + (1 if peer % 2 else -1)
            for peer in range(2, 1002)
        }
        await backend.commit(StoreBatch(delivered=mixed))
        expected = dict(more)
        expected.update(
            {key: max(marks[key], position) for key, position in mixed.items()}
        )
        self.assertEqual(await self.reopened_marks(backend, path), expected)

    async def test_odd_sizes(self) -> None:
        """
        Every mark of a commit of 1, 3 or 1,025 streams is written (the
        padding repeats a mark, which changes nothing).
        """
        backend, statements, path = await self.traced()
        expected: dict[tuple[Any, str], int] = {}
        for count, incarnation in ((1, "c"), (3, "d"), (1025, "e")):
            marks = {(peer, incarnation * 32): 7 + peer for peer in range(2, count + 2)}
            await backend.commit(StoreBatch(delivered=marks))
            expected.update(marks)
        self.assertEqual(len(self.upserts(statements)), 4)
        self.assertEqual(await self.reopened_marks(backend, path), expected)

    async def test_few_bound_values(self) -> None:
        """
        An SQLite built to bind fewer values per statement gets upserts of
        fewer marks (99 values: 32 marks each).
        """
        statements = self.trace_statements(_sqlite_commit, variables=99)
        path = self.store_path()
        backend, _ = await self.opened(path)
        marks = {(peer, "f" * 32): peer for peer in range(2, 102)}
        await backend.commit(StoreBatch(delivered=marks))
        self.assertEqual(len(self.upserts(statements)), 4)
        self.assertEqual(await self.reopened_marks(backend, path), marks)
