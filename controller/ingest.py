"""Group commit for ``serve``: the DB work of many inbound messages in one transaction, acked after it.

Why: the fleet DB runs with ``synchronous=FULL`` (an ack promises durability), so every ``COMMIT`` waits for an
fsync. One transaction per message capped ``serve`` at the disk's fsync rate — a few hundred messages per second
on this kind of machine, far below what the broker delivers once a thousand devices publish heartbeats, reports
and audit batches. :class:`WriteBatcher` queues *jobs* (plain functions of the :class:`~controller.store.FleetStore`
that verify and store one message) and runs whatever has queued up since the last group, in arrival order, inside
one ``BEGIN IMMEDIATE`` … ``COMMIT`` on the fleet DB's one writer thread. Under light load a group is one job (no
added latency); under heavy load one fsync covers hundreds of messages.

Invariants:

- Jobs run in the order they were submitted, which is the order ``serve`` received the messages, so a device's
  messages are applied in the order the broker delivered them (audit batches of one device are in seq order).
- Each job runs in its own ``SAVEPOINT`` (a nested :meth:`FleetStore.transaction`): a job that raises is undone
  alone and its future gets the exception; the other jobs of the group still commit.
- A job's future resolves only after the group's ``COMMIT`` returned, so whatever the caller acks is durable. If
  the commit fails, every job of the group fails: nothing is acked, and the devices re-send from their outboxes.
- Verification runs inside the jobs, on the writer thread: the event loop keeps reading the broker's socket while
  signatures and hash chains are checked (the GIL still serialises Python code; the loop is never *blocked* on a
  whole batch).
- At most ``max_pending`` jobs wait; :meth:`WriteBatcher.submit` then waits for room, which pauses ``serve``'s
  message loop. Messages the MQTT client has already received wait in its receive queue meanwhile (aiomqtt acks
  QoS 1 on receipt), so a controller far behind holds that backlog in memory; nothing is lost either way, since a
  device keeps everything until the controller's application-level ack.

The queue and its loop are :class:`GroupCommitter`, generic over what a group is made of and where it runs:
:class:`WriteBatcher` runs jobs on the writer thread; :class:`controller.audit_shards.AuditShards` puts one
committer per shard in front of a worker process (audit uploads, ``audit_workers`` > 0). The invariants above
hold per committer. A committer may hand over the next group while one runs (``max_in_flight``, 2 for the audit
shards), for a ``run_group`` that runs the groups in the order handed over (one worker process does).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NoReturn, TypeVar

import structlog

from controller.store import FleetStore

__all__ = ["GroupCommitter", "Job", "WriteBatcher", "run_group"]

log = structlog.get_logger(__name__)

Job = Callable[[FleetStore], Any]
"""One message's DB work: verify and store, return what the caller needs to ack (runs on the writer thread)."""

RunOnWriter = Callable[..., Awaitable[Any]]

Item = TypeVar("Item")


def run_group(store: FleetStore, jobs: list[Job]) -> list[tuple[bool, Any]]:
    """Run ``jobs`` in one transaction, each in a savepoint; ``(True, result)`` or ``(False, exception)`` per job.

    Raises:
        sqlite3.Error, StoreError: the transaction could not begin or commit (no job's work is durable).
    """
    outcomes: list[tuple[bool, Any]] = []
    with store.transaction():
        for job in jobs:
            try:
                with store.transaction():
                    outcomes.append((True, job(store)))
            except Exception as exc:  # handed to the job's caller, which decides
                outcomes.append((False, exc))
    return outcomes


class GroupCommitter(Generic[Item]):
    """Queues items and hands whatever queued up to ``run_group`` as one group (see the module docstring).

    ``run_group`` runs a list of items in one transaction and returns one ``(True, result)`` or
    ``(False, exception)`` per item, in order (what :func:`run_group` returns); it raises when the transaction
    failed as a whole. :class:`WriteBatcher` runs jobs on the writer thread;
    :class:`controller.audit_shards.AuditShards` runs picklable uploads in a worker process per shard.
    """

    def __init__(
        self,
        run_group: Callable[[list[Item]], Awaitable[list[tuple[bool, Any]]]],
        *,
        max_group: int = 512,
        max_pending: int = 4096,
        max_in_flight: int = 1,
    ) -> None:
        """Args:
        run_group: Runs one group (awaited on the loop; it must not block it).
        max_group: Most items in one transaction (bounds the time the write lock is held).
        max_pending: Most items queued or running; :meth:`submit` waits beyond that.
        max_in_flight: Most groups handed to ``run_group`` and not finished. 1: the next group is formed when the
            previous one finished. 2 (:class:`controller.audit_shards.AuditShards`): the next group is handed over
            while one runs, so that a worker that runs them in order starts it without a round trip to the loop;
            ``run_group`` must then run the groups in the order it was called, one after the other.
        """
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._run_group = run_group
        self.max_group = max_group
        self.max_in_flight = max_in_flight
        self._queue: collections.deque[tuple[Item, asyncio.Future[Any]]] = collections.deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Semaphore(max_pending)
        self.groups = 0
        """Transactions committed."""
        self.jobs = 0
        """Items run (committed or failed alone)."""
        self.largest_group = 0

    async def submit(self, item: Item) -> asyncio.Future[Any]:
        """Queue ``item``; returns a future resolved after the commit that made its work durable.

        Waits while ``max_pending`` items are queued or running (backpressure). The order of ``submit`` calls is
        the order in which items run.
        """
        await self._room.acquire()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self._room.release())
        self._queue.append((item, future))
        self._wake.set()
        return future

    @property
    def pending(self) -> int:
        """Items queued and not yet handed to ``run_group``."""
        return len(self._queue)

    async def run(self) -> NoReturn:
        """Run groups forever (a named task of ``serve``); cancelled, it cancels every future it has not resolved."""
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                for task in [task for task in in_flight if task.done()]:
                    in_flight.discard(task)
                    if task.cancelled():  # its group was cancelled from outside: failed (futures cancelled), go on
                        continue
                    task.result()  # an unexpected error ends run(), as it does with one group in flight
                if len(in_flight) >= self.max_in_flight:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                group = [self._queue.popleft() for _ in range(min(self.max_group, len(self._queue)))]
                task = asyncio.create_task(self._run_one(group))
                in_flight.add(task)
                task.add_done_callback(lambda _: self._wake.set())  # the loop above collects it
        except BaseException:  # stopping (or an unexpected error): nothing queued is acked, nothing left running
            for task in in_flight:
                task.cancel()  # _run_one cancels its group's futures
            await asyncio.gather(*in_flight, return_exceptions=True)
            for _, future in self._queue:
                future.cancel()
            self._queue.clear()
            raise

    async def _run_one(self, group: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self._run_group([item for item, _ in group])
        except asyncio.CancelledError:  # stopping: nothing of the group is acked (it may still commit)
            for _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # a failed commit fails its jobs; devices re-send them
            log.error("ingest.commit_failed", jobs=len(group), error=str(exc) or type(exc).__name__)
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        self.groups += 1
        self.jobs += len(group)
        self.largest_group = max(self.largest_group, len(group))
        for (_, future), (ok, value) in zip(group, outcomes, strict=True):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class WriteBatcher(GroupCommitter[Job]):
    """Queues jobs and runs them in groups on the writer thread (see the module docstring)."""

    def __init__(
        self,
        run_on_writer: RunOnWriter,
        store: Callable[[], FleetStore],
        *,
        max_group: int = 512,
        max_pending: int = 4096,
    ) -> None:
        """Args:
        run_on_writer: Runs a function on the fleet DB's writer thread (``FleetServer.db``).
        store: Returns the open store (called on the loop just before each group).
        max_group: Most jobs in one transaction (bounds the time the write lock is held).
        max_pending: Most jobs queued or running; :meth:`submit` waits beyond that.
        """

        async def on_writer(jobs: list[Job]) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = await run_on_writer(run_group, store(), jobs)
            return outcomes

        super().__init__(on_writer, max_group=max_group, max_pending=max_pending)
