"""
The HTTP API against real nodes on real ports, driven with treq: bearer
authentication, every error code, idempotent retries, waiting for the
acknowledgement, body limits, health and readiness.
"""

from __future__ import annotations

import json
import os
import stat
from io import BytesIO
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from ilm import ILM, Config
from ilm._api import ERROR_CODES, ApiSite, read_or_create_token
from ilm.errors import (
    ConfigurationError,
    ShutdownTimeout,
    StoreError,
    StoreFull,
    StoreInDoubt,
)
from ilm.interfaces import INetwork
from ilm.testing import InMemoryBackend, InMemoryNetwork

TOKEN = "t" * 40


@implementer(INetwork)
class _Unreachable:
    """A network whose ``can_link`` refuses one id."""

    def __init__(self, network: Any, refused: object) -> None:
        self._network = network
        self._refused = refused

    def can_link(self, peer_id: object) -> bool:
        return peer_id != self._refused

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)


class ApiTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.network = InMemoryNetwork(reactor)
        self.received: list[Any] = []
        self.node = yield ILM.create(
            InMemoryBackend(),
            lambda m: None,
            _Unreachable(self.network.add_peer(1), 9),
            config=Config(max_message_size=1000, max_outbox_messages=5),
        )
        self.peer = yield ILM.create(
            InMemoryBackend(), self.received.append, self.network.add_peer(2)
        )
        self.addCleanup(self._stop)
        self.site = ApiSite(self.node, TOKEN, reactor, store="memory", version="9.9")
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.site
        )
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def _stop(self) -> Any:
        for node in (self.node, self.peer):
            if node.state not in ("stopped", "failed"):
                try:
                    yield node.shutdown(0.5)
                except ShutdownTimeout:
                    pass  # messages to absent peers stay stored

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> Deferred[tuple[int, Any, Any]]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"

        @inlineCallbacks
        def go() -> Any:
            response = yield treq.request(
                method, self.base + path, data=body, headers=sent, persistent=False
            )
            content = yield response.content()
            return response.code, json.loads(content), response.headers

        return go()

    @inlineCallbacks
    def test_post_stored_then_delivered(self) -> Any:
        """
        A POST answers 202 with the peer and message id once stored; the
        peer's application then receives the body exactly.
        """
        status, answer, _ = yield self.request("POST", "/v1/peers/2/messages", b"hi")
        self.assertEqual(status, 202)
        self.assertEqual(answer, {"peer": "2", "message_id": 1})
        while not self.received:
            yield self.node.receipt(2, 1).acknowledged
        self.assertEqual([m.contents for m in self.received], [b"hi"])

    @inlineCallbacks
    def test_wait_acknowledged(self) -> Any:
        """
        ``?wait=acknowledged`` answers 200 only once the peer has the
        message durably: the peer's application has it by then.
        """
        status, answer, _ = yield self.request(
            "POST", "/v1/peers/2/messages?wait=acknowledged", b"sure"
        )
        self.assertEqual(status, 200)
        self.assertTrue(answer["acknowledged"])
        self.assertEqual([m.contents for m in self.received], [b"sure"])

    @inlineCallbacks
    def test_peer_status(self) -> Any:
        """
        ``GET /v1/peers`` lists every peer the node knows with its
        ``peer_status()`` snapshot as JSON; ``GET /v1/peers/{peer}`` one of
        them; a peer the node knows nothing of and cannot link is
        ``404 unknown_peer`` and a malformed id ``400 bad_peer_id``.
        """
        yield self.request("POST", "/v1/peers/2/messages?wait=acknowledged", b"abc")
        status, answer, _ = yield self.request("GET", "/v1/peers")
        self.assertEqual(status, 200)
        [peer] = [p for p in answer["peers"] if p["peer_id"] == "2"]
        expected = self.node.peer_status(2)
        self.assertEqual(peer["link"], "up")
        self.assertEqual(peer["link"], expected.link)
        self.assertEqual(
            (peer["sent"], peer["acknowledged"], peer["last_acknowledged"]), (1, 1, 1)
        )
        self.assertEqual(peer["pending"], 0)
        self.assertFalse(peer["delivery_held"])
        self.assertGreaterEqual(peer["link_for_s"], 0)
        status, one, _ = yield self.request("GET", "/v1/peers/2")
        self.assertEqual(status, 200)
        self.assertEqual(one["peer_id"], "2")
        self.assertEqual(one["sent"], 1)
        status, answer, _ = yield self.request("GET", "/v1/peers/9")
        self.assertEqual((status, answer["error"]["code"]), (404, "unknown_peer"))
        status, answer, _ = yield self.request("GET", "/v1/peers/str:%FF")
        self.assertEqual((status, answer["error"]["code"]), (400, "bad_peer_id"))

    @inlineCallbacks
    def test_pending_status(self) -> Any:
        """
        Messages to a peer that is not linked show as pending, with their
        bytes and age, in the peer's status.
        """
        yield self.peer.shutdown(1)
        for body in (b"one", b"three"):
            status, _, _ = yield self.request("POST", "/v1/peers/2/messages", body)
            self.assertEqual(status, 202)
        status, answer, _ = yield self.request("GET", "/v1/peers/2")
        self.assertEqual(status, 200)
        self.assertEqual((answer["pending"], answer["pending_bytes"]), (2, 8))
        self.assertEqual(answer["last_message_id"], 2)
        self.assertGreaterEqual(answer["oldest_pending_age"], 0)
        self.assertEqual(answer["link"], "down")

    @inlineCallbacks
    def test_authentication(self) -> Any:
        """
        No token and a wrong token are refused with 401 and the
        ``unauthorized`` code; nothing is sent.  Health checks need none.
        """
        for token in (None, "wrong", TOKEN + "x"):
            status, answer, headers = yield self.request(
                "POST", "/v1/peers/2/messages", b"x", token=token
            )
            self.assertEqual(status, 401)
            self.assertEqual(answer["error"]["code"], "unauthorized")
            self.assertTrue(headers.getRawHeaders("www-authenticate"))
        status, _, _ = yield self.request("GET", "/v1/node", token=None)
        self.assertEqual(status, 401)
        self.assertEqual(self.node.last_message_id(2), 0)
        for path in ("/healthz", "/readyz"):
            status, answer, _ = yield self.request("GET", path, token=None)
            self.assertEqual((status, answer["state"]), (200, "running"))

    @inlineCallbacks
    def test_error_codes(self) -> Any:
        """
        Each refusal maps to its stable code and status: a bad peer id,
        this node itself, a peer the network can never reach, a message too
        large, a full outbox, a wrong method and an unknown path.
        """
        cases = [
            ("POST", "/v1/peers/%ff/messages", b"x", "bad_peer_id"),
            ("POST", f"/v1/peers/{2**63}/messages", b"x", "bad_peer_id"),
            ("POST", "/v1/peers/1/messages", b"x", "send_to_self"),
            ("POST", "/v1/peers/9/messages", b"x", "unknown_peer"),
            ("POST", "/v1/peers/2/messages", b"x" * 1001, "too_large"),
            ("GET", "/v1/peers/2/messages", None, "method_not_allowed"),
            ("POST", "/v1/peers/2/messages?wait=never", b"x", "bad_request"),
            ("GET", "/v1/nothing", None, "not_found"),
            ("GET", "/elsewhere", None, "not_found"),
        ]
        for method, path, body, code in cases:
            status, answer, _ = yield self.request(method, path, body)
            self.assertEqual(
                (status, answer["error"]["code"]), (ERROR_CODES[code][0], code), path
            )
            self.assertTrue(answer["error"]["message"])
        # A full outbox: the peer is gone, five messages fill the outbox.
        yield self.peer.shutdown(5)
        for _ in range(5):
            status, _, _ = yield self.request("POST", "/v1/peers/3/messages", b"x")
            self.assertEqual(status, 202)
        status, answer, _ = yield self.request("POST", "/v1/peers/3/messages", b"x")
        self.assertEqual((status, answer["error"]["code"]), (429, "outbox_full"))

    @inlineCallbacks
    def test_not_running(self) -> Any:
        """
        Once the node is stopping or stopped, a POST gets 503 ``not_running``
        and ``/readyz`` 503, while ``/healthz`` still answers.
        """
        yield self.node.shutdown(5)
        status, answer, _ = yield self.request("POST", "/v1/peers/2/messages", b"x")
        self.assertEqual((status, answer["error"]["code"]), (503, "not_running"))
        status, answer, _ = yield self.request("GET", "/readyz", token=None)
        self.assertEqual((status, answer["state"]), (503, "stopped"))
        status, _, _ = yield self.request("GET", "/healthz", token=None)
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_idempotent_retry(self) -> Any:
        """
        A POST retried with the same ``Idempotency-Key`` gets the first
        answer and stores nothing more; another key stores another message;
        the same key for another peer is another message.
        """
        key = {"Idempotency-Key": "order-17"}
        first = yield self.request("POST", "/v1/peers/2/messages", b"once", headers=key)
        again = yield self.request("POST", "/v1/peers/2/messages", b"once", headers=key)
        self.assertEqual(first[:2], again[:2])
        self.assertEqual(self.node.last_message_id(2), 1)
        other = yield self.request(
            "POST", "/v1/peers/2/messages", b"x", headers={"Idempotency-Key": "18"}
        )
        self.assertEqual(other[1]["message_id"], 2)
        third = yield self.request("POST", "/v1/peers/3/messages", b"x", headers=key)
        self.assertEqual(third[1], {"peer": "3", "message_id": 1})

    @inlineCallbacks
    def test_concurrent_retries_store_once(self) -> Any:
        """
        Ten requests with one key sent at once store one message and all
        get its answer.
        """
        key = {"Idempotency-Key": "burst"}
        from twisted.internet.defer import gatherResults

        answers = yield gatherResults(
            [
                self.request("POST", "/v1/peers/2/messages", b"b", headers=key)
                for _ in range(10)
            ]
        )
        self.assertEqual({a[1]["message_id"] for a in answers}, {1})
        self.assertEqual(self.node.last_message_id(2), 1)

    @inlineCallbacks
    def test_transient_refusal_not_kept(self) -> Any:
        """
        A refusal that stored nothing and may pass later (outbox full) is
        not replayed to a retry with the same key: the retry is tried
        afresh once there is room.
        """
        yield self.peer.shutdown(5)
        for _ in range(5):
            yield self.request("POST", "/v1/peers/3/messages", b"x")
        key = {"Idempotency-Key": "later"}
        status, _, _ = yield self.request(
            "POST", "/v1/peers/3/messages", b"x", headers=key
        )
        self.assertEqual(status, 429)
        status, answer, _ = yield self.request(
            "POST", "/v1/peers/4/messages", b"x", headers=key
        )
        self.assertEqual((status, answer["message_id"]), (202, 1))

    @inlineCallbacks
    def test_body_limit(self) -> Any:
        """
        A body over the cap gets 413 without being stored, whether its
        length is declared or it arrives in chunks.
        """
        big = b"z" * (self.site.max_body + 1)
        status, answer, _ = yield self.request("POST", "/v1/peers/2/messages", big)
        self.assertEqual((status, answer["error"]["code"]), (413, "too_large"))

        # Without a declared length: chunked transfer encoding.
        producer = FileBodyProducer(BytesIO(big))
        producer.length = UNKNOWN_LENGTH
        response = yield Agent(reactor).request(
            b"POST",
            (self.base + "/v1/peers/2/messages").encode(),
            Headers({"Authorization": [f"Bearer {TOKEN}"]}),
            producer,
        )
        content = yield treq.content(response)
        self.assertEqual(response.code, 413)
        self.assertEqual(json.loads(content)["error"]["code"], "too_large")
        self.assertEqual(self.node.last_message_id(2), 0)

    @inlineCallbacks
    def test_node_info(self) -> Any:
        """
        ``GET /v1/node`` tells the id, incarnation, version, state, uptime
        and store.
        """
        status, answer, _ = yield self.request("GET", "/v1/node")
        self.assertEqual(status, 200)
        self.assertEqual(answer["id"], "1")
        self.assertEqual(answer["incarnation"], self.node.incarnation)
        self.assertEqual(
            (answer["version"], answer["state"], answer["store"]),
            ("9.9", "running", "memory"),
        )
        self.assertGreaterEqual(answer["uptime_s"], 0)


class _FailingBackend(InMemoryBackend):
    """
    An in-memory store whose commits that store messages fail with
    ``error`` while it is set.
    """

    error: Exception | None = None

    def commit(self, batch: Any) -> Any:
        if self.error is not None and batch.messages:
            return fail(self.error)
        return super().commit(batch)


class StoreErrorCodeTests(TestCase):
    """
    The codes of a store that fails: ``store_full``, ``store_error``,
    ``store_in_doubt``; and ``internal_error`` for an unexpected failure.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        network = InMemoryNetwork(reactor)
        self.backend = _FailingBackend()
        self.node = yield ILM.create(
            self.backend,
            lambda m: None,
            network.add_peer(1),
            config=Config(store_retry=0.01, max_store_retry=0.01),
        )
        self.addCleanup(self._stop)
        self.site = ApiSite(self.node, TOKEN, reactor, store="memory")
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            self.site
        )
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def _stop(self) -> Any:
        self.backend.error = None
        try:
            yield self.node.shutdown(0.5)
        except ShutdownTimeout:
            pass  # messages to absent peers stay stored

    @inlineCallbacks
    def post(self, body: bytes = b"x") -> Any:
        response = yield treq.post(
            self.base + "/v1/peers/2/messages",
            data=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
            persistent=False,
        )
        return response.code, json.loads((yield response.content()))

    @inlineCallbacks
    def test_store_failures(self) -> Any:
        """
        A full store is ``507 store_full``, another store failure ``503
        store_error`` (nothing stored: a retry may succeed), a failure in the
        middle of a commit ``500 store_in_doubt``; each is logged by the
        node as the store failure it is.
        """
        for error, code in [
            (StoreFull("disk full"), "store_full"),
            (StoreError("connection lost"), "store_error"),
            (StoreInDoubt("commit reply lost"), "store_in_doubt"),
        ]:
            self.backend.error = error
            status, answer = yield self.post()
            self.assertEqual(
                (status, answer["error"]["code"]), (ERROR_CODES[code][0], code)
            )
            self.assertIn(str(error), answer["error"]["message"])
            self.flushLoggedErrors(type(error))

    @inlineCallbacks
    def test_internal_error(self) -> Any:
        """
        An unexpected exception from ``send_to`` is ``500 internal_error``,
        with the traceback in the node's log, not in the answer.
        """

        def broken(peer: Any, contents: bytes) -> Any:
            raise RuntimeError("a bug")

        self.patch(self.node, "send_to", broken)
        status, answer = yield self.post()
        self.assertEqual((status, answer["error"]["code"]), (500, "internal_error"))
        self.assertNotIn("a bug", answer["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class TokenFileTests(SynchronousTestCase):
    def test_created_private_and_reused(self) -> None:
        """
        A missing token file is created 0600 with a random token, and read
        back unchanged the next time.
        """
        path = self.mktemp()
        old = os.umask(0)
        try:
            token = read_or_create_token(path)
        finally:
            os.umask(old)
        self.assertGreaterEqual(len(token), 32)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(read_or_create_token(path), token)

    def test_readable_by_others_refused(self) -> None:
        """
        A token file others can read is refused, naming the file and the
        fix; so is an empty one.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x" * 40)
        os.chmod(path, 0o644)
        with self.assertRaises(ConfigurationError) as caught:
            read_or_create_token(path)
        self.assertIn(f"chmod 600 {path}", str(caught.exception))
        os.chmod(path, 0o600)
        with open(path, "w") as f:
            f.write("")
        self.assertRaises(ConfigurationError, read_or_create_token, path)
