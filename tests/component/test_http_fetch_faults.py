"""The HTTP fetcher against misbehaving servers: trickling, stalling, resetting, redirecting badly, and a flush
failing while the link drops; a stop (or two) while the receiving thread holds the file.

Real parts: :class:`agent.link.fetch.HttpBlobFetcher` and its receiving thread, a real file, and a raw asyncio
TCP server answering with hand-written HTTP/1.1 (so the faults are exactly those of the wire, which an aiohttp
test server would smooth over: ``Connection: close``, a reset with SO_LINGER 0, a malformed ``Location``).
Found by a review of ADR 0015's change; each test failed on the first version of it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import agent.link.fetch as fetch_module
from agent.link.fetch import FetchError, FetchPolicy, FetchTimeoutError, HttpBlobFetcher, verified_chunks
from agent.link.updater import VerifiedTarget
from protocols.releases import ModelTargetFields, chunk_digests

pytestmark = pytest.mark.component

CHUNK = 1024
Handler = Callable[[str, asyncio.StreamWriter, int], Awaitable[None]]


def _target(data: bytes) -> VerifiedTarget:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    fields = ModelTargetFields("bin", "q4_0", 1, 1, 1, (), (), "mit", CHUNK, tuple(chunk_digests(chunks)))
    return VerifiedTarget("models/t/1/q4_0.bin", len(data), hashlib.sha256(data).hexdigest(), fields, ())


def _head(status: str, length: int, *extra: str) -> bytes:
    return "".join(
        [f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\n", *(f"{h}\r\n" for h in extra), "\r\n"]
    ).encode()


class _Server:
    """A raw HTTP/1.1 server: ``handler(request head, writer, request number)`` writes the whole answer."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/blob"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            self.requests.append(head)
            await self.handler(head, writer, len(self.requests))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def test_a_trickling_server_is_abandoned_for_its_throughput(tmp_path: Path) -> None:
    """1 byte every 0.1 s after a first chunk: the minimum throughput ends the fetch right after the grace period
    (checked on every read, not once per buffer)."""
    data = os.urandom(2 << 20)

    async def trickle(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(_head("200 OK", len(data)) + data[:CHUNK])
        for byte in data[CHUNK:]:
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()

    policy = FetchPolicy(grace_s=1.0, min_throughput_bps=100_000, request_timeout_s=5)
    async with _Server(trickle) as url:
        with pytest.raises(FetchTimeoutError, match="below the minimum"):
            await asyncio.wait_for(HttpBlobFetcher(policy).fetch(_target(data), tmp_path / "out", url), 8)


@pytest.mark.parametrize("fault", ["endless 100 Continue", "trickled head", "silent head", "stalled body"])
async def test_a_server_stalling_before_or_in_the_body_is_dropped_at_the_deadline(tmp_path: Path, fault: str) -> None:
    """A server that never finishes the head (interim answers forever, one byte of it per 0.3 s, or nothing) or
    stalls the body: each read is within the socket timeout, yet the fetch ends at its deadline / minimum
    throughput (a watchdog aborts the request, checks no longer wait for a body read) and its thread lets go."""
    data = os.urandom(8 * CHUNK)
    release = asyncio.Event()

    async def stall(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        if fault == "endless 100 Continue":
            while not release.is_set():
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.3)
        elif fault == "trickled head":
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if release.is_set():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.3)
        elif fault == "stalled body":
            writer.write(_head("200 OK", len(data)) + data[: 3 * CHUNK])
            await writer.drain()
        await release.wait()

    policy = FetchPolicy(deadline_s=2.0, grace_s=1.0, min_throughput_bps=100_000, request_timeout_s=5)
    try:
        async with _Server(stall) as url:
            started = time.monotonic()
            with pytest.raises(FetchTimeoutError):
                await asyncio.wait_for(HttpBlobFetcher(policy).fetch(_target(data), tmp_path / "out", url), 10)
            assert time.monotonic() - started < 4, "the fetch outlived its deadline"
            await _until(lambda: not [t for t in threading.enumerate() if t.name == "fetch-http"], within=3)
    finally:
        release.set()


@pytest.mark.parametrize("connection", ["keep-alive", "close"])
async def test_a_stop_mid_transfer_is_prompt_and_keeps_the_verified_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connection: str
) -> None:
    """A stop (the fetch task cancelled) while the body stalls half-way: the receiving thread's connection is shut
    down at once, also for a ``Connection: close`` answer (``http.client`` drops the connection's socket reference
    for those, HTTP/1.0 servers alike) instead of waiting for the read timeout; the stop propagates (not an error
    of the transfer, which would read as a failed source); and the chunks verified before it stay for a resume."""
    data = os.urandom(8 * CHUNK)
    target = _target(data)
    release = asyncio.Event()
    monkeypatch.setattr(fetch_module, "_BATCH_BYTES", CHUNK)  # every chunk written as it arrives

    async def stall(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(_head("200 OK", len(data), f"Connection: {connection}") + data[: 3 * CHUNK + 100])
        await writer.drain()
        await release.wait()

    out = tmp_path / "out"
    try:
        async with _Server(stall) as url:
            task = asyncio.create_task(HttpBlobFetcher(FetchPolicy(request_timeout_s=2.0)).fetch(target, out, url))
            await _until(lambda: verified_chunks(out, target) == {0, 1, 2})
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - started < 2, "the stop waited for the socket's read timeout"
    finally:
        release.set()
    await _until(lambda: not [t for t in threading.enumerate() if t.name == "fetch-http"])  # the thread has ended
    assert verified_chunks(out, target) == {0, 1, 2}
    assert out.read_bytes() == data[: 3 * CHUNK]


@pytest.mark.parametrize("how", ["read timeout", "reset"])
async def test_whole_chunks_before_a_failed_read_are_kept(tmp_path: Path, how: str) -> None:
    """The server stalls (until the read timeout) or resets the connection after 3 chunks and 100 bytes: the
    three whole chunks are verified and on disk for the resume, the partial fourth is not."""
    data = os.urandom(8 * CHUNK)
    target = _target(data)
    release = asyncio.Event()

    async def fail(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(_head("200 OK", len(data)) + data[: 3 * CHUNK + 100])
        await writer.drain()
        if how == "reset":
            await asyncio.sleep(0.3)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            await release.wait()

    out = tmp_path / "out"
    try:
        async with _Server(fail) as url:
            with pytest.raises(FetchError):
                await HttpBlobFetcher(FetchPolicy(request_timeout_s=0.2), retries=0).fetch(target, out, url)
    finally:
        release.set()
    assert verified_chunks(out, target) == {0, 1, 2}


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:99999/x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9.gguf\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["port out of range", "non-ASCII location", "non-ASCII length", "bad chunk size"],
)
async def test_a_malformed_answer_is_a_fetch_error(tmp_path: Path, answer: bytes) -> None:
    """A mirror's malformed redirect, length or chunked body is a FetchError (the installer goes on to the next
    source), never another exception escaping the fetcher."""
    data = os.urandom(4 * CHUNK)

    async def malformed(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(answer)
        await writer.drain()

    async with _Server(malformed) as url:
        with pytest.raises(FetchError):
            await HttpBlobFetcher(retries=0).fetch(_target(data), tmp_path / "out", url)


async def test_a_failed_flush_then_a_dropped_link_fails_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A background flush fails (the file is emptied) and then the connection drops: the retry must not count the
    emptied chunks as verified (it would assemble the tail after zeros, and the file would pass as complete). The
    download fails as a write error instead, and nothing of it is kept."""
    data = os.urandom(8 * CHUNK)
    failed: list[int] = []

    def datasync(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        os.fdatasync(fd)

    monkeypatch.setattr(fetch_module, "_datasync", datasync)
    monkeypatch.setattr(fetch_module, "_SYNC_EVERY", 2 * CHUNK)
    monkeypatch.setattr(fetch_module, "_BATCH_BYTES", CHUNK)

    async def drop_then_resume(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        if n == 1:
            writer.write(_head("200 OK", len(data)) + data[: 4 * CHUNK])
            await writer.drain()
            await asyncio.sleep(0.3)
            return  # dropped
        start = int(head.split("bytes=")[1].split("-")[0])
        writer.write(_head("206 Partial Content", len(data) - start) + data[start:])
        await writer.drain()

    out = tmp_path / "out"
    async with _Server(drop_then_resume) as url:
        with pytest.raises(OSError, match="Input/output error"):
            await HttpBlobFetcher().fetch(_target(data), out, url)
    assert not out.exists() or out.stat().st_size == 0


async def test_a_second_cancel_waits_for_the_thread_to_let_the_file_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled twice (a stop, then a shutdown's cancel) while the receiving thread is in a slow flush: the task
    ends only once the thread has closed the file (a new fetch of the same file must never write beside it)."""
    data = os.urandom(8 * CHUNK)
    release = asyncio.Event()
    flushing = threading.Event()
    flushed: list[int] = []

    def slow_sync(fd: int) -> None:
        flushing.set()
        time.sleep(1.0)  # a slow SD card
        os.fdatasync(fd)
        flushed.append(fd)

    monkeypatch.setattr(fetch_module, "_datasync", slow_sync)
    monkeypatch.setattr(fetch_module, "_SYNC_EVERY", 2 * CHUNK)
    monkeypatch.setattr(fetch_module, "_BATCH_BYTES", CHUNK)

    async def stall(head: str, writer: asyncio.StreamWriter, n: int) -> None:
        writer.write(_head("200 OK", len(data)) + data[: 3 * CHUNK + 100])
        await writer.drain()
        await release.wait()

    try:
        async with _Server(stall) as url:
            task = asyncio.create_task(HttpBlobFetcher().fetch(_target(data), tmp_path / "out", url))
            await asyncio.to_thread(flushing.wait, 5)
            task.cancel()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert flushed, "the task ended while the thread was still flushing the file"
    finally:
        release.set()


async def _until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
