"""GGUF header validation before llama.cpp ever sees a file: the agent's driver over :mod:`protocols.gguf`.

The parser itself is pure and shared with the controller (ADR 0006); this module opens the file and maps the
parser's :class:`~protocols.errors.DecodeError` (and any ``OSError``) to
:class:`~agent.errors.InvalidModelError` with the same message, which is what the registry, the install
pipeline and the local API expect. Everything else (:class:`GgufInfo`, :class:`GgufLimits`, the type tables,
:func:`build_gguf`) is re-exported unchanged.

Invariant: every failure of :func:`validate_gguf` / :func:`validate_gguf_bytes` is an ``InvalidModelError``
whose message names the field and its offset (see :mod:`protocols.gguf` for the checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from agent.errors import InvalidModelError
from protocols.errors import DecodeError
from protocols.gguf import (
    DEFAULT_GGUF_LIMITS,
    FILE_TYPE_NAMES,
    GGML_TYPES,
    GGUF_MAGIC,
    GgmlType,
    GgufArraySummary,
    GgufInfo,
    GgufLimits,
    GgufTensor,
    GgufValueType,
    MetadataValue,
    build_gguf,
    parse_gguf,
    parse_gguf_bytes,
)

__all__ = [
    "DEFAULT_GGUF_LIMITS",
    "FILE_TYPE_NAMES",
    "GGML_TYPES",
    "GGUF_MAGIC",
    "GgmlType",
    "GgufArraySummary",
    "GgufInfo",
    "GgufLimits",
    "GgufTensor",
    "GgufValueType",
    "MetadataValue",
    "build_gguf",
    "validate_gguf",
    "validate_gguf_bytes",
    "validate_gguf_file",
]


def validate_gguf(path: Path, limits: GgufLimits = DEFAULT_GGUF_LIMITS) -> GgufInfo:
    """Validate a GGUF file's header and return what it says.

    Reads only the header (bounded by ``limits.max_metadata_bytes``), never the tensor data.

    Args:
        path: the file.
        limits: bounds on counts, lengths and the header size.

    Returns:
        The parsed header summary.

    Raises:
        InvalidModelError: the file is not a GGUF llama.cpp can safely read (the message names the field and
            its offset), or it cannot be read.
    """
    try:
        f = path.open("rb")
    except OSError as exc:
        raise InvalidModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with f:
        return validate_gguf_file(f, limits, name=str(path))


def validate_gguf_file(f: BinaryIO, limits: GgufLimits = DEFAULT_GGUF_LIMITS, *, name: str = "the file") -> GgufInfo:
    """:func:`validate_gguf` on an open, seekable binary file object (a download still arriving:
    :meth:`agent.link.fetch.VerifiedPrefix.open`). The same parser, the same checks, the same errors
    (``name``: what a read error calls the file)."""
    try:
        return parse_gguf(f, limits)
    except DecodeError as exc:
        raise InvalidModelError(str(exc)) from exc
    except OSError as exc:
        raise InvalidModelError(f"cannot read {name}: {exc.strerror or exc}") from exc


def validate_gguf_bytes(data: bytes, limits: GgufLimits = DEFAULT_GGUF_LIMITS) -> GgufInfo:
    """:func:`validate_gguf` on a whole file held in memory (tests, small files)."""
    try:
        return parse_gguf_bytes(data, limits)
    except DecodeError as exc:
        raise InvalidModelError(str(exc)) from exc
