"""
Certificates made in the test with ``cryptography``: a CA, certificates it
issues (with node URIs in their subjectAltName), and self-signed ones.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ilm import PeerId
from ilm.network import node_uri

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: str, key: Key, days: int = 1, age: float = 0
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=age)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(name: str = "ILM test CA") -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(name, name, key, days=2)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def issue(
    ca: tuple[x509.Certificate, Key], *node_ids: PeerId, expired: bool = False
) -> tuple[x509.Certificate, Key]:
    """
    A certificate signed by ``ca`` naming ``node_ids`` in its SAN.
    """
    ca_certificate, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(
        f"node {node_ids!r}",
        ca_certificate.subject.rfc4514_string().removeprefix("CN="),
        key,
        age=3 if expired else 0,
    )
    if node_ids:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(node_uri(n)) for n in node_ids]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def self_signed(
    name: str = "self-signed node", expired: bool = False
) -> tuple[x509.Certificate, Key]:
    """
    A self-signed certificate, valid now or (``expired``) until two days
    ago.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(name, name, key, age=3 if expired else 0)
    return builder.sign(key, hashes.SHA256()), key
