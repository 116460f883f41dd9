"""Model residency: load on first use, keep while used, unload by LRU under a memory budget.

``async with pool.use(spec) as model:`` is the only way the rest of the agent gets a loaded model. Keep the
block open until the request (including a stream) is finished: that is what marks the model as in use.

Invariants:

* **One load per model.** Concurrent first users of a spec share one load (run in a thread); a failed load is
  forgotten, so the next use tries again. Loads are serialised, so budget decisions never race.
* **Budget.** The bytes charged are each model's :attr:`~agent.inference.base.LoadedModel.memory_bytes` (measured
  at load, read live). Before a load the new model is charged its file size; after it, its measured size.
  If the total would exceed the budget, idle unpinned models are unloaded, least recently used first; if that
  cannot make room, :class:`~agent.errors.MemoryBudgetError` is raised (and a model that turned out too large
  once measured is unloaded again). Models being unloaded still count until their memory is freed.
* **Never evicted:** a model in use (reference count > 0, including users waiting for its load), or pinned
  (``pin(name)`` or ``ModelSpec.pinned``).
* **Versions.** The pool keeps one *current* version per name: the spec most recently passed to :meth:`use`.
  A use with a different sha256 makes that version current; older versions *retire*: they serve the users
  they have and are unloaded when idle. :meth:`unload` retires every version of a name.
* All bookkeeping happens on the event loop between awaits (no locks needed for state); only loading and
  freeing touch threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from agent.errors import AgentError, EngineLoadError, InferenceError, MemoryBudgetError
from agent.inference.base import LoadedModel, LoadStats, ModelSpec, QueueKind

__all__ = ["CLOSE_TIMEOUT_S", "LOAD_TIMEOUT_S", "LoadedInfo", "ModelPool"]

_log = structlog.get_logger(__name__)

LOAD_TIMEOUT_S = 600.0
"""A load (the engine opening a file) running longer is reported as stalled: a big model on a slow disk takes
minutes, a native open that never returns would otherwise hold the load lock (and every later load) forever."""
CLOSE_TIMEOUT_S = 60.0
"""Longest anything waits for an unload: freeing a model takes milliseconds to seconds; one that does not finish
is stuck behind a wedged engine thread, which :meth:`ModelPool.stalled` reports (the watchdog restarts the agent)."""


@dataclass(frozen=True, slots=True)
class LoadedInfo:
    """One resident model, as :meth:`ModelPool.loaded` reports it.

    Attributes:
        last_used: wall-clock time (UNIX seconds) the model was last acquired or released.
        retiring: an older version (or one :meth:`ModelPool.unload` was asked for) still serving its users.
    """

    name: str
    variant: str
    sha256: str
    memory_bytes: int
    in_use: int
    pinned: bool
    last_used: float
    retiring: bool = False


class _Entry:
    """One version of one model in the pool: loading, loaded, retiring or closing."""

    __slots__ = ("last_used", "last_used_wall", "loading_since", "model", "refs", "spec", "task")

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: LoadedModel | None = None
        self.task: asyncio.Task[LoadedModel] | None = None
        self.refs = 0
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()
        self.loading_since: float | None = None  # monotonic start of the engine's open, while it runs

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()

    @property
    def memory(self) -> int:
        return self.model.memory_bytes if self.model is not None else 0


class ModelPool:
    """Loaded models under one memory budget (see the module docstring for the rules)."""

    def __init__(
        self,
        budget_bytes: int,
        loader: Callable[[ModelSpec], LoadedModel] | None = None,
        *,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        """Create an empty pool.

        Args:
            budget_bytes: most bytes all resident models may be charged together.
            loader: opens a spec (blocking; run in a thread); defaults to :func:`agent.inference.load_model`.
            load_timeout_s: a load running longer is reported by :meth:`stalled` (``inference.load_timeout_s``).
            close_timeout_s: longest a load (holding the load lock), :meth:`unload` or :meth:`aclose` waits for
                unloads to finish before giving up with an error.
        """
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        if loader is None:
            from agent.inference import load_model  # the package imports this module: import at call time

            loader = load_model
        self._budget = budget_bytes
        self._loader = loader
        self._load_timeout_s = load_timeout_s
        self._close_timeout_s = close_timeout_s
        self._current: dict[str, _Entry] = {}
        self._retiring: set[_Entry] = set()
        self._closing: set[_Entry] = set()
        self._pinned: set[str] = set()
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def budget_bytes(self) -> int:
        """The memory budget."""
        return self._budget

    @property
    def used_bytes(self) -> int:
        """Bytes charged by every resident model, including ones being unloaded."""
        return sum(e.memory for e in self._all())

    @contextlib.asynccontextmanager
    async def use(self, spec: ModelSpec) -> AsyncIterator[LoadedModel]:
        """Hold ``spec``'s model (loading it first if needed) for the duration of the block.

        Raises:
            MemoryBudgetError: the model cannot fit, even after unloading every idle unpinned model.
            EngineLoadError: the engine could not open the file.
            InferenceError: the pool is closed.
        """
        entry = self._acquire(spec)
        try:
            assert entry.task is not None
            model = await asyncio.shield(entry.task)
            yield model
        finally:
            self._release(entry)

    def pin(self, name: str) -> None:
        """Never unload model ``name`` to make room (it may still be replaced by a new version)."""
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        """Undo :meth:`pin` (a spec with ``pinned=True`` stays pinned)."""
        self._pinned.discard(name)
        self._notify()

    def loaded(self) -> list[LoadedInfo]:
        """Resident models (current and retiring versions; not ones still loading), sorted by name."""
        entries = [e for e in itertools.chain(self._current.values(), self._retiring) if e.model is not None]
        return [
            LoadedInfo(
                name=e.spec.name,
                variant=e.spec.variant,
                sha256=e.spec.sha256,
                memory_bytes=e.memory,
                in_use=e.refs,
                pinned=self._is_pinned(e),
                last_used=e.last_used_wall,
                retiring=e in self._retiring,
            )
            for e in sorted(entries, key=lambda e: (e.spec.name, e in self._retiring))
        ]

    def load_stats(self) -> dict[str, LoadStats]:
        """Admission queue and slots of each resident model that has them, by name (current version first)."""
        stats: dict[str, LoadStats] = {}
        for entry in itertools.chain(self._current.values(), self._retiring):
            if entry.model is not None and entry.spec.name not in stats:
                snapshot = entry.model.load_stats()
                if snapshot is not None:
                    stats[entry.spec.name] = snapshot
        return stats

    def queue_stats(self) -> dict[str, dict[QueueKind, LoadStats]]:
        """Every admission queue of each resident model, by name then kind (current version first)."""
        stats: dict[str, dict[QueueKind, LoadStats]] = {}
        for entry in itertools.chain(self._current.values(), self._retiring):
            if entry.model is not None and entry.spec.name not in stats:
                queues = entry.model.queue_stats()
                if queues:
                    stats[entry.spec.name] = queues
        return stats

    def stalled(self, limit_s: float) -> dict[str, float]:
        """Models whose engine has owed progress too long, by name, with the seconds owed.

        A resident model (being unloaded included) whose engine thread has owed progress for more than
        ``limit_s`` seconds, or a load that has run for more than the pool's ``load_timeout_s``.
        """
        stalled: dict[str, float] = {}
        now = time.monotonic()
        for entry in self._all():
            if entry.model is not None:
                seconds, limit = entry.model.stalled_s(), limit_s
            elif entry.loading_since is not None:
                seconds, limit = now - entry.loading_since, self._load_timeout_s
            else:
                continue
            if seconds > limit:
                stalled[entry.spec.name] = max(seconds, stalled.get(entry.spec.name, 0.0))
        return stalled

    async def unload(self, name: str) -> bool:
        """Retire every version of ``name``: idle ones are unloaded now, in-use ones when their users finish.

        Returns:
            Whether any version of ``name`` was resident or loading.

        Raises:
            InferenceError: an unload did not finish within ``close_timeout_s`` (it goes on; :meth:`stalled`
                reports its engine thread).
        """
        found = False
        entry = self._current.get(name)
        if entry is not None:
            self._retire(entry, reason="requested")
            found = True
        found = found or any(e.spec.name == name for e in self._retiring)
        closing = [t for t in list(self._tasks) if t.get_name() == f"model-unload:{name}"]
        if closing:
            _, pending = await asyncio.wait(closing, timeout=self._close_timeout_s)
            if pending:
                raise InferenceError(
                    f"model {name!r} did not unload within {self._close_timeout_s:g} s (its engine thread is stuck)"
                )
        return found

    async def aclose(self) -> None:
        """Wait for loads in progress, then unload every model (even in-use ones: call after draining)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._close_timeout_s
        loading = [e.task for e in self._all() if e.task is not None and not e.task.done()]
        if loading:
            _, pending = await asyncio.wait(loading, timeout=self._close_timeout_s)
            if pending:
                _log.error("model_pool_close_abandoned", loading=sorted(e.spec.name for e in self._all()))
                return  # a native open that does not return: stop without it
        for entry in list(itertools.chain(self._current.values(), self._retiring)):
            if entry.model is not None:
                self._start_close(entry, reason="shutdown")
        self._current.clear()
        self._retiring.clear()
        while self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
            if pending:
                _log.error("model_pool_close_abandoned", unloading=sorted(e.spec.name for e in self._closing))
                return  # a stuck unload: exit without it (its engine thread is a daemon thread)

    # -- bookkeeping (synchronous: atomic on the event loop)

    def _all(self) -> Iterator[_Entry]:
        return itertools.chain(self._current.values(), self._retiring, self._closing)

    def _is_pinned(self, entry: _Entry) -> bool:
        return entry.spec.pinned or entry.spec.name in self._pinned

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here; loads report to their users, unloads log in _close

    def _acquire(self, spec: ModelSpec) -> _Entry:
        if self._closed:
            raise InferenceError("the model pool is closed")
        entry = self._current.get(spec.name)
        if entry is not None and entry.spec.sha256 != spec.sha256:
            self._retire(entry, reason="new version")
            entry = None
        if entry is None:
            entry = _Entry(spec)
            self._current[spec.name] = entry
            entry.task = self._spawn(self._load(entry), name=f"model-load:{spec.name}")
        entry.refs += 1
        entry.touch()
        return entry

    def _release(self, entry: _Entry) -> None:
        entry.refs -= 1
        entry.touch()
        if entry.refs == 0 and entry in self._retiring and entry.model is not None:
            self._start_close(entry, reason="retired")
        self._notify()

    def _retire(self, entry: _Entry, reason: str) -> None:
        if self._current.get(entry.spec.name) is entry:
            del self._current[entry.spec.name]
        self._retiring.add(entry)
        if entry.refs == 0 and entry.model is not None:
            self._start_close(entry, reason=reason)

    def _forget(self, entry: _Entry) -> None:
        if self._current.get(entry.spec.name) is entry:
            del self._current[entry.spec.name]
        self._retiring.discard(entry)
        self._notify()

    def _start_close(self, entry: _Entry, reason: str) -> None:
        if self._current.get(entry.spec.name) is entry:
            del self._current[entry.spec.name]
        self._retiring.discard(entry)
        self._closing.add(entry)
        self._spawn(self._close(entry, reason), name=f"model-unload:{entry.spec.name}")

    # -- loading and unloading

    async def _load(self, entry: _Entry) -> LoadedModel:
        spec = entry.spec
        try:
            async with self._load_lock:
                if self._closed:
                    raise InferenceError("the model pool is closed")
                await self._make_room(entry, spec.size)
                started = entry.loading_since = time.monotonic()
                try:
                    model = await asyncio.to_thread(self._loader, spec)
                except AgentError:
                    raise
                except Exception as exc:
                    raise EngineLoadError(f"model {spec.name!r} failed to load: {exc}") from exc
                finally:
                    entry.loading_since = None
                entry.model = model
                try:
                    await self._make_room(entry, 0)
                except MemoryBudgetError:
                    entry.model = None
                    await model.aclose()
                    raise
        except BaseException:
            self._forget(entry)
            raise
        _log.info(
            "model_loaded",
            model=spec.name,
            variant=spec.variant,
            sha256=spec.sha256,
            memory_bytes=model.memory_bytes,
            seconds=round(time.monotonic() - started, 3),
        )
        if entry.refs == 0 and entry in self._retiring:
            self._start_close(entry, reason="retired")
        self._notify()
        return model

    async def _make_room(self, entry: _Entry, need: int) -> None:
        """Unload idle unpinned models (LRU first) until ``need`` more bytes fit, or raise.

        Waiting for unloads (under the load lock) is bounded by ``close_timeout_s``: an unload stuck behind a
        wedged engine thread must not hold every later load forever.
        """
        deadline = time.monotonic() + self._close_timeout_s
        while True:
            used = self.used_bytes
            if used + need <= self._budget:
                return
            being_freed = sum(e.memory for e in self._closing)
            candidates = sorted(
                (
                    e
                    for e in self._current.values()
                    if e is not entry and e.model is not None and e.refs == 0 and not self._is_pinned(e)
                ),
                key=lambda e: e.last_used,
            )
            victims: list[_Entry] = []
            freed = being_freed
            for candidate in candidates:
                if used - freed + need <= self._budget:
                    break
                victims.append(candidate)
                freed += candidate.memory
            if used - freed + need > self._budget:
                raise MemoryBudgetError(self._no_room_message(entry, need, used))
            for victim in victims:
                self._start_close(victim, reason="lru")
            changed = self._changed
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await changed.wait()
            except TimeoutError:
                stuck = ", ".join(sorted({e.spec.name for e in self._closing})) or "none"
                raise MemoryBudgetError(
                    f"model {entry.spec.name!r} needs memory still held by models being unloaded ({stuck}): "
                    f"their unload has not finished in {self._close_timeout_s:g} s"
                ) from None

    def _no_room_message(self, entry: _Entry, need: int, used: int) -> str:
        held = [
            f"{e.spec.name} ({e.memory} bytes, {'pinned' if self._is_pinned(e) else 'in use'})"
            for e in itertools.chain(self._current.values(), self._retiring)
            if e is not entry and e.model is not None and (e.refs > 0 or self._is_pinned(e))
        ]
        what = "is estimated at" if entry.model is None else "measured"
        return (
            f"model {entry.spec.name!r} {what} {need or entry.memory} bytes; the budget is {self._budget} bytes "
            f"with {used - entry.memory} held" + (f" by {', '.join(held)}" if held else "")
        )

    async def _close(self, entry: _Entry, reason: str) -> None:
        model = entry.model
        try:
            if model is not None:
                await model.aclose()
        except Exception:
            _log.exception("model_unload_failed", model=entry.spec.name, sha256=entry.spec.sha256)
            raise
        finally:
            self._closing.discard(entry)
            entry.model = None
            self._notify()
        _log.info("model_unloaded", model=entry.spec.name, sha256=entry.spec.sha256, reason=reason)
