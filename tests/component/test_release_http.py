"""HTTP release delivery: the controller's artifact server and hostile mirrors against the agent's HTTP client.

Real parts: ``ReleaseRepository`` (signed metadata), ``ArtifactServer`` on a loopback port, python-tuf through
``HttpMetadataSource``, ``HttpBlobFetcher``. The hostile mirrors are small aiohttp apps (the fetcher's seam is
its URL).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

import agent.link.fetch as fetch_module
from agent.link.fetch import FetchError, FetchPolicy, FetchRefusedError, HttpBlobFetcher
from agent.link.updater import HttpMetadataSource, ReleaseUnavailableError, ReleaseUpdater, VerifiedTarget
from controller.link.http import ArtifactServer
from controller.releases import ModelDetails, ReleaseRepository

pytestmark = pytest.mark.component

PATH = "models/tiny/1/q4_0.gguf"
CHUNK = 16 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    """A repository with one published 200 kB target in 16 KiB chunks."""
    repo = ReleaseRepository.create(tmp_path / "repo")
    model = tmp_path / "tiny.gguf"
    model.write_bytes(hashlib.sha256(b"seed").digest() * 6400)
    repo.add_model(model, name="tiny", variant="q4_0", details=ModelDetails(chunk_size=CHUNK))
    repo.publish()
    return repo


@pytest.fixture
async def artifacts(repo: ReleaseRepository) -> AsyncIterator[ArtifactServer]:
    async with ArtifactServer(repo, "127.0.0.1", 0) as server:
        yield server


async def _lookup(repo: ReleaseRepository, server: ArtifactServer, tmp_path: Path) -> VerifiedTarget:
    source = HttpMetadataSource(server.url)
    updater = ReleaseUpdater(tmp_path / "tuf", source, bootstrap=repo.metadata_bytes("root", 1))
    return await updater.target(PATH)


async def _mirror(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/blob", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/blob"


async def _fetch_from_tampered_mirror(
    repo: ReleaseRepository, target: VerifiedTarget, tmp_path: Path, *, chunk: int
) -> None:
    """Fetch ``target`` from a mirror serving it with one bit flipped in ``chunk``: refused at that chunk."""
    data = bytearray(repo.blob_path(target.sha256).read_bytes())
    data[chunk * CHUNK + 1] ^= 0x80

    async def tampered(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bytes(data))

    runner, url = await _mirror(tampered)
    try:
        with pytest.raises(FetchRefusedError, match=f"chunk {chunk} failed verification"):
            await HttpBlobFetcher().fetch(target, tmp_path / "out", url)
    finally:
        await runner.cleanup()


async def test_metadata_and_blob_over_http(repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path) -> None:
    """TUF metadata and the blob come from the artifact server; the file has the signed sha256."""
    target = await _lookup(repo, artifacts, tmp_path)
    stats = await HttpBlobFetcher().fetch(target, tmp_path / "out", f"{artifacts.url}/targets/{PATH}")
    assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == target.sha256
    assert set(stats.verified.values()) == {1}


async def test_dropped_connection_resumes_with_range(
    repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path
) -> None:
    """A mirror that drops the first connection at 40 %: the retry asks for the rest with Range, nothing twice."""
    target = await _lookup(repo, artifacts, tmp_path)
    data = repo.blob_path(target.sha256).read_bytes()
    ranges: list[str | None] = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:
            response = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: int(len(data) * 0.4)])
            assert request.transport is not None
            request.transport.close()
            return response
        start = int(request.headers["Range"].split("=")[1].split("-")[0])
        return web.Response(status=206, body=data[start:])

    runner, url = await _mirror(flaky)
    try:
        stats = await HttpBlobFetcher(retries=2).fetch(target, tmp_path / "out", url)
    finally:
        await runner.cleanup()
    assert (tmp_path / "out").read_bytes() == data
    assert ranges[0] is None
    assert ranges[1] is not None
    assert ranges[1].startswith("bytes=")
    assert set(stats.verified.values()) == {1}
    assert len(stats.verified) == len(target.fields.chunks)


async def test_tampered_mirror_is_refused(repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path) -> None:
    """A mirror serving changed bytes of the right length is refused at the first bad chunk."""
    target = await _lookup(repo, artifacts, tmp_path)
    await _fetch_from_tampered_mirror(repo, target, tmp_path, chunk=5)


async def test_endless_data_is_refused(repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path) -> None:
    """A mirror sending more bytes than the signed length is refused; the file never exceeds the length."""
    target = await _lookup(repo, artifacts, tmp_path)
    data = repo.blob_path(target.sha256).read_bytes() + b"\0" * 50_000

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(data)
        return response

    runner, url = await _mirror(endless)
    try:
        with pytest.raises(FetchRefusedError, match="more bytes than the signed length"):
            await HttpBlobFetcher().fetch(target, tmp_path / "out", url)
    finally:
        await runner.cleanup()
    assert (tmp_path / "out").stat().st_size <= target.length


async def test_unpublished_path_is_not_served(
    artifacts: ArtifactServer, repo: ReleaseRepository, tmp_path: Path
) -> None:
    """The artifact server serves published targets only (404 otherwise)."""
    target = await _lookup(repo, artifacts, tmp_path)
    with pytest.raises(FetchError, match="HTTP 404"):
        await HttpBlobFetcher(FetchPolicy(), retries=0).fetch(
            target, tmp_path / "out", f"{artifacts.url}/targets/models/tiny/2/q4_0.gguf"
        )


async def test_complete_download_with_trailing_bytes_is_cut_to_the_signed_length(
    repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path
) -> None:
    """Every chunk already on disk, followed by junk: nothing is fetched, the junk is cut, the file is the target."""
    target = await _lookup(repo, artifacts, tmp_path)
    out = tmp_path / "out"
    await HttpBlobFetcher().fetch(target, out, f"{artifacts.url}/targets/{PATH}")
    with out.open("ab") as f:
        f.write(b"junk past the signed length")
    stats = await HttpBlobFetcher().fetch(target, out, f"{artifacts.url}/targets/{PATH}")
    assert not stats.verified
    assert len(stats.resumed) == len(target.fields.chunks)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == target.sha256


def _failing_flushes(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fetch_module, "_datasync", failing)
    monkeypatch.setattr(fetch_module, "_SYNC_EVERY", 4 * CHUNK)


async def test_a_failed_flush_fails_a_complete_download_and_keeps_nothing_of_it(
    repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chunk verified, but a background flush failed: the download is an I/O error, not a file to install,
    and its chunks are not kept for a resume (their pages read back fine although the disk may not hold them)."""
    target = await _lookup(repo, artifacts, tmp_path)
    _failing_flushes(monkeypatch)
    with pytest.raises(OSError, match="Input/output error"):
        await HttpBlobFetcher().fetch(target, tmp_path / "out", f"{artifacts.url}/targets/{PATH}")
    assert (tmp_path / "out").stat().st_size == 0


async def test_a_refused_source_is_reported_as_refused_even_if_a_flush_failed(
    repo: ReleaseRepository, artifacts: ArtifactServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tampered chunk decides what the caller does (drop this source, try the next): a flush failure on the
    way out must not replace it."""
    target = await _lookup(repo, artifacts, tmp_path)
    _failing_flushes(monkeypatch)
    await _fetch_from_tampered_mirror(repo, target, tmp_path, chunk=9)


@pytest.mark.parametrize("fault", ["endless 100 Continue", "trickled body"])
async def test_a_stalling_metadata_server_is_dropped_at_the_timeout(fault: str) -> None:
    """A metadata GET whose server sends interim answers forever, or trickles the body a byte per 0.2 s (each read
    within the socket timeout), fails as unavailable at its overall timeout: the refresh, which holds the
    updater's lock, is not held by it."""
    release = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if fault == "trickled body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not release.is_set():
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" if fault == "endless 100 Continue" else b"{")
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    source = HttpMetadataSource(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(ReleaseUnavailableError, match="within 1 s"):
            await asyncio.wait_for(asyncio.to_thread(source.get, "timestamp", None, 1 << 20), 8)
        assert time.monotonic() - started < 3
    finally:
        release.set()
        server.close()
