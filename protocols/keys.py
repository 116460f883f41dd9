"""Ed25519 keys: generation, serialisation and key ids.

Keys are Ed25519 everywhere in edgefleet. A key id is the lower-case hex sha256 of the 32-byte raw public
key, so the same key has the same id in every envelope, checkpoint and bundle. This module does no I/O:
callers write the PEM bytes and own the file permissions (0600 for private keys).
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.errors import DecodeError, VerificationError

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_private_key",
    "keyid",
    "private_key_from_pem",
    "private_key_to_pem",
    "public_key_from_pem",
    "public_key_from_raw",
    "public_key_raw",
    "public_key_to_pem",
    "verify_signature",
]

RAW_PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def generate_private_key() -> Ed25519PrivateKey:
    """Make a new random Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_key_raw(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a public key (of the private key's public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The key id: lower-case hex sha256 of the raw public key."""
    return hashlib.sha256(public_key_raw(key)).hexdigest()


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    """Load a public key from its 32 raw bytes.

    Raises:
        DecodeError: ``raw`` is not 32 bytes.
    """
    if len(raw) != RAW_PUBLIC_KEY_BYTES:
        raise DecodeError(f"an Ed25519 public key is {RAW_PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def private_key_to_pem(key: Ed25519PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted when ``password`` is given.

    Raises:
        ValueError: ``password`` is empty (an empty password would silently write an unencrypted key).
    """
    if password is not None and not password:
        raise ValueError("an empty password would leave the key unencrypted; pass None for no encryption")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password is not None else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def private_key_from_pem(data: bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load a PKCS#8 PEM private key; it must be Ed25519.

    Raises:
        DecodeError: not PEM, wrong password, or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"cannot load private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise DecodeError(f"expected an Ed25519 private key, got {type(key).__name__}")
    return key


def public_key_to_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key (of the private key's public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_from_pem(data: bytes) -> Ed25519PublicKey:
    """Load a SubjectPublicKeyInfo PEM public key; it must be Ed25519.

    Raises:
        DecodeError: not PEM or not an Ed25519 key.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"cannot load public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise DecodeError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


def verify_signature(key: Ed25519PublicKey, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 signature over ``data``.

    Raises:
        VerificationError: the signature does not verify.
    """
    if len(signature) != SIGNATURE_BYTES:
        raise VerificationError(f"an Ed25519 signature is {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        key.verify(signature, data)
    except InvalidSignature as exc:
        raise VerificationError("signature does not verify") from exc
