"""
Webhook delivery: each message POSTed to an HTTP endpoint, with treq.

:class:`WebhookDelivery` is an :class:`ilm.interfaces.ILocalDelivery`: the
node hands it one message per sender at a time, in order, and it answers
"delivered" only when the endpoint answered ``2xx`` and its whole response
arrived within the timeout.  Anything else (another status, a redirect, a
refused or dropped connection, a timeout, a slow body) fails the delivery
with :class:`ilm.errors.DeliveryFailed`: ILM holds that sender's stream and
tries again with backoff (at least as long as a ``Retry-After`` header
asked), while other senders' messages go on.

Requests follow the Standard Webhooks specification
(https://www.standardwebhooks.com):

- ``webhook-id``: stable across retries, derived from the message's identity
  ``(source, source incarnation, message id)``, so the receiver can drop a
  repeat (ILM's at-least-once window after a crash) by this header alone;
- ``webhook-timestamp``: the attempt's time, in seconds since the epoch;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``
  under the secret (``whsec_<base64>``), when a secret is configured;

plus ``ILM-Source``, ``ILM-Source-Incarnation`` and ``ILM-Message-Id``, and
``Content-Type: application/octet-stream`` with the message's bytes as the
body.  docs/daemon.md has code to verify them on the receiving side.

The client keeps one persistent connection pool; a sender has at most one
request in flight (ILM delivers one message per sender at a time), so the
pool keeps up to ``max_connections`` connections per host open.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from email.utils import parsedate_to_datetime
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ilm._peerid import peer_id_to_text
from ilm.errors import ConfigurationError, DeliveryFailed
from ilm.interfaces import ILocalDelivery, IMessage

__all__ = ["WebhookDelivery", "WebhookFailed", "webhook_id", "webhook_secret"]

_SECRET_PREFIX = "whsec_"


class WebhookFailed(DeliveryFailed):
    """
    A webhook endpoint did not take a message.

    ``status``: the HTTP status it answered, or ``None`` when there was no
    complete answer (connection refused or lost, timeout).
    """

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after)
        self.status = status


def webhook_secret(text: str) -> bytes:
    """
    The signing key of a Standard Webhooks secret, ``whsec_<base64>`` (the
    prefix is optional).

    :raises ConfigurationError: if it is not base64 or shorter than 16 bytes.
    """
    text = text.strip()
    if text.startswith(_SECRET_PREFIX):
        text = text[len(_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text + "==", validate=False)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigurationError(
            "a webhook secret is 'whsec_' and the base64 of at least 16 random "
            'bytes (python3 -c "import base64, os; '
            "print('whsec_' + base64.b64encode(os.urandom(32)).decode())\")"
        )
    return key


def webhook_id(message: IMessage) -> str:
    """
    The ``webhook-id`` of a message: the same for every attempt to deliver
    it, different for every other message (also after the sender lost its
    store, which changes its incarnation).
    """
    identity = "\0".join(
        (
            peer_id_to_text(message.source_id),
            getattr(message, "source_incarnation", "") or "",
            str(message.message_id),
        )
    )
    return "msg_" + hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """
    The Standard Webhooks ``v1`` signature of one attempt.
    """
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


@implementer(IBodyProducer)
class _Body:
    """
    A request body already in memory (treq's default producer would need a
    cooperator on the global reactor).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Drain(Protocol):
    """
    Reads a response body to its end, keeping its first ``limit`` bytes;
    cancelling ``done`` drops the connection (a body that does not end).
    """

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self._kept: list[bytes] = []
        self._room = limit

    def dataReceived(self, data: bytes) -> None:
        if self._room > 0:
            self._kept.append(data[: self._room])
            self._room -= len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._kept))
        else:
            self.done.errback(reason)

    def _cancel(self, _: object) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _retry_after(value: bytes | None, now: float) -> float | None:
    """
    Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date.
    """
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


@implementer(ILocalDelivery)
class WebhookDelivery:
    """
    Deliver each message as an HTTP POST to ``url``.

    :param url: the endpoint (``http://`` or ``https://``).
    :param reactor: the reactor (connections and timers).
    :param secret: the Standard Webhooks signing key (from
        :func:`webhook_secret`), or ``None`` to send no signature.
    :param timeout: seconds for one attempt, from sending the request to
        the end of the response body.
    :param max_connections: persistent connections kept per host.
    :param max_response_body: bytes of a response body kept in memory (the
        rest is read and dropped; only the status matters).
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        secret: bytes | None = None,
        timeout: float = 10.0,
        max_connections: int = 32,
        max_response_body: int = 64 * 1024,
    ) -> None:
        import treq.client

        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"webhook URL {url!r} must be http:// or https://")
        if not timeout > 0:
            raise ConfigurationError(f"webhook timeout must be positive, not {timeout}")
        self.url = url
        self.timeout = timeout
        self.max_response_body = max_response_body
        self._secret = secret
        self._clock: IReactorTime = reactor
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections
        self._pool.retryAutomatically = False
        self._client = treq.client.HTTPClient(
            Agent(reactor, pool=self._pool), data_to_body_producer=_Body
        )

    def deliver(self, message: IMessage) -> Deferred[object]:
        """
        POST ``message``; fires once the endpoint took it, fails with
        :class:`WebhookFailed` otherwise.
        """
        body = message.contents
        identity = webhook_id(message)
        timestamp = int(self._clock.seconds())
        headers: dict[bytes | str, list[bytes | str]] = {
            "Content-Type": ["application/octet-stream"],
            "webhook-id": [identity],
            "webhook-timestamp": [str(timestamp)],
            "ILM-Source": [peer_id_to_text(message.source_id)],
            "ILM-Source-Incarnation": [
                getattr(message, "source_incarnation", "") or ""
            ],
            "ILM-Message-Id": [str(message.message_id)],
        }
        if self._secret is not None:
            headers["webhook-signature"] = [
                sign(self._secret, identity, timestamp, body)
            ]
        attempt: Deferred[Any] = self._client.post(
            self.url,
            data=body,
            headers=headers,
            allow_redirects=False,
            reactor=self._reactor,
        )
        attempt.addCallback(self._read_response)
        attempt.addErrback(self._failed)
        attempt.addTimeout(self.timeout, self._clock, onTimeoutCancel=self._timed_out)
        return attempt

    def _read_response(self, response: IResponse) -> Deferred[None]:
        status = response.code
        reading = _Drain(self.max_response_body)
        response.deliverBody(reading)

        def finished(kept: bytes) -> None:
            if 200 <= status < 300:
                return
            retry_after = _retry_after(
                response.headers.getRawHeaders(b"retry-after", [None])[0],
                self._clock.seconds(),
            )
            answer = kept[:200].decode("utf-8", "replace").strip()
            raise WebhookFailed(
                f"webhook {self.url} answered {status}"
                + (f": {answer}" if answer else "")
                + (
                    f" (retry after {retry_after:.0f} s)"
                    if retry_after is not None
                    else ""
                ),
                status=status,
                retry_after=retry_after,
            )

        return reading.done.addCallback(finished)

    def _timed_out(self, result: object, timeout: float) -> Failure:
        return Failure(
            WebhookFailed(f"webhook {self.url}: no complete answer within {timeout} s")
        )

    def _failed(self, reason: Failure) -> Failure:
        if reason.check(WebhookFailed):
            return reason
        detail = reason.getErrorMessage() or reason.type.__name__  # type: ignore[union-attr]
        error = WebhookFailed(f"webhook {self.url}: {detail}")
        error.__cause__ = reason.value
        return Failure(error)

    def close(self) -> Deferred[None]:
        """
        Close the pooled connections.
        """
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"WebhookDelivery({self.url!r})"
