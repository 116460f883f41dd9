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
- At the end the whole file is fsynced, its length must be the signed length and every chunk index must have
  been verified (in this transfer, or on disk when it resumed). That is the whole-file check: the chunk list is
  a signed field of the same TUF target and covers exactly ``length`` bytes, so no second sha256 pass over the
  file is made (ADR 0013). The caller then installs it through the registry's state machine (moving the file,
  not copying it).
- Speed without weaker checks (HTTP): the body is received on a worker thread straight into a reused buffer of
  whole chunks, each verified there and the verified ones written from there (:class:`_ChunkReceiver`, ADR 0015:
  no per-block objects or event-loop hand-offs, the event loop stays free); the file is flushed to disk in
  steps on another thread while it arrives (:class:`_Flusher`), so the final fsync has only the tail left.
- :class:`VerifiedPrefix` lets a reader on another thread (the installer's GGUF header check) follow the
  download as it grows, seeing only bytes of chunks already verified and written.

Errors::

    LinkError
     └── FetchError                  a blob could not be fetched
          ├── FetchRefusedError      the data failed verification: do not retry this source blindly
          └── FetchTimeoutError      deadline or minimum throughput not met
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import http.client
import os
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, cast

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
    "VerifiedPrefix",
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


class VerifiedPrefix:
    """How much of a download, from byte 0, is verified and written; readable while it grows.

    The fetchers report every chunk that is verified against the signed list and on disk (:meth:`chunk_done`,
    from any thread; chunks resumed from disk count too). :meth:`open` gives a read-only file object over the
    download whose reads block until the bytes they ask for are in that prefix, so a reader on another thread
    (the installer's GGUF header validation) sees verified bytes only, while the rest is still arriving. Its
    size is the signed length. :meth:`close` (the transfer ended, or its file was replaced) makes any read that
    still waits, or comes later, past the prefix raise ``OSError``.
    """

    def __init__(self, target: VerifiedTarget, path: Path) -> None:
        self.path = path
        self.length = target.length
        self._chunk_size = target.fields.chunk_size
        self._cond = threading.Condition()
        self._next = 0
        """The first chunk index not yet verified and written."""
        self._ahead: set[int] = set()
        self._closed = False
        self._discarded = False

    @property
    def complete(self) -> bool:
        """Every byte of the file is verified and written (and the file was not replaced: :meth:`discard`)."""
        with self._cond:
            return not self._discarded and self._end() >= self.length

    @property
    def end(self) -> int:
        """Bytes ``[0, end)`` of the file are verified and written."""
        with self._cond:
            return self._end()

    def _end(self) -> int:  # the lock is held
        return min(self.length, self._next * self._chunk_size)

    def chunk_done(self, index: int) -> None:
        """Chunk ``index`` was verified against the signed list and is in the file."""
        self.chunks_done((index,))

    def chunks_done(self, indices: Iterable[int]) -> None:
        """:meth:`chunk_done` for each of ``indices`` (one wake-up for all of them)."""
        with self._cond:
            self._ahead.update(i for i in indices if i >= self._next)
            start = self._next
            while self._next in self._ahead:
                self._ahead.discard(self._next)
                self._next += 1
            if self._next != start:
                self._cond.notify_all()

    def close(self) -> None:
        """No more chunks will be reported: waiting reads past the prefix fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard(self) -> None:
        """The file was deleted (a refused source): whatever a reader saw of it is not the final file."""
        with self._cond:
            self._discarded = True
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, end: int) -> None:
        """Block until bytes ``[0, end)`` are verified and written.

        Raises:
            OSError: the prefix was closed before reaching ``end``.
        """
        with self._cond:
            while self._end() < end and not self._closed:
                self._cond.wait()
            if self._end() < end:
                raise OSError(f"{self.path.name}: the transfer ended before byte {end} was verified")

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """A blocking, read-only file object over the verified prefix (``seek``, ``tell``, ``read``)."""
        self.wait_for(min(1, self.length))  # the file exists once its first chunk is written
        reader = _PrefixReader(self, os.open(self.path, os.O_RDONLY))
        try:
            yield cast(BinaryIO, reader)
        finally:
            os.close(reader.fd)


class _PrefixReader:
    """The file object of :meth:`VerifiedPrefix.open` (only what a header parser calls)."""

    def __init__(self, prefix: VerifiedPrefix, fd: int) -> None:
        self.prefix = prefix
        self.fd = fd
        self.pos = 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.prefix.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.prefix.length if n < 0 else min(self.prefix.length, self.pos + n)
        if end <= self.pos:
            return b""
        self.prefix.wait_for(end)
        data = os.pread(self.fd, end - self.pos, self.pos)
        if len(data) != end - self.pos:
            raise OSError(f"{self.prefix.path.name}: short read at {self.pos} of a verified range")
        self.pos = end
        return data


def finish_file(path: Path, target: VerifiedTarget, verified: Collection[int]) -> None:
    """fsync, then check the file against the target: signed length, and every chunk verified (blocking).

    ``verified``: the indices of the chunks whose bytes were checked against the signed chunk list before they
    were written (or, on resume, read back from this file and checked). Together with the length this is as
    strong as the whole-file sha256 (the chunk list is signed with the target and covers exactly its length;
    ADR 0013), so the file is not hashed again.
    """
    with path.open("rb") as f:
        os.fsync(f.fileno())
        length = os.fstat(f.fileno()).st_size
    count = len(target.fields.chunks)
    unverified = count - len({i for i in verified if 0 <= i < count})
    if length != target.length or unverified:
        raise FetchRefusedError(
            f"{target.path}: the assembled file has {length} bytes and {unverified} unverified chunks, "
            f"the signed target {target.length} bytes in {count} chunks"
        )


_SYNC_EVERY = 8 << 20
"""HTTP: the download is made durable (``fdatasync``) in steps of about this many bytes while it arrives."""

_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class _Flusher:
    """Makes a download durable while it arrives: ``fdatasync`` on its own thread every ``every`` bytes written.

    Why: the final fsync (the durability point, in :func:`finish_file`) otherwise pays for the whole file at once
    — on this project's VM it took ~135 ms for 94 MiB even after the data had been written back, the device
    flushing its cache — and a small device holds the whole blob as dirty pages until then. Flushed in steps,
    the device works while the rest arrives and the final fsync has only the tail left. One flush at a time
    (a step is skipped while one runs); nothing waits for a flush except :meth:`close`. A failed flush (an I/O
    error) is raised by :meth:`close`: the error would otherwise be reported to this descriptor only, and the
    final fsync, on another one, might not see it.
    """

    def __init__(self, fd: int, every: int | None = None) -> None:
        self.fd = fd
        self.every = _SYNC_EVERY if every is None else every
        self.flushes = 0
        self._written = 0
        self._running: Future[None] | None = None
        self._error: OSError | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fetch-sync")

    def wrote(self, count: int) -> None:
        """``count`` more bytes were written (from one thread at a time)."""
        self._written += count
        if self._written < self.every or (self._running is not None and not self._running.done()):
            return
        self._check()
        self._written = 0
        self.flushes += 1
        self._running = self._executor.submit(_datasync, self.fd)

    def _check(self) -> None:
        running, self._running = self._running, None
        if running is not None and self._error is None:
            error = running.exception()
            if error is not None:
                self._error = error if isinstance(error, OSError) else OSError(str(error))

    def close(self) -> None:
        """Wait for the flush in progress (before the descriptor is closed).

        Raises:
            OSError: a flush failed.
        """
        if self._running is not None:
            wait([self._running])
        self._check()
        self._executor.shutdown(wait=True)
        if self._error is not None:
            raise self._error


_BATCH_BYTES = 1 << 20
"""HTTP: the body is received into a buffer of about this many bytes (whole chunks), then verified and written."""
_MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "edgefleet-agent"


class _ConnectionLostError(FetchError):
    """HTTP: the connection failed or dropped mid-body (retried, from the first chunk not verified)."""


class _Body(Protocol):
    """A response body (``http.client.HTTPResponse``): blocking reads into a caller's buffer."""

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` with what arrives (at least a byte; 0 at the end of the body)."""
        ...


def _read_body(body: _Body, into: memoryview, url: str) -> int:
    try:
        return body.readinto(into)
    except (OSError, http.client.HTTPException) as exc:
        raise _ConnectionLostError(f"{url}: {exc or type(exc).__name__}") from exc


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[list[int]], None], arg: list[int]) -> None:
    """``callback(arg)`` on ``loop``, from any thread; nothing once the loop is closed (its waiter is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, arg)


def _cut_to(fd: int, length: int) -> None:
    """Cut the file to ``length`` bytes if it is longer (a download file never holds more than the signed length)."""
    if os.fstat(fd).st_size > length:
        os.ftruncate(fd, length)


def _trim(path: Path, length: int) -> None:
    """:func:`_cut_to` for ``path``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _cut_to(fd, length)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``: ``pwrite`` may write less (a full disk part-way); nothing is an error.

    Raises:
        OSError: the write failed, or wrote nothing.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset}")
        view = view[written:]
        offset += written


class _ChunkReceiver:
    """Receives a blob's byte stream into whole chunks, checks each against the signed list and writes the verified
    ones, all on the one thread that calls :meth:`receive` (blocking).

    Why one blocking thread (ADR 0015): the body is read straight into a reused buffer (``readinto``, no object
    per block, no event-loop hand-off), hashed there and written from there; the GIL is released for each of the
    three, so the event loop (the device's API, its other links) stays free while a model downloads, and a 98 MB
    download costs about 40 % less CPU than when the event loop received it and handed blocks to a writer thread.

    Guarantees: a chunk is written only after its whole sha256 matched the signed list; the stream is taken in
    order; chunks in ``skip`` (on disk already) are checked, not rewritten; nothing after a refused chunk is
    written; the file never exceeds the signed length (a longer stream is refused); when the body fails
    mid-way the whole chunks received before the failure are still verified and written (a resume starts after
    them). The file is made durable in steps while it arrives (:class:`_Flusher`).
    """

    def __init__(self, fd: int, target: VerifiedTarget, first: int, source: str, prefix: VerifiedPrefix | None) -> None:
        self.fd = fd
        self.target = target
        self.source = source
        self.prefix = prefix
        self.index = first
        """The next chunk expected."""
        self.flusher = _Flusher(fd)
        self.on_written: Callable[[list[int]], None] = lambda indices: None
        """Called (on this thread) with the chunks just written."""
        self.check: Callable[[int], None] = lambda received: None
        """Called (on this thread) with the bytes received so far whenever some arrive; raises to end the transfer
        (deadline, throughput, stop)."""
        size = target.fields.chunk_size
        self._buffer = memoryview(bytearray(max(1, _BATCH_BYTES // size) * size))
        self._received = 0

    def receive(self, body: _Body, skip: Collection[int]) -> None:
        """Read ``body`` from chunk :attr:`index` to the end of the blob; verify and write every whole chunk.

        Raises:
            FetchRefusedError: a chunk failed verification, or the body holds more than the signed length.
            _ConnectionLostError: the body ended early or its connection failed.
            OSError: the file could not be written.
        """
        size, length = self.target.fields.chunk_size, self.target.length
        count = len(self.target.fields.chunks)
        while self.index < count:
            start = self.index * size
            want = min(len(self._buffer), length - start)
            got = 0
            try:
                while got < want:
                    got += self._read(body, self._buffer[got:want], start + got)
                    self.check(self._received + got)
            finally:  # the whole chunks received, also when the body failed mid-way
                self._take(got, skip)
                self._received += got
        if self._read(body, memoryview(bytearray(1)), length):
            raise FetchRefusedError(f"{self.source}: more bytes than the signed length {length}")

    def _read(self, body: _Body, into: memoryview, at: int) -> int:
        n = _read_body(body, into, self.source)
        if not n and at < self.target.length:
            raise _ConnectionLostError(f"{self.source}: the body ended at byte {at} of {self.target.length}")
        return n

    def _take(self, got: int, skip: Collection[int]) -> None:
        """Verify the whole chunks in the first ``got`` bytes of the buffer and write the verified ones not in
        ``skip``, each run of them with one write; raise the refusal of a chunk once those before it are written."""
        size, length, expected = self.target.fields.chunk_size, self.target.length, self.target.fields.chunks
        start = self.index * size
        verified: list[int] = []
        error: FetchRefusedError | None = None
        offset = 0
        while offset < got:
            end = min(offset + size, length - start)
            if end > got:
                break  # a partial chunk (the body failed mid-way): dropped, fetched again
            if hashlib.sha256(self._buffer[offset:end]).hexdigest() != expected[self.index + len(verified)]:
                error = FetchRefusedError(
                    f"{self.source}: chunk {self.index + len(verified)} failed verification (sha256)"
                )
                break
            verified.append(self.index + len(verified))
            offset = end
        written = [index for index in verified if index not in skip]
        run_from: int | None = None
        for position, index in enumerate([*verified, None]):
            if index is not None and index not in skip:
                run_from = position if run_from is None else run_from
                continue
            if run_from is not None:
                lo, hi = run_from * size, min(position * size, length - start)
                _pwrite_all(self.fd, self._buffer[lo:hi], start + lo)
                self.flusher.wrote(hi - lo)
                run_from = None
        self.index += len(verified)
        if self.prefix is not None:
            self.prefix.chunks_done(verified)
        if written:
            self.on_written(written)
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for the flush in progress and close the file (once; later calls do nothing).

        Raises:
            OSError: a flush of the file failed; the file was emptied (its verified chunks are fetched again).
        """
        if self.fd < 0:
            return
        try:
            try:
                self.flusher.close()
            except OSError:
                # the data may not be on disk, yet its pages read back as verified: a resume must not keep them
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, 0)
                raise
        finally:
            os.close(self.fd)
            self.fd = -1


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

    async def fetch(
        self,
        target: VerifiedTarget,
        dest: Path,
        progress: Progress | None = None,
        prefix: VerifiedPrefix | None = None,
    ) -> FetchStats:
        """Fill ``dest`` with ``target``'s verified bytes (resuming what is there); one transfer at a time.

        ``prefix``: told about every chunk verified and in the file (see :class:`VerifiedPrefix`).

        Raises:
            FetchRefusedError: a chunk failed verification too often, or the whole file does not match.
            FetchTimeoutError: deadline or throughput not met.
        """
        async with self._lock:
            return await self._fetch(target, dest, progress or (lambda done, total: None), prefix)

    async def _fetch(
        self, target: VerifiedTarget, dest: Path, progress: Progress, prefix: VerifiedPrefix | None
    ) -> FetchStats:
        fields = target.fields
        stats = self.last_stats = FetchStats()
        started = self.clock()
        dest.parent.mkdir(parents=True, exist_ok=True)
        done = await asyncio.to_thread(verified_chunks, dest, target)
        stats.resumed = set(done)
        if prefix is not None:
            prefix.chunks_done(done)
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
        fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o600)
        self.link.chunk_sink = frames.put_nowait
        last_arrival = self.clock()
        try:
            _cut_to(fd, target.length)
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
                _pwrite_all(fd, data, offset)  # finish_file counts the chunk as on disk: all of it must be
                if prefix is not None:
                    prefix.chunk_done(index)
                received_bytes += length
                progress(received_bytes, target.length)
        finally:
            self.link.chunk_sink = None
            os.close(fd)
        await asyncio.to_thread(finish_file, dest, target, stats.resumed | set(stats.verified))
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
    the file). Chunks after a gap that were already verified are received again but not rewritten. Redirects
    (at most 5, to http or https) are followed. The body is received on a worker thread (:class:`_ChunkReceiver`);
    a stop closes its connection and waits for it while it holds the file.
    """

    def __init__(
        self, policy: FetchPolicy | None = None, *, retries: int = 3, clock: Callable[[], float] = time.monotonic
    ):
        self.policy = policy or FetchPolicy()
        self.retries = retries
        self.clock = clock
        self.last_stats: FetchStats | None = None
        self.connect_timeout_s = 30.0

    async def fetch(
        self,
        target: VerifiedTarget,
        dest: Path,
        url: str,
        progress: Progress | None = None,
        prefix: VerifiedPrefix | None = None,
    ) -> FetchStats:
        """Fill ``dest`` with ``target``'s verified bytes from ``url``.

        ``prefix``: told about every chunk verified and in the file (see :class:`VerifiedPrefix`).

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
        if prefix is not None:
            prefix.chunks_done(stats.resumed)
        count = len(target.fields.chunks)
        failures = 0
        while True:
            done = stats.resumed | set(stats.verified)
            first = next((i for i in range(count) if i not in done), None)
            if first is None:  # every chunk verified (perhaps all resumed): drop bytes past the signed length
                await asyncio.to_thread(_trim, dest, target.length)
                break
            try:
                await self._range(url, target, dest, first, done, stats, started, progress, prefix)
                failures = 0
            except _ConnectionLostError as exc:
                failures += 1
                log.info("fetch.http_retry", url=url, error=str(exc), attempt=failures)
                if failures > self.retries:
                    raise FetchError(str(exc)) from exc
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))
            self._check_time(target, started, stats.bytes_received)
        await asyncio.to_thread(finish_file, dest, target, stats.resumed | set(stats.verified))
        stats.seconds = self.clock() - started
        log.info("fetch.done", target=target.path, url=url, seconds=round(stats.seconds, 3), resumed=len(stats.resumed))
        return stats

    async def _range(
        self,
        url: str,
        target: VerifiedTarget,
        dest: Path,
        first: int,
        done: set[int],
        stats: FetchStats,
        started: float,
        progress: Progress,
        prefix: VerifiedPrefix | None,
    ) -> None:
        """One request for the blob from chunk ``first`` on, received on its own thread."""
        loop = asyncio.get_running_loop()
        size = target.fields.chunk_size

        def written(indices: list[int]) -> None:  # on the event loop, in order
            for index in indices:
                stats.verified[index] += 1
                stats.bytes_received += chunk_span(index, target.length, size)[1]
            progress(min(target.length, (indices[-1] + 1) * size), target.length)

        request = _RangeRequest(url, target, dest, first, prefix, self.connect_timeout_s, self.policy)
        request.on_written = lambda indices: _call_soon(loop, written, indices)
        before = stats.bytes_received
        request.check = lambda received: self._check_time(target, started, before + received)
        result: Future[None] = Future()
        result.set_running_or_notify_cancel()  # from now on only the thread settles it (a cancel cannot)
        thread = threading.Thread(target=request.run, args=(done, result), name="fetch-http", daemon=True)
        thread.start()
        outcome = asyncio.wrap_future(result)
        outcome.add_done_callback(lambda ended: ended.cancelled() or ended.exception())  # retrieved: not logged
        try:
            # The watchdog: the thread checks the deadline and the throughput only after a read of the body,
            # and http.client can block before any (a connect, a TLS handshake, a head that never ends or
            # endless "100 Continue" answers, each read resetting the socket timeout). So the same checks
            # run here too, on a timer, and a failure aborts the request like a stop does.
            while True:
                finished, _ = await asyncio.wait({outcome}, timeout=_WATCHDOG_S)  # a timeout does not cancel it
                if finished:
                    break
                try:
                    self._check_time(target, started, before + request.received)
                except FetchTimeoutError:
                    log.info("fetch.http_timeout", url=url, received=request.received)
                    await _abort_and_release(request, result, outcome)
                    raise
            await outcome
        except asyncio.CancelledError:
            # a stop: end the thread's transfer now; if it holds the file, wait until it has let it go (its
            # verified chunks stay for a resume), through further cancels too: two writers must never share the
            # file; the stop is what propagates, never the transfer's error
            await _abort_and_release(request, result, outcome)
            raise

    def _check_time(self, target: VerifiedTarget, started: float, new_bytes: int) -> None:
        elapsed = self.clock() - started
        if elapsed > self.policy.deadline_s:
            raise FetchTimeoutError(f"{target.path}: not complete after {elapsed:.0f} s")
        if elapsed > self.policy.grace_s and new_bytes / elapsed < self.policy.min_throughput_bps:
            raise FetchTimeoutError(
                f"{target.path}: {new_bytes / elapsed:.0f} bytes/s is below the minimum of "
                f"{self.policy.min_throughput_bps:.0f} bytes/s"
            )


_WATCHDOG_S = 0.5
"""How often the event loop checks a running HTTP request against the deadline and the minimum throughput."""


async def _abort_and_release(request: _RangeRequest, result: Future[None], outcome: asyncio.Future[None]) -> None:
    """Abort ``request``; if its thread holds the file, wait (through cancels too) until it has let it go."""
    if request.abort():
        while not result.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(outcome)


class _RangeRequest:
    """One HTTP(S) GET of a blob from a chunk on, run on a worker thread (:meth:`run`), stoppable from another
    (:meth:`abort`)."""

    def __init__(
        self,
        url: str,
        target: VerifiedTarget,
        dest: Path,
        first: int,
        prefix: VerifiedPrefix | None,
        connect_timeout_s: float,
        policy: FetchPolicy,
    ) -> None:
        self.url = url
        self.target = target
        self.dest = dest
        self.first = first
        self.prefix = prefix
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = policy.request_timeout_s * 6
        self.on_written: Callable[[list[int]], None] = lambda indices: None
        self.check: Callable[[int], None] = lambda received: None
        self._lock = threading.Lock()
        self._stopped = False
        self._holds_file = False
        self.received = 0
        """Bytes of the body read so far (set by the thread, read by the event loop's watchdog)."""
        self._connection: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._socket: socket.socket | None = None
        """The connection's socket, kept: ``http.client`` drops ``connection.sock`` for a response that closes
        the connection (HTTP/1.0, ``Connection: close``), while its body is still read from that socket."""

    def abort(self) -> bool:
        """Stop the transfer (its connection is shut down); True if the thread holds the file (wait for it)."""
        with self._lock:
            self._stopped = True
            if self._socket is not None:
                with contextlib.suppress(OSError):  # the plain socket's shutdown: the TLS layer sees the end
                    socket.socket.shutdown(self._socket, socket.SHUT_RDWR)
            return self._holds_file

    def _raise_if_stopped(self) -> None:
        if self._stopped:
            raise _ConnectionLostError(f"{self.url}: stopped")

    def _stop_check(self, received: int) -> None:
        self.received = received
        self._raise_if_stopped()
        self.check(received)

    def run(self, done: Collection[int], result: Future[None]) -> None:
        """The transfer (blocking); its outcome goes to ``result`` once the file and the connection are closed."""
        error: BaseException | None = None
        try:
            self._run(done)
        except ValueError as exc:  # a server's malformed URL, header or redirect, found by the standard library
            error = FetchError(f"{self.url}: {exc}")
        except BaseException as exc:  # handed to the waiter
            error = exc
        finally:
            with self._lock:
                connection, response = self._connection, self._response
                self._connection = self._response = self._socket = None
            if response is not None:
                response.close()
            if connection is not None:
                connection.close()
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(None)

    def _run(self, done: Collection[int]) -> None:
        size = self.target.fields.chunk_size
        offset = self.first * size
        response = self._open(offset)
        if response.status == 200:
            skip = offset  # no Range support: read from 0 and drop what we have
        elif response.status == 206:
            skip = 0
        else:
            raise FetchError(f"{self.url}: HTTP {response.status}")
        declared = response.getheader("Content-Length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                raise FetchError(f"{self.url}: bad Content-Length {declared[:40]!r}")
            if int(declared) - skip > self.target.length - offset:
                raise FetchRefusedError(f"{self.url}: {declared} bytes announced, more than the signed length allows")
        body = _ResponseBody(response)
        scratch = memoryview(bytearray(min(max(skip, 1), _BATCH_BYTES)))
        dropped = 0
        while dropped < skip:
            n = _read_body(body, scratch[: min(skip - dropped, len(scratch))], self.url)
            if not n:
                raise _ConnectionLostError(f"{self.url}: the body ended before byte {offset}")
            dropped += n
            self._stop_check(dropped)
        with self._lock:
            self._raise_if_stopped()
            fd = os.open(self.dest, os.O_RDWR | os.O_CREAT, 0o600)
            self._holds_file = True
        try:
            receiver = _ChunkReceiver(fd, self.target, self.first, self.url, self.prefix)  # owns fd from here on
        except BaseException:
            os.close(fd)
            raise
        refused = False
        try:
            _cut_to(fd, self.target.length)
            receiver.on_written = self.on_written
            receiver.check = lambda received: self._stop_check(dropped + received)
            receiver.receive(body, done)
        except FetchRefusedError:
            refused = True
            raise
        finally:
            try:
                receiver.close()
            except OSError as exc:  # a failed flush: the file was emptied, nothing of it is trusted
                if not refused:
                    # over a dropped link too: its retry would count the emptied chunks as verified
                    raise
                log.warning("fetch.flush_failed", url=self.url, error=str(exc))  # the refusal decides

    def _open(self, offset: int) -> http.client.HTTPResponse:
        """The response to the GET (redirects followed), its body not read yet."""
        url = self.url
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-{self.target.length - 1}"
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError(f"{url}: not an http(s) URL")
            connection: http.client.HTTPConnection
            if parts.scheme == "https":
                connection = http.client.HTTPSConnection(
                    parts.hostname, parts.port, timeout=self.connect_timeout_s, context=ssl.create_default_context()
                )
            else:
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.connect_timeout_s)
            with self._lock:
                self._raise_if_stopped()
                previous, self._connection, self._socket = self._connection, connection, None
            if previous is not None:
                previous.close()
            path = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
            path += f"?{parts.query}" if parts.query else ""
            try:
                connection.connect()
                assert connection.sock is not None
                connection.sock.settimeout(self.read_timeout_s)
                with self._lock:
                    self._socket = connection.sock
                    self._raise_if_stopped()  # the stop came while connecting: there was nothing to shut down
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise _ConnectionLostError(f"{url}: {exc or type(exc).__name__}") from exc
            self._response = response
            location = response.getheader("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            url = urllib.parse.urljoin(url, location)
        raise FetchError(f"{self.url}: more than {_MAX_REDIRECTS} redirects")


class _ResponseBody:
    """An ``http.client`` response's body, read with at most one socket read per call.

    Why: ``HTTPResponse.readinto`` fills the whole buffer (about 1 MiB) before it returns, so a slow or trickling
    server would be checked against the deadline and the minimum throughput only once per buffer, and a read
    failing part-way would lose the count of what it had stored already (the whole chunks before the failure
    would be dropped instead of kept for the resume). Bodies with a length (what the artifact server and any
    static mirror send) and bodies ending with the connection are read with ``readinto1``; chunked ones through
    ``read1``.
    """

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.remaining = response.length
        """Bytes announced and not received yet (None: the body ends with the connection, or is chunked)."""

    def readinto(self, buffer: memoryview) -> int:
        """Fill the start of ``buffer`` with what one read gives (0: the body has ended)."""
        if self.response.chunked:
            data = self.response.read1(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        if self.remaining == 0:
            return 0
        if self.remaining is not None:
            buffer = buffer[: self.remaining]
        fp = self.response.fp
        if fp is None:  # closed under us (a stop)
            raise http.client.IncompleteRead(b"", self.remaining)
        n = fp.readinto1(buffer)
        if self.remaining is not None:
            if not n:
                raise http.client.IncompleteRead(b"", self.remaining)
            self.remaining -= n
        return n
