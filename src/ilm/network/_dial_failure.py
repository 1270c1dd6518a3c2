"""
Why an attempt to reach a peer failed, in words an operator can act on:
:class:`DialFailure` (what :meth:`StreamNetwork.link_error` returns),
:func:`dial_reason` (an error to a kind and a reason) and
:func:`never_linked` (what a dialled connection closed before it became the
link most likely means, from the stage at which it closed: the listener
tells a refused dialler nothing).
"""

from __future__ import annotations

import attr
from twisted.internet import error as _error
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from ilm._peerid import PeerId
from ilm.errors import LinkTimeout, ProtocolViolation, TLSHandshakeFailed
from ilm.network._states import AUTHENTICATED, HANDSHAKING
from ilm.network._tls import tls_error_text

__all__ = ["DialFailure", "PeerClosedHandshake", "dial_reason", "never_linked"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DialFailure:
    """
    Why this node's attempts to reach a peer have been failing
    (:meth:`StreamNetwork.link_error`).

    :ivar reason: what went wrong, in words (``"connection refused: ..."``,
        ``"the peer refused our key proof: ..."``).
    :ivar kind: the error's type name (``"ConnectionRefusedError"``,
        ``"AuthenticationFailed"``, ...).
    :ivar since: when the first attempt that failed for this reason (in a
        row) failed, in seconds on the network's clock (the reactor's: Unix
        time).
    :ivar attempts: how many attempts in a row failed for this reason.
    """

    reason: str
    kind: str
    since: float
    attempts: int


def dial_reason(error: BaseException) -> tuple[str, str]:
    """
    :return: ``(kind, reason)`` for an attempt to reach a peer that failed
        with ``error``.
    """
    kind = type(error).__name__
    detail = str(error).strip().rstrip(".")
    if isinstance(error, _error.ConnectionRefusedError):
        return kind, "connection refused: nothing listens at the peer's address"
    if isinstance(error, _error.DNSLookupError):
        return kind, f"the peer's host name cannot be resolved (DNS): {detail}"
    if isinstance(error, _error.NoRouteError):
        return kind, "the peer's host is unreachable (no route)"
    if isinstance(error, _error.TCPTimedOutError | _error.TimeoutError):
        return kind, (
            "the connection attempt timed out: the peer's host is unreachable "
            "or drops connections"
        )
    if isinstance(error, _error.ConnectError):
        return kind, f"cannot connect to the peer: {detail or kind}"
    if isinstance(error, TLSHandshakeFailed):
        return kind, f"TLS handshake failed: {detail}"
    if isinstance(error, PeerClosedHandshake):
        return error.kind, str(error)
    if isinstance(error, LinkTimeout):
        return kind, detail
    if isinstance(error, ProtocolViolation):
        return kind, f"this node refused the peer: {detail}"
    return kind, detail or kind


class PeerClosedHandshake(ConnectionLost):
    """
    The peer closed a connection this node dialled before it became the
    link; the message says what that most likely means at that stage.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0])


def never_linked(
    was: str,
    stage: str,
    reason: Failure,
    *,
    local_id: PeerId,
    keys: bool,
    tls: bool,
) -> BaseException:
    """
    Why a connection this node dialled never became the link.

    :param was: the connection's state when it was lost.
    :param stage: its link handshake's state (``"await ACCEPT"``, ...).
    :param reason: why the connection was lost.
    :param local_id: this node's id.
    :param keys: whether this node proves itself with a pre-shared key.
    :param tls: whether the link runs over TLS.
    """
    text = tls_error_text(reason.value)
    if text is not None:
        return TLSHandshakeFailed(text)
    if was == HANDSHAKING:
        if stage == "await ACCEPT":
            if keys:
                return PeerClosedHandshake(
                    f"the peer refused our key proof: it holds another key "
                    f"for node {local_id!r}, or does not know that id",
                    "AuthenticationFailed",
                )
            return PeerClosedHandshake(
                "the peer refused the link after the TLS handshake",
                "AuthenticationFailed",
            )
        if stage == "await CHALLENGE":
            refusing = (
                "did not accept this node's certificate"
                if tls
                else "refuses connections"
            )
            return PeerClosedHandshake(
                f"the peer closed the connection without answering our "
                f"HELLO: it {refusing}, speaks another version of the "
                f"stream transport, has too many connections in their "
                f"handshake, or is not an ILM node",
                "ConnectionLost",
            )
    if was == AUTHENTICATED:
        return PeerClosedHandshake(
            "the peer closed the connection after both sides authenticated: "
            "it chose another connection as the link, or refuses links from "
            "this node for a while after a protocol violation",
            "ConnectionLost",
        )
    value = reason.value
    return value if isinstance(value, BaseException) else ConnectionLost()
