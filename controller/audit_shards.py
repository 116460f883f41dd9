"""Audit ingest sharded over worker processes: ``serve`` verifies audit uploads on every core.

Why: verifying an upload is CPU-bound Python (JSON parse, every record re-encoded and hashed, the checkpoint
signature), about twice the time SQLite needs to store it. On the writer thread it runs under the GIL and under
SQLite's write lock, one upload after the other, and caps ``serve`` well below what the disk can store
(``bench/audit.py``). Devices' logs are independent, so the work is split by device.

How (``[controller] audit_workers`` > 0, see :mod:`controller.config`):

- :class:`AuditShards` runs N worker processes (``spawn``ed, so that no lock of ``serve``'s threads is
  inherited; each fed through a pipe of its own by :class:`_Worker`). An upload goes to shard
  ``crc32(device) % N``: one device always to the same worker, so its batches are applied in arrival order.
- In front of each worker is a :class:`controller.ingest.GroupCommitter`: while the worker is busy, uploads for
  it queue, and the next call hands it all of them (up to ``max_group``) as one list of picklable
  ``(topic, device, payload, now)``. Two groups are in flight per worker (``max_in_flight=2``): the next group
  is handed over while one runs. The worker (:class:`_GroupLoop`) prepares each upload with no lock held
  (:func:`controller.audit_ingest.prepare_upload`: parse, every record hashed, the checkpoint signature with the
  device's enrolled key, the chain within the batch, the rows to insert: all of the CPU work that does not
  depend on the device's accepted head), then stores the group with :func:`controller.ingest.run_group`
  semantics — one ``BEGIN IMMEDIATE`` … ``COMMIT`` on its own connection to the fleet DB, a savepoint per upload,
  a failed upload undone alone — relating each to the device's head read inside that transaction and storing it
  (:func:`controller.audit_ingest.ingest_upload`, which the in-process path runs too; a check made with a key
  that is no longer the device's enrolled one is not used). One worker's preparing overlaps another's insert
  and commit: that is the speed-up. Several writers on one SQLite file is ADR 0012's setting (WAL, 30 s busy
  timeout).
- A worker does not idle while another holds the write turn (below) and it has a group to prepare: when its
  prepared group must wait for the turn, it prepares the next group handed over, one upload at a time, trying
  the turn again in between (with nothing left to prepare, it waits for the turn); it reads what ``serve``
  sends between two uploads, so the next group crosses the pipe while the worker works. Groups are still
  stored one after the other in the order handed over (ADR 0014, second addendum).
- The WAL checkpoints of a worker's commits run on a thread of the worker (:class:`_Checkpointer`), not inside
  its ``COMMIT``: the other worker does not wait for them.
- So does the fsync of its commits (:class:`_Syncer`): a worker commits with ``synchronous = NORMAL`` (the WAL
  is written, not synced), hands the write turn on, and a thread fsyncs the WAL before the replies go out (ADR
  0014, third addendum): the other worker stores while the disk syncs, and one fsync can cover several commits.
- The workers hand SQLite's write lock to each other through an ``flock`` on ``<fleet.db>-shards.lock``, taken
  around the transaction: the next worker starts the instant the previous one committed, where SQLite's own busy
  handler would poll with sleeps of up to 100 ms. The kernel releases an ``flock`` when its process dies, so a
  killed worker cannot leave the others waiting. (``serve``'s writer thread and other controllers do not take
  it; they meet the workers at SQLite's lock, as before.)
- An upload's future resolves only after its worker's ``COMMIT`` returned and the WAL holding it was fsynced, so
  ``serve`` acks only durable records (:class:`controller.audit_ingest.AuditIngest` counts and acks, in
  ``serve``). What a worker reports as failed comes back as :class:`~controller.errors.AuditShardError` (the
  text of the worker's exception).

Failures:

- A worker that dies (killed, out of memory): every upload of that shard handed to it fails with
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
import collections
import contextlib
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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

EXIT_UNSYNCED = 75
"""A worker's exit status when an fsync of the WAL failed (sysexits' ``EX_TEMPFAIL``): its unanswered groups fail
and the shard starts a new worker."""

CHECKPOINT_BYTES = 4 << 20
"""Uploads' bytes a worker commits between two WAL checkpoints it asks for: about SQLite's own
``wal_autocheckpoint`` of 1,000 pages, the threshold it would checkpoint at inside the ``COMMIT``."""

BACKSTOP_CHECKPOINT_PAGES = 10_000
"""The workers' connections still checkpoint inside their ``COMMIT`` past this many WAL pages (40 MB), should
their checkpoint threads fall behind: the WAL is bounded either way."""


class _Checkpointer:
    """A worker's WAL checkpoints, on a thread and a connection of their own, outside the write turn.

    SQLite runs a checkpoint (copy the WAL into the database file, fsync it) inside the ``COMMIT`` that crosses
    ``wal_autocheckpoint`` pages, that is while this worker holds the shards' write turn: the other worker waited
    for it although a ``PASSIVE`` checkpoint needs no write lock (ADR 0014 addendum). Here it runs beside the
    worker's next preparing and the other worker's transaction; ``sqlite3`` releases the GIL for the whole
    checkpoint. Best effort: a failed checkpoint is reported on stderr and the next one is tried; the workers'
    connections keep a :data:`BACKSTOP_CHECKPOINT_PAGES` autocheckpoint.
    """

    def __init__(self, db_path: str) -> None:
        self._conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Checkpoint soon (once, however often it is asked while one runs)."""
        self._wanted.set()

    def close(self) -> None:
        """Let a running checkpoint finish (bounded), then close the connection."""
        self._closing = True
        self._wanted.set()
        self._thread.join(STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self._conn.close()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error:
                traceback.print_exc(file=sys.stderr)


class _Syncer:
    """A worker's replies, sent once the WAL holding their commits is on disk: fsync outside the write turn.

    The workers' connections commit with ``synchronous = NORMAL``: SQLite writes the transaction's frames to the
    WAL but does not fsync it inside ``COMMIT``, so the worker hands the write turn on without waiting for the
    disk. This thread then fsyncs the WAL (one fsync for every reply queued meanwhile: group commit) and only then
    sends the replies, so ``serve`` still acks only what is durable. An fsync of the WAL file covers every frame
    written before it, whichever connection wrote it; a frame is never overwritten before a checkpoint has copied
    it into the database file and synced that (SQLite's rule in WAL mode). A failed fsync ends the worker without a
    reply: the groups it had not answered fail in ``serve`` (nothing of them is acked; devices re-send) and the
    shard starts a new worker, as for any worker that dies.
    """

    def __init__(self, wal_path: str, results: multiprocessing.connection.Connection) -> None:
        self._wal_path = wal_path
        self._results = results
        self._queue: collections.deque[tuple[str, int, Any]] = collections.deque()
        self._wanted = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="audit-sync", daemon=True)
        self._thread.start()

    def send(self, reply: tuple[str, int, Any]) -> None:
        """Send ``reply`` once everything committed before this call is durable."""
        with self._wanted:
            self._queue.append(reply)
            self._wanted.notify()

    def close(self) -> None:
        """Send what is queued (after its fsync), then stop."""
        with self._wanted:
            self._closing = True
            self._wanted.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wanted:
                while not self._queue and not self._closing:
                    self._wanted.wait()
                replies = list(self._queue)
                self._queue.clear()
                if not replies:
                    return
            try:
                fd = os.open(self._wal_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                traceback.print_exc(file=sys.stderr)
                os._exit(EXIT_UNSYNCED)
            for reply in replies:
                self._results.send(reply)


class _GroupLoop:
    """A worker's loop: the groups ``serve`` hands over, stored in that order, the next one prepared meanwhile.

    A group is prepared upload by upload (no lock: :func:`controller.audit_ingest.prepare_upload`), then stored in
    one transaction inside the shards' write turn (:func:`run_group`). While a prepared group waits for the turn,
    the loop prepares the next group handed over (one upload at a time, trying the turn again in between), and it
    reads what ``serve`` sends whenever it is between two uploads: neither core idles while the other worker
    stores, and a group crosses the pipe while the previous one is worked on. Groups are stored strictly in the
    order they arrived (a device's uploads stay in order), each one's outcome sent back after its ``COMMIT``, once
    the WAL is fsynced (:class:`_Syncer`).
    """

    def __init__(
        self,
        store: FleetStore,
        limits: Limits,
        turn: int,
        calls: multiprocessing.connection.Connection,
        replies: _Syncer,
        checkpoints: _Checkpointer,
    ) -> None:
        self.store = store
        self.limits = limits
        self.turn = turn
        self.calls = calls
        self.replies = replies
        self.checkpoints = checkpoints
        store.db.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_CHECKPOINT_PAGES}")  # the checkpointer's job
        store.db.execute("PRAGMA synchronous = NORMAL")  # the WAL is fsynced by the syncer, outside the write turn
        self.received: collections.deque[tuple[int, list[Upload]]] = collections.deque()
        self.preparing: list[Job] = []
        """The jobs of ``received[0]`` prepared so far."""
        self.ready: collections.deque[tuple[int, list[Job], int]] = collections.deque()
        """Prepared groups waiting for the write turn: ``(id, jobs, the uploads' bytes)``."""
        self.stopping = False
        self.committed_bytes = 0
        """Uploads' bytes committed since the last checkpoint asked for."""

    def run(self) -> None:
        """Until ``serve`` says stop (``None``) and everything handed over before it is stored."""
        while self.received or self.ready or not self.stopping:
            self._take_calls(wait=not (self.received or self.ready))
            if self.ready and self._store_next(wait=not self.received):
                continue
            if self.received:  # the write turn is taken (or nothing is ready): prepare one more upload
                self._prepare_next()

    def _take_calls(self, *, wait: bool) -> None:
        while not self.stopping and (wait or self.calls.poll()):
            wait = False
            try:
                call: tuple[int, list[Upload]] | None = self.calls.recv()
            except EOFError:  # serve is gone without a stop: nothing more will be acked
                os._exit(0)
            if call is None:
                self.stopping = True
            else:
                self.received.append(call)

    def _prepare_next(self) -> None:
        group_id, uploads = self.received[0]
        if len(self.preparing) < len(uploads):
            topic, device, payload, now = uploads[len(self.preparing)]
            try:
                prepared = prepare_upload(self.store, device, payload, now=now, limits=self.limits)
            except Exception as exc:  # a bug or a DB error: this upload fails alone (like a job that raises)
                self.preparing.append(_raising(exc))
            else:
                self.preparing.append(_storing(topic, device, prepared, now, self.limits))
        if len(self.preparing) == len(uploads):
            self.received.popleft()
            self.ready.append((group_id, self.preparing, sum(len(upload[2]) for upload in uploads)))
            self.preparing = []

    def _store_next(self, *, wait: bool) -> bool:
        """Store the oldest prepared group in the write turn; False if the turn is taken and ``wait`` is not set."""
        try:
            fcntl.flock(self.turn, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        group_id, jobs, size = self.ready.popleft()
        try:
            outcomes = run_group(self.store, jobs)
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the group is durable
            traceback.print_exc(file=sys.stderr)
            reply: tuple[str, int, Any] = ("failed", group_id, f"{type(exc).__name__}: {exc}")
        else:
            for ok, value in outcomes:
                if not ok:  # serve gets the text only: the traceback goes to the worker's stderr (the journal)
                    traceback.print_exception(value, file=sys.stderr)
            texts = [(True, value) if ok else (False, f"{type(value).__name__}: {value}") for ok, value in outcomes]
            reply = ("done", group_id, texts)
        finally:
            fcntl.flock(self.turn, fcntl.LOCK_UN)
        self.replies.send(reply)
        self.committed_bytes += size
        if self.committed_bytes >= CHECKPOINT_BYTES:
            self.committed_bytes = 0
            self.checkpoints.request()
        return True


def _worker_main(
    calls: multiprocessing.connection.Connection,
    results: multiprocessing.connection.Connection,
    db_path: str,
    lock_path: str,
    limits: Limits,
) -> None:
    """A shard's worker process: ignore stop signals, watch serve, open the fleet DB (migrated by serve), run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()
    store = FleetStore.open(Path(db_path))  # raises: the worker exits non-zero, serve reports it did not start
    try:
        checkpoints = _Checkpointer(db_path)
        turn = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        results.send(("ready", 0, os.getpid()))
        replies = _Syncer(db_path + "-wal", results)  # sends every reply from here on
        try:
            _GroupLoop(store, limits, turn, calls, replies, checkpoints).run()
        finally:
            os.close(turn)  # releases the flock, should a failure leave it held
            replies.close()  # what was committed is answered, once durable
            checkpoints.close()
    finally:
        store.close()


def _exit_with_parent(sentinel: int) -> None:
    """Exit when serve's process is gone (its end of the pipe closed): an orphan would hold the DB open forever."""
    multiprocessing.connection.wait([sentinel])
    os._exit(0)  # an open transaction is rolled back by SQLite; nothing of it was acked


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


class _WorkerDied(Exception):
    """The worker process ended (killed, crashed, out of memory) with this group handed to it."""


class _Worker:
    """One worker process as serve sees it: two pipes, a sender thread, a receiver thread, the groups handed over.

    Groups go out through the call pipe in the order :meth:`hand` was called (one sender thread: a send blocks
    while the pipe is full), widened to :data:`CALL_PIPE_BYTES` (best effort) so that the next group is mostly in
    the pipe already when the worker reads it. The receiver thread waits for the worker's replies and for its
    exit, and resolves the futures on serve's loop: ``("done", id, outcomes)`` after the group's ``COMMIT`` is durable,
    ``("failed", id, text)`` when the transaction failed; when the process ends, every group not answered fails
    with :class:`_WorkerDied` (replies sent before it died are delivered first).
    """

    def __init__(self, index: int, context: Any, initargs: tuple[str, str, Limits]) -> None:
        self.index = index
        self._loop = asyncio.get_running_loop()
        calls_out, self._calls = context.Pipe(duplex=False)
        self._results, results_in = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_worker_main, args=(calls_out, results_in, *initargs), name=f"audit-shard-{index}"
        )
        self.process.start()
        calls_out.close()  # the worker's ends: serve keeps none, so that a dead worker means EOF
        results_in.close()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._calls.fileno(), fcntl.F_SETPIPE_SZ, CALL_PIPE_BYTES)
        self.pid: int | None = self.process.pid
        self.dead = False
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._answers: dict[int, asyncio.Future[list[tuple[bool, Any]]]] = {}
        self._next_id = 0
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"audit-shard-{index}-send")
        self._receiver = threading.Thread(target=self._receive, name=f"audit-shard-{index}-receive", daemon=True)
        self._receiver.start()

    async def started(self) -> None:
        """Wait until the worker opened the DB and runs its loop; raises :class:`_WorkerDied` if it did not."""
        await self._ready

    def hand(self, uploads: list[Upload]) -> asyncio.Future[list[tuple[bool, Any]]]:
        """Send one group; the future resolves with its outcomes once its ``COMMIT`` is durable (class docstring)."""
        group_id, self._next_id = self._next_id, self._next_id + 1
        answer: asyncio.Future[list[tuple[bool, Any]]] = self._loop.create_future()
        if self.dead:
            answer.set_exception(_WorkerDied())
            return answer
        self._answers[group_id] = answer
        self._sender.submit(self._send, (group_id, uploads))
        return answer

    def _send(self, call: tuple[int, list[Upload]] | None) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: the receiver reports it
            self._calls.send(call)

    def kill(self) -> None:
        """SIGKILL the worker (its groups fail once the receiver sees it gone)."""
        if self.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    async def stop(self) -> bool:
        """Tell the worker to stop after the groups handed to it, wait for it (killed after
        :data:`STOP_TIMEOUT_S`); True if it had to be killed."""
        self._sender.submit(self._send, None)
        await asyncio.to_thread(self.process.join, STOP_TIMEOUT_S)
        killed = bool(self.process.is_alive())
        if killed:
            self.kill()
            await asyncio.to_thread(self.process.join)
        await asyncio.to_thread(self._sender.shutdown, wait=True)  # a send blocked on the dead worker failed
        await asyncio.to_thread(self._receiver.join)
        self._calls.close()
        self._results.close()
        return killed

    def _receive(self) -> None:
        """The receiver thread (see the class docstring)."""
        try:
            while True:
                ready = multiprocessing.connection.wait([self._results, self.process.sentinel])
                if self._results not in ready:
                    return  # exited, and every reply it sent has been read
                try:
                    reply = self._results.recv()
                except (EOFError, OSError):
                    return
                self._on_loop(self._answer, reply)
        finally:
            self._on_loop(self._ended)

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # serve's loop is closed: nobody waits for the answer
            self._loop.call_soon_threadsafe(callback, *args)

    def _answer(self, reply: tuple[str, Any, Any]) -> None:
        kind, group_id, value = reply
        if kind == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
            return
        answer = self._answers.pop(group_id, None)
        if answer is None or answer.done():
            return
        if kind == "done":
            answer.set_result(value)
        else:
            answer.set_exception(AuditShardError(f"audit shard {self.index}: its transaction failed: {value}"))

    def _ended(self) -> None:
        self.dead = True
        if not self._ready.done():
            self._ready.set_exception(_WorkerDied())
        answers, self._answers = self._answers, {}
        for answer in answers.values():
            if not answer.done():
                answer.set_exception(_WorkerDied())


class _Shard:
    """One worker process and the group committer in front of it."""

    def __init__(
        self,
        index: int,
        new_worker: Callable[[int], _Worker],
        *,
        max_group: int,
        max_pending: int,
        group_timeout: float = GROUP_TIMEOUT_S,
    ) -> None:
        self.index = index
        self.group_timeout = group_timeout
        self._new_worker = new_worker
        self._worker: _Worker | None = None
        self._closed = False
        self.pid: int | None = None
        """The worker's process id (None until started)."""
        self.restarts: list[float] = []
        """When the worker was restarted (monotonic clock)."""
        # Two groups in flight: the worker prepares the next group while the one ahead waits for the write turn.
        self.committer: GroupCommitter[Upload] = GroupCommitter(
            self._run, max_group=max_group, max_pending=max_pending, max_in_flight=2
        )
        self._worker_lock = asyncio.Lock()  # one coroutine at a time hands groups over or replaces the worker
        self._last_handed: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        """Start the worker and wait until it runs (it opened the DB)."""
        try:
            self._worker = self._new_worker(self.index)
        except OSError as exc:  # could not spawn (no memory, no processes left)
            raise AuditShardError(f"audit shard {self.index}: cannot start its worker: {exc}") from exc
        self.pid = self._worker.pid
        try:
            await self._worker.started()
        except _WorkerDied as exc:
            await self._stop_worker()
            raise AuditShardError(f"audit shard {self.index}: its worker did not start (see its stderr)") from exc

    async def stop(self) -> None:
        """Let the worker finish the groups handed to it (at most two), then end it; a worker still busy after
        :data:`STOP_TIMEOUT_S` is killed. No group is handed over afterwards."""
        self._closed = True
        await self._stop_worker()

    async def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None and await worker.stop():
            log.error("audit.shard_stop_timeout", shard=self.index, pid=worker.pid, timeout_s=STOP_TIMEOUT_S)

    async def _run(self, uploads: list[Upload]) -> list[tuple[bool, Any]]:
        async with self._worker_lock:
            if self._closed:
                raise AuditShardError(f"audit shard {self.index}: stopped")
            worker = self._worker
            if worker is None or worker.dead:  # the last start failed, or the worker died while idle
                if worker is not None:
                    log.error("audit.shard_died", shard=self.index, pid=self.pid, uploads=0)
                await self._restart()  # nothing of this group reached the dead one
                worker = self._worker
                assert worker is not None
            running = worker.hand(uploads)
            ahead, self._last_handed = self._last_handed, running
        if ahead is not None:  # the worker runs its groups in order: this one's time starts when the one ahead ends
            await asyncio.wait([ahead])
        try:
            outcomes = await asyncio.wait_for(asyncio.shield(running), self.group_timeout)
        except TimeoutError:  # hung: killed, so that the shard starts a new worker
            log.error("audit.shard_hung", shard=self.index, pid=worker.pid, timeout_s=self.group_timeout)
            async with self._worker_lock:
                if self._worker is worker and not self._closed:  # not replaced yet (by the other group in flight)
                    worker.kill()
                    with contextlib.suppress(_WorkerDied):
                        await running
                    with contextlib.suppress(AuditShardError):  # counted; the next group tries again
                        await self._restart()
            raise AuditShardError(
                f"audit shard {self.index}: its worker did not finish the group in {self.group_timeout:.0f} s: killed"
            ) from None
        except _WorkerDied as exc:  # died during the group: it may or may not have committed it
            log.error("audit.shard_died", shard=self.index, pid=worker.pid, uploads=len(uploads))
            async with self._worker_lock:
                if self._worker is worker and not self._closed:  # the other group in flight may have replaced it
                    with contextlib.suppress(AuditShardError):  # counted; the next group tries again
                        await self._restart()
            raise AuditShardError(f"audit shard {self.index}: its worker died during the group") from exc
        return [(True, value) if ok else (False, AuditShardError(value)) for ok, value in outcomes]

    async def _restart(self) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        await self._stop_worker()
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

        def new_worker(index: int) -> _Worker:
            return _Worker(index, context, initargs)

        share = max(1, max_pending // workers)
        self.shards = [
            _Shard(i, new_worker, max_group=max_group, max_pending=share, group_timeout=group_timeout)
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
