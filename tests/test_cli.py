"""
``ilm --version``; ``ilm inspect``: what an SQLite store holds, for people
and for machines, read-only and lock-free (it works on the store of a
running node), with a clear error and a non-zero exit for anything that is
not a usable store.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from ilm import StoreBatch
from ilm._cli import main
from ilm.backends import SQLiteBackend
from ilm.backends._sqlite import migrate

ROOT = Path(__file__).resolve().parent.parent


class InspectTests(TestCase):
    def run_cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(["inspect", *args])
        return code, out.getvalue(), err.getvalue()

    async def open_store(self) -> tuple[SQLiteBackend, str, str]:
        """
        A store held open (and locked) by this process, as by a running node,
        with pending messages to ``2`` and ``"2"`` and two delivery marks.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "node.sqlite")
        backend = SQLiteBackend(path)
        state = await backend.open()
        self.addCleanup(backend.close)
        await backend.commit(
            StoreBatch(
                messages={2: (1, [b"x" * 10] * 5), "2": (1, [b"y"])},
                delivered={(3, "a" * 32): 4},
            )
        )
        await backend.commit(StoreBatch(acked={2: 2}, retired={(3, "b" * 32)}))
        return backend, path, state.incarnation

    async def test_json(self) -> None:
        """
        ``--json`` reports, for the store of a node that has it open, its
        incarnation and schema version; per peer (``2`` and ``"2"`` apart)
        the pending count and bytes and the age of the oldest pending
        message; each delivery mark with its retired flag; and that a live
        process (this one, by its pid) holds the store.
        """
        before = time.time()
        _, path, incarnation = await self.open_store()
        code, out, err = self.run_cli(path, "--json")
        self.assertEqual((code, err), (0, ""))
        report = json.loads(out)
        ages = [box.pop("oldest_pending_age") for box in report["outbound"]]
        for age in ages:
            self.assertTrue(0 <= age <= time.time() - before + 1, ages)
        self.assertEqual(
            report,
            {
                "path": path,
                "schema_version": 2,
                "incarnation": incarnation,
                "held": True,
                "held_by_pid": os.getpid(),
                "outbound": [
                    {
                        "peer_id": 2,
                        "pending": 3,
                        "pending_bytes": 30,
                        "acked": 2,
                        "last_position": 5,
                    },
                    {
                        "peer_id": "2",
                        "pending": 1,
                        "pending_bytes": 1,
                        "acked": 0,
                        "last_position": 1,
                    },
                ],
                "inbound": [
                    {
                        "peer_id": 3,
                        "incarnation": "b" * 32,
                        "delivered": 0,
                        "retired": True,
                    },
                    {
                        "peer_id": 3,
                        "incarnation": "a" * 32,
                        "delivered": 4,
                        "retired": False,
                    },
                ],
            },
        )

    async def test_text(self) -> None:
        """
        Without ``--json`` the same facts are printed for people, peer ids
        as Python literals; an empty outbox says so.
        """
        backend, path, incarnation = await self.open_store()
        await backend.commit(StoreBatch(acked={"2": 1}))
        code, out, err = self.run_cli(path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"incarnation {incarnation}", out)
        self.assertIn(f"held by a live process (pid {os.getpid()})", out)
        self.assertIn("schema version 2", out)
        self.assertIn("peer 2: 3 pending (positions 3..5, 30 bytes), oldest", out)
        self.assertIn("peer '2': none pending (all 1 acknowledged)", out)
        a, b = "a" * 32, "b" * 32
        self.assertIn(f"peer 3 incarnation {a}: delivered up to 4\n", out)
        self.assertIn(f"peer 3 incarnation {b}: delivered up to 0 (retired)", out)

    async def test_python_m_ilm_on_a_live_store(self) -> None:
        """
        ``python -m ilm inspect`` in another process reads a store this
        process holds open and locked, including commits still only in the
        WAL, and changes nothing.
        """
        backend, path, _ = await self.open_store()
        await backend.commit(StoreBatch(messages={2: (6, [b"z"] * 10)}))
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        result = subprocess.run(
            [sys.executable, "-m", "ilm", "inspect", path, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        [first, _] = json.loads(result.stdout)["outbound"]
        self.assertEqual((first["pending"], first["last_position"]), (13, 15))
        await backend.commit(StoreBatch(messages={2: (16, [b"after"])}))
        self.assertEqual(await backend.read_outbound(2, 15, 5, 1 << 30), [b"after"])

    def test_errors(self) -> None:
        """
        A missing file, a file that is not a database, an SQLite database
        that is not an ILM store, and a store from a newer ILM each give a
        one-line typed error on stderr and exit status 1.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        missing = os.path.join(directory, "missing.sqlite")
        garbage = os.path.join(directory, "garbage.sqlite")
        Path(garbage).write_bytes(b"not a database" * 100)
        foreign = os.path.join(directory, "foreign.sqlite")
        conn = sqlite3.connect(foreign)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        newer = os.path.join(directory, "newer.sqlite")
        conn = sqlite3.connect(newer, isolation_level=None)
        migrate(conn)
        conn.execute("UPDATE ilm_schema SET version = 7")
        conn.close()
        for path, error in [
            (missing, "StoreError: no ILM store at"),
            (garbage, "StoreCorrupt:"),
            (foreign, "StoreCorrupt:"),
            (newer, "StoreSchemaTooNew: store schema version 7 is newer"),
        ]:
            code, out, err = self.run_cli(path)
            self.assertEqual((code, out), (1, ""), path)
            self.assertTrue(err.startswith(f"ilm inspect: {error}"), err)
            self.assertEqual(err.count("\n"), 1, err)
        self.assertFalse(os.path.exists(missing))


class VersionTests(TestCase):
    def test_version(self) -> None:
        """
        ``ilm --version`` prints ILM's version (then Twisted's and
        Python's) and exits 0; the package's metadata takes its version from
        ``ilm.__version__``, so the two cannot drift apart.
        """
        import ilm

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(SystemExit, main, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertTrue(out.getvalue().startswith(f"ilm {ilm.__version__} (Twisted "))
        setup = (ROOT / "setup.cfg").read_text()
        self.assertIn("\nversion = attr: ilm.__version__\n", setup)


HOLD_STORE = """
import sys
from twisted.internet import reactor
from ilm.backends import SQLiteBackend

backend = SQLiteBackend(sys.argv[1])

def opened(state):
    print("open", flush=True)

backend.open().addCallback(opened)
reactor.run()
"""


class HolderTests(TestCase):
    timeout = 60

    def hold(self, path: str) -> subprocess.Popen[str]:
        """
        Start a process that opens the store at ``path`` and keeps it;
        return once it has.
        """
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD_STORE, path],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.addCleanup(self.stop, process)
        assert process.stdout is not None
        self.assertEqual(process.stdout.readline(), "open\n")
        return process

    def stop(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()

    def run_cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(list(args))
        return code, out.getvalue(), err.getvalue()

    async def store(self) -> tuple[str, str]:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "node.sqlite")
        backend = SQLiteBackend(path)
        state = await backend.open()
        await backend.commit(
            StoreBatch(messages={2: (1, [b"a", b"b"])}, delivered={(3, "c" * 32): 4})
        )
        await backend.close()
        return path, state.incarnation

    async def test_inspect_names_the_live_holder(self) -> None:
        """
        ``ilm inspect`` says which live process holds a store (its pid, from
        the kernel's lock table), and that none does once it has died
        (SIGKILL: the kernel dropped its lock); it never takes the lock.
        """
        path, _ = await self.store()
        code, out, _ = self.run_cli("inspect", path, "--json")
        self.assertEqual((code, json.loads(out)["held"]), (0, False))
        holder = self.hold(path)
        code, out, _ = self.run_cli("inspect", path)
        self.assertEqual(code, 0)
        self.assertIn(f"held by a live process (pid {holder.pid})", out)
        code, out, _ = self.run_cli("inspect", path, "--json")
        report = json.loads(out)
        self.assertEqual((report["held"], report["held_by_pid"]), (True, holder.pid))
        holder.kill()
        holder.wait(30)
        code, out, _ = self.run_cli("inspect", path)
        self.assertIn("no live process holds it", out)

    async def test_reincarnate(self) -> None:
        """
        ``ilm reincarnate STORE`` refuses (StoreLocked, exit 1, nothing
        changed) while a live process holds the store; once it has gone,
        it gives the store a new incarnation and keeps everything else
        (outbox, marks), as a node opening it then sees.
        """
        path, incarnation = await self.store()
        holder = self.hold(path)
        code, out, err = self.run_cli("reincarnate", path)
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("ilm reincarnate: StoreLocked:"), err)
        self.assertIn(str(holder.pid), err)
        self.stop(holder)
        code, out, err = self.run_cli("reincarnate", path)
        self.assertEqual((code, err), (0, ""))
        backend = SQLiteBackend(path)
        state = await backend.open()
        self.addCleanup(backend.close)
        self.assertNotEqual(state.incarnation, incarnation)
        self.assertIn(f"incarnation {incarnation} replaced by {state.incarnation}", out)
        self.assertEqual(
            [(r.peer_id, r.acked, r.last_position) for r in state.outbound], [(2, 0, 2)]
        )
        self.assertEqual(
            [(r.peer_id, r.incarnation, r.delivered) for r in state.inbound],
            [(3, "c" * 32, 4)],
        )
        self.assertEqual(await backend.read_outbound(2, 0, 10, 1 << 30), [b"a", b"b"])

    def test_reincarnate_errors(self) -> None:
        """
        ``ilm reincarnate`` on a missing file or on another application's
        database fails with one line and exit status 1, creating nothing.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        missing = os.path.join(directory, "missing.sqlite")
        foreign = os.path.join(directory, "foreign.sqlite")
        conn = sqlite3.connect(foreign)
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()
        for path, error in [
            (missing, "StoreError: no ILM store at"),
            (foreign, "StoreCorrupt:"),
        ]:
            code, out, err = self.run_cli("reincarnate", path)
            self.assertEqual((code, out), (1, ""), path)
            self.assertTrue(err.startswith(f"ilm reincarnate: {error}"), err)
            self.assertEqual(err.count("\n"), 1, err)
        self.assertEqual(sorted(os.listdir(directory)), ["foreign.sqlite"])
