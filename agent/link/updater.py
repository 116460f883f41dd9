"""The agent's TUF client: python-tuf's ``Updater`` behind a transport-independent metadata source.

DESIGN.md §4: the agent installs a model only if TUF verifies its target info, and the blob matches it. This
module does the first half; ``agent/link/fetch.py`` the second.

- :class:`MetadataSource` is the one seam: ``get(role, version)`` returns the bytes of ``<version>.<role>.json``
  (or ``timestamp.json``) or ``None`` if the repository has no such document. The MQTT link implements it with
  retained ``edgefleet/v1/repo/...`` messages, the HTTP source with the artifact server, and tests with a
  directory (:class:`DirectorySource`).
- :class:`_SourceFetcher` adapts it to python-tuf's ``FetcherInterface``: a missing document is an HTTP-404-like
  ``DownloadHTTPError`` (which ends root rotation, as TUF §5.3 expects), any other failure a ``DownloadError``.
- :class:`ReleaseUpdater` runs one refresh at a time in a worker thread (python-tuf is blocking and an
  ``Updater`` is not reusable after a refresh: a new one is built from the trusted metadata on disk each time).
  Every python-tuf error becomes a :class:`ReleaseError` naming the TUF check that failed; nothing partial is
  trusted. Rollback, freeze (expired timestamp), fast-forward, mix-and-match and threshold attacks are
  therefore refused by python-tuf's ``TrustedMetadataSet``, not by code here.

Errors::

    LinkError
     └── ReleaseError                 a release cannot be trusted or found
          ├── ReleaseUnavailableError  metadata could not be fetched (link down, timeout) or stored (disk full):
          │    │                       try again later
          │    └── ReleaseStaleError   the metadata served is expired or older than the trusted one (a freeze or
          │                            a replay on the way, a signer not re-signing yet): nothing is trusted,
          │                            but the next refresh may find current metadata, so try again later
          └── ReleaseRefusedError      TUF refused the metadata, or the target is absent/invalid: do not retry
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.errors import LinkError
from protocols.canonical import SHA256_RE
from protocols.errors import DecodeError
from protocols.releases import (
    ASSIGNMENT_KEYS_TARGET,
    AssignmentKeyList,
    ModelTargetFields,
    assignment_keys_from_target,
)

__all__ = [
    "DirectorySource",
    "HttpMetadataSource",
    "MetadataSource",
    "ReleaseError",
    "ReleaseRefusedError",
    "ReleaseStaleError",
    "ReleaseUnavailableError",
    "ReleaseUpdater",
    "VerifiedTarget",
]

METADATA_BASE = "edgefleet-repo:/metadata/"
_NAME_RE = re.compile(r"(?:(?P<version>[1-9][0-9]{0,18})\.)?(?P<role>[a-z0-9][a-z0-9._-]{0,63})\.json")


class ReleaseError(LinkError):
    """A release cannot be trusted or found."""


class ReleaseUnavailableError(ReleaseError):
    """Repository metadata could not be fetched (the link is down or slow): retry later."""


class ReleaseStaleError(ReleaseUnavailableError):
    """The metadata served is expired (freeze) or older than the trusted one (rollback): refused now, retried later.

    TUF's checks hold (nothing in it is trusted); but the cause is on the way or at the signer, not in the
    release, so it must not refuse the release until a new generation.
    """


class ReleaseRefusedError(ReleaseError):
    """TUF refused the metadata (signature, threshold, rollback, expiry, mix-and-match), or the target is bad."""


class MetadataSource(Protocol):
    """Where repository metadata comes from (the seam; see the module docstring). Called from a worker thread."""

    def get(self, role: str, version: int | None, max_length: int) -> bytes | None:
        """The document ``<version>.<role>.json`` (``timestamp.json`` if ``version`` is None), or None if absent.

        Raises:
            ReleaseUnavailableError: the source cannot be reached.
        """
        ...

    def forget(self, role: str, version: int) -> None:
        """TUF refused a refresh that used ``<version>.<role>.json`` from here: drop any copy kept of it, so that
        the next refresh asks the repository again instead of failing on the same bytes."""
        ...


class DirectorySource:
    """Metadata from a directory laid out like the controller's ``repo/metadata`` (bundles, tests)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get(self, role: str, version: int | None, max_length: int) -> bytes | None:
        """The file, or None if it does not exist."""
        name = f"{role}.json" if version is None else f"{version}.{role}.json"
        try:
            with (self.directory / name).open("rb") as f:
                return f.read(max_length + 1)
        except FileNotFoundError:
            return None

    def forget(self, role: str, version: int) -> None:
        """Nothing is kept."""


class HttpMetadataSource:
    """Metadata from an HTTP artifact server or mirror: ``GET <base>/metadata/<name>`` (404: absent).

    ``timeout`` bounds the whole request — connect, TLS handshake, head (however many ``100 Continue`` answers)
    and body — not each socket read: a timer shuts the request's socket down when it is reached. The refresh
    holds :class:`ReleaseUpdater`'s lock (key refreshes and installs wait for it), so a server that trickles
    must not be able to hold it for longer.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def get(self, role: str, version: int | None, max_length: int) -> bytes | None:
        """The document, or None on 404."""
        name = f"{role}.json" if version is None else f"{version}.{role}.json"
        url = f"{self.base_url}/metadata/{name}"
        request = _AbortableRequest()
        timer = threading.Timer(self.timeout, request.abort)
        timer.daemon = True
        timer.start()
        try:
            opener = urllib.request.build_opener(
                _HookedHandler(request.connected), _HookedHttpsHandler(request.connected)
            )
            with opener.open(url, timeout=self.timeout) as response:
                data: bytes = response.read(max_length + 1)
        except urllib.error.HTTPError as exc:
            if exc.code in (403, 404):
                return None
            raise ReleaseUnavailableError(f"{url}: HTTP {exc.code}") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            if request.aborted:
                raise ReleaseUnavailableError(f"{url}: no complete answer within {self.timeout:g} s") from exc
            raise ReleaseUnavailableError(f"{url}: {exc}") from exc
        finally:
            timer.cancel()
        if request.aborted:  # the body may have been cut short by the abort
            raise ReleaseUnavailableError(f"{url}: no complete answer within {self.timeout:g} s")
        return data

    def forget(self, role: str, version: int) -> None:
        """Nothing is kept."""


class _AbortableRequest:
    """The sockets of one metadata request, shut down by :meth:`abort` (from the timer's thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.aborted = False

    def connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if not self.aborted:
                return
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # too late already

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            sockets = list(self._sockets)
        for sock in sockets:  # the plain socket's shutdown: a TLS layer above it sees the end too
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _hooked(connection_class: type[http.client.HTTPConnection], hook: Callable[[socket.socket], None]) -> Any:
    """A factory of ``connection_class`` whose plain socket is handed to ``hook`` once connected (before TLS)."""

    def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        connection = connection_class(*args, **kwargs)
        create = connection._create_connection  # type: ignore[attr-defined]

        def create_and_hook(*a: Any, **kw: Any) -> socket.socket:
            sock: socket.socket = create(*a, **kw)
            hook(sock)
            return sock

        connection._create_connection = create_and_hook  # type: ignore[attr-defined]
        return connection

    return make


class _HookedHandler(urllib.request.HTTPHandler):
    def __init__(self, hook: Callable[[socket.socket], None]) -> None:
        super().__init__()
        self._hook = hook

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_hooked(http.client.HTTPConnection, self._hook), req)


class _HookedHttpsHandler(urllib.request.HTTPSHandler):
    def __init__(self, hook: Callable[[socket.socket], None]) -> None:
        super().__init__()
        self._hook = hook

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_hooked(http.client.HTTPSConnection, self._hook), req)


class _SourceFetcher(FetcherInterface):
    """python-tuf's fetcher interface over a :class:`MetadataSource`."""

    def __init__(self, source: MetadataSource, max_length: int) -> None:
        self.source = source
        self.max_length = max_length
        self.served: set[tuple[str, int]] = set()
        """The versioned documents the source returned (what to forget if TUF refuses the refresh)."""
        self.last: tuple[str, int | None] | None = None
        """The document asked for last: the one TUF was checking when it raised."""

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(METADATA_BASE):
            raise tuf_exc.DownloadHTTPError(f"only metadata is fetched through the updater, not {url}", 404)
        match = _NAME_RE.fullmatch(url[len(METADATA_BASE) :])
        if match is None:
            raise tuf_exc.DownloadHTTPError(f"no such metadata {url}", 404)
        version = match.group("version")
        self.last = (match.group("role"), int(version) if version else None)
        try:
            data = self.source.get(match.group("role"), int(version) if version else None, self.max_length)
        except ReleaseUnavailableError as exc:
            raise tuf_exc.DownloadError(str(exc)) from exc
        if data is None:
            raise tuf_exc.DownloadHTTPError(f"{url} is not in the repository", 404)
        if version:
            self.served.add((match.group("role"), int(version)))
        return iter([data])


@dataclass(frozen=True, slots=True)
class VerifiedTarget:
    """A model target whose info TUF verified: trust its length, sha256 and fields, nothing else."""

    path: str
    length: int
    sha256: str
    fields: ModelTargetFields
    mirrors: tuple[str, ...]


class ReleaseUpdater:
    """Refresh TUF metadata and look up targets, one refresh at a time (see the module docstring)."""

    def __init__(
        self,
        metadata_dir: Path,
        source: MetadataSource,
        *,
        bootstrap: bytes | None = None,
        config: UpdaterConfig | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.source = source
        self.config = config or UpdaterConfig()
        self._bootstrap = bootstrap
        self._lock = asyncio.Lock()
        metadata_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def bootstrapped(self) -> bool:
        """Whether a trusted root exists (from the enrollment bundle, or cached after a refresh)."""
        return self._bootstrap is not None or (self.metadata_dir / "root.json").exists()

    def _updater(self, fetcher: _SourceFetcher) -> Updater:
        if not self.bootstrapped:
            raise ReleaseRefusedError(f"no trusted root in {self.metadata_dir} and none in the enrollment bundle")
        try:
            return Updater(
                str(self.metadata_dir),
                METADATA_BASE,
                fetcher=fetcher,
                config=self.config,
                bootstrap=self._bootstrap if not (self.metadata_dir / "root.json").exists() else None,
            )
        except (tuf_exc.RepositoryError, ValueError) as exc:
            raise ReleaseRefusedError(f"no usable trusted root in {self.metadata_dir}: {exc}") from exc
        except OSError as exc:  # reading or writing the state directory (a full disk, I/O errors): not a verdict
            raise ReleaseUnavailableError(f"cannot use the trusted metadata in {self.metadata_dir}: {exc}") from exc

    def lookup(self, path: str) -> VerifiedTarget:
        """Refresh (root, timestamp, snapshot, targets) and return the verified info of target ``path``.

        Blocking: call from a worker thread, or use :meth:`target`.

        Raises:
            ReleaseUnavailableError: metadata could not be fetched.
            ReleaseRefusedError: TUF refused the metadata, or ``path`` is not a valid signed target.
        """
        info = self._refreshed_targetinfo(path)
        if info is None:
            raise ReleaseRefusedError(f"{path} is not a target of the verified repository")
        return _verified(info.path, info.length, info.hashes, info.custom)

    def _refreshed_targetinfo(self, path: str) -> TargetFile | None:
        """Refresh the metadata (TUF's whole client workflow), then ``path``'s signed info, or None if unlisted."""
        fetcher = _SourceFetcher(self.source, max(self.config.root_max_length, self.config.targets_max_length))
        updater = self._updater(fetcher)
        try:
            updater.refresh()
            return updater.get_targetinfo(path)
        except tuf_exc.RepositoryError as exc:
            # one of the documents is bad (or was replaced on the way): a source that keeps copies must not
            # serve the same bytes to every later refresh
            for role, version in fetcher.served:
                self.source.forget(role, version)
            if isinstance(exc, tuf_exc.ExpiredMetadataError):
                raise ReleaseStaleError(f"repository metadata expired (freeze protection): {exc}") from exc
            if isinstance(exc, tuf_exc.BadVersionNumberError) and fetcher.last == ("timestamp", None):
                # a timestamp older than the trusted one (or naming an older snapshot): a replay on the way
                raise ReleaseStaleError(f"repository timestamp older than trusted (rollback): {exc}") from exc
            raise ReleaseRefusedError(f"TUF refused the repository metadata: {type(exc).__name__}: {exc}") from exc
        except tuf_exc.DownloadError as exc:
            raise ReleaseUnavailableError(f"repository metadata unavailable: {exc}") from exc
        except OSError as exc:  # python-tuf persisting verified metadata (a full disk): try again later
            raise ReleaseUnavailableError(f"cannot store the repository metadata: {exc}") from exc

    def lookup_assignment_keys(self) -> AssignmentKeyList | None:
        """Refresh, then the verified assignment key list (None: the repository publishes none).

        The list is the content of the target ``keys/assignments.json``, carried in its ``custom`` field: its
        canonical bytes must have the target's signed length and sha256 before they are parsed (DESIGN.md §4:
        the keys rotate under TUF's rules). Blocking: call from a worker thread, or use :meth:`assignment_keys`.

        Raises:
            ReleaseUnavailableError: metadata could not be fetched.
            ReleaseRefusedError: TUF refused the metadata, or the listed document is invalid.
        """
        info = self._refreshed_targetinfo(ASSIGNMENT_KEYS_TARGET)
        if info is None:
            return None
        try:
            return assignment_keys_from_target(info.custom, info.length, info.hashes.get("sha256"))
        except DecodeError as exc:
            raise ReleaseRefusedError(str(exc)) from exc

    async def assignment_keys(self) -> AssignmentKeyList | None:
        """:meth:`lookup_assignment_keys` in a worker thread, one refresh at a time."""
        async with self._lock:
            return await asyncio.to_thread(self.lookup_assignment_keys)

    async def target(self, path: str) -> VerifiedTarget:
        """:meth:`lookup` in a worker thread; concurrent calls wait for each other."""
        async with self._lock:
            return await asyncio.to_thread(self.lookup, path)

    def trusted_versions(self) -> dict[str, int]:
        """Versions of the trusted metadata cached on disk (for status output)."""
        from tuf.api.metadata import Metadata

        found: dict[str, int] = {}
        for role in ("root", "timestamp", "snapshot", "targets"):
            path = self.metadata_dir / f"{role}.json"
            if path.exists():
                found[role] = Metadata.from_bytes(path.read_bytes()).signed.version
        return found


def _verified(path: str, length: int, hashes: Mapping[str, str], custom: Mapping[str, Any]) -> VerifiedTarget:
    sha256 = hashes.get("sha256")
    if sha256 is None:
        raise ReleaseRefusedError(f"target {path} has no sha256")
    if not isinstance(sha256, str) or SHA256_RE.fullmatch(sha256) is None:
        # python-tuf does not check that a hash is hex; it names files (downloads/fetch-<sha256>, the blob)
        raise ReleaseRefusedError(f"target {path}: its sha256 is not 64 lower-case hex digits")
    try:
        fields = ModelTargetFields.from_custom(custom, length)
    except DecodeError as exc:
        raise ReleaseRefusedError(f"target {path}: {exc}") from exc
    mirrors: Sequence[object] = custom.get("mirrors", []) if isinstance(custom.get("mirrors"), list) else []
    return VerifiedTarget(
        path=path,
        length=length,
        sha256=sha256,
        fields=fields,
        mirrors=tuple(m for m in mirrors if isinstance(m, str) and m.startswith(("http://", "https://"))),
    )
