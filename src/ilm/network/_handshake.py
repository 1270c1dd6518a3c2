"""
The stream transport's link handshake: a pure state machine, no I/O.

The initiator (the node that dialled) and the responder exchange four
frames::

    initiator                                         responder
    HELLO(version, flags_i, nonce_i, source, destination) ->
                                                      <- CHALLENGE(nonce_r, flags_r)
    PROOF(mac_i)                                      ->
                                                      <- ACCEPT(mac_r)

With pre-shared keys, ``mac_i`` and ``mac_r`` are HMAC-SHA256 over the role
and the transcript (version, both flags, both nonces, both ids:
:func:`ilm.network._wire.link_mac`) under the key the two nodes share; the
responder answers only after the initiator's proof checks out, so an
unauthenticated dialler learns nothing (not even whether the id it claims is
configured: the responder sends a CHALLENGE to every well-formed HELLO).
With TLS, each side's identity comes from its certificate (see
:mod:`ilm.network._tls`); the MACs are then empty unless keys are configured
as well, in which case both are checked.

On a pre-shared-key link without TLS, both sides normally set the
frame-tags flag: every frame after the handshake then carries a tag under
per-direction keys derived from the key and the transcript
(:attr:`LinkHandshake.frame_keys`).  Sides whose flags differ refuse the
link (:class:`FrameIntegrityMismatch`) once the peer's proof has checked
out; since the flags are covered by the proofs, nobody on the way can make
one side believe the other agrees.

A claimed id that differs from the authenticated one is :class:`SpoofedPeer`;
anything else that fails is :class:`AuthenticationFailed`.  Finding out
*which* node made a failed proof (to report :class:`SpoofedPeer`) costs one
HMAC per configured key: it is tried only with at most
``SPOOF_SEARCH_MAX_KEYS`` keys, and only while a :class:`KeySearchBudget`
allows it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping

import ilm.network._wire as _wire
from ilm._peerid import PeerId, check_peer_id
from ilm.errors import (
    AuthenticationFailed,
    ConfigurationError,
    FrameIntegrityMismatch,
    ProtocolViolation,
    SpoofedPeer,
    UnexpectedFrame,
)

SPOOF_SEARCH_MAX_KEYS = 256
"""Up to this many configured keys, a failed proof may be checked against
each key to name the node that really made it (:class:`SpoofedPeer`)."""

MIN_KEY_SIZE = 16

_SHOWN = 40


def shown(peer_id: PeerId | None) -> str:
    """
    ``repr(peer_id)``, cut to at most 40 characters: how an id that a
    stranger chose (up to 255 bytes of anything) appears in a refusal, so
    that a log line stays short.
    """
    text = repr(peer_id)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 4] + "...'"


class PreSharedKeys:
    """
    Pairwise pre-shared keys: ``keys[peer_id]`` is the secret this node
    shares with that peer (the peer holds the same secret under this node's
    id).  Keys are ``bytes`` of at least 16 bytes; use 32 random bytes.

    Each peer needs its own key: a key is what proves a peer's id, so one
    key configured for two peers would let either be taken for the other.
    The same key value for two peers raises
    :class:`ilm.errors.ConfigurationError` naming both peers (never the
    key).
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[PeerId, bytes]) -> None:
        checked: dict[PeerId, bytes] = {}
        owners: dict[bytes, PeerId] = {}
        for peer_id, key in keys.items():
            peer_id = check_peer_id(peer_id)
            if not isinstance(key, bytes) or len(key) < MIN_KEY_SIZE:
                raise ConfigurationError(
                    f"the key for peer {peer_id!r} must be bytes of at least "
                    f"{MIN_KEY_SIZE} bytes"
                )
            other = owners.get(key)
            if other is not None:
                raise ConfigurationError(
                    f"peers {other!r} and {peer_id!r} are configured with the "
                    f"same key: each peer needs its own key, or either could "
                    f"be taken for the other"
                )
            owners[key] = peer_id
            checked[peer_id] = key
        self._keys = checked

    def key_for(self, peer_id: PeerId) -> bytes | None:
        return self._keys.get(peer_id)

    def peers(self) -> frozenset[PeerId]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def holder_of(
        self, mac: bytes, role: bytes, transcript: _wire.Transcript
    ) -> PeerId | None:
        """
        :return: the peer whose key made ``mac`` (over ``transcript``), if
            any and if few enough keys are configured to try them all (one
            HMAC per key).
        """
        if len(self._keys) > SPOOF_SEARCH_MAX_KEYS:
            return None
        for peer_id, key in self._keys.items():
            if hmac.compare_digest(_wire.link_mac(key, role, transcript), mac):
                return peer_id
        return None

    def __repr__(self) -> str:
        return f"<PreSharedKeys for {len(self._keys)} peer(s)>"


class KeySearchBudget:
    """
    How many key trials (one HMAC each) a node spends per second looking
    for the real author of failed key proofs: a token bucket of ``rate``
    trials per second holding at most ``max(rate, SPOOF_SEARCH_MAX_KEYS)``.
    A search that does not fit is skipped (the refusal is then reported as
    :class:`AuthenticationFailed`, not :class:`SpoofedPeer`).

    :param rate: trials per second (0 turns the search off).
    :param now: the current time in seconds.
    """

    def __init__(self, rate: float, now: Callable[[], float]) -> None:
        if rate < 0:
            raise ValueError(f"rate must not be negative, not {rate!r}")
        self.rate = rate
        self.capacity = max(rate, float(SPOOF_SEARCH_MAX_KEYS)) if rate else 0.0
        self._now = now
        self._tokens = self.capacity
        self._updated = now()
        self.spent = 0
        """Key trials granted so far."""
        self.skipped = 0
        """Searches refused for want of budget."""

    def take(self, trials: int) -> bool:
        """
        :return: whether ``trials`` key trials may be spent now (they are
            then deducted).
        """
        now = self._now()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        if trials > self._tokens:
            self.skipped += 1
            return False
        self._tokens -= trials
        self.spent += trials
        return True


CertificateIdentity = Callable[[], PeerId]
"""Returns the node id the peer's certificate proves, or raises
:class:`AuthenticationFailed` (supplied by the protocol, which has the
transport)."""

# States.
_NEW = "new"
_AWAIT_CHALLENGE = "await CHALLENGE"
_AWAIT_ACCEPT = "await ACCEPT"
_AWAIT_HELLO = "await HELLO"
_AWAIT_PROOF = "await PROOF"
_DONE = "authenticated"


def _describe_tags(flags: int) -> str:
    if flags & _wire.FLAG_FRAME_TAGS:
        return "tags every frame"
    return "does not tag frames"


class LinkHandshake:
    """
    One side of one link's handshake.

    :param local_id: this node's id.
    :param destination: the node the initiator means to reach; ``None`` on
        the responder.
    :param keys: pre-shared keys, or ``None``.
    :param certificates: whether the peer's identity must be proved by its
        TLS certificate.
    :param frame_integrity: whether this side wants every frame after the
        handshake tagged; it takes effect only on links authenticated by
        keys without TLS (TLS protects its frames itself).
    :param key_search: asked, with a number of key trials, whether a failed
        proof may be tried against every configured key to name its real
        author; ``None`` always allows it.
    :param random_bytes: source of nonces (``os.urandom`` by default).
    """

    def __init__(
        self,
        local_id: PeerId,
        destination: PeerId | None,
        *,
        keys: PreSharedKeys | None,
        certificates: bool,
        frame_integrity: bool = True,
        key_search: Callable[[int], bool] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if keys is None and not certificates:
            raise ValueError("a link needs pre-shared keys or TLS certificates")
        self.local_id = local_id
        self.initiator = destination is not None
        self._destination = destination
        self._keys = keys
        self._certificates = certificates
        self.flags = (
            _wire.FLAG_FRAME_TAGS
            if frame_integrity and keys is not None and not certificates
            else 0
        )
        """This side's flags (HELLO or CHALLENGE)."""
        self._key_search = key_search
        self._random = random_bytes
        self._state = _NEW
        self._nonce_i = b""
        self._nonce_r = b""
        self._peer_flags = 0
        self._claimed: PeerId | None = None
        self._deferred_refusal: ProtocolViolation | None = None
        self._key: bytes | None = None
        self.refusal: ProtocolViolation | None = None
        """Set when this side refuses the link *after* sending its reply
        (the initiator sends its proof even when the peer's flags differ,
        so that the peer can log the mismatch for a peer it authenticated):
        the caller sends the reply, then closes with this reason."""
        self.peer_id: PeerId | None = None
        """The authenticated peer, once :attr:`done`."""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def state(self) -> str:
        return self._state

    @property
    def claimed_id(self) -> PeerId | None:
        """What the peer claims to be (the responder knows it from HELLO)."""
        return self._destination if self.initiator else self._claimed

    @property
    def frame_keys(self) -> tuple[bytes, bytes] | None:
        """
        Once :attr:`done`: ``(key of the frames this side sends, key of the
        frames it receives)`` if the link's frames are tagged, else
        ``None``.
        """
        if not self.done or not self.flags or self._key is None:
            return None
        initiator_key, responder_key = _wire.frame_keys(self._key, self._transcript())
        if self.initiator:
            return initiator_key, responder_key
        return responder_key, initiator_key

    def start(self) -> list[bytes]:
        """
        :return: the frames to send when the connection is made.
        """
        if self._state != _NEW:
            raise RuntimeError("handshake already started")
        if not self.initiator:
            self._state = _AWAIT_HELLO
            return []
        destination = self._destination
        assert destination is not None
        if self._keys is not None and self._keys.key_for(destination) is None:
            raise AuthenticationFailed(f"no pre-shared key for peer {destination!r}")
        self._nonce_i = self._random(_wire.NONCE_SIZE)
        self._state = _AWAIT_CHALLENGE
        return [
            _wire.encode_hello(
                _wire.LinkHello(
                    _wire.LINK_VERSION,
                    self._nonce_i,
                    self.local_id,
                    destination,
                    self.flags,
                )
            )
        ]

    def receive(
        self, kind: int, body: bytes, certificate_identity: CertificateIdentity
    ) -> list[bytes]:
        """
        Take one handshake frame from the peer.

        :return: the frames to send in reply (then, if :attr:`refusal` is
            set, close the connection with that reason).
        :raises ProtocolViolation: a typed reason to close the link.
        """
        state = self._state
        if kind == _wire.LINK_HELLO and state == _AWAIT_HELLO:
            return self._on_hello(_wire.decode_hello(body), certificate_identity)
        if kind == _wire.LINK_CHALLENGE and state == _AWAIT_CHALLENGE:
            nonce, flags = _wire.decode_challenge(body)
            return self._on_challenge(nonce, flags, certificate_identity)
        if kind == _wire.LINK_PROOF and state == _AWAIT_PROOF:
            return self._on_proof(_wire.decode_mac(body, "PROOF"))
        if kind == _wire.LINK_ACCEPT and state == _AWAIT_ACCEPT:
            self._on_accept(_wire.decode_mac(body, "ACCEPT"))
            return []
        raise UnexpectedFrame(
            f"{_wire.FRAME_NAMES.get(kind, hex(kind))} frame while the handshake "
            f"is in state {state!r}"
        )

    # -- responder -------------------------------------------------------------

    def _on_hello(
        self, hello: _wire.LinkHello, certificate_identity: CertificateIdentity
    ) -> list[bytes]:
        # A refusal that depends on this node's id waits for the proof stage:
        # refusing at once would tell a stranger which id it had guessed
        # right.  Every well-formed HELLO gets a CHALLENGE.
        if hello.destination != self.local_id:
            self._deferred_refusal = AuthenticationFailed(
                f"link addressed to node {shown(hello.destination)}; this is node "
                f"{self.local_id!r}"
            )
        elif hello.source == self.local_id:
            self._deferred_refusal = AuthenticationFailed(
                "peer claims this node's own id"
            )
        if self._certificates:
            proven = certificate_identity()
            if proven != hello.source:
                raise SpoofedPeer(
                    f"peer claims to be {shown(hello.source)} but its certificate "
                    f"proves {proven!r}"
                )
        self._claimed = hello.source
        self._peer_flags = hello.flags
        self._nonce_i = hello.nonce
        self._nonce_r = self._random(_wire.NONCE_SIZE)
        self._state = _AWAIT_PROOF
        return [_wire.encode_challenge(self._nonce_r, self.flags)]

    def _on_proof(self, mac: bytes) -> list[bytes]:
        if self._deferred_refusal is not None:
            raise self._deferred_refusal
        claimed = self._claimed
        assert claimed is not None
        keys = self._keys
        reply = b""
        if keys is not None:
            key = keys.key_for(claimed)
            expected = self._mac(key, _wire.INITIATOR_ROLE)
            if key is None or not hmac.compare_digest(expected, mac):
                holder = self._search_holder(keys, mac)
                if holder is not None and holder != claimed:
                    raise SpoofedPeer(
                        f"peer claims to be {shown(claimed)} but proved the key of "
                        f"{holder!r}"
                    )
                if key is None:
                    raise AuthenticationFailed(
                        f"peer {shown(claimed)} is not configured"
                    )
                raise AuthenticationFailed(
                    f"peer claiming to be {shown(claimed)} failed the key proof"
                )
            self._key = key
            reply = self._mac(key, _wire.RESPONDER_ROLE)
        elif mac:
            raise AuthenticationFailed(
                "peer sent a key proof but this node uses no pre-shared keys"
            )
        self._check_flags(claimed)
        self.peer_id = claimed
        self._state = _DONE
        return [_wire.encode_frame(_wire.LINK_ACCEPT, reply)]

    def _search_holder(self, keys: PreSharedKeys, mac: bytes) -> PeerId | None:
        if len(mac) != _wire.MAC_SIZE or len(keys) > SPOOF_SEARCH_MAX_KEYS:
            return None
        if self._key_search is not None and not self._key_search(len(keys)):
            return None
        return keys.holder_of(mac, _wire.INITIATOR_ROLE, self._transcript())

    # -- initiator -------------------------------------------------------------

    def _on_challenge(
        self, nonce: bytes, flags: int, certificate_identity: CertificateIdentity
    ) -> list[bytes]:
        destination = self._destination
        assert destination is not None
        if self._certificates:
            proven = certificate_identity()
            if proven != destination:
                raise SpoofedPeer(
                    f"dialled node {destination!r} but its certificate proves "
                    f"{proven!r}"
                )
        self._nonce_r = nonce
        self._peer_flags = flags
        proof = b""
        if self._keys is not None:
            self._key = self._keys.key_for(destination)
            proof = self._mac(self._key, _wire.INITIATOR_ROLE)
        self._state = _AWAIT_ACCEPT
        if flags != self.flags:
            # The proof goes out all the same (it covers both flags): the
            # peer can then tell its operator, for a peer it authenticated,
            # why the link is refused.
            self.refusal = self._mismatch(destination)
        return [_wire.encode_frame(_wire.LINK_PROOF, proof)]

    def _on_accept(self, mac: bytes) -> None:
        destination = self._destination
        assert destination is not None
        if self._keys is not None:
            expected = self._mac(self._key, _wire.RESPONDER_ROLE)
            if not hmac.compare_digest(expected, mac):
                raise AuthenticationFailed(
                    f"node answering as {destination!r} failed the key proof"
                )
        elif mac:
            raise AuthenticationFailed(
                "peer sent a key proof but this node uses no pre-shared keys"
            )
        self._check_flags(destination)
        self.peer_id = destination
        self._state = _DONE

    # -- both ------------------------------------------------------------------

    def _check_flags(self, peer: PeerId) -> None:
        if self._peer_flags != self.flags:
            raise self._mismatch(peer)

    def _mismatch(self, peer: PeerId) -> FrameIntegrityMismatch:
        return FrameIntegrityMismatch(
            f"peer {peer!r} {_describe_tags(self._peer_flags)} and this node "
            f"{_describe_tags(self.flags)}: LinkSettings.frame_integrity must be "
            f"the same on both nodes"
        )

    def _transcript(self) -> _wire.Transcript:
        initiator: PeerId | None
        responder: PeerId | None
        if self.initiator:
            initiator, responder = self.local_id, self._destination
            flags_i, flags_r = self.flags, self._peer_flags
        else:
            initiator, responder = self._claimed, self.local_id
            flags_i, flags_r = self._peer_flags, self.flags
        assert initiator is not None and responder is not None
        return _wire.Transcript(
            _wire.LINK_VERSION,
            flags_i,
            flags_r,
            self._nonce_i,
            self._nonce_r,
            initiator,
            responder,
        )

    def _mac(self, key: bytes | None, role: bytes) -> bytes:
        if key is None:
            # An unknown peer: compute over a throwaway key so that the reply
            # (and its timing) does not tell which ids are configured.
            key = self._random(32)
        return _wire.link_mac(key, role, self._transcript())
