"""The provisioning bundle: everything a device needs to join the fleet, in one signed file.

``edge-fleet device enroll NAME`` writes it; ``edge-agent enroll BUNDLE`` checks it with :func:`decode_bundle`
and installs it. The file is a DSSE envelope (:mod:`protocols.envelope`) of payload type
:data:`BUNDLE_PAYLOAD_TYPE` whose payload is canonical JSON::

    {"type": "enrollment_bundle", "v": 1, "device": "<id>", "issued_ts_ms": <int>,
     "broker": {"host": "<name or IP>", "port": <1..65535>, "max_packet_size": <int>},
     "ca_pem": "<device CA certificate>", "cert_pem": "<device certificate>", "tls_key_pem": "<its key>",
     "signing_key_pem": "<Ed25519 device key, PKCS#8>",
     "controller_keys": {"<keyid>": "<Ed25519 public key PEM>", ...}, "controller_threshold": <int>,
     "tuf_root": "<root metadata JSON, optional>"}

It is signed by the controller keys it names. That makes the file self-certifying: it proves integrity (any
changed byte is rejected) but not, by itself, authenticity; an operator who wants that pins the controller
key id (``edge-agent enroll --expect-keyid``), which :func:`decode_bundle` then requires. The bundle carries
private keys, so it must travel like one (0600, a trusted channel) anyway.

Checks done by :func:`decode_bundle`, in order (docs/protocol.md, "Enrollment bundle"):

1. The envelope is canonical and well-formed; its payload is strict bounded JSON (read only to learn the
   controller keys, nothing else is used before step 2).
2. The envelope verifies with the controller keys it names (restricted to the pinned key ids, if any) at the
   stated threshold; every key's id is the sha256 of its raw public key.
3. Every field is valid; the device id matches :data:`~protocols.limits.DEVICE_ID_RE`.
4. The device certificate names exactly the device as its common name, is not a CA, is directly issued by
   the bundled CA (which is a CA), is within its validity period at ``now``, and its public key is the one of
   the bundled TLS key; the signing key is an Ed25519 private key.

Errors: ``DecodeError`` (malformed), ``VerificationError``/``UnknownKeyError``/``ThresholdError`` (signature,
pin, certificate chain or key mismatch), ``ExpiredError`` (certificate not yet or no longer valid).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from protocols.canonical import MAX_INT, JSONStruct, ObjectReader, canonical_json, loads_object
from protocols.envelope import KEYID_RE, sign_envelope, verify_envelope
from protocols.errors import DecodeError, ExpiredError, UnknownKeyError, VerificationError
from protocols.keys import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    keyid,
    private_key_from_pem,
    public_key_from_pem,
)
from protocols.limits import DEFAULT_LIMITS, DEVICE_ID_RE, Limits

__all__ = [
    "BUNDLE_PAYLOAD_TYPE",
    "HOST_RE",
    "BrokerAddress",
    "EnrollmentBundle",
    "decode_bundle",
    "encode_bundle",
]

BUNDLE_PAYLOAD_TYPE: Final = "application/vnd.edgefleet.enrollment.v1+json"
"""Payload type of the bundle envelope."""

BUNDLE_TYPE: Final = "enrollment_bundle"
BUNDLE_VERSION: Final = 1

HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:.]{2,45}")
"""A broker host: a DNS name or an IPv4/IPv6 literal (no brackets, no port)."""

MAX_PEM = 16 * 1024
"""Longest PEM field."""

MAX_CONTROLLER_KEYS = 16

MAX_TUF_ROOT = 128 * 1024
"""Longest root metadata document a bundle may carry."""


@dataclass(frozen=True, slots=True)
class BrokerAddress(JSONStruct):
    """Where the device connects, and the broker's largest accepted packet (MQTT ``max_packet_size``)."""

    host: str
    port: int
    max_packet_size: int

    def to_dict(self) -> dict[str, Any]:
        """Every field."""
        return {"host": self.host, "port": self.port, "max_packet_size": self.max_packet_size}

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field."""
        return cls(
            host=reader.string("host", pattern=HOST_RE, max_len=253),
            port=reader.integer("port", lo=1, hi=65535),
            max_packet_size=reader.integer("max_packet_size", lo=1024, hi=268_435_455),
        )


@dataclass(frozen=True, slots=True)
class EnrollmentBundle(JSONStruct):
    """The decoded bundle (see the module docstring for the wire form).

    Attributes:
        device: The device id; also its certificate's CN and so its broker username.
        issued_ts_ms: When the controller made the bundle.
        broker: The broker address and packet limit.
        ca_pem: The device CA certificate (the broker's server certificate is issued by it too).
        cert_pem: The device's client certificate.
        tls_key_pem: The private key of ``cert_pem`` (PKCS#8 PEM, unencrypted).
        signing_key_pem: The device's Ed25519 signing key (reports, state, audit checkpoints).
        controller_keys: The controller's Ed25519 public keys (PEM) by key id: they sign assignments and acks.
        controller_threshold: How many of them must sign an assignment.
        tuf_root: The release repository's root metadata (JSON text) the device's TUF client starts from;
            optional (absent in bundles of controllers without a repository: no release can be installed).
    """

    device: str
    issued_ts_ms: int
    broker: BrokerAddress
    ca_pem: str
    cert_pem: str
    tls_key_pem: str
    signing_key_pem: str
    controller_keys: Mapping[str, str] = field(default_factory=dict)
    controller_threshold: int = 1
    tuf_root: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The payload object, ``type`` and ``v`` included."""
        return {
            "type": BUNDLE_TYPE,
            "v": BUNDLE_VERSION,
            "device": self.device,
            "issued_ts_ms": self.issued_ts_ms,
            "broker": self.broker.to_dict(),
            "ca_pem": self.ca_pem,
            "cert_pem": self.cert_pem,
            "tls_key_pem": self.tls_key_pem,
            "signing_key_pem": self.signing_key_pem,
            "controller_keys": dict(self.controller_keys),
            "controller_threshold": self.controller_threshold,
        } | ({"tuf_root": self.tuf_root} if self.tuf_root else {})

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse and check every field's syntax (step 3); keys and certificates are checked by step 4."""
        if reader.integer("v") != BUNDLE_VERSION:
            raise DecodeError(f"v: enrollment bundle version {reader.value('v')}, this side reads {BUNDLE_VERSION}")
        if reader.string("type", max_len=64) != BUNDLE_TYPE:
            raise DecodeError(f"type: expected {BUNDLE_TYPE!r}")
        keys: dict[str, str] = {}
        for kid, pem in reader.mapping("controller_keys", max_items=MAX_CONTROLLER_KEYS).items():
            path = f"{reader.path('controller_keys')}.{kid[:64]}"
            if not KEYID_RE.fullmatch(kid):
                raise DecodeError(f"{path}: a key id is 64 lower-case hex characters")
            if not isinstance(pem, str) or len(pem) > MAX_PEM:
                raise DecodeError(f"{path}: expected a PEM string of at most {MAX_PEM} characters")
            keys[kid] = pem
        if not keys:
            raise DecodeError(f"{reader.path('controller_keys')}: at least one key")
        bundle = cls(
            device=reader.string("device", pattern=DEVICE_ID_RE, max_len=64),
            issued_ts_ms=reader.integer("issued_ts_ms", hi=MAX_INT),
            broker=reader.struct("broker", BrokerAddress),
            ca_pem=reader.string("ca_pem", max_len=MAX_PEM),
            cert_pem=reader.string("cert_pem", max_len=MAX_PEM),
            tls_key_pem=reader.string("tls_key_pem", max_len=MAX_PEM),
            signing_key_pem=reader.string("signing_key_pem", max_len=MAX_PEM),
            controller_keys=keys,
            controller_threshold=reader.integer("controller_threshold", lo=1, hi=len(keys)),
            tuf_root=reader.string("tuf_root", max_len=MAX_TUF_ROOT) if reader.present("tuf_root") else "",
        )
        return bundle

    # --- typed views (valid once decode_bundle has checked the bundle) ------------------------------------

    def controller_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """The controller keys, loaded, by key id."""
        return {kid: public_key_from_pem(pem.encode()) for kid, pem in self.controller_keys.items()}

    def signing_key(self) -> Ed25519PrivateKey:
        """The device's Ed25519 signing key."""
        return private_key_from_pem(self.signing_key_pem.encode())

    def certificate(self) -> x509.Certificate:
        """The device certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem.encode())


def encode_bundle(
    bundle: EnrollmentBundle, keys: Sequence[Ed25519PrivateKey], *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Sign ``bundle`` with the controller ``keys`` (which must be the ones it names).

    Raises:
        ValueError: a signing key is not among ``bundle.controller_keys``, or the bundle is invalid.
    """
    for key in keys:
        if keyid(key) not in bundle.controller_keys:
            raise ValueError("a bundle must be signed by the controller keys it names")
    payload = canonical_json(bundle.to_dict())
    try:
        EnrollmentBundle.from_dict(loads_object(payload, max_bytes=limits.max_message_bytes), limits=limits)
    except DecodeError as exc:
        raise ValueError(f"refusing to encode an invalid bundle: {exc}") from exc
    return sign_envelope(payload, BUNDLE_PAYLOAD_TYPE, keys, limits=limits)


def decode_bundle(
    data: bytes,
    *,
    now: dt.datetime | None = None,
    pinned_keyids: Collection[str] | None = None,
    check_time: bool = True,
    limits: Limits = DEFAULT_LIMITS,
) -> EnrollmentBundle:
    """Check a bundle file completely (steps 1–4 of the module docstring) and return it.

    Args:
        data: The file's bytes.
        now: The time to check certificate validity at (default: the current UTC time).
        pinned_keyids: If given, only these controller key ids may count toward the threshold.
        check_time: Check the certificate's validity period (off only to read an installed, expired bundle).
        limits: Size bounds.

    Raises:
        DecodeError: malformed.
        VerificationError: signature, pin, certificate chain or key mismatch.
        ExpiredError: the device certificate is not valid at ``now``.
    """
    # Step 1: the payload is read unverified only to learn which keys the bundle claims.
    claimed = EnrollmentBundle.from_dict(
        loads_object(_unverified_payload(data, limits), max_bytes=limits.max_message_bytes), limits=limits
    )
    # Step 2: verify with those keys, then parse the verified payload again (never trust the first parse).
    trusted = _load_controller_keys(claimed.controller_keys)
    if pinned_keyids is not None:
        trusted = {kid: key for kid, key in trusted.items() if kid in set(pinned_keyids)}
        if not trusted:
            raise UnknownKeyError("the bundle is not signed by any pinned controller key")
    payload = verify_envelope(
        data, trusted, threshold=claimed.controller_threshold, payload_type=BUNDLE_PAYLOAD_TYPE, limits=limits
    )
    bundle = EnrollmentBundle.from_dict(loads_object(payload, max_bytes=limits.max_message_bytes), limits=limits)
    # Step 4.
    _check_credentials(bundle, now or dt.datetime.now(dt.UTC), check_time=check_time)
    return bundle


def _unverified_payload(data: bytes, limits: Limits) -> bytes:
    envelope = loads_object(data, max_bytes=limits.max_message_bytes)
    raw = envelope.get("payload")
    if not isinstance(raw, str):
        raise DecodeError("bundle envelope has no payload string")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"bundle payload is not base64: {exc}") from exc


def _load_controller_keys(pems: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, pem in pems.items():
        key = public_key_from_pem(pem.encode())
        if keyid(key) != kid:
            raise VerificationError(f"controller key listed as {kid[:16]}... has another key id")
        keys[kid] = key
    return keys


def _load_certificate(pem: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise DecodeError(f"{what} is not a PEM X.509 certificate: {exc}") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _public_der(key: Any) -> bytes:
    data: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _check_credentials(bundle: EnrollmentBundle, now: dt.datetime, *, check_time: bool) -> None:
    ca = _load_certificate(bundle.ca_pem, "ca_pem")
    cert = _load_certificate(bundle.cert_pem, "cert_pem")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != bundle.device:
        raise VerificationError(f"the device certificate does not name exactly the device {bundle.device!r}")
    if not _is_ca(ca):
        raise VerificationError("ca_pem is not a CA certificate")
    if _is_ca(cert):
        raise VerificationError("the device certificate must not be a CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise VerificationError(f"the device certificate is not issued by the bundled CA: {exc}") from exc
    if check_time and not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ExpiredError(
            f"the device certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not at {now:%Y-%m-%d %H:%M} UTC"
        )
    try:
        tls_key = serialization.load_pem_private_key(bundle.tls_key_pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"tls_key_pem is not an unencrypted PEM private key: {exc}") from exc
    if _public_der(tls_key.public_key()) != _public_der(cert.public_key()):
        raise VerificationError("tls_key_pem is not the key of the device certificate")
    bundle.signing_key()  # DecodeError unless an Ed25519 PKCS#8 key
