"""Blob delivery over MQTT chunks: windowed requests, per-chunk verification on arrival, resume.

The agent asks the controller for a window of chunks of one blob (:class:`~protocols.messages.FetchRequest` on
``devices/<d>/fetch``) and receives binary frames on ``devices/<d>/chunk`` (docs/protocol.md §4.6). Only
:class:`~agent.link.updater.VerifiedTarget` data is trusted: its per-chunk sha256 list, chunk size and length.

Invariants:

- A chunk is written into the partial file only after its length and sha256 match the signed chunk list, and
  only if it was requested in this transfer (frames of other transfers, unrequested or already verified indices
  are dropped); the file never holds more than the signed length.
- Resume: on start, the chunks already in the partial file are hashed; those that match the signed list are
  kept and never requested again — after a disconnect (requests in flight are re-sent for the chunks still
  missing), and after an agent restart alike. A verified chunk is therefore fetched at most once per file.
- A chunk that fails verification ``max_bad_chunks`` times aborts the transfer (:class:`FetchRefusedError`).
- A total deadline and a minimum throughput (after a grace period) bound slow retrieval
  (:class:`FetchTimeoutError`).
- At the end the whole file is fsynced and its length and sha256 checked against the target; the caller then
  installs it through the registry's state machine (moving the file, not copying it).
- Speed without weaker checks (HTTP): chunks are verified and written by one worker thread, in order, while the
  next ones arrive (:class:`_ChunkWriter`); the whole-file sha256 is computed on the way (never a re-read); the
  kernel is asked to start writing back every few MiB, so the final fsync has little left to wait for.

Errors::

    LinkError
     └── FetchError                  a blob could not be fetched
          ├── FetchRefusedError      the data failed verification: do not retry this source blindly
          └── FetchTimeoutError      deadline or minimum throughput not met
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog

from agent.errors import LinkError
from agent.link.updater import VerifiedTarget
from protocols.errors import DecodeError
from protocols.messages import FetchRequest, decode_chunk
from protocols.releases import chunk_span

__all__ = [
    "DOWNLOADS_DIR",
    "ChunkLink",
    "FetchError",
    "FetchPolicy",
    "FetchRefusedError",
    "FetchStats",
    "FetchTimeoutError",
    "HttpBlobFetcher",
    "MqttBlobFetcher",
    "finish_file",
    "verified_chunks",
]

log = structlog.get_logger(__name__)

DOWNLOADS_DIR = "downloads"
"""Under the state directory: transfers in progress (``fetch-<sha256>``), kept across restarts to resume. Not the
registry's ``partial/``, which the registry's recovery empties of files no install owns."""

Progress = Callable[[int, int], None]


class FetchError(LinkError):
    """A blob could not be fetched."""


class FetchRefusedError(FetchError):
    """Delivered data failed verification (tampered chunk, wrong length, wrong sha256)."""


class FetchTimeoutError(FetchError):
    """The transfer missed its deadline or its minimum throughput."""


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Bounds of one transfer."""

    window: int = 16
    """Chunks requested and not yet received, at most (keeps the broker's queue for this device short)."""
    request_timeout_s: float = 5.0
    """Silence after which the missing chunks of the window are requested again."""
    deadline_s: float = 6 * 3600.0
    """The whole transfer, at most."""
    min_throughput_bps: float = 8 * 1024.0
    """Average bytes per second below which the transfer is abandoned (after ``grace_s``)."""
    grace_s: float = 60.0
    max_bad_chunks: int = 3
    """Failed verifications of one chunk index before the transfer is refused."""


@dataclass
class FetchStats:
    """What one transfer did (for reports, the benchmark and tests)."""

    resumed: set[int] = field(default_factory=set)
    """Chunks found verified in the partial file at the start (never requested)."""
    verified: Counter[int] = field(default_factory=Counter)
    requested: Counter[int] = field(default_factory=Counter)
    bad_chunks: int = 0
    ignored_frames: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class ChunkLink(Protocol):
    """What the fetcher needs of the MQTT link (:class:`agent.link.mqtt.AgentLink`)."""

    device: str
    connected: asyncio.Event
    chunk_sink: Callable[[bytes], None] | None

    async def publish_fetch(self, payload: bytes) -> None:
        """Publish a fetch request."""
        ...


def verified_chunks(path: Path, target: VerifiedTarget) -> set[int]:
    """Indices of the chunks of ``path`` that already match ``target``'s signed chunk list (blocking)."""
    done: set[int] = set()
    size = target.fields.chunk_size
    try:
        with path.open("rb") as f:
            for index, expected in enumerate(target.fields.chunks):
                _, length = chunk_span(index, target.length, size)
                data = f.read(size)
                if len(data) < length:
                    break
                if hashlib.sha256(data[:length]).hexdigest() == expected:
                    done.add(index)
    except FileNotFoundError:
        pass
    return done


class _InOrderDigest:
    """The whole-file sha256, computed on the way while verified chunks are written in order from chunk 0.

    Saves re-reading the file at the end; any gap (a resumed file, an out-of-order chunk) disables it and
    :func:`finish_file` hashes the file instead.
    """

    def __init__(self) -> None:
        self._hash: Any = hashlib.sha256()
        self._next = 0

    def feed(self, index: int, data: bytes) -> None:
        if self._hash is not None and index == self._next:
            self._hash.update(data)
            self._next += 1
        else:
            self._hash = None

    def result(self, chunks: int) -> str | None:
        return self._hash.hexdigest() if self._hash is not None and self._next == chunks else None


def finish_file(path: Path, target: VerifiedTarget, digest_so_far: str | None = None) -> None:
    """fsync, then length and sha256 of the whole file (blocking).

    ``digest_so_far``: the sha256 of every chunk as written, in order (then the file is not read again).
    """
    with path.open("rb") as f:
        os.fsync(f.fileno())
        if digest_so_far is None:
            digest = hashlib.sha256()
            while block := f.read(1 << 20):
                digest.update(block)
            digest_so_far = digest.hexdigest()
    length = path.stat().st_size
    if length != target.length or digest_so_far != target.sha256:
        raise FetchRefusedError(
            f"{target.path}: the assembled file has {length} bytes and sha256 {digest_so_far}, "
            f"the signed target {target.length} bytes and {target.sha256}"
        )


def _start_writeback_fn() -> Callable[[int, int, int], None]:
    """``start(fd, offset, length)``: ask the kernel to begin writing a range back, without waiting for it.

    Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere a no-op. Started while the rest of the blob is
    still arriving, the writeback leaves the final ``fsync`` (which remains the durability point) almost
    nothing to wait for.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sync_file_range = libc.sync_file_range
    except (AttributeError, OSError):
        return lambda fd, offset, length: None
    sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    sync_file_range.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure only means a slower fsync

    return start


_start_writeback = _start_writeback_fn()
_WRITEBACK_EVERY = 4 << 20


class _ChunkWriter:
    """Checks received chunks against the signed list and writes them, on one worker thread, in order.

    Why a thread: hashing and ``pwrite`` of a 98 MB blob on the event loop serialise with receiving it; here they
    overlap with the arrival of the next chunks (hashlib and ``os.pwrite`` release the GIL). The guarantees are
    unchanged: a chunk is written only after its sha256 matched the signed list (on the worker, before the
    ``pwrite``), chunks are handled in submission order (so the in-order whole-file digest still works), and at
    most ``depth`` chunks wait in memory (backpressure on the sender). A failed check or write is raised by the
    next :meth:`submit` or by :meth:`drain`; nothing after a refused chunk is written.
    """

    def __init__(self, fd: int, target: VerifiedTarget, whole: _InOrderDigest, source: str, depth: int = 8) -> None:
        self.fd = fd
        self.target = target
        self.whole = whole
        self.source = source
        self.depth = depth
        self.on_written: Callable[[int], None] = lambda index: None
        """Called on the event loop, in order, for every chunk written."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fetch-write")
        self._pending: deque[tuple[int, bool, asyncio.Future[None]]] = deque()
        self._failed = False
        self._unsynced: tuple[int, int] | None = None
        """The byte range written since the last writeback was started."""

    def _work(self, index: int, data: bytes, write: bool) -> None:
        if self._failed:
            return  # a previous chunk was refused: write nothing after it
        if hashlib.sha256(data).hexdigest() != self.target.fields.chunks[index]:
            self._failed = True
            raise FetchRefusedError(f"{self.source}: chunk {index} failed verification (sha256)")
        if write:
            offset, _ = chunk_span(index, self.target.length, self.target.fields.chunk_size)
            os.pwrite(self.fd, data, offset)
            self.whole.feed(index, data)
            low, high = self._unsynced or (offset, offset)
            low, high = min(low, offset), max(high, offset + len(data))
            if high - low >= _WRITEBACK_EVERY:
                _start_writeback(self.fd, low, high - low)
                self._unsynced = None
            else:
                self._unsynced = (low, high)

    async def submit(self, index: int, data: bytes, *, write: bool) -> None:
        """Queue chunk ``index`` (``write``: not on disk yet); waits while ``depth`` chunks are in flight."""
        while len(self._pending) >= self.depth:
            await self._complete_one()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._work, index, data, write)
        self._pending.append((index, write, future))

    async def _complete_one(self) -> None:
        index, write, future = self._pending.popleft()
        await future
        if write:
            self.on_written(index)

    async def drain(self) -> None:
        """Wait for every queued chunk (the first failure is raised once all of them have ended)."""
        error: BaseException | None = None
        while self._pending:
            try:
                await self._complete_one()
            except Exception as exc:  # re-raised below, once the worker is idle
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop the worker thread (after :meth:`drain`)."""
        self._executor.shutdown(wait=True)


class MqttBlobFetcher:
    """Downloads one blob at a time over the MQTT link (see the module docstring)."""

    def __init__(
        self, link: ChunkLink, policy: FetchPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.link = link
        self.policy = policy or FetchPolicy()
        self.clock = clock
        self._lock = asyncio.Lock()
        self.last_stats: FetchStats | None = None
        """The current or last transfer's counters."""

    async def fetch(self, target: VerifiedTarget, dest: Path, progress: Progress | None = None) -> FetchStats:
        """Fill ``dest`` with ``target``'s verified bytes (resuming what is there); one transfer at a time.

        Raises:
            FetchRefusedError: a chunk failed verification too often, or the whole file does not match.
            FetchTimeoutError: deadline or throughput not met.
        """
        async with self._lock:
            return await self._fetch(target, dest, progress or (lambda done, total: None))

    async def _fetch(self, target: VerifiedTarget, dest: Path, progress: Progress) -> FetchStats:
        fields = target.fields
        stats = self.last_stats = FetchStats()
        started = self.clock()
        dest.parent.mkdir(parents=True, exist_ok=True)
        done = await asyncio.to_thread(verified_chunks, dest, target)
        stats.resumed = set(done)
        missing = deque(i for i in range(len(fields.chunks)) if i not in done)
        outstanding: set[int] = set()
        bad: Counter[int] = Counter()
        frames: asyncio.Queue[bytes] = asyncio.Queue()
        transfer_id = secrets.token_hex(16)
        received_bytes = sum(chunk_span(i, target.length, fields.chunk_size)[1] for i in done)
        resumed_bytes = received_bytes
        progress(received_bytes, target.length)
        log.info(
            "fetch.started", target=target.path, chunks=len(fields.chunks), resumed=len(done), transfer=transfer_id
        )
        whole = _InOrderDigest()
        if done:
            whole.feed(-1, b"")  # resumed: the file is hashed at the end
        fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o600)
        self.link.chunk_sink = frames.put_nowait
        last_arrival = self.clock()
        try:
            if os.fstat(fd).st_size > target.length:
                os.ftruncate(fd, target.length)  # never more than the signed length
            while missing or outstanding:
                self._check_time(target, started, received_bytes - resumed_bytes)
                if not self.link.connected.is_set():
                    missing.extendleft(sorted(outstanding, reverse=True))  # re-request after the reconnect
                    outstanding.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self.link.connected.wait()
                    continue
                new = []
                # refill in batches (half a window at least): one request per chunk would cost a round trip
                # through the broker and the controller's lookup for every 256 KiB
                refill = not outstanding or len(outstanding) <= self.policy.window // 2
                while refill and missing and len(outstanding) < self.policy.window:
                    index = missing.popleft()
                    outstanding.add(index)
                    new.append(index)
                if new:
                    await self._request(target, transfer_id, new, stats)
                try:
                    async with asyncio.timeout(min(1.0, self.policy.request_timeout_s)):
                        frame = await frames.get()
                except TimeoutError:
                    if self.clock() - last_arrival >= self.policy.request_timeout_s and outstanding:
                        log.info("fetch.rerequest", target=target.path, chunks=len(outstanding))
                        missing.extendleft(sorted(outstanding, reverse=True))
                        outstanding.clear()
                        last_arrival = self.clock()
                    continue
                last_arrival = self.clock()
                accepted = self._accept(frame, transfer_id, outstanding, target, stats, bad)
                if accepted is None:
                    continue
                index, data = accepted
                outstanding.discard(index)
                if data is None:
                    missing.appendleft(index)  # failed verification: ask again (bounded by max_bad_chunks)
                    continue
                offset, length = chunk_span(index, target.length, fields.chunk_size)
                os.pwrite(fd, data, offset)
                whole.feed(index, data)
                received_bytes += length
                progress(received_bytes, target.length)
        finally:
            self.link.chunk_sink = None
            os.close(fd)
        await asyncio.to_thread(finish_file, dest, target, whole.result(len(fields.chunks)))
        stats.seconds = self.clock() - started
        stats.bytes_received = received_bytes - resumed_bytes
        log.info("fetch.done", target=target.path, seconds=round(stats.seconds, 3), resumed=len(stats.resumed))
        return stats

    def _accept(
        self,
        frame: bytes,
        transfer_id: str,
        outstanding: set[int],
        target: VerifiedTarget,
        stats: FetchStats,
        bad: Counter[int],
    ) -> tuple[int, bytes | None] | None:
        """Decode and verify one frame: ``(index, data)`` if ours (``data`` None: failed), None to ignore it."""
        try:
            chunk = decode_chunk(frame)
        except DecodeError:
            stats.ignored_frames += 1
            return None
        if chunk.transfer_id != transfer_id or chunk.index not in outstanding:
            stats.ignored_frames += 1  # another (older) transfer's, unrequested, or already verified
            return None
        _, length = chunk_span(chunk.index, target.length, target.fields.chunk_size)
        if len(chunk.data) != length or hashlib.sha256(chunk.data).hexdigest() != target.fields.chunks[chunk.index]:
            stats.bad_chunks += 1
            bad[chunk.index] += 1
            what = "length" if len(chunk.data) != length else "sha256"
            log.warning("fetch.bad_chunk", target=target.path, index=chunk.index, check=what)
            if bad[chunk.index] >= self.policy.max_bad_chunks:
                raise FetchRefusedError(
                    f"{target.path}: chunk {chunk.index} failed verification ({what}) {bad[chunk.index]} times"
                )
            return chunk.index, None
        stats.verified[chunk.index] += 1
        return chunk.index, chunk.data

    async def _request(self, target: VerifiedTarget, transfer_id: str, indices: list[int], stats: FetchStats) -> None:
        request = FetchRequest(
            device=self.link.device,
            transfer_id=transfer_id,
            target_path=target.path,
            sha256=target.sha256,
            chunk_size=target.fields.chunk_size,
            indices=tuple(indices),
        )
        for index in indices:
            stats.requested[index] += 1
        try:
            await self.link.publish_fetch(request.encode())
        except LinkError as exc:
            log.info("fetch.request_not_sent", error=str(exc))  # the disconnect branch re-requests

    def _check_time(self, target: VerifiedTarget, started: float, new_bytes: int) -> None:
        elapsed = self.clock() - started
        if elapsed > self.policy.deadline_s:
            raise FetchTimeoutError(f"{target.path}: not complete after {elapsed:.0f} s")
        if elapsed > self.policy.grace_s and new_bytes / elapsed < self.policy.min_throughput_bps:
            raise FetchTimeoutError(
                f"{target.path}: {new_bytes / elapsed:.0f} bytes/s is below the minimum of "
                f"{self.policy.min_throughput_bps:.0f} bytes/s"
            )


class HttpBlobFetcher:
    """Downloads a blob over HTTP(S) from the artifact server or a mirror, with Range resume.

    Same invariants as the MQTT fetcher: each chunk is checked against the signed list before it is written, the
    file never exceeds the signed length (a server sending more is refused), and a transfer resumes from the first
    chunk not verified on disk (after a dropped connection: up to ``retries`` times per URL; after a restart: from
    the file). Chunks after a gap that were already verified are received again but not rewritten.
    """

    def __init__(
        self, policy: FetchPolicy | None = None, *, retries: int = 3, clock: Callable[[], float] = time.monotonic
    ):
        self.policy = policy or FetchPolicy()
        self.retries = retries
        self.clock = clock
        self.last_stats: FetchStats | None = None

    async def fetch(self, target: VerifiedTarget, dest: Path, url: str, progress: Progress | None = None) -> FetchStats:
        """Fill ``dest`` with ``target``'s verified bytes from ``url``.

        Raises:
            FetchRefusedError: the server sent bytes that do not verify (or too many).
            FetchTimeoutError: deadline or throughput not met.
            FetchError: the server could not be reached or kept failing.
        """
        progress = progress or (lambda done, total: None)
        stats = self.last_stats = FetchStats()
        started = self.clock()
        dest.parent.mkdir(parents=True, exist_ok=True)
        stats.resumed = await asyncio.to_thread(verified_chunks, dest, target)
        count = len(target.fields.chunks)
        failures = 0
        whole = _InOrderDigest()
        if stats.resumed:
            whole.feed(-1, b"")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.policy.request_timeout_s * 6)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                done = stats.resumed | set(stats.verified)
                first = next((i for i in range(count) if i not in done), None)
                if first is None:
                    break
                try:
                    await self._range(session, url, target, dest, first, done, stats, started, progress, whole)
                    failures = 0
                except (aiohttp.ClientError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
                    failures += 1
                    log.info("fetch.http_retry", url=url, error=str(exc) or type(exc).__name__, attempt=failures)
                    if failures > self.retries:
                        raise FetchError(f"{url}: {exc or type(exc).__name__}") from exc
                    await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                self._check_time(target, started, stats.bytes_received)
        await asyncio.to_thread(finish_file, dest, target, whole.result(count))
        stats.seconds = self.clock() - started
        log.info("fetch.done", target=target.path, url=url, seconds=round(stats.seconds, 3), resumed=len(stats.resumed))
        return stats

    async def _range(
        self,
        session: aiohttp.ClientSession,
        url: str,
        target: VerifiedTarget,
        dest: Path,
        first: int,
        done: set[int],
        stats: FetchStats,
        started: float,
        progress: Progress,
        whole: _InOrderDigest,
    ) -> None:
        size = target.fields.chunk_size
        count = len(target.fields.chunks)
        offset = first * size
        headers = {"Range": f"bytes={offset}-{target.length - 1}"} if offset else {}
        async with session.get(url, headers=headers) as response:
            if response.status == 200:
                skip = offset  # no Range support: read from 0 and drop what we have
            elif response.status == 206:
                skip = 0
            else:
                raise FetchError(f"{url}: HTTP {response.status}")
            declared = response.content_length
            if declared is not None and declared - skip > target.length - offset:
                raise FetchRefusedError(f"{url}: {declared} bytes announced, more than the signed length allows")
            while skip:
                skip -= len(await response.content.readexactly(min(skip, 1 << 20)))
            fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o600)
            writer = _ChunkWriter(fd, target, whole, url)
            try:
                if os.fstat(fd).st_size > target.length:
                    os.ftruncate(fd, target.length)

                def written(index: int) -> None:
                    _, length = chunk_span(index, target.length, size)
                    stats.verified[index] += 1
                    stats.bytes_received += length
                    progress(min(target.length, (index + 1) * size), target.length)

                writer.on_written = written
                for index in range(first, count):
                    _, length = chunk_span(index, target.length, size)
                    data = await response.content.readexactly(length)
                    # verification (before the write) and the write run on the writer's thread, overlapping
                    # with the next chunk's arrival; a bad chunk raises FetchRefusedError from submit or drain
                    await writer.submit(index, data, write=index not in done)
                    self._check_time(target, started, stats.bytes_received)
                if await response.content.read(1):
                    raise FetchRefusedError(f"{url}: more bytes than the signed length {target.length}")
            finally:
                try:
                    await writer.drain()
                finally:
                    writer.close()
                    os.close(fd)

    def _check_time(self, target: VerifiedTarget, started: float, new_bytes: int) -> None:
        elapsed = self.clock() - started
        if elapsed > self.policy.deadline_s:
            raise FetchTimeoutError(f"{target.path}: not complete after {elapsed:.0f} s")
        if elapsed > self.policy.grace_s and new_bytes / elapsed < self.policy.min_throughput_bps:
            raise FetchTimeoutError(
                f"{target.path}: {new_bytes / elapsed:.0f} bytes/s is below the minimum of "
                f"{self.policy.min_throughput_bps:.0f} bytes/s"
            )
