"""
The ILM error hierarchy.

Every failure ILM reports is an :class:`ILMError`.  The subclasses say what went
wrong and what the caller can do about it:

- :class:`SendRefused` and its subclasses fail the ``Deferred`` returned by
  :meth:`ilm.ILM.send_to` (or :meth:`ilm.ILM.send_raw_message`).  The message
  was **not** accepted: nothing was stored and nothing will be sent.  Some
  refusals are about the arguments (:class:`SendToSelf`, :class:`WrongSource`,
  :class:`InvalidPeerId`, :class:`MessageTooLarge`) and will fail again if
  retried; :class:`OutboxFull` clears once the peer acknowledges messages;
  :class:`NotRunning` means the messenger is stopping or stopped.
- :class:`StoreError` and its subclasses come from a backend.  When one fails a
  ``send_to`` Deferred, that message was not stored, except with
  :class:`StoreInDoubt`: then it may have been (and may be delivered).  ILM
  keeps running and retries its own bookkeeping writes (acknowledgements,
  delivery marks) with backoff; it never acknowledges anything that was not
  committed.
- :class:`ProtocolViolation` and its subclasses end **one link**: the peer sent
  something that breaks the protocol.  ILM logs the reason and closes the link;
  other links are unaffected and nothing already accepted is lost.
- :class:`LinkTimeout` ends one link of a stream network (handshake not
  completed in time, a silent, half-open connection, or a peer that stopped
  reading); it is reconnected.
- :class:`ConnectionLimitReached` is why a stream network aborted an
  incoming connection as soon as it was accepted (too many unauthenticated
  connections); it appears only in the log.
- The network errors (:class:`ProtocolViolation` and its subclasses,
  :class:`LinkTimeout`, :class:`ConnectionLimitReached`) carry, as the class
  attribute ``ilm_event``, the name of the log event a stream network emits
  when it closes a connection for one of them; it is also the reason under
  which ``NetworkStats.refusals`` counts that refusal.
- :class:`ShutdownTimeout` fails the Deferred returned by
  :meth:`ilm.ILM.shutdown` when pending messages could not be drained in time;
  they stay in the store and are sent after the next start.
- :class:`StoppedBeforeAcknowledged` fails a receipt's ``acknowledged`` when
  the node stopped before the peer acknowledged the message: the message
  was stored and stays stored (it is not a refusal).

Every class names, in its ``ilm_event`` attribute, the log event under which
ILM reports it (see ``docs/guide.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class ILMError(Exception):
    """
    Base class of every error raised or reported by ILM.
    """

    #: The log event ILM reports this error under.
    ilm_event: ClassVar[str] = "internal_error"


# --- refusals of one message -------------------------------------------------


class SendRefused(ILMError):
    """
    A message handed to ``send_to`` was refused; nothing was stored.
    """

    #: Why, in one stable word (metrics labels, the HTTP API's error code).
    reason: ClassVar[str] = "refused"
    #: Refusals are the caller's to report: the HTTP API logs them so.
    ilm_event = "api_error"


class SendToSelf(SendRefused, ValueError):
    """
    The destination is this node's own id; ILM does not loop messages back.
    """

    reason = "send_to_self"


class WrongSource(SendRefused, ValueError):
    """
    ``send_raw_message`` was given a message whose ``source_id`` is not this
    node's id.
    """

    reason = "wrong_source"


class InvalidPeerId(SendRefused, ValueError):
    """
    A peer id is out of range: ids are integers in ``[0, 2**63)`` or non-empty
    strings of at most 255 UTF-8 bytes.
    """

    reason = "invalid_peer_id"


class MessageTooLarge(SendRefused, ValueError):
    """
    The message contents exceed the configured ``max_message_size``, or the
    smaller limit the peer announced in its handshake.
    """

    reason = "message_too_large"

    def __init__(self, size: int, limit: int, detail: str | None = None) -> None:
        super().__init__(
            detail or f"message of {size} bytes exceeds the limit of {limit} bytes"
        )
        self.size = size
        self.limit = limit


class OutboxFull(SendRefused):
    """
    The outbox towards one peer holds as many messages (or bytes) as its limit
    allows.  Retry after the peer has acknowledged some of them.
    """

    reason = "outbox_full"

    def __init__(self, peer_id: object, kind: str, limit: int) -> None:
        super().__init__(f"outbox to peer {peer_id!r} is full ({kind} limit {limit})")
        self.peer_id = peer_id
        self.kind = kind
        self.limit = limit


class UnknownPeer(SendRefused, ValueError):
    """
    The network says it can never have a link to this peer (a stream
    network with no key, certificate pin or certificate authority that
    could authenticate it): the message would wait in the store forever.
    Usually a typo in the peer id, or ``"1"`` where ``1`` was meant.
    """

    reason = "unknown_peer"


class NotRunning(SendRefused):
    """
    The messenger is shutting down, has stopped, or failed to start.

    A receipt's ``acknowledged`` whose node stops first fails with
    :class:`StoppedBeforeAcknowledged` instead (it failed with this class
    before, which wrongly said the message was refused).
    """

    reason = "not_running"


class StoppedBeforeAcknowledged(ILMError):
    """
    A receipt's ``acknowledged``: the node stopped (or crashed, or failed)
    before the peer acknowledged the message.  The message was stored and
    stays stored: it is sent after the next start, and
    ``ILM.receipt(peer_id, message_id).acknowledged`` on the restarted node
    waits for its acknowledgement.

    Not a :class:`SendRefused`: nothing was refused.  (Earlier versions
    failed with :class:`NotRunning` here; code that caught ``NotRunning``
    on ``acknowledged`` catches this class now.)
    """

    ilm_event = "stopped"

    def __init__(self, peer_id: object, message_id: int, detail: str) -> None:
        super().__init__(
            f"message {message_id} to {peer_id!r} is stored, but {detail} before "
            f"the peer acknowledged it; it is sent after the next start"
        )
        self.peer_id = peer_id
        self.message_id = message_id


# --- configuration ------------------------------------------------------------


class ConfigurationError(ILMError, ValueError):
    """
    A setting cannot work: a malformed endpoint string, a key given to two
    peers, a key file others can read.  Raised when the object is built,
    before anything is opened, with one line naming the option or peer.
    """

    ilm_event = "daemon_start_failed"


# --- delivery -------------------------------------------------------------------


class DeliveryFailed(ILMError):
    """
    A delivery target did not take a message (an HTTP endpoint answered
    with an error status, a command exited non-zero).  ILM delivers the same
    message again later, holding back later messages from the same sender.

    ``retry_after``: seconds the target asked ILM to wait before trying
    again (an HTTP ``Retry-After``), or ``None``; ILM waits at least that
    long, and at most an hour, before the next attempt (its own backoff
    applies when it is longer).
    """

    ilm_event = "delivery_failed"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- store failures ------------------------------------------------------------


class StoreError(ILMError):
    """
    The backend could not complete an operation.  Nothing of the failed
    operation was applied (except with :class:`StoreInDoubt`).
    """

    ilm_event = "store_commit_failed"


class StoreCorrupt(StoreError):
    """
    The store's file is not a valid ILM store (damaged, or not a database).
    """

    ilm_event = "store_broken"


class StoreLocked(StoreError):
    """
    Another process holds the store (it is locked).
    """

    ilm_event = "start_failed"


class StoreReadOnly(StoreError):
    """
    The store cannot be written (read-only file, directory or filesystem).
    """


class StoreFull(StoreError):
    """
    The store ran out of space (disk full or a configured size limit).
    """


class StoreInDoubt(StoreError):
    """
    A commit failed in a way that leaves unknown whether it was applied (an
    I/O error while committing: the data may be on disk, its sync failed).
    The messages of a ``send_to`` that fails with it may or may not have been
    stored, so may still be delivered.  The store refuses further commits until
    the node restarts, which reads the truth from the store.
    """


class StoreSchemaTooNew(StoreError):
    """
    The store was written by a newer version of ILM than this one.
    """

    ilm_event = "start_failed"

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"store schema version {found} is newer than the newest this "
            f"version of ILM understands ({supported}); upgrade ILM"
        )
        self.found = found
        self.supported = supported


# --- link-ending protocol errors --------------------------------------------------


class ProtocolViolation(ILMError):
    """
    A peer broke the protocol on one link.  The link is closed; nothing
    already accepted is lost.
    """

    #: The messenger's event for a session violation; a stream network logs
    #: (and counts) a link-level one as ``link_protocol_violation``.
    ilm_event: ClassVar[str] = "protocol_violation"


class MalformedFrame(ProtocolViolation):
    """
    A frame could not be decoded (truncated, inconsistent lengths, trailing
    bytes, out-of-range field).
    """


class FrameTooLarge(ProtocolViolation):
    """
    A frame is larger than the configured maximum frame size.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class UnknownFrameType(ProtocolViolation):
    """
    A frame's type byte is not one this version knows.
    """


class UnsupportedVersion(ProtocolViolation):
    """
    The peer speaks a protocol version this node does not support.
    """


class UnexpectedFrame(ProtocolViolation):
    """
    A frame arrived that is not valid in the link's current state.
    """


class AckOutOfRange(ProtocolViolation):
    """
    The peer acknowledged a position this node never stored for it.
    """


class OutOfWindow(ProtocolViolation):
    """
    The peer sent data beyond the window this node announced.
    """


class StaleIncarnation(ProtocolViolation):
    """
    The peer introduced itself with an incarnation that has been replaced by a
    newer one (its store was lost and recreated since).
    """


class TooManyIncarnations(ProtocolViolation):
    """
    The peer presented a new incarnation (a new store) more often than
    ``Config.max_new_incarnations`` per ``new_incarnation_period`` allows:
    the link is refused, and the network's refusal backoff applies.  A peer
    that lost its store once is never refused; one that comes back with a
    new store on every link is.
    """


class PeerStoreRegressed(ProtocolViolation):
    """
    The peer's store is behind what this node has already received from it:
    the peer lost committed data but kept its incarnation, so its new
    messages could not be told from old ones.  The link is refused until an
    operator intervenes (for example by giving the peer a fresh store).
    """


class StoreBehindPeer(ProtocolViolation):
    """
    The peer reports having received more from this node than this node's
    store holds: this node's store lost committed data but kept its
    incarnation.  The link is refused so that no position is reused.
    """


class AuthenticationFailed(ProtocolViolation):
    """
    The peer could not prove the identity it claims, or is not configured.
    """

    ilm_event: ClassVar[str] = "authentication_failed"


class SpoofedPeer(ProtocolViolation):
    """
    A frame claims a node id other than the link's authenticated peer.
    """

    ilm_event: ClassVar[str] = "spoofed_peer"


class TLSHandshakeFailed(AuthenticationFailed):
    """
    A stream connection's TLS handshake failed: the peer presented no
    client certificate, offered only a TLS version older than 1.2, or sent
    bytes that are not TLS at all.
    """

    ilm_event: ClassVar[str] = "tls_handshake_failed"


class FrameAuthenticationFailed(ProtocolViolation):
    """
    A link frame of a pre-shared-key link failed its integrity check: it
    was altered, dropped, replayed, reordered or injected on the way.
    """

    ilm_event: ClassVar[str] = "frame_authentication_failed"


class FrameIntegrityMismatch(ProtocolViolation):
    """
    The two ends of a link disagree on whether link frames carry an
    integrity tag (``LinkSettings.frame_integrity``): both must use the
    same setting, and the link is refused rather than downgraded.
    """

    ilm_event: ClassVar[str] = "frame_integrity_mismatch"


# --- links ---------------------------------------------------------------------


class LinkTimeout(ILMError):
    """
    A network closed a link because time ran out: the peer did not complete
    the link handshake in time, nothing at all arrived from it for the
    idle timeout (a half-open connection), or it read nothing of what this
    node sent while this node had stopped reading from it.  The link is
    reconnected as usual; nothing already accepted is lost.
    """

    ilm_event: ClassVar[str] = "link_timeout"


class ConnectionLimitReached(ILMError):
    """
    A stream network refused an incoming connection at once because too
    many unauthenticated connections are open already (in total, or from
    the same source address): see ``LinkSettings.max_unauthenticated``.
    """

    ilm_event: ClassVar[str] = "connection_limit"


# --- shutdown ------------------------------------------------------------------


class ShutdownTimeout(ILMError):
    """
    ``shutdown`` did not finish draining within its timeout.  ``pending`` maps
    each peer id to the number of messages still waiting for its
    acknowledgement; they remain in the store.
    """

    ilm_event = "stopped"

    def __init__(self, timeout: float, pending: Mapping[Any, int]) -> None:
        total = sum(pending.values())
        super().__init__(
            f"shutdown did not drain within {timeout} s: {total} message(s) "
            f"still unacknowledged by {len(pending)} peer(s); they stay stored"
        )
        self.timeout = timeout
        self.pending = dict(pending)


__all__ = [
    "AckOutOfRange",
    "AuthenticationFailed",
    "ConfigurationError",
    "ConnectionLimitReached",
    "DeliveryFailed",
    "FrameAuthenticationFailed",
    "FrameIntegrityMismatch",
    "FrameTooLarge",
    "ILMError",
    "InvalidPeerId",
    "LinkTimeout",
    "MalformedFrame",
    "MessageTooLarge",
    "NotRunning",
    "OutOfWindow",
    "OutboxFull",
    "PeerStoreRegressed",
    "ProtocolViolation",
    "SendRefused",
    "SendToSelf",
    "ShutdownTimeout",
    "SpoofedPeer",
    "StaleIncarnation",
    "StoppedBeforeAcknowledged",
    "StoreBehindPeer",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreInDoubt",
    "StoreLocked",
    "StoreReadOnly",
    "StoreSchemaTooNew",
    "TLSHandshakeFailed",
    "TooManyIncarnations",
    "UnexpectedFrame",
    "UnknownFrameType",
    "UnknownPeer",
    "UnsupportedVersion",
    "WrongSource",
]
