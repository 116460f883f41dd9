"""Admission control in front of an engine: a bounded queue with two priority classes, and slot accounting.

An engine with ``slots`` parallel sequences takes waiting requests from an :class:`AdmissionQueue` whenever a
slot is free. Every kind of inference work is admitted through one: the llama engine's generations (slots =
``n_parallel``, cost = prompt tokens) and embedding requests (one at a time, cost = tokens to embed), the onnx
engine's runs (one at a time, cost = input bytes). The queue only decides *who waits, who is refused and who
goes next*; it never touches a native library and never blocks, so the engine's worker thread and the event
loop can both call it.

Invariants:

* **Bounded.** At most ``max_requests`` requests and at most ``max_tokens`` units of cost (``unit``: prompt
  tokens by default) wait at any time.
  :meth:`AdmissionQueue.submit` refuses a request beyond either limit with
  :class:`~agent.errors.OverloadedError`, whose ``retry_after`` estimates when a slot frees up (from the
  measured service time of recent requests). A request is never refused for its size alone while nothing
  waits: the token limit bounds the *backlog*, not one prompt (the context length bounds that).
* **Order.** ``interactive`` requests leave the queue before any ``batch`` request; within a class, first in,
  first out. Running requests are never pre-empted.
* **Withdrawal.** A request that is cancelled (client gone, deadline passed) while waiting is removed at once,
  so it stops counting against the limits; :meth:`AdmissionQueue.withdraw` says whether it was still waiting
  (otherwise the engine already took it and frees its slot at its next step).
* **Accounting.** The engine reports each admission and release, so :meth:`AdmissionQueue.stats` reports
  slots in use, queue depth, waiting tokens and cumulative time in queue consistently under one lock.
* **Thread-safe.** One :class:`threading.Lock` guards all state; every method holds it only for O(queue)
  work at most (withdrawal scans the bounded queue).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from agent.errors import DeadlineExceededError, OverloadedError
from agent.inference.base import LoadStats, Priority

__all__ = ["AdmissionQueue", "Ticket", "await_turn"]

T = TypeVar("T")
R = TypeVar("R")

_SERVICE_PRIOR_S: Final = 1.0
"""Assumed service time of a request before any was measured (for the first Retry-After estimates)."""
_EWMA_WEIGHT: Final = 0.2
_RETRY_AFTER_MAX_S: Final = 60.0


@dataclass(eq=False, slots=True)
class Ticket(Generic[T]):
    """One request in the queue (or, once admitted, in a slot).

    Attributes:
        item: the engine's own request object.
        tokens: the request's cost (prompt tokens, or the queue's ``unit``), counted against ``max_tokens`` while
            waiting.
        priority: ``interactive`` or ``batch``.
        enqueued: :func:`time.monotonic` at submission.
        admitted: :func:`time.monotonic` when the engine took it, else ``None``.
    """

    item: T
    tokens: int
    priority: Priority
    enqueued: float
    admitted: float | None = None

    @property
    def waited(self) -> float:
        """Seconds spent in the queue (until now, if still waiting)."""
        end = self.admitted if self.admitted is not None else time.monotonic()
        return end - self.enqueued


class AdmissionQueue(Generic[T]):
    """The waiting room of one engine (see the module docstring for the rules)."""

    def __init__(
        self, model: str, slots: int, max_requests: int, max_tokens: int, *, unit: str = "prompt tokens"
    ) -> None:
        """Create an empty queue.

        Args:
            model: model name, quoted in error messages.
            slots: parallel sequences of the engine behind the queue (requests it runs at once).
            max_requests: most requests waiting.
            max_tokens: most units of cost waiting.
            unit: what the cost counts, for error messages (``prompt tokens``, ``input bytes``...).
        """
        if slots < 1 or max_requests < 1 or max_tokens < 1:
            raise ValueError("slots, max_requests and max_tokens must be at least 1")
        self._model = model
        self._slots = slots
        self._max_requests = max_requests
        self._max_tokens = max_tokens
        self._unit = unit
        self._lock = threading.Lock()
        self._waiting: dict[Priority, collections.deque[Ticket[T]]] = {
            "interactive": collections.deque(),
            "batch": collections.deque(),
        }
        self._waiting_count = 0
        self._waiting_tokens = 0
        self._busy = 0
        self._service_s = _SERVICE_PRIOR_S
        self._admitted_total = 0
        self._rejected_total = 0
        self._queue_seconds_total = 0.0

    # -- event-loop side

    def submit(self, item: T, tokens: int, priority: Priority) -> Ticket[T]:
        """Put ``item`` in the queue behind everything of its class.

        Raises:
            OverloadedError: the queue holds ``max_requests`` requests, or the waiting prompt tokens would
                exceed ``max_tokens``; ``retry_after`` estimates when to try again.
        """
        with self._lock:
            if self._waiting_count >= self._max_requests:
                self._rejected_total += 1
                raise OverloadedError(
                    f"model {self._model!r} has {self._waiting_count} requests waiting (the limit is "
                    f"{self._max_requests}); try again later",
                    retry_after=self._retry_after_locked(),
                )
            if self._waiting_count and self._waiting_tokens + tokens > self._max_tokens:
                self._rejected_total += 1
                raise OverloadedError(
                    f"model {self._model!r} has {self._waiting_tokens} {self._unit} waiting; {tokens} more would "
                    f"exceed the limit of {self._max_tokens}; try again later",
                    retry_after=self._retry_after_locked(),
                )
            ticket = Ticket(item, tokens, priority, time.monotonic())
            self._waiting[priority].append(ticket)
            self._waiting_count += 1
            self._waiting_tokens += tokens
            return ticket

    def withdraw(self, ticket: Ticket[T]) -> bool:
        """Remove a waiting ticket (its request was cancelled). Returns whether it was still waiting."""
        with self._lock:
            try:
                self._waiting[ticket.priority].remove(ticket)
            except ValueError:
                return False
            self._waiting_count -= 1
            self._waiting_tokens -= ticket.tokens
            return True

    def position(self, ticket: Ticket[T]) -> int | None:
        """How many requests are ahead of a waiting ticket (``None`` once it left the queue)."""
        with self._lock:
            ahead = 0
            for priority in ("interactive", "batch"):
                queue = self._waiting[priority]
                if ticket.priority == priority:
                    try:
                        return ahead + queue.index(ticket)
                    except ValueError:
                        return None
                ahead += len(queue)
            return None

    def stats(self) -> LoadStats:
        """A consistent snapshot of the queue and the slots."""
        with self._lock:
            return LoadStats(
                waiting=self._waiting_count,
                waiting_interactive=len(self._waiting["interactive"]),
                waiting_batch=len(self._waiting["batch"]),
                waiting_tokens=self._waiting_tokens,
                slots_busy=self._busy,
                slots_total=self._slots,
                admitted_total=self._admitted_total,
                rejected_total=self._rejected_total,
                queue_seconds_total=self._queue_seconds_total,
            )

    # -- engine side

    def __len__(self) -> int:
        """Requests waiting (a racy read without the lock is fine for "is there anything?")."""
        return self._waiting_count

    def take(self, n: int) -> list[Ticket[T]]:
        """Take up to ``n`` tickets for free slots (interactive first, FIFO within a class); marks them admitted."""
        taken: list[Ticket[T]] = []
        with self._lock:
            now = time.monotonic()
            for priority in ("interactive", "batch"):
                queue = self._waiting[priority]
                while queue and len(taken) < n:
                    ticket = queue.popleft()
                    ticket.admitted = now
                    self._waiting_count -= 1
                    self._waiting_tokens -= ticket.tokens
                    self._busy += 1
                    self._admitted_total += 1
                    self._queue_seconds_total += now - ticket.enqueued
                    taken.append(ticket)
        return taken

    def release(self, ticket: Ticket[T]) -> None:
        """An admitted ticket's request ended: its slot is free; its service time feeds the estimate."""
        with self._lock:
            self._busy -= 1
            if ticket.admitted is not None:
                served = time.monotonic() - ticket.admitted
                self._service_s += _EWMA_WEIGHT * (served - self._service_s)

    def drain(self) -> list[Ticket[T]]:
        """Remove and return every waiting ticket (the engine is closing)."""
        with self._lock:
            tickets = [*self._waiting["interactive"], *self._waiting["batch"]]
            for queue in self._waiting.values():
                queue.clear()
            self._waiting_count = 0
            self._waiting_tokens = 0
            return tickets

    # -- estimate

    def _retry_after_locked(self) -> float:
        """Seconds until the backlog ahead of a new request has drained, by recent service times."""
        rounds = math.ceil((self._waiting_count + 1) / self._slots)
        return min(_RETRY_AFTER_MAX_S, max(1.0, rounds * self._service_s))


async def await_turn(
    queue: AdmissionQueue[T],
    ticket: Ticket[T],
    future: concurrent.futures.Future[R],
    timeout_s: float | None,
    *,
    abandon: Callable[[], None],
    deadline_error: Callable[[int | None], DeadlineExceededError],
) -> R:
    """Wait at most ``timeout_s`` for ``future``, the result of the work ``ticket`` queued in ``queue``.

    Past the deadline a result that is already there is returned; otherwise the ticket leaves the queue if it
    still waits, and ``deadline_error(ahead)`` is raised: ``ahead`` is how many requests were ahead of it, or
    ``None`` when its work had started. Whenever the caller stops waiting without a result (deadline, caller
    cancelled), ``abandon()`` marks the work so that whoever holds it stops, and the ticket is withdrawn.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.wrap_future(future)
    except TimeoutError:
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result()  # finished as the deadline passed
        ahead = queue.position(ticket)
        raise deadline_error(ahead if ahead is not None and queue.withdraw(ticket) else None) from None
    finally:
        if not future.done() or future.cancelled():  # caller gone or deadline passed
            abandon()
            queue.withdraw(ticket)  # or leave the queue at once if it never started
