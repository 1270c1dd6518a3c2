"""
``twistd ilm`` as a full node for any language: two real daemon processes
exchange messages in both directions through their HTTP APIs, each
delivering to a webhook served by this test, one of them SIGKILLed in the
middle; ``ilm send`` and ``ilm status`` against a running daemon; the
metrics endpoint of a real daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import treq
from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from tests.test_stream_sockets import free_port
from tests.test_twistd import TWISTD, kill, write
from tests.test_webhook import SECRET, Endpoint

KEY_HEX = "42" * 32
# The test server as a URI (trust authentication ignores the password,
# which is there to show it never reaches logs or the API).
POSTGRES_URI = os.environ.get(
    "ILM_TEST_POSTGRES_URI", "postgresql://postgres:secret@127.0.0.1:5432/test"
)


class _Node:
    """
    One ``twistd -n ilm`` process with an API, a webhook and metrics.
    """

    def __init__(
        self, case: TestCase, directory: str, node_id: int, other: _Node | None
    ) -> None:
        self.case = case
        self.id = node_id
        self.directory = os.path.join(directory, f"node{node_id}")
        os.makedirs(self.directory)
        write(os.path.join(self.directory, "keys"), f"{3 - node_id} {KEY_HEX}\n")
        write(os.path.join(self.directory, "secret"), SECRET + "\n")
        self.port = free_port()
        self.api_port = free_port()
        self.metrics_port = free_port()
        self.other = other
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.directory, "twistd.log")
        self.token = ""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def spawn(self, webhook: str, *extra: str) -> None:
        peers = []
        if self.other is not None:
            peers = [
                "--peer",
                f"{self.other.id}=tcp:host=127.0.0.1:port={self.other.port}",
            ]
        log = open(self.log_path, "ab")
        self.case.addCleanup(log.close)
        self.process = subprocess.Popen(
            [
                *TWISTD, "-n", "--pidfile=", "--logfile=-", "ilm",
                "--id", str(self.id), "--keys", "keys", "--store", "node.sqlite",
                "--listen", f"tcp:{self.port}:interface=127.0.0.1", *peers,
                "--api", f"tcp:{self.api_port}",
                "--metrics", f"tcp:{self.metrics_port}", "--metrics-per-peer",
                "--webhook", webhook, "--webhook-secret-file", "secret", *extra,
            ],
            cwd=self.directory,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.case.addCleanup(kill, self.process)

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class _HttpNodeCase(TestCase):
    timeout = 180
    nodes: tuple[_Node, ...] = ()

    async def webhook(self) -> tuple[Endpoint, str]:
        """
        A webhook receiver on a real port: the recorder and its URL.
        """
        endpoint = Endpoint()
        site = Site(endpoint)
        site.noisy = False
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        return endpoint, f"http://127.0.0.1:{port.getHost().port}/hook"

    async def wait_for(
        self, condition: Callable[[], object], what: str, timeout: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(n.log_text()[-2000:] for n in self.nodes)
                self.fail(f"timed out waiting for {what}:\n{logs}")
            await deferLater(reactor, 0.05)

    async def wait_for_async(self, read: Callable[[], Any], value: object) -> None:
        deadline = time.monotonic() + 60
        while (await read()) != value:
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {value!r}")
            await deferLater(reactor, 0.05)

    async def start(self, node: _Node, webhook: str, *extra: str) -> None:
        """
        Start ``node`` and wait until its ``/readyz`` answers 200.
        """
        node.spawn(webhook, *extra)
        token_path = os.path.join(node.directory, "ilm-api.token")
        await self.wait_for(lambda: os.path.exists(token_path), "the token file")
        ready: list[bool] = []

        async def probe() -> None:
            try:
                response = await treq.get(node.api + "/readyz", persistent=False)
                await response.content()
                if response.code == 200:
                    ready.append(True)
            except Exception:
                pass  # not listening yet

        deadline = time.monotonic() + 60
        while not ready:
            assert node.process is not None
            if node.process.poll() is not None or time.monotonic() > deadline:
                self.fail(f"node {node.id} did not start:\n{node.log_text()[-3000:]}")
            await probe()
            if not ready:
                await deferLater(reactor, 0.05)
        with open(token_path) as f:
            node.token = f.read().strip()


class TwoDaemonsTests(_HttpNodeCase):
    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.b = _Node(self, directory, 2, None)
        self.a = _Node(self, directory, 1, self.b)
        self.nodes = (self.a, self.b)
        self.hooks: dict[int, Endpoint] = {}
        self.urls: dict[int, str] = {}
        for node in self.nodes:
            self.hooks[node.id], self.urls[node.id] = await self.webhook()

    async def post(self, node: _Node, peer: int, body: bytes, **params: str) -> Any:
        response = await treq.post(
            f"{node.api}/v1/peers/{peer}/messages",
            data=body,
            params=params,
            headers={"Authorization": f"Bearer {node.token}"},
            persistent=False,
        )
        return response.code, json.loads(await response.content())

    def received(self, node_id: int) -> list[tuple[str, int, bytes]]:
        """
        What node ``node_id``'s webhook got: (webhook-id, message id, body)
        per request that it answered 200, each signature verified.
        """
        got = []
        for headers, body in self.hooks[node_id].requests:
            Webhook(SECRET).verify(body, headers, json_parse=False)
            got.append((headers["webhook-id"], int(headers["ilm-message-id"]), body))
        return got

    def check_stream(self, node_id: int, expected: list[bytes]) -> int:
        """
        Node ``node_id``'s webhook got ``expected`` in order, each first
        delivery new, every repeat an earlier message with the same
        ``webhook-id`` and body.

        :return: how many repeats.
        """
        first: dict[str, tuple[int, bytes]] = {}
        order = []
        repeats = 0
        for hook_id, message_id, body in self.received(node_id):
            if hook_id in first:
                self.assertEqual(first[hook_id], (message_id, body))
                repeats += 1
                continue
            first[hook_id] = (message_id, body)
            order.append((message_id, body))
        self.assertEqual([body for _, body in order], expected)
        self.assertEqual(
            [message_id for message_id, _ in order], list(range(1, len(expected) + 1))
        )
        return repeats

    async def test_both_ways_with_a_kill(self) -> None:
        """
        Messages posted to each daemon's API reach the other's webhook in
        order; node 2 is SIGKILLed in the middle of both streams and
        restarted; every accepted message is delivered exactly in order,
        repeats (inside the at-least-once window) carrying the same
        ``webhook-id``.  ``?wait=acknowledged`` answers once the peer has
        it.
        """
        await self.start(self.b, self.urls[2])
        await self.start(self.a, self.urls[1])
        to_b: list[bytes] = []
        to_a: list[bytes] = []
        for i in range(150):
            body = b"a->b %d" % i
            code, answer = await self.post(self.a, 2, body)
            self.assertEqual(code, 202, answer)
            self.assertEqual(answer["message_id"], i + 1)
            to_b.append(body)
            body = b"b->a %d" % i
            code, answer = await self.post(self.b, 1, body)
            self.assertEqual(code, 202, answer)
            to_a.append(body)
        # Mid-stream: node 2 dies with both streams in flight.
        assert self.b.process is not None
        self.b.process.send_signal(signal.SIGKILL)
        self.b.process.wait()
        for i in range(150, 250):
            body = b"a->b %d" % i
            code, answer = await self.post(self.a, 2, body)
            self.assertEqual(code, 202, answer)
            to_b.append(body)
        await self.start(self.b, self.urls[2])
        for i in range(150, 250):
            body = b"b->a %d" % i
            code, answer = await self.post(self.b, 1, body)
            self.assertEqual(code, 202, answer)
            to_a.append(body)
        code, answer = await self.post(self.a, 2, b"last", wait="acknowledged")
        self.assertEqual((code, answer.get("acknowledged")), (200, True), answer)
        to_b.append(b"last")
        await self.wait_for(
            lambda: (
                {body for _, _, body in self.received(2)} >= set(to_b)
                and {body for _, _, body in self.received(1)} >= set(to_a)
            ),
            "every message at the webhooks",
        )
        # Repeats only inside the at-least-once window (4,096 by default).
        self.assertLessEqual(self.check_stream(2, to_b), 4096)
        self.assertLessEqual(self.check_stream(1, to_a), 4096)

        # The status API and the metrics agree: nothing pending.
        async def pending(node: _Node) -> int:
            response = await treq.get(
                f"{node.api}/v1/peers/{3 - node.id}",
                headers={"Authorization": f"Bearer {node.token}"},
                persistent=False,
            )
            value = json.loads(await response.content())
            return int(value["pending"])

        await self.wait_for_async(lambda: pending(self.a), 0)
        await self.wait_for_async(lambda: pending(self.b), 0)
        response = await treq.get(
            f"http://127.0.0.1:{self.a.metrics_port}/metrics", persistent=False
        )
        text = (await response.content()).decode()
        self.assertIn('ilm_peer_messages_sent_total{peer="2"} 251.0', text)
        self.assertIn("ilm_pending_messages 0.0", text)

    async def test_postgres_store(self) -> None:
        """
        ``--store postgresql://...`` keeps a daemon's state in PostgreSQL
        (its own schema): node 2, SIGKILLed in the middle of a stream and
        restarted on the same database, delivers every message in order;
        ``/v1/node`` names the store without its password.
        """
        from tests.test_postgres import admin, require_postgres

        require_postgres()
        schema = f"ilm_daemon_{os.getpid()}_{int(time.time() * 1000)}"

        def drop() -> None:
            with admin() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        self.addCleanup(drop)
        store = ("--store", POSTGRES_URI, "--schema", schema, "--gateway", "g1")
        await self.start(self.b, self.urls[2], *store)
        await self.start(self.a, self.urls[1])
        sent = []
        for i in range(200):
            if i == 100:
                assert self.b.process is not None
                self.b.process.send_signal(signal.SIGKILL)
                self.b.process.wait()
            body = b"pg %d" % i
            code, answer = await self.post(self.a, 2, body)
            self.assertEqual(code, 202, answer)
            sent.append(body)
        await self.start(self.b, self.urls[2], *store)
        await self.wait_for(
            lambda: {body for _, _, body in self.received(2)} >= set(sent),
            "every message at node 2's webhook",
        )
        self.assertLessEqual(self.check_stream(2, sent), 4096)
        response = await treq.get(
            f"{self.b.api}/v1/node",
            headers={"Authorization": f"Bearer {self.b.token}"},
            persistent=False,
        )
        node = json.loads(await response.content())
        self.assertEqual(node["store"], POSTGRES_URI.replace(":secret@", ":***@"))

    async def test_failing_webhook_holds_then_resumes(self) -> None:
        """
        While node 2's webhook answers 500, node 2 holds the stream (its
        status says why) and retries; once the webhook answers 200 again
        every message arrives, in order.
        """
        endpoint = self.hooks[2]
        endpoint.behave = lambda request, body: 500
        await self.start(self.b, self.urls[2])
        await self.start(self.a, self.urls[1])
        bodies = [b"held %d" % i for i in range(5)]
        for body in bodies:
            code, _ = await self.post(self.a, 2, body)
            self.assertEqual(code, 202)
        await self.wait_for(lambda: len(endpoint.requests) >= 2, "a retry")

        async def held() -> Any:
            response = await treq.get(
                f"{self.b.api}/v1/peers/1",
                headers={"Authorization": f"Bearer {self.b.token}"},
                persistent=False,
            )
            value = json.loads(await response.content())
            return value["delivery_held"] and "500" in (
                value["delivery_held_reason"] or ""
            )

        await self.wait_for_async(held, True)
        # Only the head of the stream was tried: nothing overtook it.
        self.assertEqual({body for _, body in endpoint.requests}, {b"held 0"})
        endpoint.requests.clear()
        endpoint.behave = lambda request, body: 200
        await self.wait_for(lambda: len(endpoint.requests) >= 5, "the rest", 90)
        self.assertEqual(self.check_stream(2, bodies), 0)


class CommandLineTests(_HttpNodeCase):
    """
    ``ilm send`` and ``ilm status`` against a real daemon's API.
    """

    def ilm(
        self, *args: str, stdin: bytes = b"", **env: str
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "ilm", *args],
            input=stdin,
            capture_output=True,
            timeout=60,
            env={**os.environ, **env},
            cwd=self.directory,
        )

    async def test_send_and_status(self) -> None:
        """
        ``ilm send 2 -`` stores a message from standard input (exit 0, its
        id printed); ``ilm status`` shows the peer with it pending, and why
        the node cannot reach it (connection refused);
        ``--json`` prints the API's JSON; a bad token is refused (exit 1)
        and an absent node is exit 3 with a clear message.
        """
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        node = _Node(self, self.directory, 1, _Node(self, self.directory, 2, None))
        self.nodes = (node,)
        _, url = await self.webhook()
        await self.start(node, url)
        token_file = os.path.join(node.directory, "ilm-api.token")
        env = {"ILM_API": node.api, "ILM_API_TOKEN_FILE": token_file}
        result = await _in_thread(lambda: self.ilm("send", "2", stdin=b"hello", **env))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"message 1 to peer 2: stored\n")
        result = await _in_thread(lambda: self.ilm("status", **env))
        self.assertEqual(result.returncode, 0, result.stderr)
        text = result.stdout.decode()
        self.assertIn("node 1 (running", text)
        self.assertIn("peer 2: link down", text)
        self.assertIn("pending 1 (5 B", text)
        # Node 2 is not running: the dial's reason is the peer's last error.
        await self.wait_for(
            lambda: "refused" in self.ilm("status", "2", **env).stdout.decode(),
            "the dial failure in the status",
        )
        result = await _in_thread(lambda: self.ilm("status", "2", "--json", **env))
        self.assertEqual(result.returncode, 0, result.stderr)
        value = json.loads(result.stdout)
        self.assertEqual(value["peers"][0]["pending"], 1)
        self.assertEqual(value["node"]["id"], "1")
        bad = self.directory + "/bad.token"
        write(bad, "x" * 40)
        result = await _in_thread(
            lambda: self.ilm(
                "send", "2", "--token-file", bad, stdin=b"x", ILM_API=node.api
            )
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"unauthorized (HTTP 401)", result.stderr)
        result = await _in_thread(
            lambda: self.ilm(
                "status",
                "--api",
                f"http://127.0.0.1:{free_port()}",
                **{"ILM_API_TOKEN": "y" * 40},
            )
        )
        self.assertEqual(result.returncode, 3)
        self.assertIn(b"cannot reach the node's API", result.stderr)


def _in_thread(work: Callable[[], Any]) -> Any:
    from twisted.internet.threads import deferToThread

    return deferToThread(work)
