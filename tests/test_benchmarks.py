"""
Tests for the side-by-side benchmark command, ``python -m benchmarks``: a
tiny real run (real child processes) and the generated docs section.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("name", "msgs_per_s", "p50_ms", "p99_ms", "p999_ms", "cpu_s_per_100k")


def _closed_port() -> int:
    """A local TCP port on which nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_RUN: dict[str, Any] = {}


def _quick_run() -> dict[str, Any]:
    """
    Run the command once: tiny message counts, and the brokers pointed at
    a port where nothing listens.
    """
    port = _closed_port()
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "figures.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")]
    )
    try:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks",
                "--quick",
                "--only",
                "raw,ilm-memory,ilm-memory-batch,mqtt-qos1,jetstream",
                "--messages",
                "2000",
                "--latency-seconds",
                "0.2",
                "--mqtt",
                f"127.0.0.1:{port}",
                "--nats",
                f"nats://127.0.0.1:{port}",
                "--json",
                path,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )
        if not os.path.exists(path):
            raise AssertionError(f"no JSON written:\n{process.stderr}")
        with open(path) as f:
            report = json.load(f)
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(directory)
    return {"process": process, "report": report}


class QuickRunTests(SynchronousTestCase):
    """
    ``python -m benchmarks --quick`` with tiny message counts, brokers
    pointed at a port where nothing listens (so neither Mosquitto nor NATS
    is needed, and both are reported as skipped).
    """

    def setUp(self) -> None:
        # One run serves every test of the class.
        if not _RUN:
            try:
                _RUN.update(_quick_run())
            except BaseException as e:
                _RUN["error"] = e
        if "error" in _RUN:
            raise _RUN["error"]
        self.process = _RUN["process"]
        self.report = _RUN["report"]
        self.scenarios = {s["name"]: s for s in self.report["scenarios"]}

    def test_exit_status(self) -> None:
        """
        The command succeeds: nothing failed, skipped peers are no failure.
        """
        self.assertEqual(self.process.returncode, 0, self.process.stderr)

    def test_json_shape(self) -> None:
        """
        ``--json`` writes one object per scenario asked for, each with the
        documented fields, plus the machine and the targets.
        """
        self.assertEqual(
            list(self.scenarios),
            ["raw", "ilm-memory", "ilm-memory-batch", "mqtt-qos1", "jetstream"],
        )
        for scenario in self.report["scenarios"]:
            for field in (*FIELDS, "ratios", "status"):
                self.assertIn(field, scenario, scenario["name"])
        for field in ("cpu", "cores", "kernel", "python", "twisted"):
            self.assertIn(field, self.report["machine"])
        self.assertTrue(self.report["load_start"] and self.report["load_end"])
        self.assertTrue(self.report["targets"])

    def test_measured(self) -> None:
        """
        The scenarios that need no broker ran and report positive figures,
        with latency percentiles in order and the ratio of ILM to raw
        Twisted computed in the run.
        """
        for name in ("raw", "ilm-memory"):
            scenario = self.scenarios[name]
            self.assertEqual(scenario["status"], "ok", scenario.get("reason"))
            self.assertGreater(scenario["msgs_per_s"], 0)
            self.assertGreater(scenario["cpu_s_per_100k"], 0)
            self.assertLessEqual(scenario["p50_ms"], scenario["p99_ms"])
            self.assertLessEqual(scenario["p99_ms"], scenario["p999_ms"])
        memory = self.scenarios["ilm-memory"]
        self.assertAlmostEqual(
            memory["ratios"]["raw"],
            memory["msgs_per_s"] / self.scenarios["raw"]["msgs_per_s"],
        )

    def test_unreachable_peers_skipped(self) -> None:
        """
        A peer whose server is not reachable (or whose client library is
        not installed, as without the ``bench`` extra) is reported as
        skipped, with the reason, and with no figures (never zero).
        """
        for name in ("mqtt-qos1", "jetstream"):
            scenario = self.scenarios[name]
            self.assertEqual(scenario["status"], "skipped")
            self.assertRegex(scenario["reason"], "not reachable|not installed")
            self.assertIsNone(scenario["msgs_per_s"])
            self.assertEqual(scenario["ratios"], {})
        self.assertNotIn("mqtt-qos1", self.scenarios["ilm-memory"]["ratios"])

    def test_batch_style(self) -> None:
        """
        The batch-style scenario runs when ILM has ``send_many``, and is
        reported as skipped, saying so, until then.
        """
        from ilm import ILM

        scenario = self.scenarios["ilm-memory-batch"]
        if hasattr(ILM, "send_many"):
            self.assertEqual(scenario["status"], "ok", scenario.get("reason"))
        else:
            self.assertEqual(scenario["status"], "skipped")
            self.assertEqual(scenario["reason"], "send_many not available")


class WriteDocsTests(SynchronousTestCase):
    """
    ``--write-docs`` owns one section of docs/benchmarks.md, between markers.
    """

    def test_section_replaced(self) -> None:
        """
        The section between the markers is replaced on each run; the text
        around it is kept; a file without markers gets the section appended.
        """
        sys.path.insert(0, ROOT)
        self.addCleanup(sys.path.remove, ROOT)
        from benchmarks.run import BEGIN, END, write_docs

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# Benchmarks\n\nby hand\n")
        write_docs("first table\n", path)
        write_docs("second table\n", path)
        with open(path) as f:
            text = f.read()
        self.assertTrue(text.startswith("# Benchmarks\n\nby hand\n"))
        self.assertEqual(text.count(BEGIN), 1)
        self.assertEqual(text.count(END), 1)
        self.assertIn("second table", text)
        self.assertNotIn("first table", text)
        with open(path, "a") as f:
            f.write("\n## after\n")
        write_docs("third table\n", path)
        with open(path) as f:
            text = f.read()
        self.assertTrue(text.endswith(f"{END}\n\n## after\n"))
        self.assertIn("third table", text)


class LeanPeerTests(SynchronousTestCase):
    """
    The many-peers scenario's lean load generator, without a network.
    """

    def setUp(self) -> None:
        sys.path.insert(0, ROOT)
        self.addCleanup(sys.path.remove, ROOT)

    def test_frame_receiver(self) -> None:
        """
        A lean peer is an ``IFrameReceiver``: a ``StreamNetwork`` can carry
        its frames.
        """
        from benchmarks._many_roles import LeanPeer
        from zope.interface.verify import verifyObject

        from ilm.interfaces import IFrameReceiver

        self.assertTrue(verifyObject(IFrameReceiver, LeanPeer(object())))

    def test_carry_frame_is_what_ilm_writes(self) -> None:
        """
        The frames a lean peer writes itself are, byte for byte, those an
        ILM link writes for the same messages (tags included, frame after
        frame).
        """
        from benchmarks._many_roles import carry_frame
        from twisted.internet.testing import StringTransport

        from ilm import _frames
        from ilm.network._wire import FrameSealer
        from ilm.network._writer import LinkWriter

        writer = LinkWriter(1 << 20)
        writer.transport = transport = StringTransport()
        writer.sealer = FrameSealer(b"k" * 32)
        lean = FrameSealer(b"k" * 32)
        ours = b""
        for position, contents in ((1, b"x" * 64), (2, b""), (3, b"abc")):
            writer.send_session_frames(
                _frames.encode_messages(position, [contents], 1 << 20)
            )
            ours += carry_frame(lean.tag, position, contents)
        self.assertEqual(ours, transport.value())

    def test_receive_path(self) -> None:
        """
        ``benchmarks/receive_path.py`` puts every read of every peer
        through a real node (it fails unless each peer's messages all arrive
        once, in order) and reports a cost per read for each read size.
        """
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        self.addCleanup(sys.path.remove, os.path.join(ROOT, "benchmarks"))
        import receive_path

        figures = receive_path.run(peers=3, rounds=4)
        self.assertEqual(sorted(figures), [1, 2, 4, 8])
        for ilm, raw in figures.values():
            self.assertGreater(ilm, 0)
            self.assertGreater(raw, 0)

    def test_holds_until_linked(self) -> None:
        """
        Before the node's hello, nothing is sent: the messages are counted
        as held.
        """
        from benchmarks._many_roles import LeanPeer

        class Network:
            sent: list[bytes] = []

            def send_frames(self, peer_id: object, frames: list[bytes]) -> None:
                self.sent.extend(frames)

        peer = LeanPeer(Network())
        peer.send(b"early")
        self.assertEqual((peer.held, peer.sent, Network.sent), (1, 0, []))


class LeanPeerNodeTests(TestCase):
    """
    Lean peers against a real ILM node over real TCP links.
    """

    timeout = 60

    async def node_and_peer(self, window: int = 4096) -> tuple[list[Any], Any, Any]:
        """
        An ILM node (in-memory store, a receive window of ``window``) with
        a lean peer (id 1) linked to it.

        :return: (what the node delivered, the peer).
        """
        from benchmarks._many_roles import NODE, LeanPeer, key
        from twisted.internet import reactor

        from ilm import ILM, Config
        from ilm.network import Backoff, LinkSettings, StreamNetwork
        from ilm.testing import InMemoryBackend

        sys.path.insert(0, ROOT)
        self.addCleanup(sys.path.remove, ROOT)
        fast = LinkSettings(reconnect=Backoff(initial=0.01, maximum=0.1))
        delivered: list[Any] = []
        network = StreamNetwork(
            NODE,
            listen=["tcp:0:interface=127.0.0.1"],
            keys={1: key(1)},
            settings=fast,
            reactor=reactor,
        )
        node = await ILM.create(
            InMemoryBackend(),
            delivered.append,
            network,
            config=Config(window=window),
        )
        self.addCleanup(node.shutdown)
        port = network.listening_addresses()[0].port
        client = StreamNetwork(
            1,
            peers={NODE: f"tcp:host=127.0.0.1:port={port}"},
            keys={NODE: key(1)},
            settings=fast,
            reactor=reactor,
        )
        peer = LeanPeer(client)
        await client.start(peer)
        self.addCleanup(client.stop)
        await self.until(lambda: peer.up)
        return delivered, peer

    async def until(self, condition: Any, timeout: float = 20.0) -> None:
        """Wait, on the real reactor, until ``condition()`` holds."""
        from benchmarks._harness import now
        from twisted.internet import reactor, task

        deadline = now() + timeout
        while not condition():
            if now() > deadline:
                self.fail("condition not reached in time")
            await task.deferLater(reactor, 0.01)

    async def test_exactly_once_in_order_across_a_cut(self) -> None:
        """
        The node delivers every message a lean peer sends once and in
        order, and acknowledges them.  While the socket takes nothing
        (``EAGAIN``), the frames wait in the transport, in order; when the
        link is cut before they are written, the peer resumes and sends
        them again, and the node still delivers each once.  A frame the
        socket takes part of is completed through the transport, and the
        frames after it follow it there.
        """
        delivered, peer = await self.node_and_peer()
        for i in range(50):
            peer.send(b"a%d" % i)
        await self.until(lambda: peer.acked == 50)
        self.assertEqual(
            [m.contents for m in delivered], [b"a%d" % i for i in range(50)]
        )

        class Full:
            def send(self, data: bytes) -> int:
                raise BlockingIOError()

        peer._socket = Full()
        for i in range(50, 100):
            peer.send(b"a%d" % i)
        # Cut in the same reactor turn: what the transport holds is lost.
        peer.network.link(0).transport.abortConnection()
        await self.until(lambda: peer.links == 2 and peer.acked == 100)
        self.assertEqual(peer.resent, 50)

        class Partial:
            """A socket that takes 7 bytes of each write."""

            def __init__(self, socket: Any) -> None:
                self.socket = socket

            def send(self, data: bytes) -> int:
                return int(self.socket.send(data[:7]))

        peer._socket = Partial(peer._socket)
        for i in range(100, 120):
            peer.send(b"a%d" % i)
        await self.until(lambda: peer.acked == 120)
        self.assertEqual(
            [(m.message_id, m.contents) for m in delivered],
            [(i + 1, b"a%d" % i) for i in range(120)],
        )
        self.assertEqual(peer.held, 0)

    async def test_window(self) -> None:
        """
        A lean peer sends no further than the node's window beyond what the
        node acknowledged: the rest is counted as held.
        """
        delivered, peer = await self.node_and_peer(window=8)
        for i in range(12):
            peer.send(b"w%d" % i)
        self.assertEqual((peer.sent, peer.held), (8, 4))
        await self.until(lambda: peer.acked == 8)
        self.assertEqual(len(delivered), 8)


class PostgresScenarioTests(SynchronousTestCase):
    def test_ilm_postgres(self) -> None:
        """
        ``--only ilm-postgres`` measures two processes on PostgreSQL stores
        (every message checked) and drops the schemas it made; it is
        skipped, saying why, when the server is not reachable.
        """
        from .test_postgres import DSN, admin, require_postgres

        require_postgres()

        def schemas() -> set[str]:
            with admin() as conn:
                rows = conn.execute(
                    b"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'ilm_bench_%'"
                ).fetchall()
            return {row[0] for row in rows}

        before = schemas()
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "figures.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")]
        )
        try:
            process = subprocess.run(
                [
                    sys.executable, "-m", "benchmarks", "--quick", "--only",
                    "ilm-postgres", "--messages", "2000", "--latency-seconds",
                    "0.2", "--postgres", DSN, "--json", path,
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=env,
                timeout=180,
            )  # fmt: skip
            self.assertEqual(process.returncode, 0, process.stdout + process.stderr)
            with open(path) as f:
                (record,) = json.load(f)["scenarios"]
        finally:
            if os.path.exists(path):
                os.remove(path)
            os.rmdir(directory)
        self.assertEqual(record["status"], "ok", record.get("reason"))
        self.assertGreater(record["msgs_per_s"], 0)
        self.assertIsNotNone(record["resume_ms"])
        self.assertEqual(schemas() - before, set())
