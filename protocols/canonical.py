"""Canonical JSON for hashing and signing, strict bounded JSON decoding, and typed field access.

Encoding (:func:`canonical_json`):

* keys sorted by Unicode code point, separators ``","`` and ``":"`` (no whitespace), UTF-8, no ``\\uXXXX``
  escaping of non-ASCII text; the same value always gives the same bytes;
* only ``dict`` (``str`` keys), ``list``/``tuple``, ``str``, ``int`` (signed 64-bit range), ``bool`` and ``None``;
* **floats are rejected by default.** Bytes that are *hashed* (audit records) or *re-derived* from fields
  (checkpoints) must be reproducible by any implementation, and float text is not: Python, ECMAScript
  (RFC 8785) and Go print ``1e21``, ``1e-7`` or ``-0.0`` differently. Messages that carry measurements
  (tokens/s) pass ``allow_floats=True``: they are signed and verified as raw bytes, never re-encoded, so
  float text there only needs to parse, not to be reproducible. NaN and ±Infinity are never encoded.

Decoding (:func:`loads_object`) is strict and bounded, and raises :class:`~protocols.errors.DecodeError`:
the size is checked *before* parsing; UTF-8 is strict (no BOM); the top level is an object; duplicate keys,
``NaN``/``Infinity`` (and number literals that overflow to infinity), lone surrogates and nesting deeper than
``max_depth`` are rejected. Everything it returns can be encoded again by ``canonical_json(...,
allow_floats=True)``.

Field access (:class:`ObjectReader`, ``check_*``) turns one decoded object into typed values: ``bool`` is never
accepted as an ``int``, every string and list is bounded by :class:`~protocols.limits.Limits`, and every
failure is a ``DecodeError`` whose message starts with the dotted path of the field (``models[2].sha256``).
:class:`JSONStruct` is the small base of the frozen dataclasses in ``messages.py`` and ``audit.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection
from typing import Any, Self, TypeVar

from protocols.errors import DecodeError
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "HEX32_RE",
    "MAX_DEPTH",
    "MAX_INT",
    "MIN_INT",
    "SHA256_RE",
    "JSONStruct",
    "ObjectReader",
    "canonical_json",
    "canonical_text",
    "check_bool",
    "check_int",
    "check_number",
    "check_str",
    "loads_object",
    "parse_plain",
    "scan_plain",
]

MAX_INT = 2**63 - 1
"""Largest integer on the wire (sequence numbers, sizes, timestamps): signed 64-bit, so SQLite can store it."""

MIN_INT = -(2**63)
"""Smallest integer :func:`canonical_json` encodes."""

MAX_DEPTH = 32
"""Default bound on JSON nesting (the top-level object is depth 1)."""

MAX_EXACT_FLOAT_INT = 2**53
"""Integers given where a number is expected must convert to ``float`` exactly."""

SHA256_RE = re.compile(r"[0-9a-f]{64}")
"""A sha256 digest: 64 lower-case hex characters."""

HEX32_RE = re.compile(r"[0-9a-f]{32}")
"""A random 128-bit id (report ids, transfer ids): 32 lower-case hex characters."""

T = TypeVar("T")
S = TypeVar("S", bound="JSONStruct")


# --- encoding -------------------------------------------------------------------------------------------


def canonical_json(obj: object, *, allow_floats: bool = False) -> bytes:
    """Encode ``obj`` as canonical JSON bytes.

    Args:
        obj: A JSON value made of dicts with ``str`` keys, lists/tuples, ``str``, ``int``, ``bool`` and ``None``.
        allow_floats: Also accept finite floats. Leave it off for anything that is hashed or re-derived.

    Returns:
        The UTF-8 bytes, sorted keys, compact separators, non-ASCII text unescaped.

    Raises:
        ValueError: a float (when not allowed), NaN/Infinity, an int outside the signed 64-bit range, a string
            that is not valid Unicode (lone surrogate), or nesting deeper than :data:`MAX_DEPTH`.
        TypeError: a value of any other type, or a non-``str`` key.
    """
    # Fast path: a walk without error paths (hashing thousands of audit records per second depends on it);
    # anything it does not accept outright, and any encoding failure, goes through the full check, which
    # raises with the offending value's path.
    if not _plainly_encodable(obj, allow_floats, 1):
        _check_encodable(obj, allow_floats=allow_floats, depth=1, path="$")
    text = _ENCODER.encode(obj)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        _check_encodable(obj, allow_floats=allow_floats, depth=1, path="$")
        raise


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""One encoder for every call: ``json.dumps`` with these options would build a new one each time (a few
microseconds per audit record on the controller's ingest path)."""


def _plainly_encodable(value: object, allow_floats: bool, depth: int) -> bool:
    """True when ``value`` is exactly made of the accepted types within bounds (strings' Unicode is checked
    when encoding). False means "ask :func:`_check_encodable`", which accepts subclasses too."""
    if depth > MAX_DEPTH:
        return False
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return MIN_INT <= value <= MAX_INT  # type: ignore[operator]
    if kind is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str or not _plainly_encodable(item, allow_floats, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_plainly_encodable(item, allow_floats, depth + 1) for item in value)  # type: ignore[attr-defined]
    if kind is float:
        return allow_floats and math.isfinite(value)  # type: ignore[arg-type]
    return False


def _check_encodable(value: object, *, allow_floats: bool, depth: int, path: str) -> None:
    # json.dumps would silently turn int keys into strings ({1: x} and {"1": x} would collide) and print
    # floats, so every value is checked first.
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_unicode(value, path, ValueError)
    elif isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            raise ValueError(f"{path}: integer outside the signed 64-bit range")
    elif isinstance(value, float):
        if not allow_floats:
            raise ValueError(f"{path}: floats are not allowed in hashed or signed JSON")
        if not math.isfinite(value):
            raise ValueError(f"{path}: NaN and Infinity are not JSON")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: object keys must be str, got {type(key).__name__}")
            _check_unicode(key, path, ValueError)
            _check_encodable(item, allow_floats=allow_floats, depth=depth + 1, path=f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_encodable(item, allow_floats=allow_floats, depth=depth + 1, path=f"{path}[{index}]")
    else:
        raise TypeError(f"{path}: {type(value).__name__} is not a JSON type")


def _check_unicode(text: str, path: str, error: type[Exception]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{path}: string is not valid Unicode (lone surrogate)") from exc


# --- decoding -------------------------------------------------------------------------------------------


def loads_object(data: bytes, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse ``data`` as one JSON object, strictly and within bounds.

    Args:
        data: The encoded bytes (UTF-8 JSON).
        max_bytes: Largest accepted input; checked before any parsing.
        max_depth: Deepest accepted nesting; the top-level object is depth 1.

    Returns:
        The decoded object.

    Raises:
        DecodeError: too large, not UTF-8, not JSON, not an object at the top level, a duplicate key,
            NaN/Infinity, a lone surrogate, or nested too deeply.
    """
    if len(data) > max_bytes:
        raise DecodeError(f"input is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"input is not UTF-8: {exc}") from exc
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
            parse_float=_parse_finite_float,
        )
    except RecursionError as exc:
        raise DecodeError(f"JSON nested deeper than {max_depth}") from exc
    except ValueError as exc:  # json.JSONDecodeError, and int() beyond the interpreter's digit limit
        raise DecodeError(f"input is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"top level must be a JSON object, got {_json_kind(value)}")
    # Lone surrogates can only come from \u escapes (the text itself is valid UTF-8): without any, only the
    # nesting depth needs checking.
    _check_decoded_tree(value, max_depth, strings="\\u" in text)
    return value


def parse_plain(text: str) -> Any:
    """The value the C parser reads from ``text``, with no per-object hook and no checks; None if it gives up.

    A step of a canonical-input fast path (audit uploads, whose senders always encode with
    :func:`canonical_json`). No per-object hook and no tree walk, so this is much cheaper than
    :func:`loads_object` and by itself NOT strict: a duplicate key keeps its last value, and whitespace, key order
    and escapes are not checked. The caller must accept the value only if :func:`canonical_text` of it reproduces
    ``text`` exactly (a duplicate key then makes the re-encoding shorter; keys out of order, whitespace, an escape
    the encoder would not write — so no lone surrogate — and a non-shortest number make it differ), and bound the
    nesting and the value's type itself. Anything that passes that check, :func:`loads_object` accepts and decodes
    to an equal value; otherwise the caller decodes with :func:`loads_object`, which accepts a valid
    non-canonical encoding or names the error.

    Returns:
        The value (a parsed ``null`` is None too: check the type), or None: not JSON, a float or
        ``NaN``/``Infinity`` (never in canonical hashed data), an integer past the interpreter's digit limit, or
        nested beyond its recursion limit.
    """
    try:
        return _PLAIN_DECODER.decode(text)
    except (ValueError, RecursionError):
        return None


def canonical_text(value: object) -> str:
    """The canonical JSON text of a value returned by :func:`parse_plain` (the C encoder alone, no checks).

    Only for values parsed from JSON without floats: it does not check types, integer range or nesting, which
    :func:`canonical_json` does.

    Raises:
        ValueError, TypeError: the value is not JSON (never for what :func:`parse_plain` returns).
    """
    return "".join(_TEXT_ENCODER(value, 0))


def _refuse_number(text: str) -> Any:
    raise ValueError(f"{text[:32]!r}: not accepted by the canonical fast path")


_PLAIN_DECODER = json.JSONDecoder(parse_float=_refuse_number, parse_constant=_refuse_number)
"""The C parser with no per-object hook; floats and NaN/Infinity make :func:`parse_plain` give up."""

scan_plain: Callable[[str, int], tuple[Any, int]] = _PLAIN_DECODER.scan_once  # type: ignore[attr-defined]
"""``scan_plain(text, index)``: the one JSON value that starts at ``index`` of ``text`` and the index just after
it, read as :func:`parse_plain` reads (no hook, no checks; accept it only if :func:`canonical_text` reproduces
its text). Text after the value is not looked at. Raises StopIteration when no value starts at ``index``,
ValueError when it is not JSON (or holds a float or ``NaN``/``Infinity``), RecursionError when nested beyond the
interpreter's limit."""

_TEXT_ENCODER: Callable[[object, int], Any] = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, None, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else lambda value, _: (_ENCODER.encode(value),)
)
"""The canonical encoder's C core, called directly: ``JSONEncoder.encode`` builds it anew on every call, which
costs more than encoding an audit record. No cycle check (``markers`` None): parsed JSON has no cycles."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)  # one C call; a Python loop here was a third of the audit ingest's parse time
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DecodeError(f"duplicate key {key!r} in a JSON object")
            seen.add(key)
    return obj


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not valid JSON")


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf without going through parse_constant
        raise DecodeError(f"number {text[:32]!r} is out of range")
    return value


def _check_decoded_tree(root: dict[str, Any], max_depth: int, *, strings: bool = True) -> None:
    # Iterative, so a hostile document cannot make *this* walk recurse; the C parser's own recursion is
    # bounded by the interpreter (RecursionError above) and by max_bytes.
    if not strings:
        containers: list[tuple[dict[str, Any] | list[Any], int]] = [(root, 1)]
        while containers:
            node, depth = containers.pop()
            if depth > max_depth:
                raise DecodeError(f"JSON nested deeper than {max_depth}")
            for item in node.values() if isinstance(node, dict) else node:
                if isinstance(item, dict | list):
                    containers.append((item, depth + 1))
        return
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, "JSON", DecodeError)
        elif isinstance(value, dict | list):
            if depth > max_depth:
                raise DecodeError(f"JSON nested deeper than {max_depth}")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_unicode(key, "JSON key", DecodeError)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- typed field access ---------------------------------------------------------------------------------


def check_str(value: object, path: str, *, max_len: int, pattern: re.Pattern[str] | None = None) -> str:
    """``value`` as a string of at most ``max_len`` characters, fully matching ``pattern`` if given.

    Raises:
        DecodeError: naming ``path``.
    """
    if not isinstance(value, str):
        raise DecodeError(f"{path}: expected a string, got {_json_kind(value)}")
    if len(value) > max_len:
        raise DecodeError(f"{path}: string longer than {max_len} characters")
    if pattern is not None and pattern.fullmatch(value) is None:
        raise DecodeError(f"{path}: {value[:80]!r} does not match {pattern.pattern}")
    return value


def check_int(value: object, path: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` as an integer in ``[lo, hi]``; ``bool`` is not an integer.

    Raises:
        DecodeError: naming ``path``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{path}: expected an integer, got {_json_kind(value)}")
    if not lo <= value <= hi:
        raise DecodeError(f"{path}: {value} is outside [{lo}, {hi}]")
    return value


def check_number(value: object, path: str, *, lo: float | None = 0.0) -> float:
    """``value`` as a finite float ``>= lo`` (no lower bound if ``lo`` is None); exact integers are accepted.

    Raises:
        DecodeError: naming ``path``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError(f"{path}: expected a number, got {_json_kind(value)}")
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_FLOAT_INT:
            raise DecodeError(f"{path}: integer too large for a number field")
        value = float(value)
    if not math.isfinite(value):
        raise DecodeError(f"{path}: number is not finite")
    if lo is not None and value < lo:
        raise DecodeError(f"{path}: {value} is less than {lo}")
    return value


def check_bool(value: object, path: str) -> bool:
    """``value`` as a boolean (``true``/``false`` only, never 0/1).

    Raises:
        DecodeError: naming ``path``.
    """
    if not isinstance(value, bool):
        raise DecodeError(f"{path}: expected a boolean, got {_json_kind(value)}")
    return value


class ObjectReader:
    """Typed, bounded access to the fields of one decoded JSON object.

    A missing field and a ``null`` field are the same: both fail the required accessors, and
    :meth:`present` is false for both. Fields the reader is not asked about are ignored, which is how
    unknown (newer) fields are tolerated.
    """

    __slots__ = ("_obj", "_path", "limits")

    def __init__(self, obj: object, *, path: str = "", limits: Limits = DEFAULT_LIMITS) -> None:
        """Wrap ``obj``, which must be a dict (a JSON object).

        Raises:
            DecodeError: ``obj`` is not a JSON object.
        """
        if not isinstance(obj, dict):
            raise DecodeError(f"{path or 'message'}: expected an object, got {_json_kind(obj)}")
        self._obj: dict[str, Any] = obj
        self._path = path
        self.limits = limits

    @property
    def raw(self) -> dict[str, Any]:
        """The wrapped object itself, for a parser's one-pass fast path (it must accept exactly what the typed
        accessors accept, and fall back to them otherwise, so errors still name the field)."""
        return self._obj

    def path(self, key: str) -> str:
        """The dotted path of ``key`` in this object, used in error messages."""
        return f"{self._path}.{key}" if self._path else key

    def present(self, key: str) -> bool:
        """Whether ``key`` is there and not ``null`` (how optional fields are read)."""
        return self._obj.get(key) is not None

    def value(self, key: str) -> Any:
        """The raw value of a required field.

        Raises:
            DecodeError: the field is missing or null.
        """
        value = self._obj.get(key)
        if value is None:
            raise DecodeError(f"{self.path(key)}: missing")
        return value

    def string(self, key: str, *, pattern: re.Pattern[str] | None = None, max_len: int | None = None) -> str:
        """A string field, at most ``max_len`` (default ``limits.max_string``) characters."""
        limit = self.limits.max_string if max_len is None else max_len
        return check_str(self.value(key), self.path(key), max_len=limit, pattern=pattern)

    def integer(self, key: str, *, lo: int = 0, hi: int = MAX_INT) -> int:
        """An integer field in ``[lo, hi]`` (default: non-negative, below 2**63)."""
        return check_int(self.value(key), self.path(key), lo=lo, hi=hi)

    def number(self, key: str, *, lo: float | None = 0.0) -> float:
        """A finite number field ``>= lo``, as a float."""
        return check_number(self.value(key), self.path(key), lo=lo)

    def boolean(self, key: str) -> bool:
        """A boolean field."""
        return check_bool(self.value(key), self.path(key))

    def choice(self, key: str, choices: Collection[str]) -> str:
        """A string field that must be one of ``choices``."""
        value = self.string(key, max_len=64)
        if value not in choices:
            raise DecodeError(f"{self.path(key)}: {value!r} is not one of {sorted(choices)}")
        return value

    def sha256(self, key: str) -> str:
        """A sha256 hex digest field (64 lower-case hex characters)."""
        return self.string(key, pattern=SHA256_RE, max_len=64)

    def hex_id(self, key: str) -> str:
        """A random 128-bit id field (32 lower-case hex characters)."""
        return self.string(key, pattern=HEX32_RE, max_len=32)

    def obj(self, key: str) -> ObjectReader:
        """A nested object field, as a reader."""
        return ObjectReader(self.value(key), path=self.path(key), limits=self.limits)

    def struct(self, key: str, cls: type[S]) -> S:
        """A nested object field parsed as ``cls``."""
        return cls.read(self.obj(key))

    def array(self, key: str, item: Callable[[object, str], T], *, max_items: int | None = None) -> tuple[T, ...]:
        """A list field of at most ``max_items`` (default ``limits.max_list``) items, each parsed by ``item``.

        Args:
            key: The field name.
            item: Called with each raw item and its path (``key[3]``); raises DecodeError if invalid.
            max_items: The bound on the number of items.
        """
        raw = self.value(key)
        path = self.path(key)
        if not isinstance(raw, list):
            raise DecodeError(f"{path}: expected an array, got {_json_kind(raw)}")
        limit = self.limits.max_list if max_items is None else max_items
        if len(raw) > limit:
            raise DecodeError(f"{path}: {len(raw)} items, more than the limit of {limit}")
        return tuple(item(value, f"{path}[{index}]") for index, value in enumerate(raw))

    def structs(self, key: str, cls: type[S], *, max_items: int | None = None) -> tuple[S, ...]:
        """A list field of objects, each parsed as ``cls``."""
        limits = self.limits
        return self.array(
            key, lambda value, path: cls.read(ObjectReader(value, path=path, limits=limits)), max_items=max_items
        )

    def mapping(self, key: str, *, max_items: int | None = None) -> dict[str, Any]:
        """An object field used as a map (free keys), with at most ``max_items`` (default ``max_list``) keys."""
        raw = self.value(key)
        path = self.path(key)
        if not isinstance(raw, dict):
            raise DecodeError(f"{path}: expected an object, got {_json_kind(raw)}")
        limit = self.limits.max_list if max_items is None else max_items
        if len(raw) > limit:
            raise DecodeError(f"{path}: {len(raw)} keys, more than the limit of {limit}")
        return raw


class JSONStruct:
    """Base of the frozen dataclasses that map to one JSON object.

    Subclasses implement :meth:`to_dict` and :meth:`read`; :meth:`from_dict` validates every field.
    """

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this value (optional fields that are None are left out)."""
        raise NotImplementedError

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse and validate every field from ``reader``.

        Raises:
            DecodeError: naming the first invalid field.
        """
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: object, *, limits: Limits = DEFAULT_LIMITS) -> Self:
        """Parse and validate a decoded JSON object.

        Raises:
            DecodeError: naming the first invalid field.
        """
        return cls.read(ObjectReader(data, limits=limits))
