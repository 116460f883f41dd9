"""The API's listeners: a unix socket, and optionally a loopback-only TCP port.

:class:`ApiServer` is an async context manager that owns the listeners for its whole life:

- ``__aenter__``: creates the socket's parent directory (0755) if missing; if a file is already at the socket
  path, removes it only when it is a socket that nobody answers on (a stale leftover of a crash): a live agent's
  socket is never stolen and a regular file is never deleted; binds, ``chmod``s to ``api.socket_mode``
  *before* ``listen()`` (so no client can connect while the mode is still the umask's), then serves. The TCP
  listener, if configured, binds only to a loopback address (anything else raises
  :class:`~agent.errors.ConfigError`, whatever the config loader let through).
- ``__aexit__``: marks the state as draining (new requests get 503, ``/readyz`` says so), stops accepting
  connections, waits up to ``api.drain_timeout_s`` for in-flight requests (streams included) to finish, cancels
  what is left, waits for admin changes still running (a change and its audit record are never split, see
  :meth:`ApiState.detached`), and removes the socket file if it is still the one it created.

Handlers are cancelled when their client disconnects (aiohttp's ``handler_cancellation``), which closes the
generation's async iterator and so stops the engine's work for that request.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from agent.api.app import ApiState, create_app
from agent.errors import AgentError, ConfigError, LocalStateError

__all__ = ["ApiServer", "NotASocketError", "SocketInUseError"]

log = structlog.get_logger(__name__)


class SocketInUseError(AgentError):
    """Another process answers on the API socket, or a non-socket file is in its place."""


class NotASocketError(SocketInUseError, LocalStateError):
    """A file that is not a socket is at the socket path: it is never deleted, and a restart would meet it again
    (bad local state: ``edge-agent run`` exits with :data:`~agent.errors.EXIT_BAD_LOCAL_STATE`)."""


def _loopback_address(host: str) -> str:
    """The literal loopback address for ``host`` or :class:`ConfigError`."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"api.tcp_host must be a literal loopback address, not {host!r}") from exc
    if not address.is_loopback:
        raise ConfigError(f"api.tcp_host must be a loopback address, not {host!r}")
    return str(address)


def _someone_listens(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in {errno.ECONNREFUSED, errno.ENOENT}:
            return False
        raise SocketInUseError(f"cannot probe existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    return True


def _prepare_socket_path(path: Path) -> None:
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise NotASocketError(f"{path} exists and is not a socket; refusing to replace it (move it away)")
    if _someone_listens(path):
        raise SocketInUseError(f"another process is listening on {path}")
    log.info("api.stale_socket_removed", path=str(path))
    path.unlink()


def _bind_unix(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Mode before listen(): until listen() every connect() is refused, so no client ever sees the umask mode.
        os.chmod(path, mode)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ApiServer:
    """Serves :func:`agent.api.app.create_app` on the configured listeners (an async context manager)."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self._config = state.config.api
        self._runner: web.AppRunner | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._tcp_address: tuple[str, int] | None = None

    @property
    def app(self) -> web.Application:
        """The application being served (only while the server is open)."""
        if self._runner is None:
            raise RuntimeError("the server is not running")
        return self._runner.app

    @property
    def socket_path(self) -> Path:
        """The unix socket's path."""
        return self._config.socket_path

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the TCP listener once it listens (the real port if 0 was configured)."""
        return self._tcp_address

    async def __aenter__(self) -> ApiServer:
        tcp_host = _loopback_address(self._config.tcp_host) if self._config.tcp_port is not None else None
        runner = web.AppRunner(
            create_app(self.state),
            handler_cancellation=True,
            shutdown_timeout=self._config.drain_timeout_s,
            access_log=None,
        )
        await runner.setup()
        self._runner = runner
        try:
            path = self._config.socket_path
            _prepare_socket_path(path)
            unix_sock = _bind_unix(path, self._config.socket_mode)
            info = path.stat()
            self._socket_inode = (info.st_dev, info.st_ino)
            await web.SockSite(runner, unix_sock).start()
            if tcp_host is not None and self._config.tcp_port is not None:
                tcp_sock = _bind_tcp(tcp_host, self._config.tcp_port)
                host, port = tcp_sock.getsockname()[:2]
                self._tcp_address = (host, port)
                await web.SockSite(runner, tcp_sock).start()
        except BaseException:
            await self._close()
            raise
        log.info(
            "api.listening",
            socket=str(path),
            mode=oct(self._config.socket_mode),
            tcp=None if self._tcp_address is None else f"{self._tcp_address[0]}:{self._tcp_address[1]}",
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        log.info("api.draining", timeout_s=self._config.drain_timeout_s)
        await self._close()
        log.info("api.stopped")

    async def _close(self) -> None:
        self.state.draining = True
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                await runner.cleanup()
            await self.state.settle()  # admin changes whose clients went away: finish them and their audit
        finally:
            self._remove_socket()

    def _remove_socket(self) -> None:
        if self._socket_inode is None:
            return
        path = self._config.socket_path
        with contextlib.suppress(FileNotFoundError):
            info = path.lstat()
            if (info.st_dev, info.st_ino) == self._socket_inode:
                path.unlink()
        self._socket_inode = None
