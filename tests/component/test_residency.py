"""Model residency: load on first use, LRU eviction under a budget, pinning, in-use protection, versions.

The component tests load real ONNX graphs (a 1024x1024 float32 MatMul each, ~4 MiB on disk, charged twice that
by the onnx engine's estimate) and the real silero-vad model. Only the pure LRU policy test uses a fake model.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import EngineLoadError, InferenceError, MemoryBudgetError
from agent.inference import LoadedModel, ModelPool, ModelSpec, load_model

N = 1024


def _spec(path: Path, name: str) -> ModelSpec:
    data = path.read_bytes()
    return ModelSpec(
        name=name,
        variant="onnx-fp32",
        path=path,
        format="onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        n_ctx=1,
        n_threads=1,
        n_parallel=1,
    )


def _matmul_graph(path: Path, seed: int) -> Path:
    weights = np.random.default_rng(seed).standard_normal((N, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        f"matmul{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSpec]:
    """Four distinct MatMul graphs named a, b, c, d, plus v2 (another version of a)."""
    directory = tmp_path_factory.mktemp("graphs")
    specs = {name: _spec(_matmul_graph(directory / f"{name}.onnx", seed), name) for seed, name in enumerate("abcd")}
    specs["a-v2"] = _spec(_matmul_graph(directory / "a-v2.onnx", 99), "a")
    return specs


@pytest.fixture(scope="module", autouse=True)
def _warm_onnxruntime(graphs: dict[str, ModelSpec]) -> None:
    """Load and free one graph first, so onnxruntime's one-off process setup is not charged to a test's model."""
    asyncio.run(load_model(graphs["d"]).aclose())


@pytest.fixture
def unit(graphs: dict[str, ModelSpec]) -> int:
    """What one graph is charged: the onnx engine's floor of twice the file size (measured may add ~1%)."""
    return 2 * graphs["a"].size


async def _eventually(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) until ``condition()`` holds: background unloads run on other tasks and threads."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the pool exposes no event for "unloaded"; poll briefly
            await asyncio.sleep(0.01)


async def _touch(pool: ModelPool, spec: ModelSpec) -> None:
    async with pool.use(spec) as model:
        out = await model.infer({"x": np.ones((1, N), np.float32)})
        assert out["y"].shape == (1, N)


def _names(pool: ModelPool) -> list[str]:
    return [info.name for info in pool.loaded()]


# --- the pure policy, with a fake model -----------------------------------------------------------------------


class _FakeModel(LoadedModel):
    """FAKE, at the pool's loader seam, for the pure LRU policy unit test only: charges exactly ``spec.size``
    bytes, has no capabilities, holds no native resources."""

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self.closed = False

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def memory_bytes(self) -> int:
        return self._spec.size

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset()

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.unit
async def test_lru_policy_unloads_the_least_recently_used_idle_model() -> None:
    """With room for two models, loading a third unloads the idle one used longest ago, and only that one."""
    specs = {
        name: ModelSpec(name, "x", Path(f"/nonexistent/{name}"), "onnx", f"{i:064x}", 100, 1, 1, 1)
        for i, name in enumerate("abc")
    }
    pool = ModelPool(250, loader=_FakeModel)
    for name in "aba":  # b is now the least recently used
        async with pool.use(specs[name]):
            pass
    async with pool.use(specs["c"]) as c:
        assert isinstance(c, _FakeModel)
    assert _names(pool) == ["a", "c"]
    assert pool.used_bytes == 200
    await pool.aclose()
    assert pool.loaded() == []


# --- real models ---------------------------------------------------------------------------------------------


@pytest.mark.component
async def test_lru_eviction_under_a_budget(graphs: dict[str, ModelSpec], unit: int) -> None:
    """Real graphs under a budget for two: a third load unloads the least recently used idle one."""
    pool = ModelPool(int(2.5 * unit))
    try:
        for name in "aba":
            await _touch(pool, graphs[name])
        assert _names(pool) == ["a", "b"]
        await _touch(pool, graphs["c"])
        assert _names(pool) == ["a", "c"]
        assert pool.used_bytes <= pool.budget_bytes
        assert all(info.memory_bytes >= unit for info in pool.loaded())
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_pinned_model_is_never_evicted(graphs: dict[str, ModelSpec], unit: int) -> None:
    """A pinned model stays even when it is the least recently used; unpinned, it is evicted again."""
    pool = ModelPool(int(2.5 * unit))
    try:
        pool.pin("a")
        for name in "abc":
            await _touch(pool, graphs[name])
        assert _names(pool) == ["a", "c"]
        assert [info.pinned for info in pool.loaded()] == [True, False]
        pool.unpin("a")
        await _touch(pool, graphs["b"])
        assert _names(pool) == ["b", "c"]
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_model_in_use_is_not_evicted(graphs: dict[str, ModelSpec], unit: int) -> None:
    """A model held by a request stays loaded even when least recently used; an idle one is evicted instead."""
    pool = ModelPool(int(2.5 * unit))
    try:
        async with pool.use(graphs["a"]) as held:
            await _touch(pool, graphs["b"])
            await _touch(pool, graphs["c"])
            assert _names(pool) == ["a", "c"]
            assert {info.name: info.in_use for info in pool.loaded()} == {"a": 1, "c": 0}
            out = await held.infer({"x": np.ones((1, N), np.float32)})
            assert out["y"].shape == (1, N)
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_memory_budget_error_when_nothing_can_be_evicted(graphs: dict[str, ModelSpec], unit: int) -> None:
    """With room for one model, a second load fails with MemoryBudgetError while the first is in use or pinned."""
    pool = ModelPool(int(1.5 * unit))
    try:
        async with pool.use(graphs["a"]):
            with pytest.raises(MemoryBudgetError, match="in use"):
                await _touch(pool, graphs["b"])
        pool.pin("a")
        with pytest.raises(MemoryBudgetError, match="pinned"):
            await _touch(pool, graphs["b"])
        assert _names(pool) == ["a"]
        pool.unpin("a")
        await _touch(pool, graphs["b"])
        assert _names(pool) == ["b"]
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_concurrent_first_use_loads_once(silero_vad_path: Path) -> None:
    """Five requests arriving together for an unloaded model share one load of the real silero-vad model."""
    calls: list[ModelSpec] = []

    def counting_loader(spec: ModelSpec) -> LoadedModel:
        calls.append(spec)
        return load_model(spec)

    spec = _spec(silero_vad_path, "silero-vad")
    pool = ModelPool(1 << 30, loader=counting_loader)

    async def request() -> LoadedModel:
        async with pool.use(spec) as model:
            out = await model.infer(
                {
                    "input": np.zeros((1, 576), np.float32),
                    "state": np.zeros((2, 1, 128), np.float32),
                    "sr": np.array(16000, np.int64),
                }
            )
            assert 0.0 <= float(out["output"][0, 0]) < 0.1
            return model

    try:
        models = await asyncio.gather(*(request() for _ in range(5)))
        assert len(calls) == 1
        assert all(m is models[0] for m in models)
        assert [(i.name, i.in_use) for i in pool.loaded()] == [("silero-vad", 0)]
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_new_version_loads_and_old_one_unloads_when_idle(graphs: dict[str, ModelSpec]) -> None:
    """A use with a new sha256 loads the new version; the old one keeps serving its user, then unloads."""
    pool = ModelPool(1 << 30)
    v1, v2 = graphs["a"], graphs["a-v2"]
    try:
        async with pool.use(v1) as old, pool.use(v2) as new:
            assert new is not old
            infos = pool.loaded()
            assert [(i.sha256, i.retiring) for i in infos] == [(v2.sha256, False), (v1.sha256, True)]
            await old.infer({"x": np.ones((1, N), np.float32)})
        assert [i.sha256 for i in pool.loaded()] == [v2.sha256]
        await _eventually(lambda: pool.used_bytes == new.memory_bytes)  # the old one's memory is freed
        with pytest.raises(InferenceError, match="closed"):
            await old.infer({"x": np.ones((1, N), np.float32)})
        async with pool.use(v2) as again:
            assert again is new
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_failed_load_is_reported_and_retried(tmp_path: Path) -> None:
    """A load that fails raises EngineLoadError to its users and is forgotten, so the next use tries again."""
    calls: list[ModelSpec] = []

    def counting_loader(spec: ModelSpec) -> LoadedModel:
        calls.append(spec)
        return load_model(spec)

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx graph")
    pool = ModelPool(1 << 30, loader=counting_loader)
    try:
        for attempt in (1, 2):
            with pytest.raises(EngineLoadError):
                await _touch(pool, _spec(junk, "junk"))
            assert len(calls) == attempt
        assert pool.loaded() == []
    finally:
        await pool.aclose()


@pytest.mark.component
async def test_unload_and_close(graphs: dict[str, ModelSpec]) -> None:
    """unload(name) frees an idle model at once; after aclose nothing is loaded and use() is refused."""
    pool = ModelPool(1 << 30)
    await _touch(pool, graphs["a"])
    await _touch(pool, graphs["b"])
    assert await pool.unload("a") is True
    assert _names(pool) == ["b"]
    assert await pool.unload("a") is False
    await pool.aclose()
    assert pool.loaded() == []
    assert pool.used_bytes == 0
    with pytest.raises(InferenceError, match="closed"):
        await _touch(pool, graphs["a"])
