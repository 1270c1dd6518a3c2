"""
``twistd ilm``: the plugin is found, options are checked, the inbox file
receives messages exactly once and in order, and a real daemon process
survives SIGKILL and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ilm import ILM, Message
from ilm._twistd import FileDelivery, NodeService, Options, parse_peer_id
from ilm.network import StreamNetwork

from .test_stream_sockets import free_port

KEY_HEX = "42" * 32
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def inbox_lines(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    # A line being written when the process was killed may be incomplete.
    return [json.loads(line) for line in data.split(b"\n") if line.endswith(b"}")]


class PluginTests(SynchronousTestCase):
    def test_found(self) -> None:
        """
        The ilm service maker is a twistd plugin, and makes an IService.
        """
        [maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "ilm"]
        self.assertIn("ILM", maker.description)
        options = maker.options()
        keys = write(self.mktemp(), f"1 {KEY_HEX}\n")
        options.parseOptions(["--id", "2", "--keys", keys, "--store", self.mktemp()])
        service = maker.makeService(options)
        self.assertTrue(IService.providedBy(service))
        self.assertIsInstance(service, NodeService)

    def test_twistd_lists_it(self) -> None:
        """
        ``twistd --help`` names the ilm command (the installed package
        carries the plugin).
        """
        result = subprocess.run(
            [*TWISTD, "--help"], capture_output=True, text=True, cwd=self.mktemp_dir()
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+ilm\s+Run an ILM node")

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.keys = write(self.mktemp(), f"# keys\n1 {KEY_HEX}\n\nalice {KEY_HEX}\n")

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(list(arguments))
        return options

    def test_peer_ids(self) -> None:
        """
        Digits are an int id, anything else a str id, str: forces a string.
        """
        self.assertEqual(parse_peer_id("2"), 2)
        self.assertEqual(parse_peer_id("alice"), "alice")
        self.assertEqual(parse_peer_id("str:2"), "2")
        self.assertRaises(usage.UsageError, parse_peer_id, "")
        self.assertRaises(usage.UsageError, parse_peer_id, str(2**63))

    def test_full(self) -> None:
        """
        Every option lands where makeService reads it.
        """
        options = self.parse(
            "--id", "2", "--keys", self.keys, "--listen", "tcp:0",
            "--listen", "unix:/tmp/x.sock", "--peer", "1=tcp:host=h:port=1",
            "--peer", "alice=tcp:host=a:port=2", "--window", "64", "--fsync",
        )  # fmt: skip
        self.assertEqual(options["id"], 2)
        self.assertEqual(options["listen"], ["tcp:0", "unix:/tmp/x.sock"])
        self.assertEqual(
            options["peers"], {1: "tcp:host=h:port=1", "alice": "tcp:host=a:port=2"}
        )
        self.assertEqual(
            options["keys"],
            {1: bytes.fromhex(KEY_HEX), "alice": bytes.fromhex(KEY_HEX)},
        )
        self.assertEqual((options["window"], options["fsync"]), (64, True))

    def test_refusals(self) -> None:
        """
        Each mistake is a usage error that says what is wrong.
        """
        short = write(self.mktemp(), "1 abcd\n")
        not_hex = write(self.mktemp(), "1 zz\n")
        fields = write(self.mktemp(), "1\n")
        twice = write(self.mktemp(), f"1 {KEY_HEX}\n1 {KEY_HEX}\n")
        cases = {
            "--id is required": ["--keys", self.keys],
            "always authenticated": ["--id", "2"],
            "wants ID=ENDPOINT": ["--id", "2", "--keys", self.keys, "--peer", "1"],
            "does not dial itself": [
                "--id", "2", "--keys", self.keys, "--peer", "2=tcp:host=h:port=1",
            ],
            "given twice": [
                "--id", "2", "--keys", self.keys, "--peer", "1=tcp:host=h:port=1",
                "--peer", "1=tcp:host=h:port=2",
            ],
            "at least 16 are required": ["--id", "2", "--keys", short],
            "the key is not hex": ["--id", "2", "--keys", not_hex],
            "expected 'PEER_ID HEX_KEY'": ["--id", "2", "--keys", fields],
            "a second key": ["--id", "2", "--keys", twice],
            "cannot read the keys file": ["--id", "2", "--keys", self.mktemp()],
            "go together": ["--id", "2", "--tls-certificate", "c.pem"],
            "need --tls-certificate": [
                "--id", "2", "--keys", self.keys, "--tls-ca", "x",
            ],
            "invalid peer id": ["--id", "", "--keys", self.keys],
        }  # fmt: skip
        for reason, arguments in cases.items():
            error = self.assertRaises(usage.UsageError, self.parse, *arguments)
            self.assertIn(reason, str(error), arguments)


class FileDeliveryTests(SynchronousTestCase):
    def test_lines(self) -> None:
        """
        Each message is one JSON line with its contents in base64.
        """
        path = self.mktemp()
        inbox = FileDelivery(path)
        for n in (1, 2):
            inbox.deliver(Message(1, 2, n, b"\x00payload %d" % n, "ab" * 16))
        inbox.close()
        lines = inbox_lines(path)
        self.assertEqual([line["message_id"] for line in lines], [1, 2])
        self.assertEqual(base64.b64decode(lines[1]["contents"]), b"\x00payload 2")
        self.assertEqual(
            (lines[0]["source"], lines[0]["destination"], lines[0]["incarnation"]),
            (1, 2, "ab" * 16),
        )

    def test_failed_write_raises_and_recovers(self) -> None:
        """
        A write that fails raises (ILM then holds the stream and retries);
        once the file can be written, the next attempt succeeds.
        """
        directory = self.mktemp()
        inbox = FileDelivery(os.path.join(directory, "inbox.jsonl"))
        message = Message(1, 2, 1, b"x")
        self.assertRaises(OSError, inbox.deliver, message)
        os.makedirs(directory)
        inbox.deliver(message)
        inbox.close()
        self.assertEqual(len(inbox_lines(inbox.path)), 1)


class DaemonTests(TestCase):
    """
    A real ``twistd -n ilm`` process receiving from a node in this process
    over TCP.
    """

    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.keys = write(os.path.join(self.directory, "keys"), f"1 {KEY_HEX}\n")
        self.inbox = os.path.join(self.directory, "inbox.jsonl")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, *extra: str) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.directory, "twistd.log"), "ab")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [
                *TWISTD, "-n", "--pidfile=", "--logfile=-", "ilm", "--id", "2",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--keys", self.keys, "--store", "node2.sqlite",
                "--inbox", self.inbox, *extra,
            ],
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.process = process
        self.addCleanup(self._kill, process)
        return process

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    def log_text(self) -> str:
        with open(os.path.join(self.directory, "twistd.log"), errors="replace") as f:
            return f.read()

    async def sender(self) -> ILM:
        network = StreamNetwork(
            1,
            peers={2: f"tcp:host=127.0.0.1:port={self.port}"},
            keys={2: bytes.fromhex(KEY_HEX)},
        )
        node = await ILM.create(
            os.path.join(self.directory, "node1.sqlite"), print, network
        )
        self.addCleanup(node.shutdown, 10)
        return node

    async def wait_for(self, condition: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}:\n{self.log_text()[-3000:]}")
            await deferLater(reactor, 0.05)

    async def test_receive_survive_sigkill_stop(self) -> None:
        """
        The daemon appends what it receives to its inbox in order; killed
        with SIGKILL mid-stream and started again, it loses nothing (a
        repeat only inside the documented window, with the same incarnation
        and message id); SIGTERM stops it cleanly.
        """
        self.spawn()
        node = await self.sender()
        payloads = [b"message %d" % n for n in range(3000)]
        receipts = []

        async def send_all() -> None:
            # About a second of sending, so that the kill lands mid-stream.
            for offset in range(0, len(payloads), 50):
                for payload in payloads[offset : offset + 50]:
                    receipts.append(node.send_to(2, payload))
                await deferLater(reactor, 0.015)

        sending = Deferred.fromCoroutine(send_all())
        await self.wait_for(lambda: len(inbox_lines(self.inbox)) >= 300, "deliveries")
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        before_kill = len(inbox_lines(self.inbox))
        self.spawn()
        await sending
        results = await DeferredList(receipts, fireOnOneErrback=True)
        await DeferredList(
            [receipt.acknowledged for _, receipt in results], fireOnOneErrback=True
        )
        lines = inbox_lines(self.inbox)
        # Exactly once after removing repeats of the same (incarnation, id).
        seen: dict[tuple[str, int], bytes] = {}
        ordered = []
        for line in lines:
            key = (line["incarnation"], line["message_id"])
            contents = base64.b64decode(line["contents"])
            if key in seen:
                self.assertEqual(seen[key], contents)
                continue
            seen[key] = contents
            ordered.append(contents)
        self.assertEqual(ordered, payloads)
        # The kill came mid-stream, and the restarted daemon took the rest.
        self.assertLess(before_kill, len(payloads))
        self.assertEqual(self.log_text().count("ILM node 2 running"), 2)
        self.assertLessEqual(len(lines) - len(ordered), 4096)
        if os.environ.get("ILM_TWISTD_VERBOSE"):
            print(
                f"{before_kill} lines before the SIGKILL, {len(lines)} at the "
                f"end, {len(lines) - len(ordered)} repeats"
            )
        self.assertEqual({line["source"] for line in lines}, {1})
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: self.process.poll() is not None, "the exit")
        # After a clean shutdown twistd re-raises the signal that stopped it.
        self.assertEqual(
            self.process.returncode, -signal.SIGTERM, self.log_text()[-3000:]
        )
        self.assertIn("ILM node 2 stopped", self.log_text())
        self.assertIn("Server Shut Down", self.log_text())

    async def test_start_failure_exits_1(self) -> None:
        """
        A node that cannot start (its store is a directory, or its inbox
        cannot be written) logs why and exits with status 1.
        """
        os.makedirs(os.path.join(self.directory, "node2.sqlite"))
        process = self.spawn()
        await self.wait_for(lambda: process.poll() is not None, "the exit", 30)
        self.assertEqual(process.returncode, 1, self.log_text()[-3000:])
        self.assertIn("could not start", self.log_text())
        self.assertIn("node2.sqlite", self.log_text())
        os.rmdir(os.path.join(self.directory, "node2.sqlite"))
        os.remove(self.inbox)
        os.makedirs(self.inbox)
        process = self.spawn()
        await self.wait_for(lambda: process.poll() is not None, "the exit", 30)
        self.assertEqual(process.returncode, 1, self.log_text()[-3000:])
        self.assertIn("Is a directory", self.log_text())
