"""
The node's HTTP API, on ``twisted.web``: send messages and read a node's
state from any language.

Resources (``docs/daemon.md`` has the reference, with curl examples):

- ``POST /v1/peers/{peer}/messages``: the body is the message.  ``202``
  with ``{"peer": ..., "message_id": ...}`` once it is stored (durable);
  with ``?wait=acknowledged``, ``200`` once the peer has it durably.  An
  ``Idempotency-Key`` header makes a retried POST get the first answer
  instead of storing the message twice.
- ``GET /v1/peers``, ``GET /v1/peers/{peer}``: the status snapshot.
- ``GET /v1/node``: id, incarnation, version, uptime, store.
- ``GET /healthz`` (the process answers) and ``GET /readyz`` (the node is
  running), without authentication.

Everything under ``/v1`` needs ``Authorization: Bearer <token>`` (compared
in constant time).  Errors are JSON, ``{"error": {"code": ..., "message":
...}}``, with stable codes (:data:`ERROR_CODES`).  Request bodies are
capped by :class:`LimitedRequest`: twisted.web itself reads any size.

Peer ids in URLs follow :mod:`ilm._peerid`: digits are an ``int`` id,
``str:`` forces a string, percent-encoding for the rest.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections import OrderedDict
from typing import Any

from attrs import asdict
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ilm._peerid import id_order_key, peer_id_from_text, peer_id_to_text
from ilm._status import PeerStatus
from ilm.errors import (
    ConfigurationError,
    InvalidPeerId,
    MessageTooLarge,
    NotRunning,
    OutboxFull,
    SendToSelf,
    StoppedBeforeAcknowledged,
    StoreError,
    StoreFull,
    StoreInDoubt,
    UnknownPeer,
)

__all__ = [
    "ERROR_CODES",
    "ApiSite",
    "LimitedRequest",
    "read_or_create_token",
    "status_json",
]

log = Logger(namespace="ilm.api")

ERROR_CODES: dict[str, tuple[int, str]] = {
    "unauthorized": (401, "no or wrong bearer token"),
    "not_found": (404, "no such resource"),
    "method_not_allowed": (405, "method not allowed on this resource"),
    "bad_peer_id": (400, "the peer id in the URL is not a valid id"),
    "send_to_self": (400, "the peer is this node itself"),
    "bad_request": (400, "the request is malformed"),
    "unknown_peer": (404, "the node can never link to this peer"),
    "too_large": (413, "the message is larger than the node or the peer accepts"),
    "outbox_full": (429, "the outbox to this peer is full; retry later"),
    "not_running": (503, "the node is starting, stopping or stopped"),
    "store_full": (507, "the store is full; nothing was stored"),
    "store_error": (503, "the store failed; nothing was stored"),
    "store_in_doubt": (
        500,
        "the store failed mid-commit: the message may have been stored and "
        "may be delivered",
    ),
    "internal_error": (500, "an unexpected error; see the node's log"),
}
"""Every error code the API answers with: its HTTP status and meaning."""


_TRANSIENT = frozenset(
    ("outbox_full", "not_running", "store_full", "store_error", "internal_error")
)


class ApiError(Exception):
    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(message or ERROR_CODES[code][1])
        self.code = code
        self.status = ERROR_CODES[code][0]


def _refusal(error: BaseException) -> ApiError:
    """
    The API error for what ``send_to`` failed with.
    """
    for kind, code in (
        (InvalidPeerId, "bad_peer_id"),
        (SendToSelf, "send_to_self"),
        (UnknownPeer, "unknown_peer"),
        (MessageTooLarge, "too_large"),
        (OutboxFull, "outbox_full"),
        (NotRunning, "not_running"),
        (StoreInDoubt, "store_in_doubt"),
        (StoreFull, "store_full"),
        (StoreError, "store_error"),
    ):
        if isinstance(error, kind):
            return ApiError(code, str(error))
    return ApiError("internal_error")


def read_or_create_token(path: str) -> str:
    """
    The API token in ``path``; a new random one is written there (mode
    0600) if the file does not exist.

    :raises ConfigurationError: if the file cannot be read or created, is
        empty, or others may read it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise ConfigurationError(f"cannot create the API token file {path}: {e}")
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigurationError(f"cannot read the API token file {path}: {e}")
    if mode & 0o077:
        raise ConfigurationError(
            f"the API token file {path} may be read or written by other users; "
            f"run: chmod 600 {path}"
        )
    if len(token) < 16:
        raise ConfigurationError(
            f"the API token in {path} is shorter than 16 characters"
        )
    return token


class _Discard:
    """A request body sink that only counts (for bodies over the cap)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def seek(self, *args: Any) -> None:
        pass

    def tell(self) -> int:
        return self.size

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class LimitedRequest(Request):
    """
    A request whose body is capped at the site's ``max_body`` bytes.

    A body over the cap is read and dropped (memory stays bounded) and the
    request is answered ``413``; a body over eight times the cap drops the
    connection at once.
    """

    _discarded: _Discard | None = None

    @property
    def too_large(self) -> bool:
        return self._discarded is not None

    def _max_body(self) -> int:
        return getattr(self.channel.site, "max_body", 1024 * 1024)  # type: ignore[union-attr,attr-defined]

    def _discard(self, size: int) -> None:
        if self.content is not None:
            self.content.close()
        sink = self._discarded = _Discard()
        sink.size = size
        self.content = sink  # type: ignore[assignment]
        if size > 8 * self._max_body():
            self.transport.abortConnection()  # type: ignore[union-attr]

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body():
            self._discard(length)
            return
        Request.gotLength(self, length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        sink = self._discarded
        if sink is not None:
            if sink.size <= 8 * self._max_body():
                sink.write(data)
            return
        assert self.content is not None
        size = self.content.tell() + len(data)
        if size > self._max_body():
            self._discard(size)
            return
        Request.handleContentChunk(self, data)  # type: ignore[no-untyped-call]


class _Answer:
    """A finished answer, kept for idempotent retries."""

    __slots__ = ("body", "expires", "status")

    def __init__(self, status: int, body: bytes, expires: float) -> None:
        self.status = status
        self.body = body
        self.expires = expires


class IdempotencyCache:
    """
    Answers to POSTs that carried an ``Idempotency-Key``, by key, for
    ``ttl`` seconds, at most ``max_keys`` of them (oldest dropped first).
    A retry while the first request is still being answered waits for that
    answer.
    """

    def __init__(self, clock: IReactorTime, ttl: float, max_keys: int) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_keys = max_keys
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._pending: dict[str, list[Deferred[_Answer]]] = {}

    def lookup(self, key: str) -> _Answer | Deferred[_Answer] | None:
        self._expire()
        answer = self._answers.get(key)
        if answer is not None:
            return answer
        waiters = self._pending.get(key)
        if waiters is not None:
            d: Deferred[_Answer] = Deferred()
            waiters.append(d)
            return d
        self._pending[key] = []
        return None

    def forget(self, key: str) -> None:
        """
        The request with ``key`` ended without an answer (its client left
        while waiting): a retry starts afresh, waiters are told nothing.
        """
        self._pending.pop(key, None)

    def settle(self, key: str, status: int, body: bytes, keep: bool) -> None:
        """
        The first request with ``key`` was answered: answer the retries
        waiting for it, and (if ``keep``) later ones too, for ``ttl``.
        """
        answer = _Answer(status, body, self._clock.seconds() + self.ttl)
        waiters = self._pending.pop(key, [])
        if keep:
            self._answers[key] = answer
            while len(self._answers) > self.max_keys:
                self._answers.popitem(last=False)
        for d in waiters:
            d.callback(answer)

    def _expire(self) -> None:
        now = self._clock.seconds()
        answers = self._answers
        while answers:
            key, answer = next(iter(answers.items()))
            if answer.expires > now:
                break
            del answers[key]


def _json(request: Request, status: int, value: object) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(value, separators=(",", ":")).encode("utf-8") + b"\n"


def _error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"code": error.code, "message": str(error)}}


class _Handler(Resource):
    """
    Dispatch on the request path: ``/v1/...`` needs the bearer token.
    """

    isLeaf = True

    def __init__(self, api: ApiSite) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self._api = api

    def render(self, request: Request) -> bytes | int:
        api = self._api
        try:
            path = [
                segment.decode("ascii")
                for segment in request.path.split(b"/")[1:]  # type: ignore[union-attr]
            ]
        except UnicodeDecodeError:
            return self._fail(request, ApiError("not_found"))
        method = request.method
        if isinstance(request, LimitedRequest) and request.too_large:
            return self._fail(
                request,
                ApiError(
                    "too_large",
                    f"the request body is larger than {api.max_body} bytes",
                ),
            )
        if path in (["healthz"], ["readyz"]):
            if method != b"GET":
                return self._fail(request, ApiError("method_not_allowed"))
            node_state: str = api.node.state
            ready = path == ["healthz"] or node_state == "running"
            return _json(
                request,
                200 if ready else 503,
                {"status": "ok" if ready else "not ready", "state": node_state},
            )
        if not path or path[0] != "v1":
            return self._fail(request, ApiError("not_found"))
        if not self._authorised(request):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="ilm"')
            return self._fail(request, ApiError("unauthorized"))
        route = path[1:]
        if route == ["node"] and method == b"GET":
            return _json(request, 200, api.node_info())
        if route == ["peers"] and method == b"GET":
            return _json(request, 200, api.peers_status())
        if len(route) in (2, 3) and route[0] == "peers":
            try:
                peer = peer_id_from_text(route[1])
            except (ValueError, TypeError) as e:
                return self._fail(request, ApiError("bad_peer_id", str(e)))
            if len(route) == 2 and method == b"GET":
                try:
                    return _json(request, 200, api.peer_status(peer))
                except ApiError as e:
                    return self._fail(request, e)
            if route[2:] == ["messages"]:
                if method != b"POST":
                    return self._fail(request, ApiError("method_not_allowed"))
                return self._post(request, peer)
            return self._fail(request, ApiError("not_found"))
        if route and route[0] in ("node", "peers"):
            return self._fail(request, ApiError("method_not_allowed"))
        return self._fail(request, ApiError("not_found"))

    def _authorised(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self._api.token.encode("utf-8"))

    def _fail(self, request: Request, error: ApiError) -> bytes:
        return _json(request, error.status, _error_body(error))

    def _post(self, request: Request, peer: Any) -> bytes | int:
        api = self._api
        wait = request.args.get(b"wait", [b"stored"])[0]  # type: ignore[union-attr]
        if wait not in (b"stored", b"acknowledged"):
            return self._fail(
                request,
                ApiError("bad_request", "wait must be 'stored' or 'acknowledged'"),
            )
        header = request.getHeader(b"idempotency-key")
        key = None
        if header is not None:
            if not 1 <= len(header) <= 255:
                return self._fail(
                    request,
                    ApiError("bad_request", "Idempotency-Key must be 1 to 255 bytes"),
                )
            # A key names one intended message: the same key for another
            # peer is another message.
            key = f"{peer_id_to_text(peer)} {wait.decode()} {header.hex()}"
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        work = ensureDeferred(api.answer_post(peer, body, wait, key))
        # A client that hangs up stops the wait (not the send).
        request.notifyFinish().addErrback(lambda _: work.cancel())

        def respond(result: tuple[int, bytes]) -> None:
            status, encoded = result
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(encoded)
            request.finish()

        def failed(reason: Failure) -> None:
            if reason.check(CancelledError):
                return
            log.failure(
                "internal error answering a POST", reason, ilm_event="api_error"
            )
            respond((500, json.dumps(_error_body(ApiError("internal_error"))).encode()))

        work.addCallbacks(respond, failed)
        return NOT_DONE_YET


class ApiSite(Site):
    """
    The HTTP API of one node, as a ``twisted.web`` site.

    :param node: the :class:`ilm.ILM` node.
    :param token: the bearer token.
    :param clock: timers (idempotency expiry, uptime).
    :param max_body: the largest request body accepted (bytes).
    :param idempotency_ttl: seconds an ``Idempotency-Key``'s answer is kept.
    :param idempotency_keys: how many keys are kept at most.
    :param store: a description of the store for ``GET /v1/node``.
    """

    requestFactory = LimitedRequest  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        node: Any,
        token: str,
        clock: IReactorTime,
        *,
        max_body: int | None = None,
        idempotency_ttl: float = 24 * 3600.0,
        idempotency_keys: int = 100_000,
        store: str = "",
        version: str = "",
    ) -> None:
        self.node: Any = node
        self.token = token
        self.clock = clock
        self.max_body = (
            max_body if max_body is not None else node.config.max_message_size
        )
        self.idempotency = IdempotencyCache(clock, idempotency_ttl, idempotency_keys)
        self.started_at = clock.seconds()
        self.store = store
        self.version = version
        Site.__init__(self, _Handler(self))
        self.requestFactory = LimitedRequest  # type: ignore[assignment]

    async def answer_post(
        self, peer: Any, body: bytes, wait: bytes, key: str | None
    ) -> tuple[int, bytes]:
        """
        Send ``body`` to ``peer`` (or find the answer of the first request
        with the same idempotency ``key``): the status and JSON body.
        """
        if key is not None:
            found = self.idempotency.lookup(key)
            if isinstance(found, Deferred):
                found = await found
            if found is not None:
                return found.status, found.body
        try:
            status, value = await self._send(peer, body, wait == b"acknowledged")
        except BaseException:
            if key is not None:
                self.idempotency.forget(key)
            raise
        encoded = json.dumps(value, separators=(",", ":")).encode() + b"\n"
        if key is not None:
            # Kept: an answer about a stored message, or a refusal that a
            # retry would get again.  A transient refusal (outbox full, not
            # running, store full) stored nothing: a retry tries afresh.
            code = value.get("error", {}).get("code")
            final = "message_id" in value or code not in _TRANSIENT
            self.idempotency.settle(key, status, encoded, keep=final)
        return status, encoded

    async def _send(
        self, peer: Any, body: bytes, acknowledged: bool
    ) -> tuple[int, dict[str, Any]]:
        try:
            receipt = await self.node.send_to(peer, body)
        except Exception as e:
            error = _refusal(e)
            if error.code == "internal_error":
                log.failure("send_to failed unexpectedly", ilm_event="api_error")
            return error.status, _error_body(error)
        answer: dict[str, Any] = {
            "peer": peer_id_to_text(receipt.peer_id),
            "message_id": receipt.message_id,
        }
        if not acknowledged:
            return 202, answer
        try:
            await receipt.acknowledged
        except (StoppedBeforeAcknowledged, NotRunning) as e:
            error = ApiError(
                "not_running",
                f"message {receipt.message_id} is stored, but the node stopped "
                f"before the peer acknowledged it ({e})",
            )
            return error.status, {**_error_body(error), **answer}
        return 200, {**answer, "acknowledged": True}

    def node_info(self) -> dict[str, Any]:
        node = self.node
        return {
            "id": peer_id_to_text(node.local_id),
            "incarnation": node.incarnation,
            "version": self.version,
            "state": node.state,
            "uptime_s": round(self.clock.seconds() - self.started_at, 3),
            "store": self.store,
        }

    def peers_status(self) -> dict[str, Any]:
        """
        ``GET /v1/peers``: every peer the node knows, in id order.
        """
        statuses = self.node.peer_status()
        now = self.clock.seconds()
        return {
            "peers": [
                status_json(statuses[peer], now)
                for peer in sorted(statuses, key=id_order_key)
            ]
        }

    def peer_status(self, peer: Any) -> dict[str, Any]:
        """
        ``GET /v1/peers/{peer}``.

        :raises ApiError: ``unknown_peer`` if the node knows nothing of it.
        """
        try:
            status = self.node.peer_status(peer)
        except (UnknownPeer, InvalidPeerId) as e:
            raise _refusal(e) from None
        return status_json(status, self.clock.seconds())


def status_json(status: PeerStatus, now: float) -> dict[str, Any]:
    """
    One peer's status as the API's JSON: every field of
    :class:`ilm.PeerStatus`, the peer id in its URL text form, times as
    Unix seconds and, for convenience, ``link_for_s`` and ``held_for_s``
    (seconds in the current link state and delivery hold).
    """
    value = asdict(status)
    value["peer_id"] = peer_id_to_text(status.peer_id)
    value["link_for_s"] = (
        None if status.link_since is None else round(now - status.link_since, 3)
    )
    value["held_for_s"] = (
        None
        if status.delivery_held_since is None
        else round(now - status.delivery_held_since, 3)
    )
    return value
