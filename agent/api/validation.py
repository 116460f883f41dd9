"""Parsing and bounding of everything a client sends.

Nothing from a request reaches the registry or an engine before it has passed through this module:

- the body is read only up to ``max_body_bytes`` (more → :class:`~agent.errors.PayloadTooLargeError`, 413),
  must be UTF-8 JSON (else 400) and an object at the top level;
- names (model, variant, token) are checked against one syntax: ``[A-Za-z0-9][A-Za-z0-9._-]*`` with a length
  bound, so ``..``, ``/``, NUL, percent-escapes and 10 kB strings never reach a filesystem path or a query;
- numbers are checked for type (``true`` is not an integer) and range; strings and lists for length.

Every function raises :class:`~agent.errors.BadRequestError` with a message naming the offending field and,
where it is a top-level field, sets ``param`` on the error (OpenAI's error shape has one).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.errors import BadRequestError, PayloadTooLargeError
from protocols.limits import MODEL_NAME_RE, VARIANT_RE

__all__ = [
    "MAX_NAME_LENGTH",
    "NAME_RE",
    "InvalidFieldError",
    "ModelRef",
    "bad_request",
    "check_model_name",
    "check_name",
    "check_variant",
    "get_bool",
    "get_int",
    "get_number",
    "get_str",
    "parse_model_ref",
    "read_json",
]

MAX_NAME_LENGTH = 128
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate: paired ones decode to one character, a lone one to a string no text holds."""
"""Generic names (tensor-free identifiers); models and variants use the registry's stricter patterns."""


class InvalidFieldError(BadRequestError):
    """A :class:`BadRequestError` that names the offending top-level field (OpenAI's ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def bad_request(message: str, param: str | None = None) -> InvalidFieldError:
    """A 400 error for ``message``, naming the field ``param`` if given."""
    return InvalidFieldError(message, param)


async def read_json(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """Read and parse the request body as a JSON object of at most ``max_bytes`` bytes.

    Raises:
        PayloadTooLargeError: declared or actual body longer than ``max_bytes``.
        BadRequestError: empty body, not UTF-8, not JSON, nested too deeply, not an object, or text holding a lone
            UTF-16 surrogate (which no tokenizer or UTF-8 encoder takes).
    """
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLargeError(f"request body is larger than the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    while chunk := await request.content.read(65536):
        total += len(chunk)
        if total > max_bytes:  # a chunked body declares no length: count as it arrives
            raise PayloadTooLargeError(f"request body is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request("request body is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except ValueError as exc:  # e.g. an integer literal longer than Python's int_max_str_digits
        raise bad_request(f"request body is not acceptable JSON: {str(exc)[:120]}") from exc
    except RecursionError as exc:
        raise bad_request("request body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) is not None:  # JSON may escape half a UTF-16 pair: no text can hold that
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_request(
                "request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair); "
                "text must be valid Unicode"
            ) from exc
    return data


def check_name(value: object, what: str, param: str | None = None, *, pattern: re.Pattern[str] = NAME_RE) -> str:
    """Return ``value`` if it is a string that ``pattern`` matches in full, else raise.

    Raises:
        BadRequestError: not a string, too long, or not matching (the message quotes at most 64 characters).
    """
    if not isinstance(value, str):
        raise bad_request(f"{what} must be a string", param)
    if len(value) > MAX_NAME_LENGTH:
        raise bad_request(f"{what} is longer than {MAX_NAME_LENGTH} characters", param)
    if not pattern.fullmatch(value):
        raise bad_request(
            f"{what} {value[:64]!r} is not valid (lower-case letters, digits, '.', '_', '-'; "
            "starting with a letter or digit)",
            param,
        )
    return value


def check_model_name(value: object, param: str | None = "model") -> str:
    """A model (family) name, as the registry accepts it (:data:`protocols.limits.MODEL_NAME_RE`)."""
    return check_name(value, "model name", param, pattern=MODEL_NAME_RE)


def check_variant(value: object, param: str | None = "variant") -> str:
    """A variant name, as the registry accepts it (:data:`protocols.limits.VARIANT_RE`)."""
    return check_name(value, "model variant", param, pattern=VARIANT_RE)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model as a client names it: ``name`` (its active variant) or ``name:variant``."""

    name: str
    variant: str | None

    def __str__(self) -> str:
        return self.name if self.variant is None else f"{self.name}:{self.variant}"


def parse_model_ref(value: object, param: str = "model") -> ModelRef:
    """Parse an OpenAI ``model`` field.

    Raises:
        BadRequestError: missing, not a string, or a name or variant that fails :func:`check_name`.
    """
    if value is None:
        raise bad_request(f"'{param}' is required", param)
    if not isinstance(value, str):
        raise bad_request(f"'{param}' must be a string", param)
    if len(value) > 2 * MAX_NAME_LENGTH + 1:
        raise bad_request(f"'{param}' is too long", param)
    name, sep, variant = value.partition(":")
    check_model_name(name, param)
    if sep:
        check_variant(variant, param)
        return ModelRef(name, variant)
    return ModelRef(name, None)


def get_int(
    body: dict[str, Any], key: str, *, default: int | None, low: int, high: int, required: bool = False
) -> int | None:
    """An optional integer field within ``[low, high]`` (JSON booleans and floats are refused)."""
    value = body.get(key)
    if value is None:
        if required:
            raise bad_request(f"'{key}' is required", key)
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer", key)
    if not low <= value <= high:
        raise bad_request(f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def get_number(body: dict[str, Any], key: str, *, default: float, low: float, high: float) -> float:
    """An optional number field within ``[low, high]``."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"'{key}' must be a number", key)
    if not low <= value <= high:
        raise bad_request(f"'{key}' must be between {low} and {high}, got {value}", key)
    return float(value)


def get_bool(body: dict[str, Any], key: str, *, default: bool) -> bool:
    """An optional boolean field."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false", key)
    return value


def get_str(body: dict[str, Any], key: str, *, max_length: int, required: bool = True) -> str | None:
    """A string field of at most ``max_length`` characters."""
    value = body.get(key)
    if value is None:
        if required:
            raise bad_request(f"'{key}' is required", key)
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{key}' must be a string", key)
    if len(value) > max_length:
        raise bad_request(f"'{key}' is longer than {max_length} characters", key)
    if "\x00" in value:
        raise bad_request(f"'{key}' contains a NUL character", key)
    return value
