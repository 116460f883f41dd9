"""The HTTP fetcher's stream verifier and the verified-prefix reader, against real files.

Real parts: :class:`agent.link.fetch._ChunkWriter` writing a real file (the stream is cut into blocks at
arbitrary points, as a socket delivers it), :class:`agent.link.fetch.VerifiedPrefix` read by the real GGUF
validator (``agent.registry.formats.inspect_gguf_file``) on another thread while chunks are reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidModelError
from agent.link.fetch import FetchRefusedError, VerifiedPrefix, _ChunkWriter, finish_file
from agent.link.updater import VerifiedTarget
from agent.registry.formats import inspect_gguf_file, inspect_model
from agent.registry.gguf import GgmlType, build_gguf
from protocols.releases import ModelTargetFields, chunk_count, chunk_digests

pytestmark = pytest.mark.component


def _target(data: bytes, chunk_size: int, fmt: str = "gguf") -> VerifiedTarget:
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    fields = ModelTargetFields(fmt, "q4_0", 1, 1, 1, (), (), "mit", chunk_size, tuple(chunk_digests(chunks)))
    return VerifiedTarget("models/t/1/q4_0.gguf", len(data), hashlib.sha256(data).hexdigest(), fields, ())


def _blocks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


async def _stream(path: Path, target: VerifiedTarget, blocks: list[bytes], batch: int) -> list[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    writer = _ChunkWriter(fd, target, 0, "test", None, depth=2)
    written: list[int] = []
    writer.on_written = written.append
    try:
        for i in range(0, len(blocks), batch):
            await writer.submit(blocks[i : i + batch], skip=())
    finally:
        try:
            await writer.drain()
        finally:
            writer.close()
            os.close(fd)
    return written


blobs = st.binary(min_size=1, max_size=3000)
cut_lists = st.lists(st.integers(0, 10_000), max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=blobs, chunk_size=st.integers(1, 700), cuts=cut_lists, batch=st.integers(1, 4))
def test_stream_cut_anywhere_is_written_exactly(data: bytes, chunk_size: int, cuts: list[int], batch: int) -> None:
    """Whatever the block boundaries, every chunk is verified and the file is the blob, each chunk written once."""
    target = _target(data, chunk_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out"
        written = asyncio.run(_stream(path, target, _blocks(data, cuts), batch))
        assert path.read_bytes() == data
        assert written == list(range(chunk_count(len(data), chunk_size)))
        finish_file(path, target, written)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=blobs, chunk_size=st.integers(1, 700), cuts=cut_lists, where=st.integers(0), bit=st.integers(0, 7))
def test_flipping_any_byte_is_refused_before_the_chunk_is_written(
    data: bytes, chunk_size: int, cuts: list[int], where: int, bit: int
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
            asyncio.run(_stream(path, target, _blocks(bytes(tampered), cuts), 2))
        assert path.read_bytes() == data[: bad * chunk_size]  # the verified chunks before it, nothing else
        with pytest.raises(FetchRefusedError, match="unverified chunks"):
            finish_file(path, target, range(bad))


def test_more_bytes_than_signed_are_refused_by_the_writer(tmp_path: Path) -> None:
    """A stream running past the last signed chunk is refused; the file never exceeds the signed length."""
    data = os.urandom(5000)
    target = _target(data, 1024)
    with pytest.raises(FetchRefusedError, match="more bytes than the signed length"):
        asyncio.run(_stream(tmp_path / "out", target, [data + b"x"], 1))
    assert (tmp_path / "out").stat().st_size <= len(data)


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
