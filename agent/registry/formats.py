"""Model file formats: detection, and validation before anything else opens a file.

Invariants:

- :func:`inspect_model` is the only way a file becomes a registry model: it returns a :class:`ModelFacts`
  (format, params, context length, licence, summary metadata) or raises
  :class:`~agent.errors.InvalidModelError`.
- GGUF files go through :func:`agent.registry.gguf.validate_gguf` (header only, bounded).
- ONNX files get a cheap structural check, bounded in time and memory whatever the file size: the top level
  of the ``ModelProto`` protobuf message is walked record by record (tags, wire types, lengths within the file,
  ending exactly at EOF), large fields are skipped, not read. ``ir_version`` and a ``graph`` must be present.
  Loading the graph is the ONNX engine's job; this check only rejects files that are obviously not ONNX.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from agent.errors import InvalidModelError
from agent.registry.gguf import GGUF_MAGIC, GgufInfo, validate_gguf, validate_gguf_file

__all__ = [
    "ModelFacts",
    "ModelFormat",
    "OnnxInfo",
    "detect_format",
    "inspect_gguf_file",
    "inspect_model",
    "validate_onnx",
]

ModelFormat = Literal["gguf", "onnx"]

_ONNX_MAX_BYTES = 2**31 - 1
"""Protobuf's 2 GiB message limit; bigger ONNX models keep weights in external files, which import refuses."""
_ONNX_MAX_FIELDS = 1 << 16
_ONNX_SMALL_STRING = 4096
_ONNX_MAX_IR_VERSION = 100
# ModelProto field numbers (onnx.proto3): 1 ir_version, 2 producer_name, 3 producer_version, 4 domain,
# 5 model_version, 6 doc_string, 7 graph, 8 opset_import, 14 metadata_props, 20 training_info, 25 functions
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True, slots=True)
class OnnxInfo:
    """What the top level of an ONNX ``ModelProto`` says."""

    ir_version: int
    producer_name: str | None
    producer_version: str | None
    model_version: int | None
    opsets: dict[str, int]
    graph_bytes: int


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Facts about a validated model file, as the registry stores them."""

    format: ModelFormat
    params: int | None
    context_length: int | None
    licence: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


class _ProtoReader:
    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        self._f = f
        self.pos = start
        self.end = end

    def _fail(self, at: int, detail: str) -> InvalidModelError:
        return InvalidModelError(f"invalid ONNX: protobuf record at offset {at}: {detail}")

    def varint(self) -> int:
        at = self.pos
        self._f.seek(at)
        data = self._f.read(min(10, self.end - at))
        value = 0
        for i, byte in enumerate(data):
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                self.pos = at + i + 1
                return value
        raise self._fail(at, "truncated or over-long varint")

    def read(self, n: int) -> bytes:
        self._f.seek(self.pos)
        data = self._f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, at: int) -> None:
        if self.pos + n > self.end:
            raise self._fail(at, f"length {n} runs past the end ({self.end} bytes)")
        self.pos += n

    def fields(self) -> list[tuple[int, int, int, int]]:
        """Walk records to ``end``: (field number, wire type, value or payload length, payload offset)."""
        out: list[tuple[int, int, int, int]] = []
        while self.pos < self.end:
            if len(out) >= _ONNX_MAX_FIELDS:
                raise self._fail(self.pos, f"more than {_ONNX_MAX_FIELDS} top-level fields")
            at = self.pos
            tag = self.varint()
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise self._fail(at, "field number 0")
            if wire == _VARINT:
                out.append((number, wire, self.varint(), at))
            elif wire == _I64:
                self.skip(8, at)
                out.append((number, wire, 8, at))
            elif wire == _I32:
                self.skip(4, at)
                out.append((number, wire, 4, at))
            elif wire == _LEN:
                n = self.varint()
                payload = self.pos
                self.skip(n, at)
                out.append((number, wire, n, payload))
            else:
                raise self._fail(at, f"unsupported wire type {wire} for field {number}")
        return out


def validate_onnx(path: Path) -> OnnxInfo:
    """Check that a file is structurally an ONNX ``ModelProto`` without loading it.

    Raises:
        InvalidModelError: not a protobuf message of the ONNX model shape, or too large for one file.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise InvalidModelError("invalid ONNX: empty file")
            if size > _ONNX_MAX_BYTES:
                raise InvalidModelError(
                    f"invalid ONNX: {size} bytes is over protobuf's 2 GiB limit (external data is not supported)"
                )
            reader = _ProtoReader(f, 0, size)
            records = reader.fields()
            info: dict[str, Any] = {"opsets": {}}
            graph_bytes = 0
            for number, wire, value, payload in records:
                expected = {1: _VARINT, 2: _LEN, 3: _LEN, 5: _VARINT, 7: _LEN, 8: _LEN}.get(number)
                if expected is not None and wire != expected:
                    raise InvalidModelError(f"invalid ONNX: field {number} has wire type {wire}")
                if number == 1:
                    info["ir_version"] = value
                elif number in (2, 3) and value <= _ONNX_SMALL_STRING:
                    reader.pos = payload
                    text = reader.read(value).decode("utf-8", errors="replace")
                    info["producer_name" if number == 2 else "producer_version"] = text
                elif number == 5:
                    info["model_version"] = value
                elif number == 7:
                    graph_bytes += value
                elif number == 8 and value <= _ONNX_SMALL_STRING:
                    opset = _ProtoReader(f, payload, payload + value).fields()
                    domain, version = "", 0
                    for o_number, o_wire, o_value, o_payload in opset:
                        if o_number == 1 and o_wire == _LEN and o_value <= 256:
                            domain = (
                                _ProtoReader(f, o_payload, o_payload + o_value)
                                .read(o_value)
                                .decode("utf-8", errors="replace")
                            )
                        elif o_number == 2 and o_wire == _VARINT:
                            version = o_value
                    info["opsets"][domain or "ai.onnx"] = version
    except OSError as exc:
        raise InvalidModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    ir_version = info.get("ir_version")
    if not isinstance(ir_version, int) or not 1 <= ir_version <= _ONNX_MAX_IR_VERSION:
        raise InvalidModelError(f"invalid ONNX: ir_version missing or out of range ({ir_version})")
    if graph_bytes == 0:
        raise InvalidModelError("invalid ONNX: the model has no graph")
    return OnnxInfo(
        ir_version=ir_version,
        producer_name=info.get("producer_name"),
        producer_version=info.get("producer_version"),
        model_version=info.get("model_version"),
        opsets=info["opsets"],
        graph_bytes=graph_bytes,
    )


def detect_format(path: Path, suffix: str | None = None) -> ModelFormat:
    """Infer a model file's format from its first bytes, then its extension (``suffix`` overrides the path's).

    Raises:
        InvalidModelError: neither GGUF nor ONNX.
    """
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise InvalidModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    suffix = (path.suffix if suffix is None else suffix).lower()
    if head == GGUF_MAGIC or suffix == ".gguf":
        return "gguf"
    # an ONNX ModelProto starts with field 1 (ir_version, varint): tag byte 0x08
    if suffix == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    raise InvalidModelError("unknown model format: neither GGUF nor ONNX")


def inspect_gguf_file(f: BinaryIO) -> ModelFacts:
    """:func:`inspect_model` of a GGUF read from an open file object (the same checks as for a path).

    Used on a release download while it arrives (:class:`agent.link.fetch.VerifiedPrefix`), so that the header
    validation overlaps the transfer instead of following it.

    Raises:
        InvalidModelError: the file is not a valid GGUF model.
    """
    return _gguf_facts(validate_gguf_file(f))


def _gguf_facts(gguf: GgufInfo) -> ModelFacts:
    if gguf.tensor_count == 0:
        raise InvalidModelError("invalid GGUF: the file has no tensors (vocabulary-only files are not models)")
    return ModelFacts(
        format="gguf",
        params=gguf.parameter_count,
        context_length=gguf.context_length,
        licence=gguf.licence,
        metadata=gguf.summary(),
    )


def inspect_model(path: Path, suffix: str | None = None) -> ModelFacts:
    """Detect and validate a model file; return the facts the registry records.

    Args:
        path: the file.
        suffix: the extension the file was imported with (partial files have none of their own).

    Raises:
        InvalidModelError: the file is not a valid GGUF or ONNX model.
    """
    kind = detect_format(path, suffix)
    if kind == "gguf":
        return _gguf_facts(validate_gguf(path))
    onnx = validate_onnx(path)
    return ModelFacts(
        format="onnx",
        params=None,
        context_length=None,
        licence=None,
        metadata={
            "ir_version": onnx.ir_version,
            "producer_name": onnx.producer_name,
            "producer_version": onnx.producer_version,
            "opsets": onnx.opsets,
        },
    )
