"""Unit tests for protocols/keys.py: serialisation round trips, key ids and signature checks."""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import DecodeError, VerificationError
from protocols.keys import (
    RAW_PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    generate_private_key,
    keyid,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_pem,
    public_key_from_raw,
    public_key_raw,
    public_key_to_pem,
    verify_signature,
)

pytestmark = pytest.mark.unit

KEY = generate_private_key()
OTHER_KEY = generate_private_key()
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PRIVATE_PEM = EC_KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
EC_PUBLIC_PEM = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def test_private_pem_round_trip_plain() -> None:
    """An unencrypted private key PEM loads back to the same key."""
    pem = private_key_to_pem(KEY)
    assert b"ENCRYPTED" not in pem
    assert keyid(private_key_from_pem(pem)) == keyid(KEY)


def test_private_pem_round_trip_encrypted() -> None:
    """A password-encrypted private key PEM loads back to the same key with the password, only with it."""
    pem = private_key_to_pem(KEY, password=b"correct horse")
    assert b"ENCRYPTED" in pem
    assert keyid(private_key_from_pem(pem, password=b"correct horse")) == keyid(KEY)
    with pytest.raises(DecodeError):
        private_key_from_pem(pem, password=b"wrong horse")
    with pytest.raises(DecodeError):
        private_key_from_pem(pem)


def test_public_pem_round_trip() -> None:
    """A public key PEM (from the public or the private half) loads back to the same key."""
    for source in (KEY, KEY.public_key()):
        assert public_key_raw(public_key_from_pem(public_key_to_pem(source))) == public_key_raw(KEY)


def test_raw_round_trip() -> None:
    """The 32 raw public key bytes load back to the same key."""
    raw = public_key_raw(KEY)
    assert len(raw) == RAW_PUBLIC_KEY_BYTES
    assert public_key_raw(public_key_from_raw(raw)) == raw


@given(st.binary().filter(lambda b: len(b) != RAW_PUBLIC_KEY_BYTES))
def test_raw_wrong_length_rejected(raw: bytes) -> None:
    """Raw public keys of any length other than 32 bytes are rejected with DecodeError."""
    with pytest.raises(DecodeError):
        public_key_from_raw(raw)


def test_keyid_stable_and_hex() -> None:
    """The key id is 64 lower-case hex characters, the same for the private half, public half and reloads."""
    kid = keyid(KEY)
    assert re.fullmatch(r"[0-9a-f]{64}", kid)
    assert keyid(KEY.public_key()) == kid
    assert keyid(public_key_from_pem(public_key_to_pem(KEY))) == kid
    assert keyid(private_key_from_pem(private_key_to_pem(KEY))) == kid
    assert keyid(OTHER_KEY) != kid


def test_ec_private_pem_rejected() -> None:
    """A PEM private key that is not Ed25519 (here EC P-256) is rejected with DecodeError."""
    with pytest.raises(DecodeError, match="Ed25519"):
        private_key_from_pem(EC_PRIVATE_PEM)


def test_ec_public_pem_rejected() -> None:
    """A PEM public key that is not Ed25519 (here EC P-256) is rejected with DecodeError."""
    with pytest.raises(DecodeError, match="Ed25519"):
        public_key_from_pem(EC_PUBLIC_PEM)


@pytest.mark.parametrize("data", [b"", b"not a pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_garbage_pem_rejected(data: bytes) -> None:
    """Bytes that are not a PEM key are rejected with DecodeError, for private and public loaders."""
    with pytest.raises(DecodeError):
        private_key_from_pem(data)
    with pytest.raises(DecodeError):
        public_key_from_pem(data)


@given(data=st.binary(max_size=256))
def test_verify_signature_accepts_valid(data: bytes) -> None:
    """A signature by the key over the same data verifies."""
    verify_signature(KEY.public_key(), KEY.sign(data), data)


@given(
    data=st.binary(max_size=256),
    position=st.integers(0, SIGNATURE_BYTES - 1),
    mask=st.integers(1, 255),
)
def test_verify_signature_rejects_flipped_signature(data: bytes, position: int, mask: int) -> None:
    """Flipping any bits of any signature byte makes verification fail with VerificationError."""
    signature = bytearray(KEY.sign(data))
    signature[position] ^= mask
    with pytest.raises(VerificationError):
        verify_signature(KEY.public_key(), bytes(signature), data)


@given(data=st.binary(max_size=256), extra=st.binary(min_size=1, max_size=8))
def test_verify_signature_rejects_other_data_key_or_length(data: bytes, extra: bytes) -> None:
    """A signature fails for other data, another key, or with a wrong length."""
    signature = KEY.sign(data)
    with pytest.raises(VerificationError):
        verify_signature(KEY.public_key(), signature, data + extra)
    with pytest.raises(VerificationError):
        verify_signature(OTHER_KEY.public_key(), signature, data)
    with pytest.raises(VerificationError):
        verify_signature(KEY.public_key(), signature + extra, data)
    with pytest.raises(VerificationError):
        verify_signature(KEY.public_key(), signature[:-1], data)
