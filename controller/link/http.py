"""The controller's HTTP artifact server: release metadata and published blobs (``[controller] artifact_port``).

Routes (read-only, no authentication: everything served is public and integrity comes from TUF):

- ``GET /metadata/<N>.root.json``, ``/metadata/timestamp.json``, ``/metadata/<N>.snapshot.json``,
  ``/metadata/<N>.targets.json`` — the repository's signed metadata, as python-tuf's HTTP layout expects.
- ``GET /targets/models/<name>/<version>/<variant>.<ext>`` — the blob of a *published* target, with ``Range``
  support (resumable downloads; aiohttp's ``FileResponse``).

Any HTTP mirror or CDN serving the same paths works the same way for devices.
"""

from __future__ import annotations

import asyncio
import re
from types import TracebackType

import structlog
from aiohttp import web

from controller.releases import ReleaseError, ReleaseRepository
from protocols.messages import TARGET_PATH_RE

__all__ = ["ArtifactServer"]

log = structlog.get_logger(__name__)

_METADATA_RE = re.compile(r"(?:[1-9][0-9]{0,18}\.(?:root|snapshot|targets)|timestamp)\.json")


class ArtifactServer:
    """The artifact server as an async context manager (see the module docstring)."""

    def __init__(self, repo: ReleaseRepository, host: str, port: int) -> None:
        self.repo = repo
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/metadata/{name}", self._metadata)
        app.router.add_get("/targets/{path:models/.+}", self._target)
        self.app = app

    @property
    def url(self) -> str:
        """The base URL (``http://host:port``), valid once started."""
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> ArtifactServer:
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        if self.port == 0:
            server = site._server  # the bound port when 0 was asked for (tests, benchmarks)
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("artifacts.listening", url=self.url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metadata(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not _METADATA_RE.fullmatch(name):
            raise web.HTTPNotFound()
        path = self.repo.metadata_dir / name
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})

    async def _target(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        if not TARGET_PATH_RE.fullmatch(path):
            raise web.HTTPNotFound()
        try:
            target = await asyncio.to_thread(self.repo.target, path)
        except ReleaseError as exc:
            raise web.HTTPNotFound() from exc
        blob = self.repo.blob_path(target.hashes["sha256"])
        return web.FileResponse(blob, headers={"Content-Type": "application/octet-stream"})
