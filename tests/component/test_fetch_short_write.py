"""Since ADR 0013 no whole-file sha256 runs after a download, so every chunk counted as verified must be on disk
whole: a short ``pwrite`` in the MQTT fetcher must not leave a chunk half written (found by a review of that change).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.link.fetch import FetchError, FetchPolicy, MqttBlobFetcher
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
