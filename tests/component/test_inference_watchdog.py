"""The systemd watchdog stops pinging while a model's decode thread is wedged, and resumes when it recovers.

The daemon's health probe (:func:`agent.daemon.inference_progress`) over a real :class:`ModelPool` holding the
real SmolLM2, a datagram socket standing in for systemd's notify socket, and a decode thread wedged the way a
native call that never returns would wedge it: a job on that thread that blocks until the test releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import inference_progress
from agent.errors import InferenceError, MemoryBudgetError
from agent.inference import ModelPool, ModelSpec, SamplingParams, TextDelta
from agent.inference.llama import LlamaModel
from agent.systemd import SystemdNotifier, watchdog_loop

pytestmark = [pytest.mark.component, pytest.mark.timeout(120)]


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, Path]]:
    """A non-blocking datagram socket standing in for systemd's (short path: sun_path is 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="efw-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, path
    sock.close()
    path.unlink(missing_ok=True)
    directory.rmdir()


class _Pings:
    """Reads the notify socket continuously (a blocking ``sendto`` waits once ten datagrams are unread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.times: list[float] = []
        self._sock = sock
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 64)
            if data == b"WATCHDOG=1":
                self.times.append(loop.time())

    def since(self, start: float) -> int:
        return sum(t >= start for t in self.times)

    def close(self) -> None:
        self._task.cancel()


async def test_wedged_decode_thread_withholds_watchdog_pings(
    notify_socket: tuple[socket.socket, Path], smollm2_path: Path
) -> None:
    """Idle past the limit: pings continue. Wedged past it: none. Released: pings resume and requests run."""
    sock, path = notify_socket
    digest = await asyncio.to_thread(lambda: hashlib.sha256(smollm2_path.read_bytes()).hexdigest())
    spec = ModelSpec(
        name="smollm2-135m-instruct",
        variant="q4_1",
        path=smollm2_path,
        format="gguf",
        sha256=digest,
        size=len(await asyncio.to_thread(smollm2_path.read_bytes)),
        n_ctx=512,
        n_threads=1,
        n_parallel=1,
    )
    loop = asyncio.get_running_loop()
    pool = ModelPool(2**31)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})  # a ping every 50 ms
    pings = _Pings(sock)
    gate = threading.Event()
    watchdog = None
    try:
        async with pool.use(spec) as model:
            watchdog = asyncio.create_task(watchdog_loop(notifier, inference_progress(pool, limit_s=0.3)))
            start = loop.time()
            await asyncio.sleep(0.6)  # idle for twice the limit: idle is not stalled
            assert pings.since(start) >= 4

            wedged = model._loop.submit_job(gate.wait)  # type: ignore[attr-defined]
            await asyncio.sleep(0.4)  # past the limit, plus a ping that may have been in flight
            assert pool.stalled(0.3), "the pool does not see the wedged decode thread"
            start = loop.time()
            await asyncio.sleep(0.5)
            assert pings.since(start) == 0

            gate.set()
            await asyncio.wait_for(asyncio.wrap_future(wedged), timeout=10)
            text = ""
            async with asyncio.timeout(60):
                async for event in model.complete("The sky is", SamplingParams(temperature=0.0, max_tokens=2)):
                    if isinstance(event, TextDelta):
                        text += event.text
            assert text
            start = loop.time()
            await asyncio.sleep(0.4)
            assert not pool.stalled(0.3)
            assert pings.since(start) >= 3
    finally:
        if watchdog is not None:
            watchdog.cancel()
        gate.set()
        pings.close()
        notifier.close()
        await pool.aclose()


async def _smollm2_spec(path: Path, name: str = "smollm2-135m-instruct") -> ModelSpec:
    data = await asyncio.to_thread(path.read_bytes)
    return ModelSpec(
        name=name,
        variant="q4_1",
        path=path,
        format="gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        n_ctx=512,
        n_threads=1,
        n_parallel=1,
    )


async def _use_once(pool: ModelPool, spec: ModelSpec) -> None:
    async with pool.use(spec):
        pass


async def test_unloading_a_wedged_model_keeps_withholding_pings(
    notify_socket: tuple[socket.socket, Path], smollm2_path: Path
) -> None:
    """Unloading a wedged model: pings stay off, and the unload and a load needing its memory fail in bounded time."""
    sock, path = notify_socket
    spec = await _smollm2_spec(smollm2_path)
    other = await _smollm2_spec(smollm2_path, name="other")
    loop = asyncio.get_running_loop()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    pings = _Pings(sock)
    gate = threading.Event()
    pool = ModelPool(2**31, close_timeout_s=1.0)
    watchdog = None
    try:
        async with pool.use(spec) as model:
            pass
        # room for one model, not two: a second model's load must wait for this one's memory
        pool._budget = model.memory_bytes + spec.size // 2  # type: ignore[attr-defined]
        watchdog = asyncio.create_task(watchdog_loop(notifier, inference_progress(pool, limit_s=0.3)))
        model._loop.submit_job(gate.wait)  # type: ignore[attr-defined]  # a native call that never returns
        await asyncio.sleep(0.4)
        assert pool.stalled(0.3)

        unload = asyncio.create_task(pool.unload(spec.name))  # LRU, a new version, a failed health check...
        await asyncio.sleep(0.3)
        start = loop.time()
        await asyncio.sleep(0.5)
        assert spec.name in pool.stalled(0.3), "a closing model stuck behind its wedged thread must stay stalled"
        assert pings.since(start) == 0
        with pytest.raises(InferenceError, match="did not unload within 1 s"):
            await asyncio.wait_for(unload, timeout=10)
        assert pool.used_bytes >= model.memory_bytes  # still charged: its memory is not free

        with pytest.raises(MemoryBudgetError, match="unload has not finished"):
            await asyncio.wait_for(_use_once(pool, other), timeout=10)
        assert pings.since(start) == 0

        gate.set()  # the native call returns: the close finishes, the memory is free, loads work again
        async with asyncio.timeout(30):
            while pool.used_bytes:  # noqa: ASYNC110 - the pool exposes no event for "unloaded"
                await asyncio.sleep(0.05)
            async with pool.use(other):
                pass
        assert not pool.stalled(0.3)
        start = loop.time()
        await asyncio.sleep(0.4)
        assert pings.since(start) >= 3
    finally:
        if watchdog is not None:
            watchdog.cancel()
        gate.set()
        pings.close()
        notifier.close()
        await pool.aclose()


async def test_a_load_that_never_returns_withholds_pings(
    notify_socket: tuple[socket.socket, Path], smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load running past load_timeout_s is a stall: no pings until it returns, then pings resume."""
    sock, path = notify_socket
    spec = await _smollm2_spec(smollm2_path)
    gate = threading.Event()
    real_open = LlamaModel._open

    def wedged_open(spec: ModelSpec) -> Any:  # the one seam faked: llama.cpp's open blocks until the test says
        gate.wait()
        return real_open(spec)

    monkeypatch.setattr(LlamaModel, "_open", staticmethod(wedged_open))
    loop = asyncio.get_running_loop()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    pings = _Pings(sock)
    pool = ModelPool(2**31, load_timeout_s=0.5)
    watchdog = asyncio.create_task(watchdog_loop(notifier, inference_progress(pool, limit_s=0.3)))
    user = None
    try:
        user = asyncio.create_task(pool.use(spec).__aenter__())
        await asyncio.sleep(0.3)
        assert not pool.stalled(0.3), "a load within load_timeout_s is not a stall"
        await asyncio.sleep(0.4)
        assert spec.name in pool.stalled(0.3)
        start = loop.time()
        await asyncio.sleep(0.5)
        assert pings.since(start) == 0

        gate.set()
        await asyncio.wait_for(user, timeout=60)
        assert not pool.stalled(0.3)
        start = loop.time()
        await asyncio.sleep(0.4)
        assert pings.since(start) >= 3
    finally:
        watchdog.cancel()
        gate.set()
        if user is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(user, timeout=60)
        pings.close()
        notifier.close()
        await pool.aclose()
