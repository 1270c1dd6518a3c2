"""
``twistd ilm``: the plugin is found; the whole configuration is checked
before anything is created, one line per problem; the inbox file receives
messages exactly once and in order, every line whole JSON, through a full
disk and through SIGKILLs; a real daemon process survives SIGKILL, stops
cleanly on SIGTERM, and exits with status 1 (removing its pid file, without
a traceback) when it cannot start.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ilm import ILM, Message
from ilm._twistd import (
    FileDelivery,
    NodeService,
    Options,
    makeService,
    parse_peer_id,
    read_keys,
)
from ilm.network import StreamNetwork

from .test_stream_sockets import free_port
from .tls_support import make_ca, self_signed

KEY_HEX = "42" * 32
OTHER_KEY_HEX = "43" * 32
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def write(path: str, text: str, mode: int = 0o600) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def inbox_lines(path: str) -> list[dict[str, Any]]:
    """
    The complete lines of an inbox being written (the last one may be in
    the middle of its write).
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    return [json.loads(line) for line in data.split(b"\n") if line.endswith(b"}")]


def whole_lines(case: SynchronousTestCase, path: str) -> list[dict[str, Any]]:
    """
    Every line of the inbox at ``path``, checking that each is whole JSON
    and that the file ends with a newline.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data:
        case.assertTrue(data.endswith(b"\n"), f"partial last line: {data[-80:]!r}")
    lines = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            case.fail(f"line {number} is not JSON: {line[:80]!r}...{line[-80:]!r}")
    return lines


def exactly_once(
    case: SynchronousTestCase, lines: list[dict[str, Any]]
) -> tuple[list[bytes], int]:
    """
    The contents of ``lines`` once repeats of the same (source,
    incarnation, message id) are skipped, checking each repeat is
    identical; and how many repeats there were.
    """
    seen: dict[tuple[Any, str, int], bytes] = {}
    ordered = []
    for line in lines:
        key = (line["source"], line["incarnation"], line["message_id"])
        contents = base64.b64decode(line["contents"])
        if key in seen:
            case.assertEqual(seen[key], contents)
            continue
        seen[key] = contents
        ordered.append(contents)
    return ordered, len(lines) - len(ordered)


def pem_key(key: Any) -> str:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def pem_certificate(certificate: Any) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[no-any-return]


class PluginTests(SynchronousTestCase):
    def test_found(self) -> None:
        """
        The ilm service maker is a twistd plugin, and makes an IService.
        """
        [maker] = [p for p in getPlugins(IServiceMaker) if p.tapname == "ilm"]
        self.assertIn("ILM", maker.description)
        options = maker.options()
        keys = write(self.mktemp(), f"1 {KEY_HEX}\n")
        options.parseOptions(
            ["--id", "2", "--keys", keys, "--listen", "tcp:0", "--store", self.mktemp()]
        )
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
        self.keys = write(
            self.mktemp(), f"# keys\n1 {KEY_HEX}\n\nalice {OTHER_KEY_HEX}\n"
        )

    def parse(self, *arguments: str) -> Options:
        options = Options()
        options.parseOptions(list(arguments))
        return options

    def problems(self, *arguments: str) -> list[str]:
        """
        The lines of the usage error ``arguments`` give.
        """
        error = self.assertRaises(usage.UsageError, self.parse, *arguments)
        return str(error).splitlines()

    def test_peer_ids(self) -> None:
        """
        Digits are an int id, anything else a str id, str: forces a string;
        a signed number and spaces around an id are refused.
        """
        self.assertEqual(parse_peer_id("2"), 2)
        self.assertEqual(parse_peer_id("alice"), "alice")
        self.assertEqual(parse_peer_id("str:2"), "2")
        self.assertEqual(parse_peer_id("str:-5"), "-5")
        self.assertRaises(usage.UsageError, parse_peer_id, "")
        self.assertRaises(usage.UsageError, parse_peer_id, str(2**63))
        error = self.assertRaises(usage.UsageError, parse_peer_id, "-5")
        self.assertIn("'str:-5'", str(error))
        self.assertRaises(usage.UsageError, parse_peer_id, "+5")
        self.assertRaises(usage.UsageError, parse_peer_id, " 5")

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
            options["peers"],
            {1: ["tcp:host=h:port=1"], "alice": ["tcp:host=a:port=2"]},
        )
        self.assertEqual(
            options["keys"],
            {1: bytes.fromhex(KEY_HEX), "alice": bytes.fromhex(OTHER_KEY_HEX)},
        )
        self.assertEqual((options["window"], options["fsync"]), (64, True))
        self.assertIsNone(options["tls"])
        self.assertEqual(options.warnings, [])

    def test_sidecar_defaults(self) -> None:
        """
        By default the API listens on 127.0.0.1:8780 with the token in
        ilm-api.token, metrics are off and messages go to the inbox file.
        """
        options = self.parse("--id", "2", "--keys", self.keys, "--listen", "tcp:0")
        self.assertEqual(options["api"], "tcp:8780:interface=127.0.0.1")
        self.assertEqual(options["api-token-file"], "ilm-api.token")
        self.assertIsNone(options["metrics"])
        self.assertEqual(options["inbox"], "ilm-inbox.jsonl")
        self.assertIsNone(options["webhook"])

    def test_sidecar_options(self) -> None:
        """
        A bare port or a TCP endpoint without an interface is bound to the
        loopback; ``--api none`` turns the API off; a webhook with its
        secret replaces the inbox.
        """
        secret = write(self.mktemp(), "whsec_" + "c2VjcmV0c2VjcmV0c2VjcmV0\n")
        options = self.parse(
            "--id", "2", "--keys", self.keys, "--listen", "tcp:0",
            "--api", "none", "--metrics", "9100", "--metrics-per-peer",
            "--webhook", "http://127.0.0.1:9/hook", "--webhook-secret-file", secret,
        )  # fmt: skip
        self.assertIsNone(options["api"])
        self.assertEqual(options["metrics"], "tcp:9100:interface=127.0.0.1")
        self.assertIsNone(options["inbox"])
        self.assertEqual(options["webhook-secret"], b"secretsecretsecret")
        options = self.parse(
            "--id", "2", "--keys", self.keys, "--listen", "tcp:0",
            "--api", "tcp:8781", "--exec", "cat",
        )  # fmt: skip
        self.assertEqual(options["api"], "tcp:8781:interface=127.0.0.1")
        self.assertEqual(options["exec"], "cat")

    def test_postgres_store(self) -> None:
        """
        A PostgreSQL URI is a store (no file checks); the gateway defaults
        to the host name.
        """
        import socket

        options = self.parse(
            "--id", "2", "--keys", self.keys, "--listen", "tcp:0",
            "--store", "postgresql://u:pw@db.example/ilm", "--schema", "s1",
        )  # fmt: skip
        self.assertEqual(options["gateway"], socket.gethostname())
        self.assertEqual(options["schema"], "s1")

    def test_sidecar_refusals(self) -> None:
        """
        Two delivery targets, a non-HTTP webhook, a secret without a
        webhook (or readable by others, or malformed), per-peer metrics
        without metrics and a bad endpoint are each one line.
        """
        base = ("--id", "2", "--keys", self.keys, "--listen", "tcp:0")
        exposed = write(self.mktemp(), "whsec_c2VjcmV0c2VjcmV0c2VjcmV0\n", 0o644)
        short = write(self.mktemp(), "whsec_c2hvcnQ=\n")
        good = write(self.mktemp(), "whsec_c2VjcmV0c2VjcmV0c2VjcmV0\n")
        for arguments, expected in [
            (("--inbox", "x.jsonl", "--webhook", "http://h/"), "give one delivery"),
            (("--webhook", "ftp://h/"), "must be an http:// or https:// URL"),
            (("--webhook-secret-file", good), "needs --webhook URL"),
            (
                ("--webhook", "http://h/", "--webhook-secret-file", exposed),
                "chmod 600",
            ),
            (
                ("--webhook", "http://h/", "--webhook-secret-file", short),
                "at least 16 random bytes",
            ),
            (("--metrics-per-peer",), "needs --metrics ENDPOINT"),
            (("--api", "bogus:1"), "--api 'bogus:1': not a server endpoint"),
            (("--exec", "'unclosed"), "--exec command"),
            (("--gateway", "g1"), "--gateway names a gateway sharing a PostgreSQL"),
            (("--store", "postgresql://h:notaport/db"), "is not a number"),
            (("--store", "postgresql://h/db?bogus=1"), "invalid URI query"),
        ]:
            problems = self.problems(*base, *arguments)
            self.assertEqual(len(problems), 1, problems)
            self.assertIn(expected, problems[0])

    def test_refusals(self) -> None:
        """
        Each mistake is a usage error whose one line says what is wrong.
        """
        short = write(self.mktemp(), "1 abcd\n")
        not_hex = write(self.mktemp(), "1 zz\n")
        fields = write(self.mktemp(), "1\n")
        twice = write(self.mktemp(), f"1 {KEY_HEX}\n1 {OTHER_KEY_HEX}\n")
        reused = write(self.mktemp(), f"1 {KEY_HEX}\n3 {KEY_HEX}\n")
        own = write(self.mktemp(), f"1 {KEY_HEX}\n2 {OTHER_KEY_HEX}\n")
        empty = write(self.mktemp(), "# nobody yet\n")
        listen = ["--listen", "tcp:0"]
        cases = {
            "--id is required": ["--keys", self.keys, *listen],
            "always authenticated": ["--id", "2", *listen],
            "expected ID=ENDPOINT": [
                "--id", "2", "--keys", self.keys, *listen, "--peer", "1",
            ],
            "does not dial itself": [
                "--id", "2", "--keys", self.keys, "--peer", "2=tcp:host=h:port=1",
            ],
            "endpoint 'tcp:host=h:port=1' of peer 1 is given twice": [
                "--id", "2", "--keys", self.keys, "--peer", "1=tcp:host=h:port=1",
                "--peer", "1=tcp:host=h:port=1",
            ],
            "at least 16 are required": ["--id", "2", "--keys", short, *listen],
            "the key is not hex": ["--id", "2", "--keys", not_hex, *listen],
            "expected 'PEER_ID HEX_KEY'": ["--id", "2", "--keys", fields, *listen],
            "a second key for 1": ["--id", "2", "--keys", twice, *listen],
            "is also the key of 1": ["--id", "2", "--keys", reused, *listen],
            "own id 2": ["--id", "2", "--keys", own, *listen],
            "holds no key": ["--id", "2", "--keys", empty, *listen],
            "cannot read the keys file": [
                "--id", "2", "--keys", self.mktemp(), *listen,
            ],
            "go together": ["--id", "2", "--tls-certificate", "c.pem", *listen],
            "need --tls-certificate": [
                "--id", "2", "--keys", self.keys, "--tls-ca", "x", *listen,
            ],
            "invalid peer id ''": ["--id", "", "--keys", self.keys, *listen],
            "integer ids are 0 to 2**63-1": [
                "--id", "-5", "--keys", self.keys, *listen,
            ],
            "neither listens (--listen) nor dials": ["--id", "2", "--keys", self.keys],
            "no key for peer 3": [
                "--id", "2", "--keys", self.keys, "--peer", "3=tcp:host=h:port=1",
            ],
            "'port'": ["--id", "2", "--keys", self.keys, "--peer", "1=tcp:host=h"],
            "Unknown endpoint type": [
                "--id", "2", "--keys", self.keys, "--peer", "1=127.0.0.1:9001",
            ],
            "'notaport'": [
                "--id", "2", "--keys", self.keys,
                "--peer", "1=tcp:host=h:port=notaport",
            ],
            "listen endpoint 'tcp:notaport'": [
                "--id", "2", "--keys", self.keys, "--listen", "tcp:notaport",
            ],
            "--window 'x'": [
                "--id", "2", "--keys", self.keys, *listen, "--window", "x",
            ],
            "--window 0": [
                "--id", "2", "--keys", self.keys, *listen, "--window", "0",
            ],
        }  # fmt: skip
        for reason, arguments in cases.items():
            problems = self.problems(*arguments)
            self.assertEqual(len(problems), 1, (arguments, problems))
            self.assertIn(reason, problems[0], arguments)

    def test_every_problem_reported(self) -> None:
        """
        Several mistakes give one line each, in one error.
        """
        bad = write(self.mktemp(), f"1 {KEY_HEX}\n2 zz\n")
        problems = self.problems(
            "--id", "-5", "--keys", bad, "--listen", "tcp:notaport",
            "--peer", "1=tcp:host=h", "--peer", "3=tcp:host=h:port=1",
            "--window", "-1",
        )  # fmt: skip
        self.assertEqual(len(problems), 5, problems)
        for expected, line in zip(
            [
                "--id: invalid",
                ":2: the key is not hex",
                "--listen:",
                "--peer:",
                "--window",
            ],
            problems,
            strict=True,
        ):
            self.assertIn(expected, line)

    def test_secret_file_modes(self) -> None:
        """
        A keys file or TLS private key that other users can read, or that
        the group or other users can write, is refused with the fix; one
        only its group can read is accepted.
        """
        for mode in (0o644, 0o604, 0o620, 0o602):
            os.chmod(self.keys, mode)
            [problem] = self.problems(
                "--id", "2", "--keys", self.keys, "--listen", "tcp:0"
            )
            self.assertIn(f"(mode {mode:04o}): run 'chmod 600 {self.keys}'", problem)
        os.chmod(self.keys, 0o640)
        self.parse("--id", "2", "--keys", self.keys, "--listen", "tcp:0")
        certificate, key = self_signed()
        peer_certificate, _ = self_signed("peer")
        cert_path = write(self.mktemp(), pem_certificate(certificate), 0o644)
        key_path = write(self.mktemp(), pem_key(key), 0o644)
        from ilm.network import fingerprint

        tls = [
            "--id", "2", "--listen", "tcp:0", "--tls-certificate", cert_path,
            "--tls-key", key_path, "--pin",
            f"1={fingerprint(peer_certificate)}",
        ]  # fmt: skip
        [problem] = self.problems(*tls)
        self.assertIn(f"the TLS private key {key_path} can be read", problem)
        self.assertIn(f"chmod 600 {key_path}", problem)
        os.chmod(key_path, 0o600)
        options = self.parse(*tls)
        self.assertIsNotNone(options["tls"])

    def test_tls_identifies_dialled_peers(self) -> None:
        """
        With TLS only, a dialled peer that no pin or CA could identify is
        refused; a CA identifies any peer.
        """
        certificate, key = self_signed()
        cert_path = write(self.mktemp(), pem_certificate(certificate))
        key_path = write(self.mktemp(), pem_key(key))
        ca_path = write(self.mktemp(), pem_certificate(make_ca()[0]))
        tls = ["--id", "2", "--tls-certificate", cert_path, "--tls-key", key_path]
        peer = ["--peer", "3=tcp:host=h:port=1"]
        pin = ["--pin", "1=" + "ab" * 32]
        [problem] = self.problems(*tls, *pin, *peer)
        self.assertIn("TLS cannot identify peer 3", problem)
        self.parse(*tls, "--tls-ca", ca_path, *peer)
        [problem] = self.problems(*tls, *peer)
        self.assertIn("needs --pin ID=FINGERPRINT or --tls-ca", problem)

    def test_unused_keys_warned(self) -> None:
        """
        Keys of peers the node neither dials nor could be dialled by (it
        does not listen) give a warning, not an error.
        """
        options = self.parse(
            "--id", "2", "--keys", self.keys, "--peer", "1=tcp:host=h:port=1"
        )
        [warning] = options.warnings
        self.assertIn("the keys of 'alice' are never used", warning)

    def test_files(self) -> None:
        """
        A store or inbox in a directory that does not exist, a store that is
        a directory, and the same file for both are refused.
        """
        base = ["--id", "2", "--keys", self.keys, "--listen", "tcp:0"]
        missing = os.path.join(self.mktemp(), "x")
        [problem] = self.problems(*base, "--store", missing)
        self.assertIn(f"--store {missing}: the directory", problem)
        self.assertIn("does not exist", problem)
        [problem] = self.problems(*base, "--inbox", missing, "--store", self.mktemp())
        self.assertIn(f"--inbox {missing}: the directory", problem)
        directory = self.mktemp()
        os.makedirs(directory)
        [problem] = self.problems(*base, "--store", directory)
        self.assertIn("is a directory", problem)
        same = self.mktemp()
        [problem] = self.problems(*base, "--store", same, "--inbox", same)
        self.assertIn("--store and --inbox name the same file", problem)

    def test_rundir(self) -> None:
        """
        Under twistd, relative paths are relative to ``--rundir``, where the
        node will run.
        """
        rundir = os.path.abspath(self.mktemp())
        os.makedirs(rundir)
        write(os.path.join(rundir, "keys.txt"), f"1 {KEY_HEX}\n")
        parent = usage.Options()
        parent["rundir"] = rundir
        options = Options()
        options.parent = parent
        options.parseOptions(["--id", "2", "--keys", "keys.txt", "--listen", "tcp:0"])
        self.assertEqual(options["keys"], {1: bytes.fromhex(KEY_HEX)})

    def test_log_format(self) -> None:
        """
        ``--log-format json`` under twistd makes twistd's logger the JSON
        observer, unless twistd's own --logger or --syslog is given, or a
        daemon would log to standard output; anything but text or json is
        refused.
        """
        base = ["--id", "2", "--keys", self.keys, "--listen", "tcp:0"]
        [problem] = self.problems(*base, "--log-format", "xml")
        self.assertIn("--log-format 'xml': expected text or json", problem)
        for settings, expected in [
            ({"logger": "x.y"}, "leave out twistd's --logger and --syslog"),
            ({"syslog": 1}, "leave out twistd's --logger and --syslog"),
            ({"logfile": "-", "nodaemon": 0}, "a daemon cannot log to standard"),
            ({"logfile": "-", "nodaemon": 1}, None),
        ]:
            parent = usage.Options()
            parent.update(settings)
            options = Options()
            options.parent = parent
            if expected is None:
                options.parseOptions([*base, "--log-format", "json"])
                self.assertEqual(parent["logger"], "ilm._twistd.json_log_observer")
            else:
                error = self.assertRaises(
                    usage.UsageError,
                    usage.Options.parseOptions,
                    options,
                    [*base, "--log-format", "json"],
                )
                self.assertIn(expected, str(error))

    def test_read_keys_raises(self) -> None:
        """
        Without a list to collect problems in, read_keys raises the first.
        """
        error = self.assertRaises(usage.UsageError, read_keys, self.keys, 1)
        self.assertIn("own id 1", str(error))


class FileDeliveryTests(SynchronousTestCase):
    def events(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_lines(self) -> None:
        """
        FileDelivery provides ILocalDelivery; each message is one JSON line
        with its contents in base64, in a file only its owner can read.
        """
        from zope.interface.verify import verifyObject

        from ilm.interfaces import ILocalDelivery

        path = self.mktemp()
        inbox = FileDelivery(path)
        self.addCleanup(inbox.close)
        verifyObject(ILocalDelivery, inbox)
        for n in (1, 2):
            inbox.deliver(Message(1, 2, n, b"\x00payload %d" % n, "ab" * 16))
        lines = whole_lines(self, path)
        self.assertEqual([line["message_id"] for line in lines], [1, 2])
        self.assertEqual(base64.b64decode(lines[1]["contents"]), b"\x00payload 2")
        self.assertEqual(
            (lines[0]["source"], lines[0]["destination"], lines[0]["incarnation"]),
            (1, 2, "ab" * 16),
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_failed_open_raises_and_recovers(self) -> None:
        """
        A file that cannot be opened raises (ILM then holds the stream and
        retries); once it can be, the next attempt succeeds.
        """
        directory = self.mktemp()
        inbox = FileDelivery(os.path.join(directory, "inbox.jsonl"))
        self.addCleanup(inbox.close)
        message = Message(1, 2, 1, b"x")
        self.assertRaises(OSError, inbox.deliver, message)
        os.makedirs(directory)
        inbox.deliver(message)
        self.assertEqual(len(whole_lines(self, inbox.path)), 1)

    def test_partial_line_cut_at_open(self) -> None:
        """
        Opening the inbox cuts off a trailing partial line (as a process
        killed in the middle of a write leaves it), however long, before
        anything is appended, and says so in the log.
        """
        path = self.mktemp()
        inbox = FileDelivery(path)
        inbox.deliver(Message(1, 2, 1, b"first", "ab" * 16))
        inbox.close()
        whole = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(
                b'{"source":1,"destination":2,"message_id":2,"contents":"'
                + b"A" * 200_000
            )
        events = self.events()
        inbox.deliver(Message(1, 2, 2, b"second", "ab" * 16))
        inbox.close()
        lines = whole_lines(self, path)
        self.assertEqual([line["message_id"] for line in lines], [1, 2])
        [event] = [
            e for e in events if e.get("ilm_event") == "inbox_partial_line_removed"
        ]
        self.assertEqual(event["removed"], 200_055)
        self.assertEqual(event["path"], path)
        # A file holding nothing but a partial line is emptied.
        with open(path, "wb") as f:
            f.write(b'{"source":1')
        FileDelivery(path).open()
        self.assertEqual(os.path.getsize(path), 0)
        self.assertLess(0, whole)

    def test_write_failure_undone_then_retried(self) -> None:
        """
        A write that fails in the middle of a line (here the file size
        limit, RLIMIT_FSIZE, in a child process: a real short write then
        EFBIG) raises and leaves the file as it was before it; once the
        limit is raised, the next attempt succeeds with the file still open.
        """
        path = os.path.abspath(self.mktemp())
        script = textwrap.dedent(
            f"""
            import errno, json, os, resource, signal
            from ilm import Message
            from ilm._twistd import FileDelivery

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            inbox = FileDelivery({path!r})
            resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))
            sizes = []
            n = 0
            while True:
                n += 1
                try:
                    inbox.deliver(Message(1, 2, n, b"x" * 1500, "ab" * 16))
                except OSError as e:
                    assert e.errno == errno.EFBIG, e
                    break
                sizes.append(os.path.getsize({path!r}))
            # The failed write was undone: the file ends after the last line.
            size = os.path.getsize({path!r})
            assert size == sizes[-1], (sizes, size)
            try:
                inbox.deliver(Message(1, 2, n, b"x" * 1500, "ab" * 16))
            except OSError:
                pass
            else:
                raise AssertionError("the retry should still fail")
            resource.setrlimit(
                resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
            )
            inbox.deliver(Message(1, 2, n, b"x" * 1500, "ab" * 16))
            print(n)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        count = int(result.stdout)
        lines = whole_lines(self, path)
        self.assertEqual(
            [line["message_id"] for line in lines], list(range(1, count + 1))
        )
        # Some lines were written before the limit, and the limit fell inside one.
        self.assertGreater(count, 2)
        self.assertNotEqual(
            10_000 % len(json.dumps(lines[0], separators=(",", ":"))), 0
        )


class _FakeReactor:
    """
    What NodeService needs of a reactor, recording what it is asked.
    """

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Callable[..., object]]] = []
        self.calls: list[Callable[..., object]] = []

    def addSystemEventTrigger(
        self, phase: str, event: str, function: Callable[..., object]
    ) -> None:
        self.triggers.append((phase, event, function))

    def callLater(self, delay: float, function: Callable[..., object]) -> None:
        self.calls.append(function)

    def stop(self) -> None:
        pass


class NodeServiceTests(SynchronousTestCase):
    def test_inbox_cannot_be_opened(self) -> None:
        """
        An inbox that cannot be opened stops the daemon before the node
        starts: the reason is logged as one event with plain fields, the
        pid file naming this process is removed, the reactor is stopped and
        the exit with status 1 is scheduled for after the shutdown.
        """
        keys = write(self.mktemp(), f"1 {KEY_HEX}\n")
        options = Options()
        options.parseOptions(
            ["--id", "2", "--keys", keys, "--listen", "tcp:0", "--store", self.mktemp()]
        )
        options["inbox"] = os.path.join(self.mktemp(), "inbox.jsonl")
        pidfile = write(self.mktemp(), str(os.getpid()))
        fake = _FakeReactor()
        built = makeService(options, reactor)
        assert isinstance(built, NodeService)
        # The same node and inbox, on a fake reactor, as twistd with a pid
        # file would run them.
        service = NodeService(
            built.node, built.delivery, fake, twistd={"pidfile": pidfile}
        )
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service.startService()
        [event] = [e for e in events if e.get("ilm_event") == "daemon_start_failed"]
        self.assertEqual(
            (event["error"], event["error_type"]),
            (f"the inbox {options['inbox']}: No such file or directory",
             "FileNotFoundError"),
        )  # fmt: skip
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual([(p, e) for p, e, _ in fake.triggers], [("after", "shutdown")])
        self.assertEqual(fake.calls, [fake.stop])
        self.assertFalse(service.node.running)


class _Daemon:
    """
    Running ``twistd ilm`` processes for a test, in one directory.
    """

    def __init__(self, case: TestCase, directory: str, port: int) -> None:
        self.case = case
        self.directory = directory
        self.port = port
        self.log_path = os.path.join(directory, "twistd.log")
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(
        self, *extra: str, inbox: str, prelude: str = ""
    ) -> subprocess.Popen[bytes]:
        """
        Start ``twistd -n ilm`` as node 2, logging to ``twistd.log``.

        :param prelude: Python statements the process runs before twistd.
        """
        log = open(self.log_path, "ab")
        self.case.addCleanup(log.close)
        command = [sys.executable, "-c", prelude + TWISTD[2]]
        process = subprocess.Popen(
            [
                *command, "-n", "--pidfile=", "--logfile=-", "ilm", "--api", "none",
                "--id", "2", "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                "--keys", "keys", "--store", "node2.sqlite", "--inbox", inbox,
                *extra,
            ],
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.process = process
        self.case.addCleanup(kill, process)
        return process

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def kill(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


class _DaemonCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.keys = write(os.path.join(self.directory, "keys"), f"1 {KEY_HEX}\n")
        self.inbox = os.path.join(self.directory, "inbox.jsonl")
        self.port = free_port()
        self.daemon = _Daemon(self, self.directory, self.port)

    def spawn(self, *extra: str, inbox: str | None = None) -> subprocess.Popen[bytes]:
        return self.daemon.spawn(*extra, inbox=inbox or self.inbox)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.daemon.process

    def log_text(self) -> str:
        return self.daemon.log_text()

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

    async def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}:\n{self.log_text()[-3000:]}")
            await deferLater(reactor, 0.02)

    async def exit_status(self, process: subprocess.Popen[Any]) -> int:
        await self.wait_for(lambda: process.poll() is not None, "the exit", 30)
        assert process.returncode is not None
        return process.returncode

    async def send_acknowledged(self, node: ILM, payloads: list[bytes]) -> None:
        results = await DeferredList(
            [node.send_to(2, p) for p in payloads], fireOnOneErrback=True
        )
        await DeferredList(
            [receipt.acknowledged for _, receipt in results], fireOnOneErrback=True
        )


class DaemonTests(_DaemonCase):
    """
    A real ``twistd -n ilm`` process receiving from a node in this process
    over TCP.
    """

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
        lines = whole_lines(self, self.inbox)
        ordered, repeats = exactly_once(self, lines)
        self.assertEqual(ordered, payloads)
        # The kill came mid-stream, and the restarted daemon took the rest.
        self.assertLess(before_kill, len(payloads))
        self.assertEqual(self.log_text().count("ILM node 2 running"), 2)
        self.assertLessEqual(repeats, 4096)
        self.assertEqual({line["source"] for line in lines}, {1})
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        # After a clean shutdown twistd re-raises the signal that stopped it.
        self.assertEqual(
            await self.exit_status(self.process),
            -signal.SIGTERM,
            self.log_text()[-3000:],
        )
        self.assertIn("ILM node 2 stopped", self.log_text())
        self.assertIn("Server Shut Down", self.log_text())

    async def test_json_log(self) -> None:
        """
        With ``--log-format json`` every line the daemon logs is one JSON
        object; ILM's events carry an ``ilm_event`` and plain values (an
        int id stays an int, a flag a bool, no ``repr()`` strings).
        """
        process = self.spawn("--log-format", "json")
        await self.wait_for(
            lambda: '"ilm_event": "started"' in self.log_text(), "the start"
        )
        process.send_signal(signal.SIGTERM)
        await self.exit_status(process)
        events = [json.loads(line) for line in self.log_text().splitlines()]
        ours = {e["ilm_event"]: e for e in events if "ilm_event" in e}
        self.assertLessEqual({"daemon_starting", "started", "stopped"}, set(ours))
        starting = ours["daemon_starting"]
        self.assertEqual(
            (starting["node_id"], starting["fsync"], starting["inbox"]),
            (2, False, self.inbox),
        )
        self.assertEqual(ours["started"]["local_id"], 2)
        for event in ours.values():
            for name, value in event.items():
                if isinstance(value, str) and not name.startswith("log_"):
                    self.assertNotRegex(value, r"^['<]", (name, event))

    async def test_partial_line_cut_on_restart(self) -> None:
        """
        A partial last line in the inbox (as a SIGKILL in the middle of a
        write leaves it) is cut off when the daemon starts, before it
        appends anything: every line is whole JSON and nothing is lost.
        """
        self.spawn()
        node = await self.sender()
        first = [b"before %d" % n for n in range(100)]
        await self.send_acknowledged(node, first)
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        with open(self.inbox, "ab") as f:
            f.write(b'{"source":1,"destination":2,"message_id":101,"incarnation":"')
        self.spawn()
        second = [b"after %d" % n for n in range(100)]
        await self.send_acknowledged(node, second)
        ordered, _ = exactly_once(self, whole_lines(self, self.inbox))
        self.assertEqual(ordered, first + second)
        self.assertIn("cut off a partial last line of 60 bytes", self.log_text())

    async def test_killed_in_the_middle_of_a_large_write(self) -> None:
        """
        A daemon killed in the middle of writing a large message (about
        700 kB a line) leaves a torn line; restarted, it cuts the line off
        and delivers that message again: every line is whole JSON and every
        message arrives exactly once after repeats are skipped.

        The kill is made certain rather than left to timing (a SIGKILL
        lands inside a write of this size rarely: none of 25 in a trial): a
        file size limit (RLIMIT_FSIZE) with SIGXFSZ at its default action
        lets the kernel write the line up to the limit, then kills the
        process when it writes the rest.
        """
        self.spawn()
        node = await self.sender()
        payloads = [bytes([n]) * 512 * 1024 for n in range(8)]
        await self.send_acknowledged(node, payloads[:3])
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await self.exit_status(self.process)
        # Room for one more line and part of the next.
        limit = os.path.getsize(self.inbox) + 1_000_000
        killed = self.daemon.spawn(
            inbox=self.inbox,
            prelude=(
                "import resource, signal; "
                "signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, "
                "resource.RLIM_INFINITY)); "
            ),
        )
        sending = Deferred.fromCoroutine(self.send_acknowledged(node, payloads[3:]))
        self.assertEqual(await self.exit_status(killed), -signal.SIGXFSZ)
        self.assertEqual(os.path.getsize(self.inbox), limit)
        self.spawn()
        await sending
        ordered, _ = exactly_once(self, whole_lines(self, self.inbox))
        self.assertEqual(ordered, payloads)
        self.assertIn("cut off a partial last line", self.log_text())

    async def test_start_failure_exits_1(self) -> None:
        """
        A node whose store cannot be opened (here: a file that is not a
        database) logs one line saying why, without a traceback, and exits
        with status 1.
        """
        with open(os.path.join(self.directory, "node2.sqlite"), "wb") as f:
            f.write(b"not a database" * 1000)
        process = self.spawn()
        self.assertEqual(await self.exit_status(process), 1, self.log_text()[-3000:])
        [line] = [
            line for line in self.log_text().splitlines() if "could not start" in line
        ]
        self.assertIn("node2.sqlite", line)
        self.assertNotIn("Traceback", self.log_text())

    async def test_expected_start_failures(self) -> None:
        """
        A port in use and a store held by another running node are expected
        failures: each is one line saying why, with no traceback; the
        daemon exits with status 1 and removes its pid file.
        """
        running = self.spawn()
        await self.wait_for(
            lambda: "ILM node 2 running" in self.log_text(), "the start"
        )
        for what, store, port in [
            ("Address already in use", "other.sqlite", self.port),
            (
                "node2.sqlite is already open (locked by process",
                "node2.sqlite",
                free_port(),
            ),
        ]:
            log_path = os.path.join(self.directory, f"{store}.log")
            result = subprocess.run(
                [
                    *TWISTD, "-n", "--pidfile=failed.pid", f"--logfile={log_path}",
                    "ilm", "--api", "none", "--id", "2",
                    "--listen", f"tcp:{port}:interface=127.0.0.1",
                    "--keys", "keys", "--store", store, "--inbox", "other.jsonl",
                ],
                cwd=self.directory, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            with open(log_path) as f:
                log = f.read()
            self.assertEqual(result.returncode, 1, log)
            self.assertIn(what, log)
            self.assertNotIn("Traceback", log)
            self.assertEqual((result.stdout, result.stderr), ("", ""))
            self.assertFalse(os.path.exists(os.path.join(self.directory, "failed.pid")))
        self.assertIsNone(running.poll())

    async def test_daemonized(self) -> None:
        """
        Daemonized (without -n), ``twistd ilm`` returns only once the node
        runs, and the files it creates (log, pid file, inbox, and the log
        SIGUSR1 rotates to) are readable by their owner only; when the node
        cannot start, ``twistd ilm`` itself exits with status 1 and says
        why.
        """

        def twistd(name: str, store: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    *TWISTD, f"--pidfile={name}.pid", f"--logfile={name}.log", "ilm",
                    "--api", "none", "--id", "2", "--keys", "keys", "--store", store,
                    "--inbox", f"{name}.jsonl",
                    "--listen", f"tcp:{self.port}:interface=127.0.0.1",
                ],
                cwd=self.directory, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        result = twistd("daemon", "node2.sqlite")
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(self.directory, "daemon.log")) as f:
            self.assertIn("ILM node 2 running", f.read())
        pid_path = os.path.join(self.directory, "daemon.pid")
        with open(pid_path) as f:
            pid = int(f.read())
        self.addCleanup(_kill_pid, pid)
        for name in ("daemon.log", "daemon.pid", "daemon.jsonl"):
            mode = stat.S_IMODE(os.stat(os.path.join(self.directory, name)).st_mode)
            self.assertEqual(mode, 0o600, name)
        # SIGUSR1 rotates the log, as docs/daemon.md says; the new file is
        # private too.
        os.kill(pid, signal.SIGUSR1)
        await self.wait_for(
            lambda: os.path.exists(os.path.join(self.directory, "daemon.log.1")),
            "the rotation",
        )
        for name in ("daemon.log", "daemon.log.1"):
            mode = stat.S_IMODE(os.stat(os.path.join(self.directory, name)).st_mode)
            self.assertEqual(mode, 0o600, name)
        # A second node on the same port cannot start.
        failed = twistd("other", "other.sqlite")
        self.assertEqual(failed.returncode, 1, failed.stderr)
        self.assertIn("Address already in use", failed.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "other.pid")))
        os.kill(pid, signal.SIGTERM)
        await self.wait_for(lambda: not os.path.exists(pid_path), "the clean stop")


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ConfigurationErrorTests(SynchronousTestCase):
    """
    Real ``twistd ilm`` processes given malformed options.
    """

    def test_one_line_per_problem_nothing_created(self) -> None:
        """
        Each malformed configuration exits with status 1 at once, printing
        one line per problem (and a pointer to --help) on standard error:
        no usage text, no traceback, and no file created (no pid file, log,
        store or inbox).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write(os.path.join(directory, "keys"), f"1 {KEY_HEX}\n")
        write(os.path.join(directory, "own"), f"1 {KEY_HEX}\n2 {OTHER_KEY_HEX}\n")
        write(os.path.join(directory, "empty"), "\n")
        write(os.path.join(directory, "open"), f"1 {KEY_HEX}\n", 0o644)
        _, key = self_signed()
        write(os.path.join(directory, "tls.key"), pem_key(key), 0o644)
        write(os.path.join(directory, "tls.pem"), "not read\n")
        keys = ["--keys", "keys"]
        listen = ["--listen", "tcp:0"]
        # Each case: the arguments, and for each line expected, what it says.
        cases: list[tuple[list[str], list[tuple[str, ...]]]] = [
            ([*keys, "--peer", "1=tcp:host=127.0.0.1"], [("peer 1", "'port'")]),
            ([*keys, "--peer", "1=127.0.0.1:9001"], [("peer 1", "Unknown endpoint")]),
            ([*keys, "--peer", "1=tcp:host=h:port=notaport"], [("peer 1", "notaport")]),
            ([*keys, "--listen", "tcp:notaport"], [("--listen", "notaport")]),
            ([*keys, "--listen", "tcp:99999"], [("--listen", "out of range")]),
            (
                [*keys, *listen, "--peer", "3=tcp:host=h:port=1"],
                [("--peer 3", "no key for peer 3")],
            ),
            (["--keys", "own", *listen], [("own:2", "own id 2")]),
            (["--keys", "empty", *listen], [("holds no key",)]),
            (keys, [("neither listens",)]),
            (
                ["--keys", "open", *listen],
                [("mode 0644", f"'chmod 600 {directory}/open'")],
            ),
            (
                [*listen, "--tls-certificate", "tls.pem", "--tls-key", "tls.key",
                 "--pin", "1=" + "ab" * 32],
                [(f"'chmod 600 {directory}/tls.key'",)],
            ),
            (["--listen", "tcp:0", *keys, "--window", "many"], [("--window 'many'",)]),
        ]  # fmt: skip
        runs = [(["--id", "2", *arguments], lines) for arguments, lines in cases]
        runs.append(
            (
                ["--id", "-5", "--keys", "open", "--listen", "tcp:x"],
                [("--id", "'-5'"), ("mode 0644",), ("--listen", "'tcp:x'")],
            )
        )
        before = sorted(os.listdir(directory))
        processes = [
            subprocess.Popen(
                [
                    *TWISTD,
                    "-n",
                    "--pidfile=twistd.pid",
                    "--logfile=twistd.log",
                    "ilm",
                    *arguments,
                ],
                cwd=directory,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for arguments, _ in runs
        ]
        for process, (arguments, expected) in zip(processes, runs, strict=True):
            out, err = process.communicate(timeout=60)
            self.assertEqual(process.returncode, 1, (arguments, out, err))
            lines = err.splitlines()
            self.assertEqual(out, "", arguments)
            self.assertEqual(len(lines), len(expected) + 1, (arguments, err))
            for line, texts in zip(lines, expected, strict=False):
                self.assertTrue(line.startswith("twistd ilm: "), line)
                for text in texts:
                    self.assertIn(text, line, arguments)
            self.assertEqual(
                lines[-1], "twistd ilm: 'twistd ilm --help' lists the options"
            )
        self.assertEqual(sorted(os.listdir(directory)), before)

    def test_help_and_version(self) -> None:
        """
        ``twistd ilm --help`` prints the options (status 0);
        ``twistd ilm --version`` prints ILM's version, as ``ilm --version``
        does.
        """
        import ilm

        directory = self.mktemp()
        os.makedirs(directory)
        result = subprocess.run(
            [*TWISTD, "ilm", "--help"], cwd=directory, capture_output=True, text=True
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--peer=", result.stdout)
        self.assertIn("docs/daemon.md", result.stdout)
        version = subprocess.run(
            [*TWISTD, "ilm", "--version"], cwd=directory, capture_output=True, text=True
        )
        self.assertEqual(version.returncode, 0, version.stderr)
        self.assertTrue(version.stdout.startswith(f"ilm {ilm.__version__} (Twisted "))
        cli = subprocess.run(
            [sys.executable, "-m", "ilm", "--version"], capture_output=True, text=True
        )
        self.assertEqual(cli.stdout, version.stdout)
        self.assertEqual(os.listdir(directory), [])


def mount_tmpfs(case: SynchronousTestCase, path: str, options: str) -> None:
    """
    Mount a tmpfs at ``path`` for the test (unmounted when it ends), or
    skip the test where that cannot be done.
    """
    if os.geteuid() != 0:
        raise SkipTest("mounting a tmpfs needs root")
    os.makedirs(path)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs: {result.stderr.strip()}")

    def unmount() -> None:
        if subprocess.run(["umount", path]).returncode != 0:
            subprocess.run(["umount", "-l", path])

    case.addCleanup(unmount)


class ReadOnlyFilesystemTests(SynchronousTestCase):
    def test_store_and_inbox_on_a_read_only_filesystem(self) -> None:
        """
        A store or an inbox on a read-only filesystem is a configuration
        problem: one line each, exit status 1, no traceback.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        write(os.path.join(directory, "keys"), f"1 {KEY_HEX}\n")
        mount = os.path.join(directory, "ro")
        mount_tmpfs(self, mount, "size=64k,ro")
        result = subprocess.run(
            [
                *TWISTD, "-n", "--pidfile=", "ilm", "--id", "2", "--keys", "keys",
                "--listen", "tcp:0", "--store", f"{mount}/node.sqlite",
                "--inbox", f"{mount}/inbox.jsonl",
            ],
            cwd=directory, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)
        store, inbox, _ = result.stderr.splitlines()
        self.assertEqual(
            store, f"twistd ilm: --store {mount}/node.sqlite: the directory {mount} "
            "is not writable",
        )  # fmt: skip
        self.assertIn(f"--inbox {mount}/inbox.jsonl: the directory", inbox)


class FullDiskTests(_DaemonCase):
    """
    A real daemon whose inbox is on a small tmpfs that fills up.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.mount = os.path.join(self.directory, "small")
        # Cleanups run last-in first-out: the daemon is killed before the
        # tmpfs is unmounted.
        mount_tmpfs(self, self.mount, "size=256k,mode=0700")
        self.inbox = os.path.join(self.mount, "inbox.jsonl")

    def fill(self, leave: int) -> str:
        """
        Fill the tmpfs, leaving ``leave`` bytes free.
        """
        filler = os.path.join(self.mount, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
            f.truncate(max(0, os.fstat(f.fileno()).st_size - leave))
        return filler

    async def test_full_disk_then_space_returns(self) -> None:
        """
        When the inbox's disk fills up, the failed write is undone (the
        file holds only whole lines), the sender's stream waits, and once
        space returns the next retry succeeds and the stream resumes:
        every message arrives once, in order, each line whole JSON.
        """
        self.spawn()
        await self.wait_for(
            lambda: "ILM node 2 running" in self.log_text(), "the start"
        )
        filler = self.fill(leave=40 * 1024)
        node = await self.sender()
        payloads = [b"%d " % n + b"x" * 3000 for n in range(60)]
        sending = Deferred.fromCoroutine(self.send_acknowledged(node, payloads))
        await self.wait_for(
            lambda: "No space left on device" in self.log_text(), "the full disk"
        )
        full = whole_lines(self, self.inbox)
        self.assertLess(0, len(full))
        self.assertLess(len(full), len(payloads))
        os.remove(filler)
        await sending
        ordered, repeats = exactly_once(self, whole_lines(self, self.inbox))
        self.assertEqual(ordered, payloads)
        self.assertEqual(repeats, 0)
        self.assertNotIn("closed file", self.log_text())
