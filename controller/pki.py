"""The fleet's X.509 PKI for the broker's mutual TLS: a device CA, certificates, and its revocation list.

Pure functions over ``cryptography`` objects; :mod:`controller.home` writes the files (keys 0600).

Invariants:

- One CA signs the broker's server certificate, every device certificate and every controller certificate.
  Keys are ECDSA P-256 (accepted by every TLS stack a broker or device is likely to use).
- A device certificate's subject is exactly ``CN=<device id>`` with the ``clientAuth`` extended key usage;
  the broker maps that CN to the MQTT username (``use_identity_as_username``) and the client id
  (``use_username_as_clientid``), and the ACL grants ``%u`` only its own topics.
- A controller certificate's CN is :func:`controller_common_name`, which contains ``:`` and so can never be
  a device id (:data:`~protocols.limits.DEVICE_ID_RE`): no device can ever be enrolled under a controller's
  identity, and no controller name collides with a device's topics.
- The CRL lists every revoked serial; it is re-issued on each revocation and must be renewed before its
  ``next_update`` (an expired CRL makes OpenSSL refuse *every* client).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.limits import DEVICE_ID_RE

__all__ = [
    "CONTROLLER_CN_PREFIX",
    "Issued",
    "build_crl",
    "cert_pem",
    "controller_common_name",
    "create_ca",
    "issue_client_cert",
    "issue_server_cert",
    "key_pem",
    "load_cert",
    "load_key",
]

CONTROLLER_CN_PREFIX = "edge-fleet-controller:"
CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def serial(self) -> int:
        """The certificate's serial number."""
        return self.cert.serial_number


def controller_common_name(name: str) -> str:
    """The CN (and so the MQTT username and client id) of controller ``name``; never a device id."""
    cn = f"{CONTROLLER_CN_PREFIX}{name}"
    assert not DEVICE_ID_RE.fullmatch(cn)  # ':' is not in the device id alphabet
    return cn


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(name: str = "edgefleet device CA", *, days: int = 3650) -> Issued:
    """A self-signed CA certificate and key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    common_name: str,
    *,
    usage: x509.ObjectIdentifier,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    days: int,
    names: Sequence[str] = (),
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - CLOCK_SKEW)
        .not_valid_after(not_after or now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_server_cert(ca: Issued, names: Sequence[str], *, days: int = 825) -> Issued:
    """The broker's server certificate, valid for every DNS name / IP address in ``names``."""
    if not names:
        raise ValueError("a server certificate needs at least one name")
    return _leaf(
        ca,
        names[0],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=None,
        not_after=None,
        days=days,
        names=list(dict.fromkeys(names)),
    )


def issue_client_cert(
    ca: Issued,
    common_name: str,
    *,
    days: int = 730,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A client certificate for a device or a controller (``CN=common_name``, clientAuth)."""
    return _leaf(
        ca,
        common_name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=not_before,
        not_after=not_after,
        days=days,
    )


def build_crl(
    ca: Issued, revoked: Iterable[tuple[int, dt.datetime]], *, number: int, days: int = 365
) -> x509.CertificateRevocationList:
    """A CRL of ``(serial, revoked_at)`` pairs, valid for ``days``."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (written 0600 by the caller)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert(data: bytes) -> x509.Certificate:
    """Load a PEM certificate."""
    return x509.load_pem_x509_certificate(data)


def load_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Load a PEM EC private key."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"expected an EC private key, got {type(key).__name__}")
    return key
