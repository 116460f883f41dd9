"""The one place where exceptions become HTTP error responses.

Every error response has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:

- an :class:`~agent.errors.AgentError` answers with the class's ``http_status``, ``error_type`` and
  ``error_code`` and its message; :class:`~agent.errors.OverloadedError` adds ``Retry-After`` (whole seconds,
  rounded up, at least 1);
- an aiohttp ``HTTPException`` raised by the framework (no such route, method not allowed, body too large)
  keeps its status and gets a matching ``type``/``code``;
- anything else is a bug: it answers 500 with a generic message that names only the request id, and the
  traceback goes to the log, never to the client.

Routes never build error responses themselves; they raise, and the request middleware calls
:func:`error_response`.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from agent.errors import AgentError, OverloadedError

__all__ = ["GenerationCancelledError", "ShuttingDownError", "error_body", "error_response", "http_exception_response"]

_HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


class ShuttingDownError(AgentError):
    """The server is draining for shutdown and takes no new work."""

    http_status = 503
    error_type = "server_error"
    error_code = "shutting_down"


class GenerationCancelledError(AgentError):
    """The engine cancelled a generation (its model was unloaded or the agent is stopping)."""

    http_status = 503
    error_type = "server_error"
    error_code = "cancelled"


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: BaseException, request_id: str) -> web.Response:
    """The response for an exception raised while handling a request.

    Args:
        exc: what the handler raised.
        request_id: the request's id, quoted in the message of unexpected errors.
    """
    if isinstance(exc, AgentError):
        headers: dict[str, str] = {}
        if isinstance(exc, OverloadedError):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        param = getattr(exc, "param", None)
        message = str(exc) or type(exc).__name__
        body = error_body(message, exc.error_type, exc.error_code, param if isinstance(param, str) else None)
        return web.json_response(body, status=exc.http_status, headers=headers)
    if isinstance(exc, web.HTTPException):
        return http_exception_response(exc)
    return web.json_response(
        error_body(f"internal error (request id {request_id})", "server_error", "internal_error"), status=500
    )


def http_exception_response(exc: web.HTTPException) -> web.Response:
    """An OpenAI-shaped response for an aiohttp ``HTTPException`` (keeps its status and ``Allow`` header)."""
    status = exc.status
    error_type, code = _HTTP_CODES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", f"http_{status}")
    )
    message = {
        404: "no such route",
        405: "method not allowed",
        413: "request body too large",
    }.get(status, exc.reason)
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    return web.json_response(error_body(message, error_type, code), status=status, headers=headers)
