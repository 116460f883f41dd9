"""Admission control through the local API: 429 + Retry-After, priority classes, deadlines, scheduler metrics.

A real ApiServer on a unix socket in the test's event loop, the real SmolLM2 with one slot and a queue of two,
and aiohttp's client over the socket. A streaming request that counts forever holds the slot while a test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.api import ApiServer, ApiState, TokenStore
from agent.client import ApiClient, ApiClientError
from agent.config import AgentConfig, ApiConfig, InferenceConfig
from agent.inference import ModelPool
from agent.registry import Registry

pytestmark = pytest.mark.component

LLM = "smollm2-135m-instruct"
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
WRITE_S = 2.0


@dataclass
class Served:
    session: aiohttp.ClientSession
    pool: ModelPool
    server: ApiServer

    async def complete(self, headers: dict[str, str] | None = None, **body: Any) -> tuple[int, dict[str, Any], str]:
        payload = {"model": LLM, "prompt": "The sky is", "max_tokens": 2, "temperature": 0, **body}
        async with self.session.post("http://agent/v1/completions", json=payload, headers=headers or {}) as reply:
            return reply.status, dict(reply.headers), await reply.text()

    async def embed(
        self, texts: list[str], headers: dict[str, str] | None = None, **body: Any
    ) -> tuple[int, dict[str, str], str]:
        payload = {"model": LLM, "input": texts, **body}
        async with self.session.post("http://agent/v1/embeddings", json=payload, headers=headers or {}) as reply:
            return reply.status, dict(reply.headers), await reply.text()

    async def metrics(self) -> str:
        async with self.session.get("http://agent/metrics") as reply:
            return await reply.text()


@pytest.fixture
async def served(tmp_path: Path, smollm2_path: Path) -> AsyncIterator[Served]:
    """The agent with SmolLM2 at one slot and at most two waiting requests; a streamed write waits WRITE_S."""
    config = AgentConfig(
        state_dir=tmp_path / "state",
        api=ApiConfig(socket_path=tmp_path / "run" / "api.sock"),
        inference=InferenceConfig(n_ctx=2048, n_parallel=1, n_threads=2, max_queue=2),
    )
    registry = Registry.open(config.state_dir, config.registry)
    registry.recover()
    registry.import_file(smollm2_path, name=LLM, variant="q4_1")
    tokens = TokenStore.open(config.state_dir)
    pool = ModelPool(config.inference.memory_budget_bytes)
    try:
        async with (
            ApiServer(
                ApiState(config=config, registry=registry, pool=pool, tokens=tokens, stream_write_timeout_s=WRITE_S)
            ) as server,
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(config.api.socket_path))) as session,
        ):
            yield Served(session, pool, server)
    finally:
        await pool.aclose()
        tokens.close()
        registry.close()


@contextlib.asynccontextmanager
async def _slot_held(served: Served) -> AsyncIterator[None]:
    """A streaming request generating from ENDLESS holds the only slot for the duration of the block."""
    started = asyncio.Event()

    async def hog() -> None:
        payload = {"model": LLM, "prompt": ENDLESS, "max_tokens": 1500, "temperature": 0, "stream": True}
        async with served.session.post("http://agent/v1/completions", json=payload) as reply:
            assert reply.status == 200
            async for _ in reply.content:
                started.set()

    task = asyncio.create_task(hog())
    await asyncio.wait_for(started.wait(), timeout=60)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _waiting(served: Served, count: int) -> None:
    for _ in range(200):
        stats = served.pool.load_stats().get(LLM)
        if stats is not None and stats.waiting == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never saw {count} waiting requests: {served.pool.load_stats()}")


async def test_full_queue_answers_429_with_retry_after_and_metrics_show_it(served: Served) -> None:
    """With the slot busy and two requests waiting, a third gets 429 + Retry-After; /metrics shows queue and slots."""
    async with _slot_held(served):
        waiting = [asyncio.create_task(served.complete()) for _ in range(2)]
        await _waiting(served, 2)
        status, headers, text = await served.complete()
        assert status == 429, text
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(text)["error"]["code"] == "queue_full"
        metrics = await served.metrics()
        assert f'edge_agent_scheduler_waiting{{model="{LLM}",priority="interactive",queue="generation"}} 2.0' in metrics
        assert f'edge_agent_scheduler_slots_busy{{model="{LLM}",queue="generation"}} 1.0' in metrics
        assert f'edge_agent_scheduler_rejected_total{{model="{LLM}",queue="generation"}} 1.0' in metrics
    results = await asyncio.wait_for(asyncio.gather(*waiting), timeout=60)
    assert [status for status, _, _ in results] == [200, 200]
    assert f'edge_agent_queue_wait_seconds_count{{model="{LLM}"}}' in await served.metrics()


async def test_interactive_request_overtakes_a_queued_batch_request(served: Served) -> None:
    """A batch request (X-Priority header) queued before an interactive one (body field) is served after it."""
    finished: list[str] = []

    async def run(tag: str, **kwargs: Any) -> None:
        status, _, text = await served.complete(**kwargs)
        assert status == 200, text
        finished.append(tag)

    async with _slot_held(served):
        batch = asyncio.create_task(run("batch", headers={"X-Priority": "batch"}))
        await _waiting(served, 1)
        interactive = asyncio.create_task(run("interactive", priority="interactive"))
        await _waiting(served, 2)
    await asyncio.wait_for(asyncio.gather(batch, interactive), timeout=60)
    assert finished == ["interactive", "batch"]


async def test_deadline_passed_while_queued_answers_504(served: Served) -> None:
    """A request whose X-Request-Deadline-Ms passes while it waits for the busy slot gets 504 deadline_exceeded."""
    async with _slot_held(served):
        status, _, text = await served.complete(headers={"X-Request-Deadline-Ms": "300"})
        assert status == 504, text
        error = json.loads(text)["error"]
        assert error["code"] == "deadline_exceeded"
        assert "while waiting for a slot" in error["message"]
        status, _, text = await served.complete(timeout=0.3)
        assert status == 504, text


async def test_bad_priority_or_deadline_is_a_400(served: Served) -> None:
    """An unknown priority class or a malformed deadline header is refused with 400 before any work."""
    status, _, text = await served.complete(priority="urgent")
    assert status == 400
    assert json.loads(text)["error"]["param"] == "priority"
    status, _, _ = await served.complete(headers={"X-Request-Deadline-Ms": "soon"})
    assert status == 400


def _in_use(served: Served) -> bool:
    return any(info.name == LLM and info.in_use for info in served.pool.loaded())


def _shrink_server_buffers(server: ApiServer) -> None:
    """Shrink the server side of every open connection's buffers (the kernel's send buffer, asyncio's high-water
    mark), so that a client that stops reading stalls the server's writes within a few tokens, not ~300 KB."""
    runner = server._runner  # aiohttp exposes live connections only through the runner's low-level server
    assert runner is not None
    assert runner.server is not None
    for handler in runner.server.connections:
        transport = handler.transport
        assert isinstance(transport, asyncio.WriteTransport)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=1024)


async def test_a_streaming_client_that_stops_reading_releases_its_model(served: Served) -> None:
    """A client that stops reading a stream (without disconnecting) is dropped once a write waits too long; the
    model is released and the slot serves the next request."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": LLM, "prompt": ENDLESS, "max_tokens": 1900, "temperature": 0, "stream": True})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:  # a raw socket: nothing reads behind our back
        client.setblocking(False)
        await loop.sock_connect(client, str(served.server.socket_path))
        await loop.sock_sendall(
            client,
            b"POST /v1/completions HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            b"X-Request-Deadline-Ms: 20000\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body.encode()),
        )
        assert (await loop.sock_recv(client, 12)).startswith(b"HTTP/1.1 200")
        _shrink_server_buffers(served.server)
        # From here on nothing is read: the buffers fill up, then a write (at the latest the stream's last one,
        # after the 20 s deadline) waits for a reader that never comes. The deadline is long enough for even a
        # loaded box to produce more than the shrunk buffers hold (~8 KB, some 50 tokens): a stream that fits in
        # them would end normally, which is not the case under test.
        assert _in_use(served)
        for _ in range(900):  # up to 45 s
            if not _in_use(served):
                break
            await asyncio.sleep(0.05)
        assert not _in_use(served), "the stalled stream still holds the model"
        status, _, text = await served.complete()
        assert status == 200, text
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 16), timeout=10):
                received += chunk
        assert b"data: [DONE]" not in received
        assert b'"error"' not in received


async def test_the_cli_client_reports_a_stream_error_with_its_status(served: Served) -> None:
    """The CLI's ApiClient raises a deadline passed mid-stream as ApiClientError 504, not as a generic 500."""
    client = ApiClient(served.server.socket_path)

    def consume() -> int:
        body = {"model": LLM, "prompt": ENDLESS, "max_tokens": 1500, "temperature": 0, "timeout": 1.0}
        try:
            for _ in client.stream("/v1/completions", body):
                pass
        except ApiClientError as exc:
            return exc.status
        return 200

    assert await asyncio.to_thread(consume) == 504


def test_the_cli_client_turns_a_silent_or_broken_agent_into_api_client_errors(tmp_path: Path) -> None:
    """A socket that accepts but never answers, or hangs up mid-request, is an ApiClientError (is_running() is
    False), never a raw TimeoutError or ConnectionResetError."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(8)  # connections queue up, nobody answers
        client = ApiClient(path, timeout=0.5)
        assert not client.is_running()
        with pytest.raises(ApiClientError, match="did not answer") as silent:
            client.request("GET", "/v1/admin/status")
        assert silent.value.status == 0

        def hang_up() -> None:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            conn.close()

        while True:  # drop the connections of the calls above
            listener.setblocking(False)
            try:
                listener.accept()[0].close()
            except BlockingIOError:
                break
        listener.setblocking(True)
        thread = threading.Thread(target=hang_up)
        thread.start()
        with pytest.raises(ApiClientError) as broken:
            ApiClient(path, timeout=5).request("GET", "/v1/admin/status")
        thread.join()
        assert broken.value.status == 0


# --- embeddings: admitted like generations ----------------------------------------------------------------------

LONG_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 9  # ~130 tokens


@contextlib.asynccontextmanager
async def _embedding_held(served: Served) -> AsyncIterator[None]:
    """A long embeddings request (256 texts) is being embedded for the duration of the block; its client then
    disconnects."""
    hog = asyncio.create_task(served.embed([LONG_TEXT] * 256))
    for _ in range(600):
        stats = served.pool.queue_stats().get(LLM, {}).get("embeddings")
        if stats is not None and stats.slots_busy == 1:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the embeddings request never started: {served.pool.queue_stats()}")
    try:
        yield
    finally:
        hog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hog


async def _embeddings_waiting(served: Served, count: int) -> None:
    for _ in range(200):
        stats = served.pool.queue_stats().get(LLM, {}).get("embeddings")
        if stats is not None and stats.waiting == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never saw {count} waiting embeddings requests: {served.pool.queue_stats()}")


async def test_full_embeddings_queue_answers_429_with_retry_after_and_metrics_show_it(served: Served) -> None:
    """With a long embeddings request running and two waiting, a third gets 429 + Retry-After; /metrics shows the
    embeddings queue; once the long request's client leaves, the waiting ones are served."""
    async with _embedding_held(served):
        waiting = [asyncio.create_task(served.embed(["edge", "fleet"])) for _ in range(2)]
        await _embeddings_waiting(served, 2)
        status, headers, text = await served.embed(["one more"])
        assert status == 429, text
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(text)["error"]["code"] == "queue_full"
        metrics = await served.metrics()
        assert f'edge_agent_scheduler_waiting{{model="{LLM}",priority="interactive",queue="embeddings"}} 2.0' in metrics
        assert f'edge_agent_scheduler_slots_busy{{model="{LLM}",queue="embeddings"}} 1.0' in metrics
        assert f'edge_agent_scheduler_rejected_total{{model="{LLM}",queue="embeddings"}} 1.0' in metrics
    results = await asyncio.wait_for(asyncio.gather(*waiting), timeout=60)
    assert [status for status, _, _ in results] == [200, 200]


async def test_embeddings_deadline_answers_504_while_waiting_and_between_texts(served: Served) -> None:
    """An embeddings request gets 504 deadline_exceeded, with generation's error shape, when its deadline passes
    while it waits behind another one (header) or while its own texts are embedded (body field)."""
    async with _embedding_held(served):
        status, _, text = await served.embed(["short"], headers={"X-Request-Deadline-Ms": "300"})
        assert status == 504, text
        error = json.loads(text)["error"]
        assert error["code"] == "deadline_exceeded"
        assert "while waiting for its turn" in error["message"]
    status, _, text = await served.complete(timeout=0.001)
    assert status == 504, text
    generation = json.loads(text)["error"]
    started = time.perf_counter()
    status, _, text = await served.embed([LONG_TEXT] * 256, timeout=1.0)
    assert status == 504, text
    assert time.perf_counter() - started < 30  # not the minutes 256 texts take
    error = json.loads(text)["error"]
    assert "while embedding, after" in error["message"]
    assert (set(error), error["type"], error["code"]) == (set(generation), generation["type"], generation["code"])
