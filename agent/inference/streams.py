"""Streaming helpers shared by engines: the thread → event-loop hand-off, and stop strings in streamed text.

Pure Python, no native library. Invariants:

* **One wake-up per step, not per token.** An engine thread appends events to each request's
  :class:`Inbox` (a :class:`collections.deque`: appends are atomic, the engine never blocks and never takes a
  lock), marks it in a :class:`WakeBatch`, and at the end of its step calls :meth:`WakeBatch.flush`, which
  schedules *one* ``loop.call_soon_threadsafe`` per event loop for every request touched in that step.
* **No lost wake-up.** The consumer arms its waiter and re-checks the deque on the event loop, and the wake
  callback runs on that same loop, so an event appended at any moment is either seen by the re-check or
  wakes the waiter.
* **A closed loop is a gone consumer.** If a consumer's loop is closed, its inboxes are marked ``orphaned``
  (the engine treats that as a cancellation).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Generic, TypeVar

__all__ = ["Inbox", "StopScanner", "WakeBatch"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """Events from an engine thread to one consumer coroutine."""

    __slots__ = ("_waiter", "flagged", "items", "loop", "orphaned")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create an empty inbox read on ``loop``."""
        self.loop = loop
        self.items: collections.deque[T] = collections.deque()
        self.flagged = False  # engine thread only: already in the current WakeBatch
        self.orphaned = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        """Append an event (any thread); it is delivered when the thread's :class:`WakeBatch` is flushed."""
        self.items.append(item)

    async def get(self) -> T:
        """The next event (event loop)."""
        items = self.items
        while not items:
            waiter = self.loop.create_future()
            self._waiter = waiter
            try:
                if not items:  # an event appended before the waiter was armed wakes nobody: look again
                    await waiter
            finally:
                self._waiter = None
        return items.popleft()

    def wake(self) -> None:
        """Wake the consumer if it waits (event loop)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _wake_all(inboxes: list[Inbox[object]]) -> None:
    for inbox in inboxes:
        inbox.wake()


class WakeBatch:
    """The inboxes one engine step touched (engine thread only)."""

    __slots__ = ("_touched",)

    def __init__(self) -> None:
        """Start an empty batch."""
        self._touched: list[Inbox[object]] = []

    def touch(self, inbox: Inbox[object]) -> None:
        """Mark ``inbox`` for the next :meth:`flush` (idempotent within a step)."""
        if not inbox.flagged:
            inbox.flagged = True
            self._touched.append(inbox)

    def flush(self) -> None:
        """Wake every touched consumer: one ``call_soon_threadsafe`` per event loop."""
        touched = self._touched
        if not touched:
            return
        self._touched = []
        by_loop: dict[asyncio.AbstractEventLoop, list[Inbox[object]]] = {}
        for inbox in touched:
            inbox.flagged = False
            by_loop.setdefault(inbox.loop, []).append(inbox)
        for loop, inboxes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_all, inboxes)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for inbox in inboxes:
                    inbox.orphaned = True


class StopScanner:
    """Finds stop strings in streamed text and holds back any tail that could be the start of one.

    Pure: ``feed`` returns the text that is safe to emit and whether a stop string was found (the text before
    it is returned; the stop string and everything after it are dropped).
    """

    __slots__ = ("_pending", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        """Scan for ``stops`` (empty strings are ignored)."""
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return what can be emitted and whether a stop string ended the stream."""
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return pending[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        """The held-back tail (the stream ended without a stop string)."""
        rest, self._pending = self._pending, ""
        return rest
