"""The fetchers' stream verifier, the verified-prefix reader and write faults, against real files.

Real parts: :class:`agent.link.fetch._ChunkReceiver` writing a real file (the stream is cut into blocks at
arbitrary points, as a socket delivers it, and received through buffers of any size),
:class:`agent.link.fetch.VerifiedPrefix` read by the real GGUF validator
(``agent.registry.formats.inspect_gguf_file``) on another thread while chunks are reported. A stop mid-transfer
against a real server is in ``test_http_fetch_faults.py``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.link.fetch as fetch_module
from agent.errors import InvalidModelError
from agent.link.fetch import (
    FetchError,
    FetchPolicy,
    FetchRefusedError,
    MqttBlobFetcher,
    VerifiedPrefix,
    _ChunkReceiver,
    _ConnectionLostError,
    finish_file,
    verified_chunks,
)
from agent.link.updater import VerifiedTarget
from agent.registry.formats import inspect_gguf_file, inspect_model
from agent.registry.gguf import GgmlType, build_gguf
from protocols.messages import FetchRequest, decode, encode_chunk
from protocols.releases import ModelTargetFields, chunk_count, chunk_digests, chunk_span

pytestmark = pytest.mark.component


def _target(data: bytes, chunk_size: int, fmt: str = "gguf") -> VerifiedTarget:
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    fields = ModelTargetFields(fmt, "q4_0", 1, 1, 1, (), (), "mit", chunk_size, tuple(chunk_digests(chunks)))
    return VerifiedTarget("models/t/1/q4_0.gguf", len(data), hashlib.sha256(data).hexdigest(), fields, ())


def _blocks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class _Body:
    """A response body delivering ``blocks`` (each in as many reads as the reader's buffer needs), then ``error``
    (raised) or the end."""

    def __init__(self, blocks: list[bytes], error: Exception | None = None) -> None:
        self.blocks = deque(b for b in blocks if b)
        self.error = error

    def readinto(self, buffer: memoryview) -> int:
        if not self.blocks:
            if self.error is not None:
                raise self.error
            return 0
        block = self.blocks[0]
        n = min(len(buffer), len(block))
        buffer[:n] = block[:n]
        if n == len(block):
            self.blocks.popleft()
        else:
            self.blocks[0] = block[n:]
        return n


def _receive(
    path: Path,
    target: VerifiedTarget,
    blocks: list[bytes],
    *,
    buffer: int = 1 << 20,
    skip: Collection[int] = (),
    error: Exception | None = None,
) -> list[int]:
    """Receive ``blocks`` into ``path`` through a buffer of about ``buffer`` bytes; the chunks written, in order."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with mock.patch.object(fetch_module, "_BATCH_BYTES", buffer):
        receiver = _ChunkReceiver(fd, target, 0, "test", None)  # it owns fd
    written: list[int] = []
    receiver.on_written = written.extend
    try:
        receiver.receive(_Body(blocks, error), skip)
    finally:
        receiver.close()
    return written


blobs = st.binary(min_size=1, max_size=3000)
cut_lists = st.lists(st.integers(0, 10_000), max_size=12)


buffers = st.integers(1, 3000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=blobs, chunk_size=st.integers(1, 700), cuts=cut_lists, buffer=buffers)
def test_stream_cut_anywhere_is_written_exactly(data: bytes, chunk_size: int, cuts: list[int], buffer: int) -> None:
    """Whatever the block boundaries and the buffer size, every chunk is verified and the file is the blob, each
    chunk written once."""
    target = _target(data, chunk_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out"
        written = _receive(path, target, _blocks(data, cuts), buffer=buffer)
        assert path.read_bytes() == data
        assert written == list(range(chunk_count(len(data), chunk_size)))
        finish_file(path, target, written)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=blobs,
    chunk_size=st.integers(1, 700),
    cuts=cut_lists,
    buffer=buffers,
    where=st.integers(0),
    bit=st.integers(0, 7),
)
def test_flipping_any_byte_is_refused_before_the_chunk_is_written(
    data: bytes, chunk_size: int, cuts: list[int], buffer: int, where: int, bit: int
) -> None:
    """Flip any bit of the stream: that chunk is refused, and neither it nor any later chunk reaches the file."""
    target = _target(data, chunk_size)
    at = where % len(data)
    bad = at // chunk_size
    tampered = bytearray(data)
    tampered[at] ^= 1 << bit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out"
        with pytest.raises(FetchRefusedError, match=f"chunk {bad} failed verification"):
            _receive(path, target, _blocks(bytes(tampered), cuts), buffer=buffer)
        assert path.read_bytes() == data[: bad * chunk_size]  # the verified chunks before it, nothing else
        with pytest.raises(FetchRefusedError, match="unverified chunks"):
            finish_file(path, target, range(bad))


def test_more_bytes_than_signed_are_refused_by_the_receiver(tmp_path: Path) -> None:
    """A stream running past the last signed chunk is refused; the file never exceeds the signed length."""
    data = os.urandom(5000)
    target = _target(data, 1024)
    with pytest.raises(FetchRefusedError, match="more bytes than the signed length"):
        _receive(tmp_path / "out", target, [data + b"x"])
    assert (tmp_path / "out").stat().st_size <= len(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=blobs, chunk_size=st.integers(1, 700), cuts=cut_lists, buffer=buffers, end=st.integers(0))
def test_a_body_failing_midway_keeps_exactly_the_whole_chunks_received(
    data: bytes, chunk_size: int, cuts: list[int], buffer: int, end: int
) -> None:
    """The connection drops after any byte: the whole chunks before it are verified and written (a resume starts
    after them), the partial one is not, and the drop is raised as a lost connection (retried), not a refusal."""
    target = _target(data, chunk_size)
    end %= len(data)  # at least the last byte is missing
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out"
        with pytest.raises(_ConnectionLostError, match="reset"):
            _receive(path, target, _blocks(data[:end], cuts), buffer=buffer, error=ConnectionResetError("reset"))
        whole = end // chunk_size
        assert path.read_bytes() == data[: whole * chunk_size]
        assert verified_chunks(path, target) == set(range(whole))


def test_chunks_already_on_disk_are_checked_not_rewritten(tmp_path: Path) -> None:
    """Resumed from a gap: chunks in ``skip`` are verified in the stream but only the missing ones are written."""
    data = os.urandom(5 * 1024)
    target = _target(data, 1024)
    path = tmp_path / "out"
    path.write_bytes(data[:1024] + bytes(1024) + data[2048:])  # chunk 1 missing
    written = _receive(path, target, [data], buffer=2048, skip={0, 2, 3, 4})
    assert written == [1]
    assert path.read_bytes() == data


def test_finish_file_refuses_a_wrong_length(tmp_path: Path) -> None:
    """All chunks verified but the file has another length (appended to): refused."""
    data = os.urandom(3000)
    target = _target(data, 1024)
    (tmp_path / "out").write_bytes(data + b"\0")
    with pytest.raises(FetchRefusedError, match="3001 bytes"):
        finish_file(tmp_path / "out", target, range(3))


def _gguf() -> bytes:
    metadata = {"general.architecture": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(5000)]}
    return build_gguf(metadata, [("token_embd.weight", [64, 64], GgmlType.Q4_0)], fill=7)


def _validate_while_arriving(
    tmp_path: Path, data: bytes, order: list[int], chunk_size: int
) -> tuple[object, list[int]]:
    """Write and report the chunks of ``data`` in ``order`` while another thread validates the prefix."""
    target = _target(data, chunk_size)
    path = tmp_path / "download"
    path.write_bytes(b"")
    prefix = VerifiedPrefix(target, path)
    outcome: list[object] = []
    ends: list[int] = []

    def check() -> None:
        try:
            with prefix.open() as f:
                outcome.append(inspect_gguf_file(f))
        except (InvalidModelError, OSError) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=check)
    thread.start()
    with path.open("r+b") as f:
        for index in order:
            f.seek(index * chunk_size)
            f.write(data[index * chunk_size : (index + 1) * chunk_size])
            f.flush()
            prefix.chunk_done(index)
            ends.append(prefix.end)
    prefix.close()
    thread.join(10)
    assert not thread.is_alive()
    return outcome[0], ends


def test_header_validated_while_arriving_matches_the_registry(tmp_path: Path) -> None:
    """Chunks arriving out of order: the prefix only grows over contiguous chunks, and the facts of the header
    validated on it are exactly those of the finished file."""
    data = _gguf()
    size = 4096
    n = chunk_count(len(data), size)
    order = [1, 0, *range(3, n), 2]
    facts, ends = _validate_while_arriving(tmp_path, data, order, size)
    assert ends[0] == 0  # chunk 1 alone is not a prefix
    assert ends[1] == 2 * size
    assert ends[-2] == 2 * size  # chunk 2 missing: nothing after it counts
    assert ends[-1] == len(data)
    assert facts == inspect_model(tmp_path / "download")


def test_hostile_header_is_rejected_while_arriving(tmp_path: Path) -> None:
    """A header claiming 2**40 tensors is refused by the same validator, before the transfer completes."""
    data = b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + bytes(50_000)
    outcome, _ = _validate_while_arriving(tmp_path, data, list(range(chunk_count(len(data), 4096))), 4096)
    assert isinstance(outcome, InvalidModelError)
    assert "tensor count" in str(outcome)


def test_transfer_ending_early_fails_the_read_instead_of_blocking(tmp_path: Path) -> None:
    """A reader waiting for bytes that never arrive is released by close() with an error, not left hanging."""
    data = _gguf()
    outcome, _ = _validate_while_arriving(tmp_path, data, [0], 256)
    assert isinstance(outcome, InvalidModelError | OSError)
    assert "transfer ended before byte" in str(outcome)


# --- write faults (found by a review of ADR 0013's change: with no whole-file sha256 after a download, every
# chunk counted as verified must be on disk whole, and a stop mid-transfer must neither drop a queued batch nor
# turn into a refused source) ----------------------------------------------------------------------------------

CHUNK = 1024


class _Sender:
    """A fake MQTT link answering every fetch request with the right chunks."""

    def __init__(self, data: bytes) -> None:
        self.device = "dev1"
        self.data = data
        self.connected = asyncio.Event()
        self.connected.set()
        self.chunk_sink: Callable[[bytes], None] | None = None

    async def publish_fetch(self, payload: bytes) -> None:
        request = decode(payload)
        assert isinstance(request, FetchRequest)
        for index in request.indices:
            offset, size = chunk_span(index, len(self.data), CHUNK)
            frame = encode_chunk(request.transfer_id, index, self.data[offset : offset + size])
            assert self.chunk_sink is not None
            asyncio.get_running_loop().call_soon(self.chunk_sink, frame)


async def test_mqtt_short_pwrite_is_not_counted_as_a_verified_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short ``pwrite`` (e.g. a full disk part-way) must not leave a chunk counted as verified half written:
    the fetcher writes the rest (or fails); it never returns with a file whose bytes are not the signed ones."""
    data = hashlib.sha256(b"x").digest() * 160  # 5120 bytes: 5 chunks of 1 KiB
    target = _target(data, CHUNK)
    real_pwrite = os.pwrite
    short_once = [True]

    def pwrite(fd: int, buf: bytes, offset: int) -> int:
        if offset == CHUNK and short_once[0]:  # chunk 1: only half of it reaches the file
            short_once[0] = False
            return real_pwrite(fd, bytes(buf)[: len(buf) // 2], offset)
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out"
    try:
        await MqttBlobFetcher(_Sender(data), FetchPolicy(window=1)).fetch(target, out)
    except (FetchError, OSError):
        return  # refusing (or failing) the transfer is correct
    assert out.read_bytes() == data, "fetch succeeded although chunk 1 on disk does not match the signed chunk"


async def test_the_download_is_flushed_to_disk_in_steps_while_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP: the receiver's flusher makes the file durable every few MiB (here: every 4 chunks) on its own thread,
    so the final fsync has only the tail left; the bytes are exactly the stream's."""
    flushed_at: list[int] = []
    flushed = threading.Event()

    def datasync(fd: int) -> None:
        flushed_at.append(os.fstat(fd).st_size)
        os.fdatasync(fd)
        flushed.set()

    monkeypatch.setattr(fetch_module, "_datasync", datasync)
    monkeypatch.setattr(fetch_module, "_BATCH_BYTES", CHUNK)
    data = os.urandom(40 * CHUNK + 7)
    target = _target(data, CHUNK)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    receiver = _ChunkReceiver(fd, target, 0, "test", None)
    receiver.flusher.every = 4 * CHUNK

    class Paced(_Body):  # waits for the first flush before sending the second half
        def readinto(self, buffer: memoryview) -> int:
            if sum(map(len, self.blocks)) <= len(data) // 2:
                flushed.wait(10)
            return super().readinto(buffer)

    try:
        receiver.receive(Paced(_blocks(data, list(range(0, len(data), CHUNK // 2)))), ())
    finally:
        receiver.close()
    assert (tmp_path / "out").read_bytes() == data
    assert receiver.flusher.flushes == len(flushed_at) >= 2, flushed_at
    assert flushed_at[0] < len(data), "the first flush ran while the blob was still arriving"


async def test_a_failed_flush_fails_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error of a background flush is reported to its descriptor only (the final fsync runs on another
    one and may not see it): the receiver raises it when it closes, so the download is not taken as durable, and
    empties the file, so that no resume trusts pages that read back fine but may not be on disk."""

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fetch_module, "_datasync", failing)
    data = os.urandom(12 * CHUNK)
    target = _target(data, CHUNK)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    receiver = _ChunkReceiver(fd, target, 0, "test", None)
    receiver.flusher.every = 4 * CHUNK
    try:
        receiver.receive(_Body([data]), ())
    finally:
        with pytest.raises(OSError, match="Input/output error"):
            receiver.close()
    assert receiver.fd == -1, "the descriptor was closed all the same"
    assert (tmp_path / "out").stat().st_size == 0, "nothing of it is kept for a resume"
