"""Reconnect backoff and cancellation hygiene shared by both ends of the link (no I/O: the caller sleeps)."""

from __future__ import annotations

import asyncio
import random

__all__ = ["Backoff", "raise_if_cancelled", "raise_if_cancelling"]


class Backoff:
    """Jittered exponential backoff ("equal jitter"): half the step is fixed, half random.

    The random half spreads a fleet's reconnects after a broker restart instead of having every device retry in
    the same instant; the fixed half keeps a single device from retrying in a tight loop.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.SystemRandom()

    def next(self) -> float:
        """The next delay in seconds."""
        step = min(self.maximum, self.minimum * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        """Start again from the minimum (after a connection that lasted)."""
        self.attempt = 0


def raise_if_cancelling(exc: BaseException) -> None:
    """Re-raise the cancellation that ``exc`` replaced, if the current task is being cancelled.

    aiomqtt's ``async with`` may turn a cancellation that arrives during its disconnect into an ``MqttError``; a
    reconnect loop that catches ``MqttError`` would then swallow the cancellation and run forever (Python 3.11
    delivers a task's cancellation once). Call this first in such an ``except`` clause.
    """
    if _cancelling():
        raise asyncio.CancelledError from exc


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was cancelled and yet runs on: call it at the top of loops.

    Python 3.11's ``asyncio.wait_for``, which aiomqtt awaits in every publish, subscribe and unsubscribe, returns
    the result instead of raising when the task's cancellation arrives in the same loop iteration as that result
    (3.12 reimplemented it). The cancellation is then delivered nowhere and a ``while True`` loop runs on after
    its stop: a stopped agent kept re-sending its outbox to the broker. A handled cancellation leaves
    ``Task.cancelling()`` at 0 (``asyncio.timeout`` uncancels what it turned into ``TimeoutError``); one still
    counted while the task runs was swallowed. Not for a task that hosts a ``TaskGroup`` (3.11 may leave such a
    task counted after a child fails).
    """
    if _cancelling():
        raise asyncio.CancelledError


def _cancelling() -> bool:
    """The current task has a cancellation requested and not handled (``Task.cancelling()``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
