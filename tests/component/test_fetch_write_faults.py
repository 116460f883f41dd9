"""Write faults in the fetchers (found by a review of ADR 0013's change, where no whole-file sha256 runs after a
download any more): every chunk counted as verified must be on disk whole, and a stop mid-transfer must neither
drop a queued batch nor turn into a refused source.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.link.fetch import FetchError, FetchPolicy, MqttBlobFetcher, _ChunkWriter
from agent.link.updater import VerifiedTarget
from protocols.messages import FetchRequest, decode, encode_chunk
from protocols.releases import ModelTargetFields, chunk_digests, chunk_span

pytestmark = pytest.mark.component

CHUNK = 1024


def _target(data: bytes, chunk_size: int) -> VerifiedTarget:
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    fields = ModelTargetFields("gguf", "q4_0", 1, 1, 1, (), (), "mit", chunk_size, tuple(chunk_digests(chunks)))
    return VerifiedTarget("models/t/1/q4_0.gguf", len(data), hashlib.sha256(data).hexdigest(), fields, ())


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


class _HeldExecutor(concurrent.futures.Executor):
    """Runs nothing until :meth:`run_all`: every submitted batch waits, not started, like one the worker has not
    picked up yet."""

    def __init__(self) -> None:
        self.queue: list[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.queue.append((future, fn, args))
        return future

    def run_all(self) -> None:
        while self.queue:
            future, fn, args = self.queue.pop(0)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it started: never runs
            try:
                future.set_result(fn(*args))
            except Exception as exc:
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.run_all()


async def test_a_stop_while_batches_wait_for_the_worker_loses_none_and_raises_no_refusal(tmp_path: Path) -> None:
    """The HTTP writer: cancelled while waiting for a batch the worker has not started, it must not cancel that
    batch (the worker would take the next one as its continuation: every later chunk misaligned, refused)."""
    data = os.urandom(4 * CHUNK)
    target = _target(data, CHUNK)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    writer = _ChunkWriter(fd, target, 0, "test", None, depth=2)
    writer._executor.shutdown()
    held = _HeldExecutor()
    writer._executor = held  # type: ignore[assignment]
    try:
        await writer.submit([data[:CHUNK]], skip=())
        await writer.submit([data[CHUNK : 2 * CHUNK]], skip=())
        third = asyncio.create_task(writer.submit([data[2 * CHUNK :]], skip=()))  # waits: two batches queued
        for _ in range(3):
            await asyncio.sleep(0)
        third.cancel()  # the stop
        with pytest.raises(asyncio.CancelledError):
            await third
        held.run_all()  # the worker gets to the queued batches only now
        await writer.drain()  # no refusal: nothing was misaligned
    finally:
        writer.close()
        os.close(fd)
    assert (tmp_path / "out").read_bytes()[: 2 * CHUNK] == data[: 2 * CHUNK], "a queued batch was lost"
