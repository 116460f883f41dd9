"""The link's reconnect backoff and its cancellation hygiene (protocols/backoff.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from protocols.backoff import Backoff, raise_if_cancelling

pytestmark = pytest.mark.unit


def test_backoff_doubles_within_bounds_and_resets() -> None:
    backoff = Backoff(0.5, 8.0, random.Random(1))
    delays = [backoff.next() for _ in range(8)]
    steps = [min(8.0, 0.5 * 2**i) for i in range(8)]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    backoff.reset()
    assert backoff.next() <= 0.5


class _Replaced(Exception):
    """What a client library raises instead of the CancelledError it received."""


async def test_a_cancellation_replaced_by_an_error_still_stops_a_reconnect_loop() -> None:
    sessions = 0

    async def session() -> None:
        nonlocal sessions
        sessions += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise _Replaced("disconnected while cancelled") from None

    async def reconnect_loop() -> None:
        while True:
            try:
                await session()
            except _Replaced as exc:
                raise_if_cancelling(exc)
            await asyncio.sleep(0)

    task = asyncio.create_task(reconnect_loop())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert sessions == 1


async def test_an_error_without_a_cancellation_is_left_to_the_loop() -> None:
    raise_if_cancelling(_Replaced("a real disconnect"))  # no cancellation pending: returns
