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
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from protocols.canonical import SHA256_RE, ObjectReader, check_str
from protocols.errors import DecodeError
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "CUSTOM_KEY",
    "DEFAULT_CHUNK_SIZE",
    "ModelTargetFields",
    "chunk_count",
    "chunk_digests",
    "chunk_span",
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
