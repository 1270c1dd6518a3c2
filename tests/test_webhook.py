"""
Webhook and command delivery against real HTTP servers on real ports and
real child processes: what counts as delivered, the Standard Webhooks
headers (checked with the reference implementation), retries holding only
the failing sender's stream.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from typing import Any

from standardwebhooks.webhooks import Webhook
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from ilm import ILM, Config, Message
from ilm._exec import ExecDelivery
from ilm._webhook import WebhookDelivery, WebhookFailed, webhook_id, webhook_secret
from ilm.errors import ConfigurationError, DeliveryFailed
from ilm.interfaces import ILocalDelivery
from ilm.testing import InMemoryBackend, InMemoryNetwork

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()


def _message(
    contents: bytes = b"hello", message_id: int = 1, source: Any = 1
) -> Message:
    return Message(source, 2, message_id, contents, "ab" * 16)


class Endpoint(Resource):
    """
    A webhook receiver: records each request; ``behave(request, body)``
    decides the answer (a status, or ``NOT_DONE_YET`` after taking over the
    request).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.behave: Callable[[Request, bytes], object] = lambda request, body: 200
        self.arrived: list[Deferred[None]] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        headers = {
            k.decode().lower(): v[0].decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append((headers, body))
        waiters, self.arrived = self.arrived, []
        for waiter in waiters:
            waiter.callback(None)
        answer = self.behave(request, body)
        if answer is NOT_DONE_YET:
            return NOT_DONE_YET
        assert isinstance(answer, int)
        request.setResponseCode(answer)
        return b"ok" if 200 <= answer < 300 else b"no thanks"


class WebhookTestBase(TestCase):
    def setUp(self) -> None:
        self.endpoint = Endpoint()
        self.site = Site(self.endpoint)
        self.site.noisy = False
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        return d.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/hook"

    def delivery(self, **kwargs: Any) -> WebhookDelivery:
        kwargs.setdefault("secret", webhook_secret(SECRET))
        delivery = WebhookDelivery(self.url, reactor, **kwargs)
        self.addCleanup(delivery.close)
        return delivery


class WebhookDeliveryTests(WebhookTestBase):
    @inlineCallbacks
    def test_delivered_with_verifiable_headers(self) -> Any:
        """
        A 2xx answer means delivered.  The request carries the message bytes
        as its body, a signature that the Standard Webhooks reference
        implementation verifies, and the ILM identity headers.
        """
        delivery = self.delivery()
        verifyObject(ILocalDelivery, delivery)
        message = Message("node a", 2, 7, b"\x00\xffpayload", "cd" * 16)
        result = yield delivery.deliver(message)
        self.assertIsNone(result)
        [(headers, body)] = self.endpoint.requests
        self.assertEqual(body, b"\x00\xffpayload")
        Webhook(SECRET).verify(body, headers, json_parse=False)
        self.assertEqual(headers["webhook-id"], webhook_id(message))
        self.assertEqual(headers["ilm-source"], "node%20a")
        self.assertEqual(headers["ilm-source-incarnation"], "cd" * 16)
        self.assertEqual(headers["ilm-message-id"], "7")
        self.assertEqual(headers["content-type"], "application/octet-stream")

    @inlineCallbacks
    def test_tampered_signature_does_not_verify(self) -> Any:
        """
        The reference verifier refuses the request when the body or the
        secret differs: the signature covers both.
        """
        yield self.delivery().deliver(_message(b"original"))
        [(headers, body)] = self.endpoint.requests
        from standardwebhooks.webhooks import WebhookVerificationError

        self.assertRaises(
            WebhookVerificationError,
            Webhook(SECRET).verify,
            b"changed",
            headers,
            json_parse=False,
        )
        other = "whsec_" + base64.b64encode(b"o" * 32).decode()
        self.assertRaises(
            WebhookVerificationError,
            Webhook(other).verify,
            body,
            headers,
            json_parse=False,
        )

    @inlineCallbacks
    def test_error_status_fails_with_retry_after(self) -> Any:
        """
        A 500, a 429 with ``Retry-After: 7`` and a 503 with an HTTP date
        each fail the delivery with ``WebhookFailed`` carrying the status
        and the delay asked for.
        """
        answers = iter(
            [
                (500, None),
                (429, b"7"),
                (503, b"Fri, 31 Dec 2100 23:59:59 GMT"),
            ]
        )

        def behave(request: Request, body: bytes) -> int:
            status, retry_after = next(answers)
            if retry_after is not None:
                request.setHeader(b"Retry-After", retry_after)
            return status

        self.endpoint.behave = behave
        delivery = self.delivery()
        failures = []
        for _ in range(3):
            try:
                yield delivery.deliver(_message())
            except WebhookFailed as e:
                failures.append(e)
        self.assertEqual([f.status for f in failures], [500, 429, 503])
        self.assertIsNone(failures[0].retry_after)
        self.assertEqual(failures[1].retry_after, 7.0)
        self.assertGreater(failures[2].retry_after or 0, 86400.0)
        self.assertIn("no thanks", str(failures[0]))
        self.assertIsInstance(failures[0], DeliveryFailed)

    @inlineCallbacks
    def test_redirect_is_not_followed(self) -> Any:
        """
        A redirect is a failure, not followed: the message must reach the
        configured endpoint.
        """

        def behave(request: Request, body: bytes) -> int:
            request.setHeader(b"Location", b"http://127.0.0.1:1/elsewhere")
            return 302

        self.endpoint.behave = behave
        with self.assertRaises(WebhookFailed) as caught:
            yield self.delivery().deliver(_message())
        self.assertEqual(caught.exception.status, 302)
        self.assertEqual(len(self.endpoint.requests), 1)

    @inlineCallbacks
    def test_no_answer_times_out(self) -> Any:
        """
        An endpoint that never answers fails the delivery after the timeout.
        """
        self.endpoint.behave = lambda request, body: NOT_DONE_YET
        with self.assertRaises(WebhookFailed) as caught:
            yield self.delivery(timeout=0.3).deliver(_message())
        self.assertIsNone(caught.exception.status)
        self.assertIn("within 0.3 s", str(caught.exception))

    @inlineCallbacks
    def test_slow_body_times_out(self) -> Any:
        """
        A 200 whose body does not finish within the timeout is not a
        delivery: the timeout covers the body, not only the headers.
        """
        started: list[Request] = []

        def behave(request: Request, body: bytes) -> object:
            request.setResponseCode(200)
            request.setHeader(b"Content-Length", b"1000")
            request.write(b"partial")
            started.append(request)
            return NOT_DONE_YET

        self.endpoint.behave = behave
        with self.assertRaises(WebhookFailed):
            yield self.delivery(timeout=0.3).deliver(_message())
        self.assertEqual(len(started), 1)

    @inlineCallbacks
    def test_connection_refused(self) -> Any:
        """
        A refused connection fails the delivery with ``WebhookFailed``.
        """
        yield self.port.stopListening()
        with self.assertRaises(WebhookFailed) as caught:
            yield self.delivery().deliver(_message())
        self.assertIsNone(caught.exception.status)

    @inlineCallbacks
    def test_no_secret_no_signature(self) -> Any:
        """
        Without a secret the request carries no signature header (and
        still the id and timestamp).
        """
        yield self.delivery(secret=None).deliver(_message())
        [(headers, _)] = self.endpoint.requests
        self.assertNotIn("webhook-signature", headers)
        self.assertIn("webhook-id", headers)
        self.assertIn("webhook-timestamp", headers)

    @inlineCallbacks
    def test_connection_reused(self) -> Any:
        """
        Consecutive deliveries reuse one persistent connection.
        """
        clients = set()

        def behave(request: Request, body: bytes) -> int:
            clients.add(request.getClientAddress().port)  # type: ignore[attr-defined]
            return 204

        self.endpoint.behave = behave
        delivery = self.delivery()
        for n in range(1, 21):
            yield delivery.deliver(_message(message_id=n))
        self.assertEqual(len(clients), 1)


class WebhookThroughILMTests(WebhookTestBase):
    @inlineCallbacks
    def test_failing_sender_held_others_flow(self) -> Any:
        """
        Through a real node: while the endpoint refuses sender 1's messages
        (500s), sender 3's flow on; once it accepts again, sender 1's
        arrive, each exactly once and in order, and every retry of one
        message carries the same ``webhook-id``.
        """
        refusing = {"on": True}

        def behave(request: Request, body: bytes) -> int:
            source = request.getHeader(b"ILM-Source")
            if source == b"1" and refusing["on"]:
                return 500
            return 200

        self.endpoint.behave = behave
        network = InMemoryNetwork(reactor)
        config = Config(delivery_retry=0.02, max_delivery_retry=0.05)
        receiver = yield ILM.create(
            InMemoryBackend(),
            self.delivery(),
            network.add_peer(2),
            config=config,
        )
        senders = {}
        for peer in (1, 3):
            senders[peer] = yield ILM.create(
                InMemoryBackend(), lambda m: None, network.add_peer(peer)
            )
        for node in (receiver, *senders.values()):
            self.addCleanup(node.shutdown, 5)
        for n in range(5):
            for peer, node in senders.items():
                yield node.send_to(2, b"%d-%d" % (peer, n))

        def accepted(peer: int) -> list[bytes]:
            return [
                body
                for headers, body in self.endpoint.requests
                if headers["ilm-source"] == str(peer)
            ]

        def attempts_1() -> list[str]:
            return [
                h["webhook-id"]
                for h, _ in self.endpoint.requests
                if h["ilm-source"] == "1"
            ]

        while len(accepted(3)) < 5 or len(attempts_1()) < 3:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(set(attempts_1())), 1)
        refusing["on"] = False
        while not senders[1].pending_outbound() == {}:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(accepted(3), [b"3-%d" % n for n in range(5)])
        delivered_1 = [
            body
            for (headers, body) in self.endpoint.requests
            if headers["ilm-source"] == "1"
        ]
        self.assertEqual(delivered_1[-5:], [b"1-%d" % n for n in range(5)])
        # Every attempt before the last five was the first message, refused.
        self.assertEqual(set(delivered_1[:-5]), {b"1-0"})
        self.flushLoggedErrors(WebhookFailed)


class WebhookIdTests(SynchronousTestCase):
    def test_stable_and_distinct(self) -> None:
        """
        The id is the same for the same message, and differs by source,
        incarnation and message id.
        """
        base = Message(1, 2, 5, b"x", "ab" * 16)
        same = Message(1, 2, 5, b"other contents", "ab" * 16)
        self.assertEqual(webhook_id(base), webhook_id(same))
        others = [
            Message(3, 2, 5, b"x", "ab" * 16),
            Message("1", 2, 5, b"x", "ab" * 16),
            Message(1, 2, 6, b"x", "ab" * 16),
            Message(1, 2, 5, b"x", "cd" * 16),
        ]
        ids = {webhook_id(m) for m in [base, *others]}
        self.assertEqual(len(ids), 5)

    def test_secret_parsing(self) -> None:
        """
        ``whsec_`` secrets decode to their key; short or empty ones are a
        configuration error.
        """
        self.assertEqual(webhook_secret(SECRET), b"s" * 32)
        self.assertEqual(webhook_secret(SECRET[6:] + "\n"), b"s" * 32)
        self.assertRaises(ConfigurationError, webhook_secret, "whsec_")
        self.assertRaises(ConfigurationError, webhook_secret, "whsec_c2hvcnQ=")

    def test_bad_url(self) -> None:
        """
        Only http and https URLs are accepted.
        """
        self.assertRaises(ConfigurationError, WebhookDelivery, "ftp://x/", reactor=None)


class ExecDeliveryTests(TestCase):
    def _script(self, body: str) -> str:
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(body)
        return f"{sys.executable} {path}"

    @inlineCallbacks
    def test_exit_zero_delivers_with_identity(self) -> Any:
        """
        The program gets the message on stdin and its identity in the
        environment; exit 0 is a delivery.
        """
        out = self.mktemp()
        command = self._script(
            "import json, os, sys\n"
            f"open({out!r}, 'w').write(json.dumps(["
            "sys.stdin.buffer.read().hex(), os.environ['ILM_SOURCE'], "
            "os.environ['ILM_MESSAGE_ID'], os.environ['ILM_DEDUP_ID'], "
            "os.environ['ILM_SOURCE_INCARNATION']]))\n"
        )
        delivery = ExecDelivery(command, reactor)
        verifyObject(ILocalDelivery, delivery)
        message = _message(b"\x00bytes", 9, "7")
        yield delivery.deliver(message)
        with open(out) as f:
            data, source, message_id, dedup, incarnation = json.load(f)
        self.assertEqual(bytes.fromhex(data), b"\x00bytes")
        self.assertEqual((source, message_id), ("str:7", "9"))
        self.assertEqual(dedup, webhook_id(message))
        self.assertEqual(incarnation, "ab" * 16)

    @inlineCallbacks
    def test_non_zero_and_timeout_fail(self) -> Any:
        """
        A non-zero exit fails with its status and the end of its output; a
        program running past the timeout is killed and fails.
        """
        failing = ExecDelivery(
            self._script("import sys; print('disk full'); sys.exit(3)"), reactor
        )
        with self.assertRaises(DeliveryFailed) as caught:
            yield failing.deliver(_message())
        self.assertIn("exited with status 3", str(caught.exception))
        self.assertIn("disk full", str(caught.exception))
        slow = ExecDelivery(
            self._script("import time; time.sleep(30)"), reactor, timeout=0.3
        )
        with self.assertRaises(DeliveryFailed) as caught:
            yield slow.deliver(_message())
        self.assertIn("killed", str(caught.exception))

    def test_bad_commands(self) -> None:
        """
        An empty or unparsable command is a configuration error; a missing
        program fails the delivery (it may be installed later).
        """
        self.assertRaises(ConfigurationError, ExecDelivery, "", reactor)
        self.assertRaises(ConfigurationError, ExecDelivery, "'unclosed", reactor)

    @inlineCallbacks
    def test_missing_program_fails_delivery(self) -> Any:
        """
        A program that does not exist fails the delivery, not the node.
        """
        delivery = ExecDelivery("/nonexistent/ilm-handler", reactor)
        with self.assertRaises(DeliveryFailed):
            yield delivery.deliver(_message())
