"""A small synchronous client for the local API over its unix socket (used by the CLI).

Standard library only: :class:`http.client.HTTPConnection` connected to an ``AF_UNIX`` socket. The CLI uses it
for ``chat``, ``status`` and for admin commands while the daemon runs; apps should use any OpenAI client.

Every failure is an :class:`ApiClientError`: the API's error status (for an error event inside a stream, the status
the same error has before a stream starts), or status 0 when there is no answer (nothing listens:
:class:`DaemonNotRunningError`; a timeout or a broken connection).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ApiClient", "ApiClientError", "DaemonNotRunningError"]


class ApiClientError(Exception):
    """The API answered with an error (``status`` and the OpenAI-shaped message)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code


class DaemonNotRunningError(ApiClientError):
    """Nothing listens on the socket."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(0, f"no agent listens on {path} ({reason})")


# A stream's error event has the error's type and code but no status (the 200 was sent already): the status
# the same error gets before a stream starts, from agent.errors.
_STATUS_BY_CODE = {
    "deadline_exceeded": 504,
    "queue_full": 429,
    "model_load_failed": 503,
    "memory_budget_exceeded": 503,
    "shutting_down": 503,
    "model_not_found": 404,
}
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "rate_limit_error": 429,
    "timeout_error": 504,
}


def _stream_error_status(code: object, error_type: object) -> int:
    if isinstance(code, str) and code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[code]
    return _STATUS_BY_TYPE.get(error_type, 500) if isinstance(error_type, str) else 500


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Calls the agent's local API on ``socket_path`` with an optional bearer token."""

    def __init__(self, socket_path: Path, token: str | None = None, timeout: float = 300.0) -> None:
        self.socket_path = socket_path
        self.token = token
        self.timeout = timeout

    def is_running(self) -> bool:
        """True when an agent answers ``/healthz`` on the socket (within 2 s)."""
        try:
            self.request("GET", "/healthz", timeout=2.0)
        except ApiClientError:
            return False
        return True

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """One JSON request; returns the decoded JSON body.

        Raises:
            DaemonNotRunningError: nothing listens on the socket.
            ApiClientError: the API answered with an error status.
        """
        conn = self._open(method, path, body, timeout)
        try:
            with self._broken(conn):
                response = conn.getresponse()
                data = response.read()
        finally:
            conn.close()
        return self._decode(response.status, data)

    def stream(self, path: str, body: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``body`` with ``stream: true`` and yield each server-sent event's JSON until ``[DONE]``."""
        conn = self._open("POST", path, {**body, "stream": True}, None)
        try:
            with self._broken(conn):
                response = conn.getresponse()
                if response.status != 200:
                    self._decode(response.status, response.read())
                for raw in response:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if isinstance(event, dict) and "error" in event:
                        error = event["error"] if isinstance(event["error"], dict) else {}
                        code, kind = error.get("code"), error.get("type")
                        raise ApiClientError(_stream_error_status(code, kind), str(error.get("message")), code)
                    yield event
        finally:
            conn.close()

    @contextlib.contextmanager
    def _broken(self, conn: _UnixConnection) -> Iterator[None]:
        """Turn a connection that times out or breaks into :class:`ApiClientError` (status 0)."""
        try:
            yield
        except ConnectionRefusedError:
            raise  # nothing listens: the caller says so
        except TimeoutError as exc:
            raise ApiClientError(0, f"the agent did not answer within {conn.timeout:g} s") from exc
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ApiClientError(0, f"the connection to the agent broke ({type(exc).__name__})") from exc

    def _open(self, method: str, path: str, body: Mapping[str, Any] | None, timeout: float | None) -> _UnixConnection:
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with self._broken(conn):
                conn.request(method, path, body=payload, headers=headers)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise DaemonNotRunningError(self.socket_path, type(exc).__name__) from exc
        except PermissionError as exc:
            conn.close()
            raise ApiClientError(0, f"permission denied on {self.socket_path}: join the agent's group") from exc
        except ApiClientError:
            conn.close()
            raise
        return conn

    @staticmethod
    def _decode(status: int, data: bytes) -> Any:
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = None
        if status >= 400:
            error = decoded.get("error", {}) if isinstance(decoded, dict) else {}
            message = error.get("message") if isinstance(error, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            raise ApiClientError(status, str(message or data[:200].decode(errors="replace")), code)
        return decoded
