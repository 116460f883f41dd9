"""The ``custom`` fields of a model's TUF target, and the arithmetic of its chunks (pure; no I/O).

A model variant is the TUF target ``models/<name>/<version>/<variant>.<gguf|onnx>`` (DESIGN.md §4). TUF signs
its length and sha256; edgefleet adds, under ``custom.edgefleet``, what a device needs to decide *before*
downloading whether the model fits, and what it needs to verify every chunk as it arrives::

    {"format": "gguf", "quant": "q8_0", "params": 134515008, "context_length": 8192,
     "min_ram_bytes": 268435456, "arch": ["x86_64", "aarch64"], "accelerators": [], "licence": "apache-2.0",
     "chunk_size": 262144, "chunks": ["<sha256 of chunk 0>", ...]}

Invariants checked by :meth:`ModelTargetFields.from_custom` (raises ``DecodeError``): every field present and
typed; ``chunks`` has exactly ``ceil(length / chunk_size)`` entries; ``chunk_size`` within
``limits.max_chunk_bytes``. An empty ``arch`` / ``accelerators`` list means "any".

The controller builds the fields (:func:`chunk_digests`); the agent reads them only from TUF-verified target
info, so they carry the same trust as the target's length and sha256.

The same module defines the one non-model target, ``keys/assignments.json``: the controller's assignment keys
(:class:`AssignmentKeyList`, :func:`assignment_keys_from_target`), so that they rotate under TUF's rules.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from protocols.canonical import SHA256_RE, ObjectReader, canonical_json, check_int, check_str, loads_object
from protocols.errors import DecodeError
from protocols.keys import Ed25519PublicKey, keyid, public_key_from_raw, public_key_raw
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ASSIGNMENT_KEYS_CUSTOM",
    "ASSIGNMENT_KEYS_TARGET",
    "CUSTOM_KEY",
    "DEFAULT_CHUNK_SIZE",
    "AssignmentKeyList",
    "ModelTargetFields",
    "chunk_count",
    "chunk_digests",
    "assignment_keys_from_target",
    "chunk_span",
    "decode_assignment_keys",
]

CUSTOM_KEY: Final = "edgefleet"
"""The key under the target's ``custom`` object holding :class:`ModelTargetFields`."""

DEFAULT_CHUNK_SIZE: Final = 256 * 1024
"""Chunk size for new targets: well under Mosquitto's default packet limit and ``max_message_bytes``."""

_TOKEN_RE = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")


def chunk_count(length: int, chunk_size: int) -> int:
    """How many chunks a blob of ``length`` bytes has (``ceil``; a non-empty blob has at least one)."""
    return -(-length // chunk_size)


def chunk_span(index: int, length: int, chunk_size: int) -> tuple[int, int]:
    """``(offset, size)`` of chunk ``index`` in a blob of ``length`` bytes."""
    offset = index * chunk_size
    return offset, max(0, min(chunk_size, length - offset))


def chunk_digests(chunks: Iterable[bytes]) -> list[str]:
    """The sha256 hex digest of each chunk, in order."""
    return [hashlib.sha256(chunk).hexdigest() for chunk in chunks]


@dataclass(frozen=True, slots=True)
class ModelTargetFields:
    """What edgefleet adds to a model target (see the module docstring)."""

    format: str
    quant: str
    params: int
    context_length: int
    min_ram_bytes: int
    arch: tuple[str, ...]
    accelerators: tuple[str, ...]
    licence: str
    chunk_size: int
    chunks: tuple[str, ...]

    def to_custom(self) -> dict[str, Any]:
        """The ``custom`` object of the target."""
        return {
            CUSTOM_KEY: {
                "format": self.format,
                "quant": self.quant,
                "params": self.params,
                "context_length": self.context_length,
                "min_ram_bytes": self.min_ram_bytes,
                "arch": list(self.arch),
                "accelerators": list(self.accelerators),
                "licence": self.licence,
                "chunk_size": self.chunk_size,
                "chunks": list(self.chunks),
            }
        }

    @classmethod
    def from_custom(
        cls, custom: Mapping[str, Any], length: int, *, limits: Limits = DEFAULT_LIMITS
    ) -> ModelTargetFields:
        """Parse and check the fields of a target of ``length`` bytes.

        Raises:
            DecodeError: a missing or invalid field, or a chunk list that does not cover ``length``.
        """
        if CUSTOM_KEY not in custom:
            raise DecodeError(f"target has no custom.{CUSTOM_KEY} fields")
        reader = ObjectReader(custom[CUSTOM_KEY], path=f"custom.{CUSTOM_KEY}", limits=limits)
        chunk_size = reader.integer("chunk_size", lo=1, hi=limits.max_chunk_bytes)
        chunks = reader.array(
            "chunks", lambda v, p: check_str(v, p, max_len=64, pattern=SHA256_RE), max_items=limits.max_chunks
        )
        if len(chunks) != chunk_count(length, chunk_size):
            raise DecodeError(
                f"custom.{CUSTOM_KEY}.chunks: {len(chunks)} entries, but {length} bytes in chunks of {chunk_size} "
                f"need {chunk_count(length, chunk_size)}"
            )

        def token(v: object, p: str) -> str:
            return check_str(v, p, max_len=64, pattern=_TOKEN_RE)

        return cls(
            format=reader.choice("format", ("gguf", "onnx")),
            quant=reader.string("quant", pattern=_TOKEN_RE, max_len=64),
            params=reader.integer("params"),
            context_length=reader.integer("context_length"),
            min_ram_bytes=reader.integer("min_ram_bytes"),
            arch=reader.array("arch", token, max_items=32),
            accelerators=reader.array("accelerators", token, max_items=32),
            licence=reader.string("licence", max_len=128),
            chunk_size=chunk_size,
            chunks=chunks,
        )

    def fit_problem(self, *, arch: str, ram_bytes: int, accelerators: Iterable[str] = ()) -> str | None:
        """Why this target does not fit a device, or ``None`` if it does."""
        if self.arch and arch not in self.arch:
            return f"built for {', '.join(self.arch)}, this device is {arch}"
        if self.min_ram_bytes > ram_bytes:
            return f"needs {self.min_ram_bytes} bytes of RAM, this device has {ram_bytes}"
        if self.accelerators and not set(self.accelerators) & set(accelerators):
            return f"needs one of the accelerators {', '.join(self.accelerators)}"
        return None


# --- assignment keys: the controller keys that sign assignments, as a TUF target ---------------------------

ASSIGNMENT_KEYS_TARGET: Final = "keys/assignments.json"
"""The TUF target listing the assignment keys (DESIGN.md §4: they rotate under TUF's rules, not by re-enrolment)."""

ASSIGNMENT_KEYS_CUSTOM: Final = "assignment_keys"
"""The key under the target's ``custom`` object holding the document itself (so no blob has to be fetched)."""

ASSIGNMENT_KEYS_TYPE: Final = "edgefleet.assignment-keys"
MAX_ASSIGNMENT_KEYS: Final = 16
_MAX_KEYS_DOCUMENT: Final = 8192
_KEYID_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class AssignmentKeyList:
    """The assignment keys: Ed25519 public keys (raw, hex) by key id, and how many must sign an assignment.

    Wire form (canonical JSON; the document is the target's content and sits under ``custom.assignment_keys``)::

        {"type": "edgefleet.assignment-keys", "v": 1, "threshold": 1, "keys": {"<keyid>": "<64 hex>"}}

    :func:`decode_assignment_keys` checks: the exact field set, ``v`` 1, 1–16 keys, each key id the sha256 of
    its raw key (``protocols.keys.keyid``), each key a valid Ed25519 point, ``1 <= threshold <= len(keys)``.
    """

    keys: Mapping[str, str]
    threshold: int

    def to_dict(self) -> dict[str, Any]:
        """The document as a JSON object."""
        return {"type": ASSIGNMENT_KEYS_TYPE, "v": 1, "threshold": self.threshold, "keys": dict(self.keys)}

    def encode(self) -> bytes:
        """Canonical JSON bytes (what the target's length and sha256 cover)."""
        return canonical_json(self.to_dict())

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """The keys, loaded, by key id (valid once decoded)."""
        return {kid: public_key_from_raw(bytes.fromhex(raw)) for kid, raw in self.keys.items()}

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey], threshold: int = 1) -> AssignmentKeyList:
        """The list of ``keys`` (checked like a decoded one)."""
        listed = {keyid(k): public_key_raw(k).hex() for k in keys}
        return decode_assignment_keys(cls(listed, threshold).encode())


def decode_assignment_keys(data: bytes) -> AssignmentKeyList:
    """Parse and check an assignment key list (see :class:`AssignmentKeyList`).

    Raises:
        DecodeError: malformed, or any check fails.
    """
    obj = loads_object(data, max_bytes=_MAX_KEYS_DOCUMENT, max_depth=3)
    if set(obj) != {"type", "v", "threshold", "keys"}:
        raise DecodeError(f"assignment keys: fields {sorted(obj)}, expected type, v, threshold, keys")
    if obj["type"] != ASSIGNMENT_KEYS_TYPE:
        raise DecodeError(f"assignment keys: type must be {ASSIGNMENT_KEYS_TYPE!r}")
    if obj["v"] != 1 or isinstance(obj["v"], bool):
        raise DecodeError("assignment keys: v must be 1")
    keys = obj["keys"]
    if not isinstance(keys, dict) or not 1 <= len(keys) <= MAX_ASSIGNMENT_KEYS:
        raise DecodeError(f"assignment keys: keys must be an object of 1 to {MAX_ASSIGNMENT_KEYS} keys")
    for kid, raw in keys.items():
        if not _KEYID_RE.fullmatch(kid) or not isinstance(raw, str) or not _KEYID_RE.fullmatch(raw):
            raise DecodeError(f"assignment keys: {kid[:64]!r}: a key id and a key are 64 lower-case hex digits")
        key = public_key_from_raw(bytes.fromhex(raw))
        if keyid(key) != kid:
            raise DecodeError(f"assignment keys: key id {kid} is not the id of its key")
    threshold = check_int(obj["threshold"], "assignment keys: threshold", lo=1, hi=len(keys))
    return AssignmentKeyList(dict(keys), threshold)


def assignment_keys_from_target(custom: Mapping[str, Any], length: int, sha256: str | None) -> AssignmentKeyList:
    """The key list carried by a (TUF-verified) ``keys/assignments.json`` target: the canonical bytes of
    ``custom.assignment_keys`` must have the target's signed ``length`` and ``sha256``, then they are parsed.

    Raises:
        DecodeError: no list, a length or hash mismatch, or an invalid list.
    """
    document = custom.get(ASSIGNMENT_KEYS_CUSTOM)
    if not isinstance(document, dict):
        raise DecodeError(f"{ASSIGNMENT_KEYS_TARGET}: no {ASSIGNMENT_KEYS_CUSTOM} object in custom")
    try:
        data = canonical_json(document)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{ASSIGNMENT_KEYS_TARGET}: {exc}") from exc
    if len(data) != length or hashlib.sha256(data).hexdigest() != sha256:
        raise DecodeError(f"{ASSIGNMENT_KEYS_TARGET}: the key list does not match the signed length and sha256")
    return decode_assignment_keys(data)
