"""
Mutual TLS for stream links, with node identities bound to certificates.

Every link is TLS in both directions and both sides must present a
certificate.  The TLS layer accepts any certificate so that the handshake
completes; the node id is then decided in code, after the TLS handshake
(:func:`certificate_identity`), from one of:

- a pin: ``peer_fingerprints[id]`` is the SHA-256 fingerprint of the peer's
  certificate (self-signed certificates are fine).  The pin is the whole
  trust decision: the certificate's validity dates are not checked, so a
  pinned certificate keeps working after it expires (remove the pin to
  revoke it);
- a CA: the certificate chains to one of ``ca_certificates`` (checked with
  OpenSSL, validity dates included) and carries exactly one node URI
  (:func:`node_uri`) in its subjectAltName.

Anything else fails with :class:`ilm.errors.AuthenticationFailed` and a
clear reason in the log, before the peer is told anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from zope.interface import implementer

from ilm._peerid import PeerId, check_peer_id
from ilm.errors import AuthenticationFailed

_URI_PREFIX = "urn:ilm:node:"


def node_uri(peer_id: PeerId) -> str:
    """
    The subjectAltName URI that names node ``peer_id`` in a CA-issued
    certificate: ``urn:ilm:node:int:42`` or ``urn:ilm:node:str:<percent-
    encoded UTF-8>``.
    """
    peer_id = check_peer_id(peer_id)
    if type(peer_id) is int:
        return f"{_URI_PREFIX}int:{peer_id}"
    return f"{_URI_PREFIX}str:{quote(str(peer_id), safe='')}"


def parse_node_uri(uri: str) -> PeerId | None:
    """
    :return: the node id a :func:`node_uri` names, or ``None`` if ``uri`` is
        not a valid node URI.
    """
    if not uri.startswith(_URI_PREFIX):
        return None
    kind, _, value = uri[len(_URI_PREFIX) :].partition(":")
    try:
        if kind == "int" and value.isdigit() and value.isascii():
            return check_peer_id(int(value))
        if kind == "str" and value:
            return check_peer_id(unquote(value, errors="strict"))
    except (ValueError, TypeError):
        return None
    return None


def fingerprint(certificate: x509.Certificate) -> str:
    """
    The SHA-256 fingerprint of ``certificate`` (its DER form), as lowercase
    hex without separators: what :class:`TLSCredentials` pins.
    """
    return hashlib.sha256(
        certificate.public_bytes(serialization.Encoding.DER)
    ).hexdigest()


def _normalise_fingerprint(value: str) -> str:
    cleaned = value.replace(":", "").strip().lower()
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"{value!r} is not a SHA-256 fingerprint (64 hex digits)")
    return cleaned


class TLSCredentials:
    """
    This node's certificate and how it recognises its peers'.

    :param certificate: this node's certificate (``cryptography``).
    :param private_key: its private key.
    :param peer_fingerprints: node id to the SHA-256 fingerprint of that
        node's certificate (hex, colons allowed).
    :param ca_certificates: CAs whose certificates name a node with a
        :func:`node_uri` subjectAltName.
    :param chain: intermediate certificates to send with this node's own.

    At least one of ``peer_fingerprints`` and ``ca_certificates`` is needed.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: PrivateKeyTypes,
        *,
        peer_fingerprints: Mapping[PeerId, str] | None = None,
        ca_certificates: Sequence[x509.Certificate] = (),
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        pins: dict[str, PeerId] = {}
        for peer_id, value in (peer_fingerprints or {}).items():
            peer_id = check_peer_id(peer_id)
            digest = _normalise_fingerprint(value)
            if digest in pins and pins[digest] != peer_id:
                raise ValueError(
                    f"fingerprint {digest} is pinned for both {pins[digest]!r} "
                    f"and {peer_id!r}"
                )
            pins[digest] = peer_id
        if not pins and not ca_certificates:
            raise ValueError("TLSCredentials need peer_fingerprints or ca_certificates")
        self.certificate = certificate
        self.private_key = private_key
        self._pins = pins
        self._cas = tuple(ca_certificates)
        self._chain = tuple(chain)
        self._store: crypto.X509Store | None = None
        self._creator: MutualTLSCreator | None = None

    def can_identify(self, peer_id: PeerId) -> bool:
        """
        Whether a certificate could ever prove ``peer_id``: its fingerprint
        is pinned, or a certificate authority is trusted (which may issue
        one later).
        """
        return bool(self._cas) or peer_id in self._pins.values()

    @classmethod
    def from_pem(
        cls,
        certificate: bytes,
        private_key: bytes,
        *,
        peer_fingerprints: Mapping[PeerId, str] | None = None,
        ca_certificates: bytes | None = None,
    ) -> TLSCredentials:
        """
        Build credentials from PEM data (``ca_certificates`` may hold several
        certificates).
        """
        return cls(
            x509.load_pem_x509_certificate(certificate),
            serialization.load_pem_private_key(private_key, password=None),
            peer_fingerprints=peer_fingerprints,
            ca_certificates=(
                x509.load_pem_x509_certificates(ca_certificates)
                if ca_certificates
                else ()
            ),
        )

    def creator(self) -> MutualTLSCreator:
        """
        The connection creator for ``TLSMemoryBIOFactory`` (both roles).
        """
        if self._creator is None:
            self._creator = MutualTLSCreator(self)
        return self._creator

    def identify(
        self, leaf: x509.Certificate, chain: Sequence[x509.Certificate]
    ) -> PeerId:
        """
        :return: the node id that ``leaf`` proves (``chain``: the other
            certificates the peer sent).
        :raises AuthenticationFailed: with the reason.
        """
        pinned = self._pins.get(fingerprint(leaf))
        if pinned is not None:
            return pinned
        if not self._cas:
            raise AuthenticationFailed(
                f"peer certificate {fingerprint(leaf)} is not pinned for any node"
            )
        store = self._trust_store()
        untrusted = [crypto.X509.from_cryptography(c) for c in chain if c != leaf]
        try:
            crypto.X509StoreContext(
                store, crypto.X509.from_cryptography(leaf), untrusted
            ).verify_certificate()
        except crypto.X509StoreContextError as error:
            raise AuthenticationFailed(
                f"peer certificate is neither pinned nor valid under the "
                f"configured CA: {error}"
            )
        try:
            names = leaf.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            names = []
        ids = {parse_node_uri(name) for name in names} - {None}
        if len(ids) != 1:
            raise AuthenticationFailed(
                f"CA-issued peer certificate names {len(ids)} ILM nodes in its "
                f"subjectAltName (exactly one {_URI_PREFIX}... URI is required)"
            )
        (peer_id,) = ids
        assert peer_id is not None
        return peer_id

    def _trust_store(self) -> crypto.X509Store:
        if self._store is None:
            store = crypto.X509Store()
            for ca in self._cas:
                store.add_cert(crypto.X509.from_cryptography(ca))
            self._store = store
        return self._store


def _accept_any(
    connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int
) -> bool:
    # The identity is decided after the handshake, in code (see identify):
    # here any certificate is accepted so that the reason for a refusal can
    # be logged clearly instead of surfacing as an opaque TLS alert.
    return True


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class MutualTLSCreator:
    """
    Creates OpenSSL connections that present this node's certificate and
    require one from the peer (TLS 1.2 or later).
    """

    def __init__(self, credentials: TLSCredentials) -> None:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(credentials.private_key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(credentials.certificate),
            extraCertChain=[
                crypto.X509.from_cryptography(c) for c in credentials._chain
            ],
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        context: SSL.Context = options.getContext()
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _accept_any
        )
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def certificate_identity(transport: object, credentials: TLSCredentials) -> PeerId:
    """
    :return: the node id proved by the certificate the peer presented on
        ``transport`` (a TLS transport whose handshake has completed).
    :raises AuthenticationFailed: no TLS, no certificate, or not recognised.
    """
    get_handle = getattr(transport, "getHandle", None)
    connection = get_handle() if get_handle is not None else None
    if not isinstance(connection, SSL.Connection):
        raise AuthenticationFailed("link is not TLS but certificates are required")
    leaf = connection.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        raise AuthenticationFailed("peer presented no TLS certificate")
    chain = connection.get_peer_cert_chain(as_cryptography=True) or []
    return credentials.identify(leaf, chain)


_TLS_HINTS = (
    ("did not return a certificate", "the peer presented no certificate"),
    ("certificate required", "the peer required a certificate"),
    ("unsupported protocol", "the peer offers only TLS versions older than 1.2"),
    ("version too low", "the peer offers only TLS versions older than 1.2"),
    ("no protocols available", "the peer offers only TLS versions older than 1.2"),
    ("wrong version number", "the peer does not speak TLS (plaintext or garbage)"),
    ("http request", "the peer does not speak TLS (plaintext or garbage)"),
    ("packet length too long", "the peer does not speak TLS (plaintext or garbage)"),
    ("record layer failure", "the peer does not speak TLS (plaintext or garbage)"),
)


def tls_error_text(error: BaseException | None) -> str | None:
    """
    :return: for an OpenSSL error (a failed TLS handshake), what it most
        likely means followed by OpenSSL's own reasons; ``None`` for any
        other error.
    """
    if not isinstance(error, SSL.Error):
        return None
    reasons: list[str] = []
    details = error.args[0] if error.args else None
    if isinstance(details, list):
        for item in details:
            if isinstance(item, tuple) and item and item[-1]:
                reasons.append(str(item[-1]))
    text = "; ".join(reasons) or str(error) or type(error).__name__
    lowered = text.lower()
    for needle, hint in _TLS_HINTS:
        if needle in lowered:
            return f"{hint} (OpenSSL: {text})"
    return f"TLS handshake failed (OpenSSL: {text})"
