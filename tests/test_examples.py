"""
The guide's example application (``examples/sender.py`` and
``examples/receiver.py``, docs/guide.md) run as real processes over TCP,
each with its own SQLite store: killed with SIGKILL and started again, the
sender neither loses nor repeats what it handed over, the receiver applies
every message once; SIGTERM stops a node cleanly; the JSON log holds one
event per line with plain fields.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ilm import Message

from .test_stream_sockets import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KEY = "5a" * 32


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def applied(database: str) -> list[tuple[str, str, int, bytes]]:
    """
    What the receiving application has applied, in order.
    """
    if not os.path.exists(database):
        return []
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT source, incarnation, message_id, contents FROM messages "
            "ORDER BY rowid"
        ).fetchall()
    except sqlite3.OperationalError:
        return []  # the table is not created yet
    finally:
        conn.close()


class ExampleProcessTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        for name, peer in (("sender-keys.txt", 2), ("receiver-keys.txt", 1)):
            path = os.path.join(self.directory, name)
            with open(path, "w") as f:
                f.write(f"{peer} {KEY}\n")
            os.chmod(path, 0o600)
        self.port = free_port()
        self.database = os.path.join(self.directory, "application.sqlite")

    def start(self, name: str, *arguments: str) -> subprocess.Popen[bytes]:
        """
        Run ``examples/NAME`` in the test's directory, its log in
        ``NAME.log``.
        """
        log = open(os.path.join(self.directory, f"{name}.log"), "ab")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), *arguments],
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        )
        self.addCleanup(_kill, process)
        return process

    def receiver(self, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(
            "receiver.py", "--listen", f"tcp:{self.port}:interface=127.0.0.1", *extra
        )

    def sender(self, count: int) -> subprocess.Popen[bytes]:
        return self.start(
            "sender.py",
            "--peer",
            f"tcp:host=127.0.0.1:port={self.port}",
            "--count",
            str(count),
        )

    def log(self, name: str) -> str:
        path = os.path.join(self.directory, f"{name}.log")
        with open(path, errors="replace") as f:
            return f.read()

    async def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(
                    f"timed out waiting for {what}\n--- receiver\n"
                    f"{self.log('receiver.py')[-2000:]}\n--- sender\n"
                    f"{self.log('sender.py')[-2000:]}"
                )
            await deferLater(reactor, 0.02)

    async def exit_status(self, process: subprocess.Popen[bytes]) -> int:
        await self.wait_for(lambda: process.poll() is not None, "the exit")
        assert process.returncode is not None
        return process.returncode

    async def test_through_kills(self) -> None:
        """
        The receiver and then the sender are SIGKILLed in the middle of the
        run and started again: the sender carries on after what it had
        handed over, and the receiver's application ends with messages
        1 to N of one sender incarnation, each once, in order.
        """
        count = 1500
        receiver = self.receiver()
        await self.wait_for(
            lambda: "ILM node 2 running" in self.log("receiver.py"), "the receiver"
        )
        sender = self.sender(count)
        await self.wait_for(lambda: len(applied(self.database)) >= 300, "300 applied")
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
        receiver = self.receiver()
        await self.wait_for(lambda: len(applied(self.database)) >= 700, "700 applied")
        sender.send_signal(signal.SIGKILL)
        sender.wait()
        self.assertNotIn("all 1500 message(s) acknowledged", self.log("sender.py"))
        sender = self.sender(count)
        self.assertEqual(await self.exit_status(sender), 0, self.log("sender.py"))
        log = self.log("sender.py")
        self.assertIn("all 1500 message(s) acknowledged", log)
        # The restarted sender learned from its store how far it had got.
        line = [line for line in log.splitlines() if "handed over before" in line][-1]
        handed_over = int(line.split("[example.sender#info] ")[1].split()[0])
        self.assertLess(0, handed_over)
        self.assertIn(f"sending {count - handed_over} more", line)
        rows = applied(self.database)
        self.assertEqual([row[2] for row in rows], list(range(1, count + 1)))
        self.assertEqual({(row[0], row[1]) for row in rows}, {("1", rows[0][1])})
        self.assertEqual(
            [row[3] for row in rows], [b"message %d" % n for n in range(1, count + 1)]
        )
        receiver.send_signal(signal.SIGTERM)
        self.assertEqual(await self.exit_status(receiver), 0, self.log("receiver.py"))

    async def test_sigterm_and_json_log(self) -> None:
        """
        SIGTERM stops the receiver cleanly (exit status 0, "stopped"); its
        JSON log holds one event per line, ILM's events with an
        ``ilm_event`` and plain field values.
        """
        json_log = os.path.join(self.directory, "receiver.json")
        receiver = self.receiver("--json-log", json_log)
        await self.wait_for(
            lambda: "ILM node 2 running" in self.log("receiver.py"), "the receiver"
        )
        receiver.send_signal(signal.SIGTERM)
        self.assertEqual(await self.exit_status(receiver), 0, self.log("receiver.py"))
        self.assertIn("ILM node 2 stopped", self.log("receiver.py"))
        with open(json_log) as f:
            events = [json.loads(line) for line in f]
        by_kind = {event.get("ilm_event"): event for event in events}
        started = by_kind["started"]
        self.assertEqual(started["local_id"], 2)
        self.assertIsInstance(started["incarnation"], str)
        self.assertEqual(started["pending"], 0)
        self.assertEqual(by_kind["stopped"]["local_id"], 2)
        self.assertEqual(started["log_namespace"], "ilm")


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


class ReceiverApplicationTests(SynchronousTestCase):
    def test_repeats_ignored(self) -> None:
        """
        The receiving application applies a message delivered again (the
        at-least-once window) only once, and tells apart messages that
        differ only in their sender's incarnation or whose sender ids are
        1 and "1".
        """
        receiver = load_example("receiver.py")
        database = self.mktemp()
        application = receiver.Application(database)
        self.addCleanup(application.db.close)
        first = Message(1, 2, 1, b"a", "a" * 32)
        for message in [
            first,
            first,
            Message(1, 2, 1, b"b", "b" * 32),
            Message("1", 2, 1, b"c", "a" * 32),
            first,
        ]:
            application.deliver(message)
        self.assertEqual([row[3] for row in applied(database)], [b"a", b"b", b"c"])
