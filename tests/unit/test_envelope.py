"""Unit tests for protocols/envelope.py: signing, strict parsing and threshold verification."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.envelope import (
    PAYLOAD_TYPE_RE,
    add_signature,
    pae,
    peek_payload_type,
    resign_own,
    sign_envelope,
    verify_envelope,
)
from protocols.errors import (
    DecodeError,
    ProtocolError,
    ThresholdError,
    UnknownKeyError,
    VerificationError,
)
from protocols.keys import Ed25519PrivateKey, Ed25519PublicKey, generate_private_key, keyid
from protocols.limits import DEFAULT_LIMITS, Limits

pytestmark = pytest.mark.unit

PT = "application/vnd.edgefleet.test.v1+json"
PAYLOAD = b'{"hello":"world"}'
A, B, C, D = (generate_private_key() for _ in range(4))


def trust(*keys: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    """Trusted-key mapping for ``keys``."""
    return {keyid(k): k.public_key() for k in keys}


def canonical(obj: object) -> bytes:
    """The same canonical JSON encoding the envelope module produces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def edit(envelope: bytes, change: Callable[[dict[str, Any]], object]) -> bytes:
    """Re-encode ``envelope`` canonically after ``change`` mutated its parsed JSON."""
    obj = json.loads(envelope)
    change(obj)
    return canonical(obj)


payload_types = st.from_regex(PAYLOAD_TYPE_RE, fullmatch=True)


def test_pae_matches_dsse_spec_vector() -> None:
    """PAE encodes exactly as the DSSE v1 specification's example."""
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@given(payload=st.binary(max_size=2048), payload_type=payload_types)
def test_resign_own_keeps_payload_and_type_and_carries_only_the_new_key(payload: bytes, payload_type: str) -> None:
    """An envelope re-signed after a key change verifies with the new key only, same bytes and type."""
    resigned = resign_own(sign_envelope(payload, payload_type, [A]), [B])
    assert resigned is not None
    assert verify_envelope(resigned, trust(B), threshold=1, payload_type=payload_type) == payload
    with pytest.raises(UnknownKeyError):
        verify_envelope(resigned, trust(A), threshold=1, payload_type=payload_type)
    assert resign_own(resigned, [B]) is None  # signed by that key already: nothing to do


def test_resign_own_refuses_a_malformed_envelope() -> None:
    """Re-signing never wraps bytes that are not an envelope."""
    with pytest.raises(DecodeError):
        resign_own(b'{"payload":"x"}', [A])


@given(payload=st.binary(max_size=2048), payload_type=payload_types)
def test_round_trip(payload: bytes, payload_type: str) -> None:
    """A signed envelope verifies and returns the exact payload bytes; peek sees the signed type."""
    envelope = sign_envelope(payload, payload_type, [A])
    assert verify_envelope(envelope, trust(A), threshold=1, payload_type=payload_type) == payload
    assert peek_payload_type(envelope) == payload_type


def test_envelope_is_canonical_dsse_json() -> None:
    """The envelope is canonical JSON with the DSSE fields, base64 payload and one entry per signer."""
    envelope = sign_envelope(PAYLOAD, PT, [A, B, A])
    obj = json.loads(envelope)
    assert canonical(obj) == envelope
    assert obj["payloadType"] == PT
    assert base64.b64decode(obj["payload"]) == PAYLOAD
    assert [s["keyid"] for s in obj["signatures"]] == [keyid(A), keyid(B)]
    for entry in obj["signatures"]:
        signer = trust(A, B)[entry["keyid"]]
        signer.verify(base64.b64decode(entry["sig"]), pae(PT, PAYLOAD))


@given(
    data=st.data(),
    payload=st.binary(max_size=512),
    payload_type=payload_types,
    signers=st.integers(1, 3),
)
def test_flipping_any_byte_is_rejected(data: st.DataObject, payload: bytes, payload_type: str, signers: int) -> None:
    """Flipping any bits of any byte of a signed envelope makes verification raise, never return."""
    keys = [A, B, C][:signers]
    envelope = bytearray(sign_envelope(payload, payload_type, keys))
    position = data.draw(st.integers(0, len(envelope) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    envelope[position] ^= mask
    with pytest.raises((DecodeError, VerificationError)):
        verify_envelope(bytes(envelope), trust(*keys), threshold=signers, payload_type=payload_type)


@given(data=st.binary(max_size=1024))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    """Arbitrary bytes never verify and only ever raise a ProtocolError."""
    with pytest.raises(ProtocolError):
        verify_envelope(data, trust(A), threshold=1, payload_type=PT)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@given(value=json_values)
def test_arbitrary_json_raises_decode_error(value: object) -> None:
    """Any JSON document that is not an envelope is rejected with DecodeError."""
    with pytest.raises(DecodeError):
        verify_envelope(canonical(value), trust(A), threshold=1, payload_type=PT)


def test_untrusted_key_is_unknown_key_error() -> None:
    """An envelope signed only by untrusted keys raises UnknownKeyError."""
    envelope = sign_envelope(PAYLOAD, PT, [C, D])
    with pytest.raises(UnknownKeyError):
        verify_envelope(envelope, trust(A, B), threshold=1, payload_type=PT)


def test_below_threshold_is_threshold_error() -> None:
    """Fewer distinct trusted signers than the threshold raises ThresholdError; untrusted ones do not help."""
    envelope = sign_envelope(PAYLOAD, PT, [A, C, D])
    with pytest.raises(ThresholdError):
        verify_envelope(envelope, trust(A, B), threshold=2, payload_type=PT)


def test_duplicate_signatures_count_once() -> None:
    """Two copies of one key's signature count as one signer: threshold 2 fails, threshold 1 passes."""
    envelope = sign_envelope(PAYLOAD, PT, [A])
    doubled = edit(envelope, lambda obj: obj["signatures"].append(dict(obj["signatures"][0])))
    assert len(json.loads(doubled)["signatures"]) == 2
    with pytest.raises(ThresholdError):
        verify_envelope(doubled, trust(A, B), threshold=2, payload_type=PT)
    assert verify_envelope(doubled, trust(A, B), threshold=1, payload_type=PT) == PAYLOAD


def test_two_of_three_threshold() -> None:
    """With three trusted keys and threshold 2, any two signers pass and one signer does not."""
    trusted = trust(A, B, C)
    for signers in ([A, B], [A, C], [B, C], [A, B, C]):
        envelope = sign_envelope(PAYLOAD, PT, signers)
        assert verify_envelope(envelope, trusted, threshold=2, payload_type=PT) == PAYLOAD
    for single in (A, B, C):
        with pytest.raises(ThresholdError):
            verify_envelope(sign_envelope(PAYLOAD, PT, [single]), trusted, threshold=2, payload_type=PT)


def test_add_signature_reaches_threshold() -> None:
    """Operators can sign one after another with add_signature until the threshold is met."""
    trusted = trust(A, B, C)
    first = sign_envelope(PAYLOAD, PT, [B])
    with pytest.raises(ThresholdError):
        verify_envelope(first, trusted, threshold=2, payload_type=PT)
    second = add_signature(first, C)
    assert verify_envelope(second, trusted, threshold=2, payload_type=PT) == PAYLOAD


def test_add_signature_twice_is_idempotent() -> None:
    """Adding the same key's signature again leaves one entry for it."""
    envelope = add_signature(add_signature(sign_envelope(PAYLOAD, PT, [A]), B), B)
    assert [s["keyid"] for s in json.loads(envelope)["signatures"]] == [keyid(A), keyid(B)]


def test_bad_signature_by_trusted_key_does_not_count() -> None:
    """A trusted key id whose signature is invalid does not count towards the threshold."""
    envelope = sign_envelope(PAYLOAD, PT, [A, B])
    forged = base64.b64encode(B.sign(pae(PT, b"other payload"))).decode()
    tampered = edit(envelope, lambda obj: obj["signatures"][1].update(sig=forged))
    with pytest.raises(ThresholdError):
        verify_envelope(tampered, trust(A, B), threshold=2, payload_type=PT)
    assert verify_envelope(tampered, trust(A, B), threshold=1, payload_type=PT) == PAYLOAD


def test_signature_under_other_keyid_does_not_count() -> None:
    """A valid signature filed under another trusted key's id does not verify."""
    envelope = sign_envelope(PAYLOAD, PT, [A])
    relabelled = edit(envelope, lambda obj: obj["signatures"][0].update(keyid=keyid(B)))
    with pytest.raises(UnknownKeyError):
        verify_envelope(relabelled, trust(A, B), threshold=1, payload_type=PT)


def test_wrong_payload_type_rejected() -> None:
    """An envelope whose payloadType is not the expected one raises VerificationError."""
    envelope = sign_envelope(PAYLOAD, "application/vnd.edgefleet.report.v1+json", [A])
    with pytest.raises(VerificationError) as excinfo:
        verify_envelope(envelope, trust(A), threshold=1, payload_type=PT)
    assert excinfo.type is VerificationError


def test_payload_type_is_signed() -> None:
    """Changing payloadType to the expected one breaks the signatures (the type is covered by PAE)."""
    envelope = sign_envelope(PAYLOAD, "application/vnd.edgefleet.report.v1+json", [A])
    retyped = edit(envelope, lambda obj: obj.update(payloadType=PT))
    with pytest.raises(UnknownKeyError):
        verify_envelope(retyped, trust(A), threshold=1, payload_type=PT)


def test_oversized_envelope_rejected() -> None:
    """An envelope over max_message_bytes is rejected on verify (DecodeError) and on sign (ValueError)."""
    big = b"x" * DEFAULT_LIMITS.max_message_bytes
    envelope = sign_envelope(big, PT, [A], limits=Limits(max_message_bytes=2 * len(big)))
    with pytest.raises(DecodeError, match="more than the limit"):
        verify_envelope(envelope, trust(A), threshold=1, payload_type=PT)
    with pytest.raises(ValueError, match="exceeds"):
        sign_envelope(big, PT, [A])
    small = Limits(max_message_bytes=256)
    with pytest.raises(DecodeError, match="more than the limit"):
        verify_envelope(sign_envelope(b"y" * 200, PT, [A]), trust(A), threshold=1, payload_type=PT, limits=small)


def test_too_many_signatures_rejected() -> None:
    """An envelope with more than max_signatures entries is rejected, even if every signature is valid."""
    keys = [generate_private_key() for _ in range(DEFAULT_LIMITS.max_signatures + 1)]
    envelope = sign_envelope(PAYLOAD, PT, keys, limits=Limits(max_signatures=len(keys)))
    with pytest.raises(DecodeError, match="signatures"):
        verify_envelope(envelope, trust(*keys), threshold=1, payload_type=PT)
    with pytest.raises(ValueError, match="signatures"):
        sign_envelope(PAYLOAD, PT, keys)
    at_limit = sign_envelope(PAYLOAD, PT, keys[:-1])
    assert verify_envelope(at_limit, trust(*keys), threshold=len(keys) - 1, payload_type=PT) == PAYLOAD


def _valid() -> bytes:
    return sign_envelope(PAYLOAD, PT, [A])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


MALFORMED: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "not json": lambda: b"not json",
    "json array": lambda: b"[]",
    "json null": lambda: b"null",
    "json string": lambda: b'"envelope"',
    "invalid utf-8": lambda: b"\xff" + _valid(),
    "utf-8 bom": lambda: b"\xef\xbb\xbf" + _valid(),
    "trailing garbage": lambda: _valid() + b"garbage",
    "trailing whitespace": lambda: _valid() + b" ",
    "leading whitespace": lambda: b"\n" + _valid(),
    "two envelopes": lambda: _valid() + _valid(),
    "pretty printed": lambda: json.dumps(json.loads(_valid()), indent=2, sort_keys=True).encode(),
    "unsorted keys": lambda: json.dumps(dict(reversed(json.loads(_valid()).items())), separators=(",", ":")).encode(),
    "duplicate field": lambda: _valid()[:-1] + b',"payloadType":"' + PT.encode() + b'"}',
    "deep nesting": lambda: b"[" * 100_000 + b"]" * 100_000,
    "missing payload": lambda: edit(_valid(), lambda o: o.pop("payload")),
    "missing signatures": lambda: edit(_valid(), lambda o: o.pop("signatures")),
    "extra field": lambda: edit(_valid(), lambda o: o.update(extra=1)),
    "payload not a string": lambda: edit(_valid(), lambda o: o.update(payload=12)),
    "payload not base64": lambda: edit(_valid(), lambda o: o.update(payload="!!!!")),
    "payload urlsafe base64": lambda: edit(_valid(), lambda o: o.update(payload="-_-_")),
    "payload missing padding": lambda: edit(_valid(), lambda o: o.update(payload=_b64(PAYLOAD).rstrip("="))),
    "payload with newline": lambda: edit(
        _valid(), lambda o: o.update(payload=_b64(PAYLOAD)[:4] + "\n" + _b64(PAYLOAD)[4:])
    ),
    "payload non-canonical base64": lambda: edit(_valid(), lambda o: o.update(payload="QR==")),
    "payloadType empty": lambda: edit(_valid(), lambda o: o.update(payloadType="")),
    "payloadType with space": lambda: edit(_valid(), lambda o: o.update(payloadType="a b")),
    "payloadType not a string": lambda: edit(_valid(), lambda o: o.update(payloadType=["a"])),
    "signatures not a list": lambda: edit(_valid(), lambda o: o.update(signatures={})),
    "signatures empty": lambda: edit(_valid(), lambda o: o.update(signatures=[])),
    "signature not an object": lambda: edit(_valid(), lambda o: o.update(signatures=["sig"])),
    "signature extra field": lambda: edit(_valid(), lambda o: o["signatures"][0].update(x="y")),
    "signature missing sig": lambda: edit(_valid(), lambda o: o["signatures"][0].pop("sig")),
    "keyid upper-case": lambda: edit(_valid(), lambda o: o["signatures"][0].update(keyid=keyid(A).upper())),
    "keyid short": lambda: edit(_valid(), lambda o: o["signatures"][0].update(keyid=keyid(A)[:-2])),
    "keyid not a string": lambda: edit(_valid(), lambda o: o["signatures"][0].update(keyid=7)),
    "sig wrong length": lambda: edit(_valid(), lambda o: o["signatures"][0].update(sig=_b64(b"\x00" * 32))),
    "sig not base64": lambda: edit(_valid(), lambda o: o["signatures"][0].update(sig="%%%%")),
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_envelope_is_decode_error(make: Callable[[], bytes]) -> None:
    """Malformed envelopes (JSON, base64, fields, canonical form, garbage) raise DecodeError everywhere."""
    data = make()
    with pytest.raises(DecodeError):
        verify_envelope(data, trust(A), threshold=1, payload_type=PT)
    with pytest.raises(DecodeError):
        peek_payload_type(data)
    with pytest.raises(DecodeError):
        add_signature(data, B)


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_below_one_is_value_error(threshold: int) -> None:
    """A threshold below 1 is a programming error (ValueError), never a silent pass."""
    with pytest.raises(ValueError, match="threshold"):
        verify_envelope(_valid(), trust(A), threshold=threshold, payload_type=PT)


def test_trusted_mapping_with_wrong_keyid_is_value_error() -> None:
    """A trusted mapping listing a key under another key's id is a programming error (ValueError)."""
    with pytest.raises(ValueError, match="key id"):
        verify_envelope(_valid(), {keyid(A): B.public_key()}, threshold=1, payload_type=PT)


def test_sign_argument_errors() -> None:
    """Signing with no key or an invalid payload type is a programming error (ValueError)."""
    with pytest.raises(ValueError, match="key"):
        sign_envelope(PAYLOAD, PT, [])
    for bad_type in ("", "a b", "é", "a\\b", 'a"b', "x" * 129):
        with pytest.raises(ValueError, match="payload type"):
            sign_envelope(PAYLOAD, bad_type, [A])
