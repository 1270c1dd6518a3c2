"""
``python -m ilm.network.fuzz``, the command's manners: its help, its
progress, its usage errors kept on the streams it is given, and the node
with an SQLite store it drives besides the in-memory one.
"""

from __future__ import annotations

import inspect
import io
import re
import sys
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from ilm.backends._sqlite import SQLiteBackend
from ilm.errors import StoreError
from ilm.network import fuzz


def run(*arguments: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = fuzz.main(list(arguments), out, err)
    return status, out.getvalue(), err.getvalue()


class CommandTests(SynchronousTestCase):
    def test_help(self) -> None:
        """
        ``--help`` names the command as it is run, says what it checks, and
        explains every option.
        """
        out = io.StringIO()
        error = self.assertRaises(SystemExit, fuzz.main, ["--help"], out, io.StringIO())
        self.assertEqual(error.code, 0)
        text = out.getvalue()
        self.assertTrue(text.startswith("usage: python -m ilm.network.fuzz "), text)
        self.assertIn("SQLite store", text)
        parser = fuzz.build_parser()
        for action in parser._actions:
            self.assertTrue(action.help, action.option_strings)

    def test_usage_errors_on_the_given_stream(self) -> None:
        """
        A usage error goes to the stream the run was given (not to the
        process's standard error) and exits with status 2.
        """
        for arguments, message in [
            (["--inputs", "0"], "--inputs must be at least 1"),
            (["--session-share", "2"], "--session-share must be between 0 and 1"),
            (["--store", "postgres"], "invalid choice: 'postgres'"),
        ]:
            err = io.StringIO()
            self.patch(sys, "stderr", io.StringIO())
            error = self.assertRaises(
                SystemExit, fuzz.main, arguments, io.StringIO(), err
            )
            self.assertEqual(error.code, 2)
            self.assertIn(message, err.getvalue())
            self.assertEqual(sys.stderr.getvalue(), "")  # type: ignore[attr-defined]

    def test_progress(self) -> None:
        """
        On a stream that is not a terminal, progress is one line per tenth
        of the inputs, with the rate and the time left; the closing counts
        go to standard output.
        """
        status, out, err = run(
            "--inputs", "2000", "--seed", "3", "--session-share", "0.2",
            "--store", "memory",
        )  # fmt: skip
        self.assertEqual(status, 0, out)
        lines = err.splitlines()
        self.assertEqual(len(lines), 10, err)
        self.assertRegex(lines[0], r"^\[###\.+\] 200/2,000 inputs, [\d,]+/s, ")
        self.assertIn("2,000/2,000 inputs", lines[-1])
        self.assertIn("2,000 inputs fuzzed (seed 3)", out)
        self.assertIn("into the node with the memory store", out)

    def test_sqlite_backend(self) -> None:
        """
        The SQLite node's backend provides IBackend, and each of its
        operations has finished when it returns.
        """
        from zope.interface.verify import verifyObject

        from ilm import StoreBatch
        from ilm.interfaces import IBackend

        backend = fuzz.SynchronousSQLite(self.mktemp())
        self.addCleanup(backend.release)
        verifyObject(IBackend, backend)
        state = self.successResultOf(backend.open())
        self.assertEqual((state.outbound, len(state.incarnation)), ((), 32))
        self.successResultOf(backend.commit(StoreBatch(messages={2: (1, [b"x"])})))
        # Reads bounded in bytes too, where the backend takes the bound.
        parameters = inspect.signature(SQLiteBackend.read_outbound).parameters
        bound = (1 << 20,) if "max_bytes" in parameters else ()
        self.assertEqual(
            self.successResultOf(backend.read_outbound(2, 0, 5, *bound)), [b"x"]
        )

    def test_store_failure_fails_the_run(self) -> None:
        """
        A commit of the SQLite node's store that fails (here: made to fail)
        fails the run, naming the node and the store error: nothing a peer
        sends may break the store.
        """
        real = SQLiteBackend.commit
        calls = []

        def commit(backend: SQLiteBackend, *args: Any, **kwargs: Any) -> Deferred[Any]:
            calls.append(None)
            if len(calls) == 2:
                return fail(StoreError("injected commit failure"))
            return real(backend, *args, **kwargs)

        self.patch(SQLiteBackend, "commit", commit)
        status, out, _ = run(
            "--inputs", "5000", "--seed", "7", "--protocol-share", "0",
            "--session-share", "1", "--store", "sqlite",
        )  # fmt: skip
        self.assertEqual(status, 1, out)
        self.assertIn("(seed 7): AssertionError: sqlite store node:", out)
        self.assertIn("injected commit failure", out)
        self.flushLoggedErrors(StoreError)

    def test_both_stores(self) -> None:
        """
        By default the session inputs go to two running nodes, one with an
        in-memory store and one with an SQLite file, and neither finds a
        problem.
        """
        status, out, _ = run(
            "--inputs", "3000", "--seed", "11", "--protocol-share", "0",
            "--session-share", "0.5",
        )  # fmt: skip
        # A store failure is in the output; its logged traceback is not a
        # second error of this test.
        self.flushLoggedErrors(StoreError)
        self.assertEqual(status, 0, out)
        match = re.search(
            r"([\d,]+) into the node with the memory store, ([\d,]+) into the node "
            r"with the sqlite store",
            out,
        )
        assert match is not None, out
        memory, sqlite = (int(g.replace(",", "")) for g in match.groups())
        self.assertGreater(memory, 500)
        self.assertGreater(sqlite, 500)
