"""GGUF header parsing and validation, pure: bytes or a binary file object in, a :class:`GgufInfo` out.

One parser for both sides (ADR 0006): the controller validates and inspects a GGUF before it quantizes, signs
or publishes it; the device validates it before llama.cpp loads it. A signed model is still untrusted input:
llama.cpp's own GGUF parser is C++ and has had memory-safety bugs. :func:`parse_gguf` reads the header
(key/value metadata and tensor infos) with bounded, buffered reads and never touches tensor data, then checks
that everything the header claims fits the file. Opening files, and deciding what a failure means, is the
caller's job (``agent/registry/gguf.py`` maps failures to ``InvalidModelError``; the controller's CLI prints
them).

Invariants (each violation raises :class:`~protocols.errors.DecodeError` naming the field and its offset):

- magic ``GGUF``, little-endian version 2 or 3;
- tensor and key/value counts, every string length, array length and array nesting depth are bounded by
  :class:`GgufLimits`, and so is the whole header (``max_metadata_bytes``, 64 MiB by default), so a hostile
  header costs at most a known amount of memory and time;
- every key is unique, valid UTF-8, and its value has a known GGUF type; ``general.architecture`` is a string;
  ``general.alignment`` (default 32) is a ``uint32`` power of two;
- every tensor has a unique name, 1 to 4 dimensions, a known ggml type whose block size divides the first
  dimension, an offset aligned to ``general.alignment``; tensors do not overlap and the data section (which
  starts at the header's end rounded up to the alignment) holds every tensor's bytes within the file.

Large arrays (tokenizer tokens, merges, token types) are walked to validate them but only summarised in
:attr:`GgufInfo.metadata` (:class:`GgufArraySummary`: item type and length). Strings inside such arrays are
length-checked but not decoded. Only little-endian files are supported.

:func:`build_gguf` writes small valid files; tests and tools use it to make real inputs instead of mocks.
"""

from __future__ import annotations

import io
import math
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO, Union

from protocols.errors import DecodeError

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
    "parse_gguf",
    "parse_gguf_bytes",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SUPPORTED_VERSIONS = (2, 3)
_KEEP_ARRAY_ITEMS = 64
"""Arrays with at most this many items are kept in the metadata; longer ones are summarised."""
_CHUNK = 1 << 20

MiB = 1 << 20


class GgufValueType(IntEnum):
    """Value types of GGUF metadata (GGUF spec, ``gguf_metadata_value_type``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS: dict[GgufValueType, str] = {
    GgufValueType.UINT8: "<B",
    GgufValueType.INT8: "<b",
    GgufValueType.UINT16: "<H",
    GgufValueType.INT16: "<h",
    GgufValueType.UINT32: "<I",
    GgufValueType.INT32: "<i",
    GgufValueType.FLOAT32: "<f",
    GgufValueType.BOOL: "<B",
    GgufValueType.UINT64: "<Q",
    GgufValueType.INT64: "<q",
    GgufValueType.FLOAT64: "<d",
}
_SCALAR_SIZES = {kind: struct.calcsize(fmt) for kind, fmt in _SCALAR_FORMATS.items()}


class GgmlType(IntEnum):
    """Tensor types of ggml (``enum ggml_type``); retired ids (4, 5, 31-33, 36-38) are absent on purpose."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


_QK_K = 256
GGML_TYPES: dict[GgmlType, tuple[int, int]] = {
    # type: (elements per block, bytes per block), derived from the block structs in ggml-common.h
    GgmlType.F32: (1, 4),
    GgmlType.F16: (1, 2),
    GgmlType.Q4_0: (32, 2 + 16),
    GgmlType.Q4_1: (32, 2 + 2 + 16),
    GgmlType.Q5_0: (32, 2 + 4 + 16),
    GgmlType.Q5_1: (32, 2 + 2 + 4 + 16),
    GgmlType.Q8_0: (32, 2 + 32),
    GgmlType.Q8_1: (32, 4 + 32),
    GgmlType.Q2_K: (_QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    GgmlType.Q3_K: (_QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    GgmlType.Q4_K: (_QK_K, 2 + 2 + _QK_K // 2 + 12),
    GgmlType.Q5_K: (_QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    GgmlType.Q6_K: (_QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    GgmlType.Q8_K: (_QK_K, 4 + _QK_K + _QK_K // 8),
    GgmlType.IQ2_XXS: (_QK_K, 2 + _QK_K // 4),
    GgmlType.IQ2_XS: (_QK_K, 2 + _QK_K // 4 + _QK_K // 32),
    GgmlType.IQ3_XXS: (_QK_K, 2 + 3 * _QK_K // 8),
    GgmlType.IQ1_S: (_QK_K, 2 + _QK_K // 8 + _QK_K // 16),
    GgmlType.IQ4_NL: (32, 2 + 16),
    GgmlType.IQ3_S: (_QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    GgmlType.IQ2_S: (_QK_K, 2 + _QK_K // 4 + _QK_K // 16),
    GgmlType.IQ4_XS: (_QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    GgmlType.I8: (1, 1),
    GgmlType.I16: (1, 2),
    GgmlType.I32: (1, 4),
    GgmlType.I64: (1, 8),
    GgmlType.F64: (1, 8),
    GgmlType.IQ1_M: (_QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    GgmlType.BF16: (1, 2),
    GgmlType.TQ1_0: (_QK_K, 2 + 4 * 13),
    GgmlType.TQ2_0: (_QK_K, 2 + 64),
    GgmlType.MXFP4: (32, 1 + 16),
}

FILE_TYPE_NAMES: dict[int, str] = {
    # llama.cpp ``enum llama_ftype`` (``general.file_type``)
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}


@dataclass(frozen=True, slots=True)
class GgufLimits:
    """Upper bounds on what a GGUF header may claim (the defaults accept every real model we know of)."""

    max_tensors: int = 1 << 16
    max_kv: int = 1 << 16
    max_key_bytes: int = 1024
    max_string_bytes: int = 4 * MiB
    """Longest string value (chat templates are the longest real ones, tens of kB)."""
    max_tensor_name_bytes: int = 255
    max_array_length: int = 1 << 24
    max_array_depth: int = 2
    """Arrays of arrays are allowed to this depth (a top-level array is depth 1)."""
    max_dims: int = 4
    max_alignment: int = 1 << 16
    max_metadata_bytes: int = 64 * MiB
    """Bound on the whole header: key/value metadata plus tensor infos."""


DEFAULT_GGUF_LIMITS = GgufLimits()


@dataclass(frozen=True, slots=True)
class GgufArraySummary:
    """A metadata array too long to keep (e.g. tokenizer tokens): its item type and length only."""

    item_type: str
    length: int


MetadataValue = Union[int, float, bool, str, list["MetadataValue"], GgufArraySummary]  # noqa: UP007


@dataclass(frozen=True, slots=True)
class GgufTensor:
    """One tensor info of the header (offset relative to the data section)."""

    name: str
    dims: tuple[int, ...]
    ggml_type: GgmlType
    offset: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GgufInfo:
    """What a validated GGUF header says about the model."""

    version: int
    file_size: int
    tensor_count: int
    kv_count: int
    metadata: Mapping[str, MetadataValue]
    architecture: str
    name: str | None
    licence: str | None
    context_length: int | None
    parameter_count: int
    file_type: int | None
    quant: str
    tensor_types: Mapping[str, int]
    has_chat_template: bool
    vocab_size: int | None
    alignment: int
    data_offset: int
    tensor_data_bytes: int
    tensors: tuple[GgufTensor, ...] = field(repr=False, default=())

    def summary(self) -> dict[str, object]:
        """A small JSON-able summary for the registry's metadata column."""
        return {
            "gguf_version": self.version,
            "architecture": self.architecture,
            "model_name": self.name,
            "context_length": self.context_length,
            "parameter_count": self.parameter_count,
            "file_type": self.file_type,
            "quant": self.quant,
            "tensor_types": dict(self.tensor_types),
            "tensor_count": self.tensor_count,
            "chat_template": self.has_chat_template,
            "vocab_size": self.vocab_size,
        }


_U64 = struct.Struct("<Q")


def _fail(what: str, offset: int, detail: str) -> DecodeError:
    return DecodeError(f"invalid GGUF: {what} at offset {offset}: {detail}")


class _Reader:
    """Sequential, buffered, bounded reads of a GGUF header.

    Never reads past ``min(file_size, max_metadata_bytes)``; every read names the field it is for, so an
    error says which field at which offset did not fit.
    """

    def __init__(self, f: BinaryIO, file_size: int, max_bytes: int) -> None:
        self._f = f
        self.size = file_size
        self._max = max_bytes
        self._buf = b""
        self._buf_start = 0
        self.pos = 0

    def _ensure(self, n: int, what: str) -> int:
        """Make ``n`` bytes at ``pos`` available; return their index in the buffer."""
        end = self.pos + n
        if end > self.size:
            raise _fail(what, self.pos, f"needs {n} bytes but the file ends at {self.size} (truncated)")
        if end > self._max:
            raise _fail(what, self.pos, f"header exceeds the metadata bound of {self._max} bytes")
        buf_end = self._buf_start + len(self._buf)
        if end > buf_end:
            keep = self._buf[self.pos - self._buf_start :] if self.pos < buf_end else b""
            read_from = max(buf_end, self.pos)
            want = min(max(end - read_from, _CHUNK), min(self.size, self._max) - read_from)
            self._f.seek(read_from)
            data = self._f.read(want)
            if len(data) < end - read_from:
                raise _fail(what, self.pos, "file shrank while reading (truncated)")
            self._buf = keep + data
            self._buf_start = self.pos
        return self.pos - self._buf_start

    def unpack(self, fmt: str, size: int, what: str) -> int | float:
        i = self._ensure(size, what)
        self.pos += size
        value: int | float = struct.unpack_from(fmt, self._buf, i)[0]
        return value

    def u32(self, what: str) -> int:
        i = self._ensure(4, what)
        self.pos += 4
        value: int = struct.unpack_from("<I", self._buf, i)[0]
        return value

    def u64(self, what: str) -> int:
        i = self._ensure(8, what)
        self.pos += 8
        value: int = struct.unpack_from("<Q", self._buf, i)[0]
        return value

    def raw(self, n: int, what: str) -> bytes:
        i = self._ensure(n, what)
        self.pos += n
        return self._buf[i : i + n]

    def skip(self, n: int, what: str) -> None:
        """Advance ``n`` bytes after checking they exist (no copy when they are not buffered)."""
        end = self.pos + n
        if end > self.size:
            raise _fail(what, self.pos, f"needs {n} bytes but the file ends at {self.size} (truncated)")
        if end > self._max:
            raise _fail(what, self.pos, f"header exceeds the metadata bound of {self._max} bytes")
        self.pos = end

    def string_length(self, what: str, bound: int) -> tuple[int, int]:
        """Read a string's uint64 length and check it against ``bound`` and the file; return (offset, n)."""
        at = self.pos
        n = self.u64(f"{what} length")
        if n > bound:
            raise _fail(what, at, f"string length {n} exceeds the bound of {bound} bytes")
        if self.pos + n > self.size:
            raise _fail(what, at, f"string length {n} runs past the end of the file ({self.size} bytes)")
        return at, n

    def skip_strings(self, count: int, bound: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings (a vocabulary: ~100k of them) with the checks of
        :meth:`string_length` and :meth:`skip`.

        The tight loop formats no field names: only a string that breaks a bound goes through the checked path,
        which raises the same error, naming the item, as reading it one by one would.
        """
        limit = min(self.size, self._max)
        unpack = _U64.unpack_from
        # positions relative to the buffer: ``i`` the current string, ``end`` the bound on a string's end
        # (``limit``), ``stop`` the end of the bytes a length prefix can be read from without a refill
        buf, start = self._buf, self._buf_start
        i, end = self.pos - start, limit - start
        stop = min(len(buf), end)
        for index in range(count):
            if i + 8 <= stop:
                n = unpack(buf, i)[0]
                if n <= bound and i + 8 + n <= end:
                    i += 8 + n
                    continue
            # not buffered yet, or out of bounds: the checked path refills the buffer or raises
            self.pos = start + i
            _, n = self.string_length(f"{what}[{index}]", bound)
            self.skip(n, f"{what}[{index}]")
            buf, start = self._buf, self._buf_start
            i, end = self.pos - start, limit - start
            stop = min(len(buf), end)
        self.pos = start + i

    def string(self, what: str, bound: int) -> str:
        at, n = self.string_length(what, bound)
        data = self.raw(n, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(what, at, f"string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


class _Parser:
    def __init__(self, reader: _Reader, limits: GgufLimits) -> None:
        self.r = reader
        self.limits = limits

    def value_type(self, what: str) -> GgufValueType:
        at = self.r.pos
        raw = self.r.u32(f"{what} type")
        try:
            return GgufValueType(raw)
        except ValueError:
            raise _fail(what, at, f"unknown GGUF value type {raw}") from None

    def value(self, kind: GgufValueType, what: str, depth: int) -> MetadataValue:
        if kind is GgufValueType.STRING:
            return self.r.string(what, self.limits.max_string_bytes)
        if kind is GgufValueType.ARRAY:
            return self.array(what, depth + 1)
        at = self.r.pos
        value = self.r.unpack(_SCALAR_FORMATS[kind], _SCALAR_SIZES[kind], what)
        if kind is GgufValueType.BOOL:
            if value not in (0, 1):
                raise _fail(what, at, f"bool value {value} is neither 0 nor 1")
            return bool(value)
        return value

    def array(self, what: str, depth: int) -> MetadataValue:
        at = self.r.pos
        if depth > self.limits.max_array_depth:
            raise _fail(what, at, f"arrays nested deeper than {self.limits.max_array_depth} levels")
        item = self.value_type(f"{what} array item")
        length_at = self.r.pos
        length = self.r.u64(f"{what} array length")
        if length > self.limits.max_array_length:
            raise _fail(what, length_at, f"array length {length} exceeds the bound of {self.limits.max_array_length}")
        min_item = _SCALAR_SIZES.get(item, 8 if item is GgufValueType.STRING else 12)
        if self.r.pos + length * min_item > min(self.r.size, self.limits.max_metadata_bytes):
            raise _fail(
                what,
                length_at,
                f"array of {length} {item.name} items runs past the end of the file or the metadata bound",
            )
        keep = length <= _KEEP_ARRAY_ITEMS
        if item in _SCALAR_SIZES and not keep:
            # values of long scalar arrays (token types, scores) are skipped, not inspected
            self.r.skip(length * _SCALAR_SIZES[item], f"{what} array data")
            return GgufArraySummary(item.name.lower(), length)
        if item is GgufValueType.STRING and not keep:
            self.r.skip_strings(length, self.limits.max_string_bytes, what)
            return GgufArraySummary("string", length)
        items = [self.value(item, f"{what}[{index}]", depth) for index in range(length)]
        if not keep:
            return GgufArraySummary(item.name.lower(), length)
        return items


def _nbytes(ggml_type: GgmlType, dims: Sequence[int]) -> tuple[int, int]:
    block, type_size = GGML_TYPES[ggml_type]
    n_elements = math.prod(dims)
    return n_elements, n_elements // block * type_size


def parse_gguf(f: BinaryIO, limits: GgufLimits = DEFAULT_GGUF_LIMITS) -> GgufInfo:
    """Parse and validate the GGUF header of a seekable binary file object, and return what it says.

    Reads only the header (bounded by ``limits.max_metadata_bytes``), never the tensor data. The file's size
    is taken by seeking to its end; the caller keeps the file open and closes it.

    Args:
        f: a seekable binary file object (an open file, ``io.BytesIO``).
        limits: bounds on counts, lengths and the header size.

    Returns:
        The parsed header summary.

    Raises:
        DecodeError: the bytes are not a GGUF llama.cpp can safely read; the message names the field and its
            offset.
        OSError: reading ``f`` failed (the caller's I/O, passed through).
    """
    file_size = f.seek(0, io.SEEK_END)
    return _parse(_Reader(f, file_size, limits.max_metadata_bytes), limits)


def parse_gguf_bytes(data: bytes, limits: GgufLimits = DEFAULT_GGUF_LIMITS) -> GgufInfo:
    """:func:`parse_gguf` on a whole file held in memory (tests, small files)."""
    return _parse(_Reader(io.BytesIO(data), len(data), limits.max_metadata_bytes), limits)


def _parse(r: _Reader, limits: GgufLimits) -> GgufInfo:
    p = _Parser(r, limits)
    magic = r.raw(4, "magic") if r.size >= 4 else b""
    if magic != GGUF_MAGIC:
        raise _fail("magic", 0, f"expected b'GGUF', found {magic!r} (not a GGUF file)")
    version = r.u32("version")
    if version not in _SUPPORTED_VERSIONS:
        hint = " (big-endian GGUF is not supported)" if version.to_bytes(4, "big")[3] == 0 else ""
        raise _fail("version", 4, f"unsupported GGUF version {version}{hint}; expected 2 or 3")
    tensor_count = r.u64("tensor count")
    if tensor_count > limits.max_tensors:
        raise _fail("tensor count", 8, f"{tensor_count} tensors exceeds the bound of {limits.max_tensors}")
    kv_count = r.u64("metadata key/value count")
    if kv_count > limits.max_kv:
        raise _fail("metadata key/value count", 16, f"{kv_count} entries exceeds the bound of {limits.max_kv}")

    metadata: dict[str, MetadataValue] = {}
    alignment = DEFAULT_ALIGNMENT
    for index in range(kv_count):
        key_at = r.pos
        key = r.string(f"key of metadata entry #{index}", limits.max_key_bytes)
        if not key:
            raise _fail(f"key of metadata entry #{index}", key_at, "empty key")
        if key in metadata:
            raise _fail(f"key {key!r}", key_at, "duplicate metadata key")
        kind_at = r.pos
        kind = p.value_type(f"value of {key!r}")
        value = p.value(kind, f"value of {key!r}", 0)
        if key == "general.alignment":
            if kind is not GgufValueType.UINT32 or not isinstance(value, int):
                raise _fail(key, kind_at, f"must be uint32, found {kind.name}")
            if value <= 0 or value & (value - 1) or value > limits.max_alignment:
                raise _fail(key, kind_at, f"alignment {value} is not a power of two <= {limits.max_alignment}")
            alignment = value
        metadata[key] = value

    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise DecodeError("invalid GGUF: required key general.architecture is missing or not a string")

    tensors: list[GgufTensor] = []
    names: set[str] = set()
    for index in range(tensor_count):
        name_at = r.pos
        name = r.string(f"name of tensor #{index}", limits.max_tensor_name_bytes)
        what = f"tensor {name!r}"
        if name in names:
            raise _fail(what, name_at, "duplicate tensor name")
        names.add(name)
        dims_at = r.pos
        n_dims = r.u32(f"{what} n_dims")
        if not 1 <= n_dims <= limits.max_dims:
            raise _fail(what, dims_at, f"n_dims {n_dims} is not between 1 and {limits.max_dims}")
        dims = tuple(r.u64(f"{what} dim {d}") for d in range(n_dims))
        type_at = r.pos
        raw_type = r.u32(f"{what} type")
        try:
            ggml_type = GgmlType(raw_type)
        except ValueError:
            raise _fail(what, type_at, f"unknown ggml tensor type {raw_type}") from None
        block = GGML_TYPES[ggml_type][0]
        if dims[0] % block:
            raise _fail(
                what, dims_at, f"first dimension {dims[0]} is not a multiple of the {ggml_type.name} block size {block}"
            )
        offset_at = r.pos
        offset = r.u64(f"{what} offset")
        if offset % alignment:
            raise _fail(what, offset_at, f"data offset {offset} is not aligned to {alignment}")
        n_elements, n_bytes = _nbytes(ggml_type, dims)
        if n_bytes > r.size:
            raise _fail(what, dims_at, f"dims {list(dims)} need {n_bytes} bytes, more than the whole file")
        tensors.append(GgufTensor(name, dims, ggml_type, offset, n_elements, n_bytes))

    header_end = r.pos
    data_offset = -(-header_end // alignment) * alignment
    if tensors and data_offset > r.size:
        raise _fail("data section", header_end, f"aligned start {data_offset} is past the end of the file")
    previous_end, previous_name = 0, ""
    for tensor in sorted(tensors, key=lambda t: t.offset):
        end = data_offset + tensor.offset + tensor.n_bytes
        if end > r.size:
            raise _fail(
                f"tensor {tensor.name!r}",
                header_end,
                f"data [{data_offset + tensor.offset}, {end}) runs past the end of the file ({r.size} bytes)",
            )
        if tensor.offset < previous_end:
            raise _fail(f"tensor {tensor.name!r}", header_end, f"data overlaps tensor {previous_name!r}")
        previous_end, previous_name = tensor.offset + tensor.n_bytes, tensor.name

    return _info(version, r.size, kv_count, metadata, architecture, alignment, data_offset, tensors)


def _info(
    version: int,
    file_size: int,
    kv_count: int,
    metadata: dict[str, MetadataValue],
    architecture: str,
    alignment: int,
    data_offset: int,
    tensors: list[GgufTensor],
) -> GgufInfo:
    def meta_int(key: str) -> int | None:
        value = metadata.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def meta_str(key: str) -> str | None:
        value = metadata.get(key)
        return value if isinstance(value, str) else None

    histogram = Counter(t.ggml_type.name for t in tensors)
    file_type = meta_int("general.file_type")
    if file_type is not None and file_type in FILE_TYPE_NAMES:
        quant = FILE_TYPE_NAMES[file_type]
    else:
        by_bytes: Counter[str] = Counter()
        for t in tensors:
            if len(t.dims) >= 2:
                by_bytes[t.ggml_type.name] += t.n_bytes
        quant = by_bytes.most_common(1)[0][0] if by_bytes else "unknown"
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArraySummary):
        vocab_size: int | None = tokens.length
    elif isinstance(tokens, list):
        vocab_size = len(tokens)
    else:
        vocab_size = meta_int(f"{architecture}.vocab_size")
    return GgufInfo(
        version=version,
        file_size=file_size,
        tensor_count=len(tensors),
        kv_count=kv_count,
        metadata=metadata,
        architecture=architecture,
        name=meta_str("general.name"),
        licence=meta_str("general.license"),
        context_length=meta_int(f"{architecture}.context_length"),
        parameter_count=sum(t.n_elements for t in tensors),
        file_type=file_type,
        quant=quant,
        tensor_types=dict(histogram),
        has_chat_template=isinstance(metadata.get("tokenizer.chat_template"), str),
        vocab_size=vocab_size,
        alignment=alignment,
        data_offset=data_offset,
        tensor_data_bytes=sum(t.n_bytes for t in tensors),
        tensors=tuple(tensors),
    )


# --- writer -------------------------------------------------------------------------------------------------


def _encode_string(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _infer_type(value: object) -> GgufValueType:
    if isinstance(value, bool):
        return GgufValueType.BOOL
    if isinstance(value, int):
        return GgufValueType.INT64 if value < -(2**31) or value >= 2**31 else GgufValueType.INT32
    if isinstance(value, float):
        return GgufValueType.FLOAT32
    if isinstance(value, str):
        return GgufValueType.STRING
    if isinstance(value, list | tuple):
        return GgufValueType.ARRAY
    raise TypeError(f"cannot encode {type(value).__name__} as a GGUF value")


def _encode_value(value: object, kind: GgufValueType) -> bytes:
    if kind is GgufValueType.STRING:
        assert isinstance(value, str)
        return _encode_string(value)
    if kind is GgufValueType.ARRAY:
        assert isinstance(value, list | tuple)
        items = list(value)
        item_kind = _infer_type(items[0]) if items else GgufValueType.INT32
        if item_kind in (GgufValueType.INT32, GgufValueType.INT64):
            item_kind = (
                GgufValueType.INT64
                if any(_infer_type(v) is GgufValueType.INT64 for v in items)
                else GgufValueType.INT32
            )
        body = b"".join(_encode_value(v, item_kind) for v in items)
        return struct.pack("<IQ", item_kind, len(items)) + body
    return struct.pack(_SCALAR_FORMATS[kind], value)


def build_gguf(
    metadata: Mapping[str, object],
    tensors: Sequence[tuple[str, Sequence[int], GgmlType]] = (),
    *,
    version: int = 3,
    alignment: int = DEFAULT_ALIGNMENT,
    types: Mapping[str, GgufValueType] | None = None,
    fill: int = 0,
) -> bytes:
    """Encode a small GGUF file (header, padding and zero-filled tensor data).

    Python values map to GGUF types as ``bool`` → BOOL, ``int`` → INT32 (INT64 if needed), ``float`` →
    FLOAT32, ``str`` → STRING, ``list`` → ARRAY (item type from the first item); ``types`` overrides a key's
    type (e.g. ``general.alignment`` must be UINT32). Tensors are laid out in order, each aligned; the file
    ends at the last tensor's aligned end.

    Args:
        metadata: key/value metadata, in order.
        tensors: ``(name, dims, ggml_type)`` triples.
        version: the GGUF version field.
        alignment: tensor data alignment (written as ``general.alignment`` when not 32).
        types: explicit value types by key.
        fill: byte value the tensor data is filled with.

    Returns:
        The file's bytes.
    """
    types = dict(types or {})
    meta = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT and "general.alignment" not in meta:
        meta["general.alignment"] = alignment
        types["general.alignment"] = GgufValueType.UINT32
    out = bytearray(GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), len(meta)))
    for key, value in meta.items():
        kind = types.get(key) or _infer_type(value)
        out += _encode_string(key) + struct.pack("<I", kind) + _encode_value(value, kind)
    offset = 0
    sizes = []
    for name, dims, ggml_type in tensors:
        _, n_bytes = _nbytes(ggml_type, dims)
        out += _encode_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        sizes.append(n_bytes)
        offset += -(-n_bytes // alignment) * alignment
    if tensors:
        out += bytes(-len(out) % alignment)
        for n_bytes in sizes:
            out += bytes([fill]) * n_bytes + bytes(-n_bytes % alignment)
    return bytes(out)
