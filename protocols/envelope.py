"""DSSE-style signed envelopes: the signature wrapper of every signed control message.

An envelope is one JSON object::

    {"payload": "<base64>", "payloadType": "<type>", "signatures": [{"keyid": "<64 hex>", "sig": "<base64>"}]}

Each ``sig`` is an Ed25519 signature over the DSSE pre-authentication encoding (:func:`pae`) of the
payload type and the *raw* payload bytes, so the type is signed too and a payload can never be
re-interpreted as another message kind.

Invariants:

- Verify first, parse later (the sigstore habit): :func:`verify_envelope` returns the payload bytes exactly
  as they were signed, and only after a threshold of *distinct trusted* key ids verified. Callers parse
  the payload only after that; nothing is ever re-serialised in order to be verified.
- Parsing is strict and bounded by :class:`~protocols.limits.Limits`: total size, number of signatures,
  exact field set, field types, key id syntax (64 lower-case hex), payload type syntax
  (:data:`PAYLOAD_TYPE_RE`), strict *canonical* base64 (no whitespace, correct padding, zero unused bits)
  and a canonical JSON form (sorted keys, compact separators, UTF-8). Every accepted envelope therefore
  has exactly one byte encoding: an envelope cannot be altered, even in a way that keeps its meaning,
  without being rejected, and its sha256 identifies it.
- A trusted key counts at most once however many signature entries carry its key id; an entry by a
  trusted key whose signature fails does not count; entries by untrusted key ids are ignored.
- Errors (see :mod:`protocols.errors`): :class:`DecodeError` for malformed envelopes,
  :class:`VerificationError` for a payload type other than the expected one, :class:`UnknownKeyError`
  when no trusted key signed validly, :class:`ThresholdError` when some but too few did. Misuse by the
  caller (a threshold below 1, a mapping whose key id does not match its key, signing with no key) is a
  programming error and raises :class:`ValueError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.canonical import canonical_json, loads_object
from protocols.errors import DecodeError, ThresholdError, UnknownKeyError, VerificationError
from protocols.keys import SIGNATURE_BYTES, keyid, verify_signature
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "KEYID_RE",
    "PAYLOAD_TYPE_RE",
    "add_signature",
    "pae",
    "peek_payload_type",
    "resign_own",
    "sign_envelope",
    "verify_envelope",
]

#: Key ids: lower-case hex sha256 of the raw public key (see :func:`protocols.keys.keyid`).
KEYID_RE = re.compile(r"[0-9a-f]{64}")

#: Payload types: a media-type-like name such as ``application/vnd.edgefleet.assignment.v1+json``. Only
#: characters that JSON never escapes are allowed, which keeps the canonical form unique and readable.
PAYLOAD_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+/_-]{0,127}")

_FIELDS = frozenset({"payload", "payloadType", "signatures"})
_SIGNATURE_FIELDS = frozenset({"keyid", "sig"})


@dataclass(frozen=True, slots=True)
class _Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class _Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[_Signature, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE v1 pre-authentication encoding: the exact bytes every signature covers.

    ``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` where ``LEN`` is the byte
    length in ASCII decimal and ``type`` is UTF-8.

    Args:
        payload_type: The envelope's ``payloadType``.
        payload: The raw payload bytes.

    Returns:
        The bytes to sign or verify.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(
    payload: bytes,
    payload_type: str,
    keys: Sequence[Ed25519PrivateKey],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Sign ``payload`` with every key in ``keys`` and wrap it in an envelope.

    Several keys of the same id sign once. More signatures can be added later by other signers with
    :func:`add_signature` (threshold signing).

    Args:
        payload: The raw payload bytes (usually canonical JSON of a message).
        payload_type: The payload type; must match :data:`PAYLOAD_TYPE_RE`.
        keys: The signing keys, at least one.
        limits: The limits the receiver will apply; the envelope must fit them.

    Returns:
        The envelope as canonical JSON bytes.

    Raises:
        ValueError: No key, an invalid payload type, or an envelope the receiver would reject as too
            large or carrying too many signatures.
    """
    if not keys:
        raise ValueError("sign_envelope needs at least one key")
    if not PAYLOAD_TYPE_RE.fullmatch(payload_type):
        raise ValueError(f"invalid payload type {payload_type!r}: must match {PAYLOAD_TYPE_RE.pattern}")
    message = pae(payload_type, payload)
    signatures: dict[str, _Signature] = {}
    for key in keys:
        kid = keyid(key)
        if kid not in signatures:
            signatures[kid] = _Signature(kid, key.sign(message))
    return _encode(_Envelope(payload_type, payload, tuple(signatures.values())), limits)


def resign_own(envelope: bytes, keys: Sequence[Ed25519PrivateKey], *, limits: Limits = DEFAULT_LIMITS) -> bytes | None:
    """The same payload and payload type signed anew by ``keys`` only; None if ``keys`` signed it already.

    For a sender's *own* stored envelopes after its key changed (a device re-enrolled under the same id, whose
    queued reports carry the old key's signature). Nothing is verified: never use it on received data.

    Raises:
        DecodeError: ``envelope`` is malformed.
        ValueError: as :func:`sign_envelope`.
    """
    decoded = _decode(envelope, limits)
    wanted = {keyid(key) for key in keys}
    if wanted <= {sig.keyid for sig in decoded.signatures}:
        return None
    return sign_envelope(decoded.payload, decoded.payload_type, keys, limits=limits)


def add_signature(envelope: bytes, key: Ed25519PrivateKey, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Add ``key``'s signature to an existing envelope (threshold signing by several operators).

    The envelope is parsed as strictly as :func:`verify_envelope` does, but its existing signatures are
    *not* verified: the signer vouches for the payload it signs, so it must have checked the payload
    itself. Any existing entry with ``key``'s key id is replaced, so adding twice is harmless.

    Args:
        envelope: An envelope made by :func:`sign_envelope` or :func:`add_signature`.
        key: The additional signing key.
        limits: The limits to parse with; the result must fit them too.

    Returns:
        The envelope with the signature added, as canonical JSON bytes.

    Raises:
        DecodeError: ``envelope`` is malformed.
        ValueError: The result would carry more signatures than ``limits`` allow or be too large.
    """
    parsed = _decode(envelope, limits)
    kid = keyid(key)
    others = tuple(s for s in parsed.signatures if s.keyid != kid)
    added = _Signature(kid, key.sign(pae(parsed.payload_type, parsed.payload)))
    return _encode(_Envelope(parsed.payload_type, parsed.payload, (*others, added)), limits)


def verify_envelope(
    data: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    threshold: int,
    payload_type: str,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Verify an envelope and return its payload bytes, exactly as signed.

    Steps: parse the envelope strictly; require ``payloadType == payload_type``; verify each signature
    whose key id is in ``trusted`` over ``pae(payloadType, payload)``; count distinct key ids that
    verified; return the payload once that count reaches ``threshold``.

    Args:
        data: The envelope bytes as received.
        trusted: Trusted public keys by key id (each id must be ``keyid(key)``).
        threshold: How many distinct trusted keys must have signed, at least 1.
        payload_type: The payload type this caller expects.
        limits: Size and count bounds.

    Returns:
        The raw payload bytes; parse them only now.

    Raises:
        ValueError: ``threshold < 1``, or a ``trusted`` entry whose key id is not its key's id.
        DecodeError: The envelope is malformed.
        VerificationError: The payload type is not ``payload_type``.
        UnknownKeyError: No trusted key signed validly.
        ThresholdError: Some, but fewer than ``threshold``, distinct trusted keys signed validly.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    envelope = _decode(data, limits)
    if envelope.payload_type != payload_type:
        raise VerificationError(f"payload type {envelope.payload_type!r} is not the expected {payload_type!r}")
    message = pae(envelope.payload_type, envelope.payload)
    verified: set[str] = set()
    for signature in envelope.signatures:
        if signature.keyid in verified:
            continue  # a key counts once, however many entries carry its id
        key = trusted.get(signature.keyid)
        if key is None:
            continue  # untrusted key ids are ignored, not errors: other signers may be trusted
        if keyid(key) != signature.keyid:
            raise ValueError(f"trusted key listed under key id {signature.keyid} has a different key id")
        try:
            verify_signature(key, signature.sig, message)
        except VerificationError:
            continue  # a bad signature by a trusted key does not count
        verified.add(signature.keyid)
    if not verified:
        raise UnknownKeyError(f"no valid signature by any of {len(trusted)} trusted key(s)")
    if len(verified) < threshold:
        raise ThresholdError(f"{len(verified)} distinct trusted key(s) signed validly, the threshold is {threshold}")
    return envelope.payload


def peek_payload_type(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> str:
    """The ``payloadType`` of an envelope, **unverified**: for dispatch only, never for trust decisions.

    The envelope is parsed as strictly as :func:`verify_envelope` does, but no signature is checked;
    the caller must still pass the returned type (or the one it expects) to :func:`verify_envelope`.

    Args:
        data: The envelope bytes as received.
        limits: Size and count bounds.

    Returns:
        The envelope's payload type.

    Raises:
        DecodeError: The envelope is malformed.
    """
    return _decode(data, limits).payload_type


def _encode(envelope: _Envelope, limits: Limits) -> bytes:
    if len(envelope.signatures) > limits.max_signatures:
        raise ValueError(f"{len(envelope.signatures)} signatures exceed the limit of {limits.max_signatures}")
    data = canonical_json(
        {
            "payload": base64.b64encode(envelope.payload).decode("ascii"),
            "payloadType": envelope.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in envelope.signatures
            ],
        }
    )
    if len(data) > limits.max_message_bytes:
        raise ValueError(f"envelope of {len(data)} bytes exceeds the limit of {limits.max_message_bytes}")
    return data


def _b64decode(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise DecodeError(f"envelope field {field!r} must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError(f"envelope field {field!r} is not valid base64: {exc}") from exc
    # validate=True still accepts non-zero unused bits in the last character ("QR==" decodes like
    # "QQ=="); requiring the canonical encoding makes every accepted envelope non-malleable.
    if base64.b64encode(raw).decode("ascii") != value:
        raise DecodeError(f"envelope field {field!r} is not canonical base64")
    return raw


def _decode_signature(entry: object, index: int) -> _Signature:
    if not isinstance(entry, dict):
        raise DecodeError(f"signature {index} must be a JSON object, got {type(entry).__name__}")
    if set(entry) != _SIGNATURE_FIELDS:
        raise DecodeError(f"signature {index} must have exactly the fields keyid and sig, got {sorted(entry)}")
    kid = entry["keyid"]
    if not isinstance(kid, str) or not KEYID_RE.fullmatch(kid):
        raise DecodeError(f"signature {index} has an invalid keyid: expected 64 lower-case hex characters")
    sig = _b64decode(entry["sig"], f"signatures[{index}].sig")
    if len(sig) != SIGNATURE_BYTES:
        raise DecodeError(f"signature {index} is {len(sig)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}")
    return _Signature(kid, sig)


def _decode(data: bytes, limits: Limits) -> _Envelope:
    # Size, UTF-8, duplicate keys, nesting depth and "top level is an object" are checked by loads_object.
    obj = loads_object(data, max_bytes=limits.max_message_bytes)
    if set(obj) != _FIELDS:
        raise DecodeError(f"envelope must have exactly the fields {sorted(_FIELDS)}, got {sorted(obj)}")

    payload_type = obj["payloadType"]
    if not isinstance(payload_type, str) or not PAYLOAD_TYPE_RE.fullmatch(payload_type):
        raise DecodeError(f"invalid payloadType: must be a string matching {PAYLOAD_TYPE_RE.pattern}")
    payload = _b64decode(obj["payload"], "payload")

    entries = obj["signatures"]
    if not isinstance(entries, list):
        raise DecodeError(f"envelope field 'signatures' must be a list, got {type(entries).__name__}")
    if not entries:
        raise DecodeError("envelope carries no signature")
    if len(entries) > limits.max_signatures:
        raise DecodeError(f"envelope carries {len(entries)} signatures, the limit is {limits.max_signatures}")
    signatures = tuple(_decode_signature(entry, i) for i, entry in enumerate(entries))

    # Last, so that the messages above name the actual defect: one byte encoding per envelope.
    if canonical_json(obj) != data:
        raise DecodeError("envelope is not canonical JSON (sorted keys, compact separators, UTF-8)")
    return _Envelope(payload_type, payload, signatures)
