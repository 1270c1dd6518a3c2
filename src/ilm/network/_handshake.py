"""
The stream transport's link handshake: a pure state machine, no I/O.

The initiator (the node that dialled) and the responder exchange four
frames::

    initiator                                  responder
    HELLO(version, nonce_i, source, destination) ->
                                               <- CHALLENGE(nonce_r)
    PROOF(mac_i)                               ->
                                               <- ACCEPT(mac_r)

With pre-shared keys, ``mac_i`` and ``mac_r`` are HMAC-SHA256 over the role,
the version, both nonces and both ids (:func:`ilm.network._wire.link_mac`)
under the key the two nodes share; the responder answers only after the
initiator's proof checks out, so an unauthenticated dialler learns nothing
(not even whether the id it claims is configured: the responder sends a
CHALLENGE to every well-formed HELLO).  With TLS, each side's identity comes
from its certificate (see :mod:`ilm.network._tls`); the MACs are then empty
unless keys are configured as well, in which case both are checked.

A claimed id that differs from the authenticated one is :class:`SpoofedPeer`;
anything else that fails is :class:`AuthenticationFailed`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Mapping

from ilm._message import PeerId, check_peer_id
from ilm.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ProtocolViolation,
    SpoofedPeer,
    UnexpectedFrame,
)
from ilm.network import _wire

_SPOOF_SEARCH_LIMIT = 256
"""Up to this many configured keys, a failed proof is checked against each
key to name the node that really made it (:class:`SpoofedPeer`)."""

MIN_KEY_SIZE = 16


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

    def holder_of(
        self,
        mac: bytes,
        role: bytes,
        version: int,
        initiator_nonce: bytes,
        responder_nonce: bytes,
        initiator: PeerId,
        responder: PeerId,
    ) -> PeerId | None:
        """
        :return: the peer whose key made ``mac`` (over these values), if any
            and if few enough keys are configured to try them all.
        """
        if len(self._keys) > _SPOOF_SEARCH_LIMIT:
            return None
        for peer_id, key in self._keys.items():
            expected = _wire.link_mac(
                key,
                role,
                version,
                initiator_nonce,
                responder_nonce,
                initiator,
                responder,
            )
            if hmac.compare_digest(expected, mac):
                return peer_id
        return None

    def __repr__(self) -> str:
        return f"<PreSharedKeys for {sorted(map(repr, self._keys))}>"


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


class LinkHandshake:
    """
    One side of one link's handshake.

    :param local_id: this node's id.
    :param destination: the node the initiator means to reach; ``None`` on
        the responder.
    :param keys: pre-shared keys, or ``None``.
    :param certificates: whether the peer's identity must be proved by its
        TLS certificate.
    :param random_bytes: source of nonces (``os.urandom`` by default).
    """

    def __init__(
        self,
        local_id: PeerId,
        destination: PeerId | None,
        *,
        keys: PreSharedKeys | None,
        certificates: bool,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if keys is None and not certificates:
            raise ValueError("a link needs pre-shared keys or TLS certificates")
        self.local_id = local_id
        self.initiator = destination is not None
        self._destination = destination
        self._keys = keys
        self._certificates = certificates
        self._random = random_bytes
        self._state = _NEW
        self._nonce_i = b""
        self._nonce_r = b""
        self._claimed: PeerId | None = None
        self._deferred_refusal: ProtocolViolation | None = None
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
                    _wire.LINK_VERSION, self._nonce_i, self.local_id, destination
                )
            )
        ]

    def receive(
        self, kind: int, body: bytes, certificate_identity: CertificateIdentity
    ) -> list[bytes]:
        """
        Take one handshake frame from the peer.

        :return: the frames to send in reply.
        :raises ProtocolViolation: a typed reason to close the link.
        """
        state = self._state
        if kind == _wire.HELLO and state == _AWAIT_HELLO:
            return self._on_hello(_wire.decode_hello(body), certificate_identity)
        if kind == _wire.CHALLENGE and state == _AWAIT_CHALLENGE:
            nonce = _wire.decode_challenge(body)
            return self._on_challenge(nonce, certificate_identity)
        if kind == _wire.PROOF and state == _AWAIT_PROOF:
            return self._on_proof(_wire.decode_mac(body, "PROOF"))
        if kind == _wire.ACCEPT and state == _AWAIT_ACCEPT:
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
                f"link addressed to node {hello.destination!r}; this is node "
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
                    f"peer claims to be {hello.source!r} but its certificate "
                    f"proves {proven!r}"
                )
        self._claimed = hello.source
        self._nonce_i = hello.nonce
        self._nonce_r = self._random(_wire.NONCE_SIZE)
        self._state = _AWAIT_PROOF
        return [_wire.encode_challenge(self._nonce_r)]

    def _on_proof(self, mac: bytes) -> list[bytes]:
        if self._deferred_refusal is not None:
            raise self._deferred_refusal
        claimed = self._claimed
        assert claimed is not None
        keys = self._keys
        reply = b""
        if keys is not None:
            key = keys.key_for(claimed)
            expected = self._mac(key, _wire.INITIATOR_ROLE, claimed, self.local_id)
            if key is None or not hmac.compare_digest(expected, mac):
                holder = (
                    keys.holder_of(
                        mac,
                        _wire.INITIATOR_ROLE,
                        _wire.LINK_VERSION,
                        self._nonce_i,
                        self._nonce_r,
                        claimed,
                        self.local_id,
                    )
                    if len(mac) == _wire.MAC_SIZE
                    else None
                )
                if holder is not None and holder != claimed:
                    raise SpoofedPeer(
                        f"peer claims to be {claimed!r} but proved the key of "
                        f"{holder!r}"
                    )
                if key is None:
                    raise AuthenticationFailed(f"peer {claimed!r} is not configured")
                raise AuthenticationFailed(
                    f"peer claiming to be {claimed!r} failed the key proof"
                )
            reply = self._mac(key, _wire.RESPONDER_ROLE, claimed, self.local_id)
        elif mac:
            raise AuthenticationFailed(
                "peer sent a key proof but this node uses no pre-shared keys"
            )
        self.peer_id = claimed
        self._state = _DONE
        return [_wire.encode_frame(_wire.ACCEPT, reply)]

    # -- initiator -------------------------------------------------------------

    def _on_challenge(
        self, nonce: bytes, certificate_identity: CertificateIdentity
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
        proof = b""
        if self._keys is not None:
            proof = self._mac(
                self._keys.key_for(destination),
                _wire.INITIATOR_ROLE,
                self.local_id,
                destination,
            )
        self._state = _AWAIT_ACCEPT
        return [_wire.encode_frame(_wire.PROOF, proof)]

    def _on_accept(self, mac: bytes) -> None:
        destination = self._destination
        assert destination is not None
        if self._keys is not None:
            expected = self._mac(
                self._keys.key_for(destination),
                _wire.RESPONDER_ROLE,
                self.local_id,
                destination,
            )
            if not hmac.compare_digest(expected, mac):
                raise AuthenticationFailed(
                    f"node answering as {destination!r} failed the key proof"
                )
        elif mac:
            raise AuthenticationFailed(
                "peer sent a key proof but this node uses no pre-shared keys"
            )
        self.peer_id = destination
        self._state = _DONE

    def _mac(
        self, key: bytes | None, role: bytes, initiator: PeerId, responder: PeerId
    ) -> bytes:
        if key is None:
            # An unknown peer: compute over a throwaway key so that the reply
            # (and its timing) does not tell which ids are configured.
            key = self._random(32)
        return _wire.link_mac(
            key,
            role,
            _wire.LINK_VERSION,
            self._nonce_i,
            self._nonce_r,
            initiator,
            responder,
        )
