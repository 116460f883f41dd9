"""Audit ingest sharded over worker processes: ``serve`` verifies audit uploads on every core.

Why: verifying an upload is CPU-bound Python (JSON parse, every record re-encoded and hashed, the checkpoint
signature), about twice the time SQLite needs to store it. On the writer thread it runs under the GIL and under
SQLite's write lock, one upload after the other, and caps ``serve`` well below what the disk can store
(``bench/audit.py``). Devices' logs are independent, so the work is split by device.

How (``[controller] audit_workers`` > 0, see :mod:`controller.config`):

- :class:`AuditShards` runs N worker processes (a :class:`~concurrent.futures.ProcessPoolExecutor` of one
  process each, ``spawn``ed so that no lock of ``serve``'s threads is inherited). An upload goes to shard
  ``crc32(device) % N``: one device always to the same worker, so its batches are applied in arrival order.
- In front of each worker is a :class:`controller.ingest.GroupCommitter`: while the worker is busy, uploads for
  it queue, and the next call hands it all of them (up to ``max_group``) as one list of picklable
  ``(topic, device, payload, now)``. Two groups are in flight per worker (``max_in_flight=2``): the next group
  is handed over while one runs and waits in the worker's call queue, whose pipe is widened
  (:func:`_widen_call_pipe`), so the worker starts it the instant it committed the previous one instead of
  idling through a round trip to ``serve``'s loop (≈ 2 ms per group, 10-15 % of a worker's time at one upload
  per commit). The worker runs its groups one after the other, in the order handed over. The worker
  (:func:`ingest_group`) first prepares every upload of the group with no lock held
  (:func:`controller.audit_ingest.prepare_upload`: parse, every record hashed, the checkpoint signature with the
  device's enrolled key, the chain within the batch, the rows to insert: all of the CPU work
  that does not depend on the device's accepted head), then runs them with :func:`controller.ingest.run_group`
  semantics — one ``BEGIN IMMEDIATE`` … ``COMMIT`` on its own connection to the fleet DB, a savepoint per upload,
  a failed upload undone alone — relating each to the device's head read inside that transaction and storing it
  (:func:`controller.audit_ingest.ingest_upload`, which the in-process path runs too; a check made with a key
  that is no longer the device's enrolled one is not used). One worker's preparing overlaps another's insert
  and commit: that is the speed-up. Several writers on one SQLite file is ADR 0012's setting (WAL, 30 s busy
  timeout).
- The workers hand SQLite's write lock to each other through an ``flock`` on ``<fleet.db>-shards.lock``, taken
  around the transaction: the next worker starts the instant the previous one committed, where SQLite's own busy
  handler would poll with sleeps of up to 100 ms. The kernel releases an ``flock`` when its process dies, so a
  killed worker cannot leave the others waiting. (``serve``'s writer thread and other controllers do not take
  it; they meet the workers at SQLite's lock, as before.)
- An upload's future resolves only after its worker's ``COMMIT`` returned, so ``serve`` acks only durable
  records (:class:`controller.audit_ingest.AuditIngest` counts and acks, in ``serve``). What a worker reports
  as failed comes back as :class:`~controller.errors.AuditShardError` (the text of the worker's exception).

Failures:

- A worker that dies (killed, out of memory) breaks its pool: every upload of that shard queued in it fails with
  :class:`~controller.errors.AuditShardError` (not acked: the devices re-send; what the worker had committed is
  stored once, by the primary key), and the shard starts a new worker for its next group. Other shards go on.
  A worker found dead when a group is handed to it (it died while idle) is replaced first, and the group goes
  to the new one: nothing of it had reached the dead one. A worker that dies (or is killed for hanging) with
  two groups handed to it fails both, and is replaced once, by whichever of the two notices first.
  More than ``MAX_RESTARTS`` restarts of one shard within ``RESTART_WINDOW_S`` raise from :meth:`AuditShards.run`
  and end ``serve`` with an error (systemd restarts it): a worker that cannot stay up is not retried forever.
- Workers ignore SIGINT and SIGTERM (a terminal's Ctrl-C and systemd's stop reach the whole process group):
  ``serve`` stops them itself. On exit, :meth:`AuditShards.__aexit__` lets every worker finish the groups
  handed to it (the one running and the one behind it; committed, but not acked: re-sent and counted as
  duplicates) and stops it; queued uploads are cancelled, never acked. A worker whose ``serve`` died (SIGKILL)
  exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from controller.audit_ingest import IngestResult, PreparedUpload, ingest_upload, prepare_upload
from controller.errors import AuditShardError
from controller.ingest import GroupCommitter, Job, run_group
from controller.store import FleetStore
from protocols.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "GROUP_TIMEOUT_S",
    "MAX_RESTARTS",
    "RESTART_WINDOW_S",
    "STOP_TIMEOUT_S",
    "AuditShards",
    "Upload",
    "default_workers",
    "ingest_group",
]

log = structlog.get_logger(__name__)

Upload = tuple[str, str, bytes, float]
"""One audit upload as a worker gets it: ``(topic, device, payload, now)``."""

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
"""More than :data:`MAX_RESTARTS` worker restarts of one shard within this many seconds end ``serve``."""

GROUP_TIMEOUT_S = 120.0
"""A worker that has not finished a group after this long is killed (nothing of the group is acked; SQLite
rolls back what it had not committed) and restarted: a hung worker (stopped, stuck in a native call, waiting for
another process's hung writer) must not stop its shard, and with it serve's message loop, for good. Twice
SQLite's 30 s busy timeout plus a full group's CPU time on a slow box. Counted for the group handed over behind
a running one from the moment that one ended."""

STOP_TIMEOUT_S = 30.0
"""How long a stop waits for a worker to finish the groups handed to it (at most two) before killing it (bounds
serve's stop)."""


def default_workers() -> int:
    """``audit_workers = -1`` (auto): one per CPU this process may use, at most 4; 0 (in-process) on one CPU.

    Past 4 the shards wait for SQLite's one write lock more than they gain from verifying in parallel.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(cpus, 4) if cpus > 1 else 0


def shard_of(device: str, shards: int) -> int:
    """The shard of ``device``: stable across processes and restarts (unlike ``hash()``)."""
    return zlib.crc32(device.encode()) % shards


# --- the worker process ------------------------------------------------------------------------------------


@dataclass
class _WorkerState:
    store: FleetStore
    limits: Limits
    lock_path: Path


# Set once per worker process by the pool's initializer: a ProcessPoolExecutor hands per-process state to the
# functions it runs only through a module global. Never set in serve's own process.
_worker: _WorkerState | None = None


def _start_worker(db_path: str, lock_path: str, limits: Limits) -> None:
    """The pool's initializer: ignore stop signals, open the fleet DB (migrated by serve already), watch serve."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = FleetStore.open(Path(db_path))
    # Workers end through os._exit (multiprocessing), which runs these finalizers but not atexit handlers.
    multiprocessing.util.Finalize(None, store.close, exitpriority=10)
    _worker = _WorkerState(store, limits, Path(lock_path))
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


def _exit_with_parent(sentinel: int) -> None:
    """Exit when serve's process is gone (its end of the pipe closed): an orphan would hold the DB open forever."""
    multiprocessing.connection.wait([sentinel])
    os._exit(0)  # an open transaction is rolled back by SQLite; nothing of it was acked


@contextlib.contextmanager
def _write_turn(path: Path) -> Iterator[None]:
    """Hold the shards' hand-over lock (see the module docstring) for one transaction."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def ingest_group(uploads: list[Upload]) -> list[tuple[bool, IngestResult | str]]:
    """In a worker: prepare the uploads with no lock, then verify and store them in one transaction (a savepoint each).

    Returns, per upload in order, ``(True, IngestResult)`` or ``(False, "ExceptionName: text")`` (the text, not
    the exception: an exception may not survive pickling back to serve).

    Raises:
        sqlite3.Error, StoreError: the transaction could not begin or commit (no upload of the group is durable).
    """
    worker = _worker
    if worker is None:
        raise RuntimeError("ingest_group runs in an audit shard's worker process")
    limits = worker.limits
    jobs: list[Job] = []
    for topic, device, payload, now in uploads:  # before the transaction: this is where workers run in parallel
        try:
            prepared = prepare_upload(worker.store, device, payload, now=now, limits=limits)
        except Exception as exc:  # a bug or a DB error: this upload fails alone (like a job that raises)
            jobs.append(_raising(exc))
            continue
        jobs.append(_storing(topic, device, prepared, now, limits))
    with _write_turn(worker.lock_path):
        outcomes = run_group(worker.store, jobs)
    for ok, value in outcomes:
        if not ok:  # serve gets the text only: the traceback goes to the worker's stderr (serve's, the journal)
            traceback.print_exception(value, file=sys.stderr)
    return [(True, value) if ok else (False, f"{type(value).__name__}: {value}") for ok, value in outcomes]


def _storing(topic: str, device: str, prepared: PreparedUpload, now: float, limits: Limits) -> Job:
    def run(store: FleetStore) -> IngestResult:
        return ingest_upload(store, topic, device, prepared, now=now, limits=limits)

    return run


def _raising(exc: Exception) -> Job:
    def run(store: FleetStore) -> None:
        raise exc

    return run


# --- serve's side -------------------------------------------------------------------------------------------

CALL_PIPE_BYTES = 1 << 20
"""Capacity asked for the pipe that carries groups to a worker: Linux's default ceiling for an unprivileged
process (``/proc/sys/fs/pipe-max-size``; ``serve`` runs as ``edge-fleet``), four full uploads. Not more when
running as root, so that ``bench/audit.py`` measures what ``serve`` gets."""


def _widen_call_pipe(pool: ProcessPoolExecutor) -> None:
    """Best effort: let the pipe to ``pool``'s worker hold :data:`CALL_PIPE_BYTES` instead of 64 KiB.

    An upload is up to 256 KiB, a group megabytes. Through a 64 KiB pipe the worker and serve's feeder thread take
    turns, one wake-up per 64 KiB, and with both cores busy each turn waits for a time slice: part of the ≈ 2 ms a
    worker idled between groups of one upload, and of the 10-60 ms between groups of 16. With a wider pipe the
    group that waits behind the running one (two in flight, :meth:`_run`) is in the pipe already (one upload) or
    a quarter of it (16) when the worker reads it. Reaches into the pool's call queue (CPython's
    ``concurrent.futures.process``); without it (another Python, a refused size) everything works as before, only
    slower.
    """
    try:
        writer = pool._call_queue._writer  # type: ignore[attr-defined]
        fcntl.fcntl(writer.fileno(), fcntl.F_SETPIPE_SZ, CALL_PIPE_BYTES)
    except (AttributeError, OSError):
        pass


class _Shard:
    """One worker process and the group committer in front of it."""

    def __init__(
        self,
        index: int,
        new_pool: Callable[[], ProcessPoolExecutor],
        *,
        max_group: int,
        max_pending: int,
        group_timeout: float = GROUP_TIMEOUT_S,
    ) -> None:
        self.index = index
        self.group_timeout = group_timeout
        self._new_pool = new_pool
        self._pool: ProcessPoolExecutor | None = None
        self.pid: int | None = None
        """The worker's process id (None until started)."""
        self.restarts: list[float] = []
        """When the worker was restarted (monotonic clock)."""
        # Two groups in flight: the next group waits in the worker's call queue while one runs (see _run).
        self.committer: GroupCommitter[Upload] = GroupCommitter(
            self._run, max_group=max_group, max_pending=max_pending, max_in_flight=2
        )
        self._pool_lock = asyncio.Lock()  # one coroutine at a time hands groups over or replaces the worker
        self._last_handed: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        """Start the worker and wait until it runs (its initializer opened the DB)."""
        self._pool = self._new_pool()
        _widen_call_pipe(self._pool)
        try:
            self.pid = await asyncio.get_running_loop().run_in_executor(self._pool, os.getpid)
        except BrokenProcessPool as exc:
            await self.stop()
            raise AuditShardError(f"audit shard {self.index}: its worker did not start (see its stderr)") from exc

    async def stop(self) -> None:
        """Let the worker finish the groups handed to it (at most two), then end it (queued calls are cancelled);
        a worker still busy after :data:`STOP_TIMEOUT_S` is killed."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        shutdown = asyncio.ensure_future(asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True))
        try:
            await asyncio.wait_for(asyncio.shield(shutdown), STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("audit.shard_stop_timeout", shard=self.index, pid=self.pid, timeout_s=STOP_TIMEOUT_S)
            self._kill()
            await shutdown

    def _kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def _run(self, uploads: list[Upload]) -> list[tuple[bool, Any]]:
        loop = asyncio.get_running_loop()
        async with self._pool_lock:
            if self._pool is None:  # the last start failed: try again for this group
                await self._restart()
            assert self._pool is not None
            try:
                running = loop.run_in_executor(self._pool, ingest_group, uploads)
            except BrokenProcessPool:  # the worker died while idle: nothing of this group reached it
                log.error("audit.shard_died", shard=self.index, pid=self.pid, uploads=0)
                await self._restart()
                assert self._pool is not None
                running = loop.run_in_executor(self._pool, ingest_group, uploads)
            pool, ahead, self._last_handed = self._pool, self._last_handed, running
        if ahead is not None:  # the worker runs its groups in order: this one's time starts when the one ahead ends
            await asyncio.wait([ahead])
        try:
            outcomes = await asyncio.wait_for(asyncio.shield(running), self.group_timeout)
        except TimeoutError:  # hung: killed, so that the pool breaks and the shard starts a new worker
            log.error("audit.shard_hung", shard=self.index, pid=self.pid, timeout_s=self.group_timeout)
            async with self._pool_lock:
                if self._pool is pool:  # not replaced yet (by the group behind or ahead of this one)
                    self._kill()
                    with contextlib.suppress(BrokenProcessPool):
                        await running
                    with contextlib.suppress(AuditShardError):  # counted; the next group tries again
                        await self._restart()
            raise AuditShardError(
                f"audit shard {self.index}: its worker did not finish the group in {self.group_timeout:.0f} s: killed"
            ) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if running.cancelled() and task is not None and not task.cancelling():
                # the pool cancelled the call (shut down before the call reached the worker), not a stop of ours
                raise AuditShardError(f"audit shard {self.index}: its group was cancelled by the pool") from None
            raise
        except BrokenProcessPool as exc:  # died during the group: it may or may not have committed it
            log.error("audit.shard_died", shard=self.index, pid=self.pid, uploads=len(uploads))
            async with self._pool_lock:
                if self._pool is pool:  # the other group in flight may have replaced the worker already
                    with contextlib.suppress(AuditShardError):  # counted; the next group tries again
                        await self._restart()
            raise AuditShardError(f"audit shard {self.index}: its worker died during the group") from exc
        return [(True, value) if ok else (False, AuditShardError(value)) for ok, value in outcomes]

    async def _restart(self) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        await self.stop()
        await self.start()
        log.warning("audit.shard_restarted", shard=self.index, pid=self.pid, recent_restarts=len(self.restarts))

    @property
    def failing(self) -> bool:
        """Restarted more than :data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW_S`."""
        now = time.monotonic()
        return sum(1 for t in self.restarts if now - t < RESTART_WINDOW_S) > MAX_RESTARTS


class AuditShards:
    """Audit uploads verified and stored by ``workers`` processes, sharded by device (see the module docstring).

    Use as ``async with AuditShards(...) as shards:`` (starts and stops the workers) with :meth:`run` as a
    task inside it; :meth:`submit` each upload.
    """

    def __init__(
        self,
        db_path: Path,
        workers: int,
        *,
        limits: Limits = DEFAULT_LIMITS,
        max_group: int = 64,
        max_pending: int = 1024,
        group_timeout: float = GROUP_TIMEOUT_S,
    ) -> None:
        """Args:
        db_path: The fleet DB, already created and migrated (serve opened it).
        workers: Number of shards (worker processes), at least 1.
        limits: Bounds for decoding uploads.
        max_group: Most uploads in one transaction of one worker.
        max_pending: Most uploads queued or running over all shards, split evenly (:meth:`submit` waits
            beyond a shard's share): at most ``max_pending`` × ``limits.max_message_bytes`` held in memory.
        group_timeout: A worker busy with one group longer than this is killed and restarted.
        """
        if workers < 1:
            raise ValueError("AuditShards needs at least one worker (0 = verify on serve's writer thread)")
        context = multiprocessing.get_context("spawn")
        initargs = (str(db_path), str(db_path) + "-shards.lock", limits)

        def new_pool() -> ProcessPoolExecutor:
            return ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker, initargs=initargs)

        share = max(1, max_pending // workers)
        self.shards = [
            _Shard(i, new_pool, max_group=max_group, max_pending=share, group_timeout=group_timeout)
            for i in range(workers)
        ]

    async def __aenter__(self) -> Self:
        try:
            await asyncio.gather(*(shard.start() for shard in self.shards))
        except BaseException:
            await self._stop()
            raise
        log.info("audit.shards_started", workers=len(self.shards), pids=[shard.pid for shard in self.shards])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        await asyncio.gather(*(shard.stop() for shard in self.shards))

    async def submit(self, topic: str, device: str, payload: bytes, *, now: float) -> asyncio.Future[Any]:
        """Queue one upload on its device's shard; the future resolves to its IngestResult after the commit.

        The future fails with :class:`~controller.errors.AuditShardError` when the worker failed the upload or
        died, or with the commit's error; never ack then.
        """
        shard = self.shards[shard_of(device, len(self.shards))]
        return await shard.committer.submit((topic, device, payload, now))

    async def run(self) -> None:
        """Run every shard's group loop; raises :class:`AuditShardError` when a shard's worker keeps dying."""
        async with asyncio.TaskGroup() as tasks:
            for shard in self.shards:
                tasks.create_task(shard.committer.run(), name=f"audit-shard-{shard.index}")
            tasks.create_task(self._watch(), name="audit-shards-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for shard in self.shards:
                if shard.failing:
                    raise AuditShardError(
                        f"audit shard {shard.index}: its worker was restarted more than {MAX_RESTARTS} times "
                        f"within {RESTART_WINDOW_S:.0f} s"
                    )

    @property
    def pids(self) -> list[int | None]:
        """The workers' process ids, by shard."""
        return [shard.pid for shard in self.shards]
