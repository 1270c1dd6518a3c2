"""
Node identities bound to TLS certificates: SHA-256 pins and CA-issued
certificates with a node URI in their subjectAltName.
"""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from ilm.errors import AuthenticationFailed
from ilm.network import TLSCredentials, fingerprint, node_uri
from ilm.network._tls import certificate_identity, parse_node_uri

from .tls_support import issue, make_ca, self_signed


class NodeUriTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        Int and str ids (including ones needing escapes) survive the URI.
        """
        for peer_id in (0, 42, 2**63 - 1, "alice", "a:b/c d", "é"):
            self.assertEqual(parse_node_uri(node_uri(peer_id)), peer_id)
        self.assertEqual(node_uri(42), "urn:ilm:node:int:42")
        self.assertNotEqual(node_uri(42), node_uri("42"))

    def test_not_node_uris(self) -> None:
        """
        Other URIs and malformed node URIs name no node.
        """
        for uri in (
            "https://example.com",
            "urn:ilm:node:int:",
            "urn:ilm:node:int:-1",
            "urn:ilm:node:int:99999999999999999999",
            "urn:ilm:node:str:",
            "urn:ilm:node:float:1.5",
        ):
            self.assertIsNone(parse_node_uri(uri), uri)


class IdentifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = make_ca()
        own, own_key = issue(self.ca, 1)
        self.pinned, _ = self_signed("pinned")
        self.credentials = TLSCredentials(
            own,
            own_key,
            peer_fingerprints={5: fingerprint(self.pinned)},
            ca_certificates=[self.ca[0]],
        )

    def test_pinned(self) -> None:
        """
        A pinned certificate proves its node, CA or not.
        """
        self.assertEqual(self.credentials.identify(self.pinned, []), 5)

    def test_pinned_certificate_dates_are_not_checked(self) -> None:
        """
        A pinned certificate proves its node even after it expired: the pin
        is the whole trust decision (removing the pin revokes it).
        """
        expired, _key = self_signed("expired", expired=True)
        self.assertLess(
            expired.not_valid_after_utc, datetime.datetime.now(datetime.UTC)
        )
        own, own_key = self_signed()
        credentials = TLSCredentials(
            own, own_key, peer_fingerprints={6: fingerprint(expired)}
        )
        self.assertEqual(credentials.identify(expired, []), 6)

    def test_ca_issued(self) -> None:
        """
        A certificate from the CA with one node URI proves that node.
        """
        certificate, _ = issue(self.ca, "bob")
        self.assertEqual(self.credentials.identify(certificate, []), "bob")

    def test_refusals(self) -> None:
        """
        Unpinned self-signed certificates, other CAs, expired certificates,
        and CA certificates naming no node or two nodes are refused.
        """
        untrusted = "neither pinned nor valid under the configured CA"
        cases = {
            "self-signed": (self_signed()[0], untrusted),
            "other CA": (issue(make_ca("other"), 2)[0], untrusted),
            "expired": (issue(self.ca, 2, expired=True)[0], "expired"),
            "no SAN": (issue(self.ca)[0], "names 0 ILM nodes"),
            "two nodes": (issue(self.ca, 2, 3)[0], "names 2 ILM nodes"),
        }
        for name, (certificate, reason) in cases.items():
            error = self.assertRaises(
                AuthenticationFailed, self.credentials.identify, certificate, []
            )
            self.assertIn(reason, str(error), name)

    def test_pins_only(self) -> None:
        """
        Without a CA, only pinned certificates are accepted.
        """
        own, key = self_signed()
        credentials = TLSCredentials(
            own, key, peer_fingerprints={5: fingerprint(self.pinned).upper()}
        )
        self.assertEqual(credentials.identify(self.pinned, []), 5)
        error = self.assertRaises(
            AuthenticationFailed, credentials.identify, issue(self.ca, 2)[0], []
        )
        self.assertIn("not pinned", str(error))

    def test_configuration_checked(self) -> None:
        """
        Credentials need pins or a CA; fingerprints must be SHA-256 hex; one
        certificate cannot be pinned for two nodes.
        """
        own, key = self_signed()
        self.assertRaises(ValueError, TLSCredentials, own, key)
        self.assertRaises(
            ValueError, TLSCredentials, own, key, peer_fingerprints={1: "abc"}
        )
        digest = fingerprint(self.pinned)
        self.assertRaises(
            ValueError,
            TLSCredentials,
            own,
            key,
            peer_fingerprints={1: digest, 2: digest},
        )

    def test_from_pem(self) -> None:
        """
        Credentials load from PEM data; colons are allowed in fingerprints.
        """
        own, key = self_signed()
        digest = fingerprint(self.pinned)
        credentials = TLSCredentials.from_pem(
            own.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            peer_fingerprints={7: ":".join(digest[i : i + 2] for i in range(0, 64, 2))},
            ca_certificates=self.ca[0].public_bytes(serialization.Encoding.PEM),
        )
        self.assertEqual(credentials.identify(self.pinned, []), 7)
        self.assertEqual(credentials.identify(issue(self.ca, 8)[0], []), 8)

    def test_connection_creator(self) -> None:
        """
        The credentials' connection creator provides both TLS creator
        interfaces and makes connections that require a peer certificate.
        """
        from OpenSSL import SSL
        from twisted.internet.interfaces import (
            IOpenSSLClientConnectionCreator,
            IOpenSSLServerConnectionCreator,
        )
        from zope.interface.verify import verifyObject

        creator = self.credentials.creator()
        verifyObject(IOpenSSLClientConnectionCreator, creator)
        verifyObject(IOpenSSLServerConnectionCreator, creator)
        connection = creator.serverConnectionForTLS(None)
        mode = connection.get_context().get_verify_mode()
        self.assertEqual(mode, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        self.assertIs(self.credentials.creator(), creator)

    def test_plain_transport_refused(self) -> None:
        """
        When certificates are required, a transport that is not TLS proves
        nothing.
        """

        class Plain:
            def getHandle(self) -> object:
                return object()

        self.assertRaises(
            AuthenticationFailed, certificate_identity, Plain(), self.credentials
        )
        self.assertRaises(
            AuthenticationFailed, certificate_identity, object(), self.credentials
        )
