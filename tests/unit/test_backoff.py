"""The link's reconnect backoff and its cancellation hygiene (protocols/backoff.py)."""

from __future__ import annotations

import asyncio
import random
import sys

import pytest

from protocols.backoff import Backoff, raise_if_cancelled, raise_if_cancelling

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


async def _wait_for_loop(check: bool, rounds: list[int], futures: list[asyncio.Future[int]]) -> None:
    """A loop awaiting ``asyncio.wait_for`` as aiomqtt's publish does; ``check`` calls raise_if_cancelled first."""
    loop = asyncio.get_running_loop()
    while True:
        if check:
            raise_if_cancelled()
        rounds.append(1)
        future: asyncio.Future[int] = loop.create_future()
        futures.append(future)
        await asyncio.wait_for(future, timeout=30)


async def _cancel_as_the_result_arrives(check: bool) -> tuple[asyncio.Task[None], list[int]]:
    rounds: list[int] = []
    futures: list[asyncio.Future[int]] = []
    task = asyncio.create_task(_wait_for_loop(check, rounds, futures))
    for _ in range(3):
        await asyncio.sleep(0)  # the loop is waiting inside wait_for
    futures[-1].set_result(1)  # the PUBACK...
    task.cancel()  # ...and the stop, in one event-loop iteration
    await asyncio.wait([task], timeout=0.5)
    return task, rounds


async def test_a_cancellation_that_wait_for_swallowed_is_raised_at_the_next_check() -> None:
    task, rounds = await _cancel_as_the_result_arrives(check=True)
    assert task.done()
    assert task.cancelled()
    assert len(rounds) in (1, 2)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's wait_for delivers the cancellation itself")
async def test_python_3_11_wait_for_swallows_a_cancellation_that_arrives_with_the_result() -> None:
    """Why the check exists: without it the loop goes on waiting after its cancellation (3.11)."""
    task, rounds = await _cancel_as_the_result_arrives(check=False)
    try:
        assert not task.done(), "wait_for delivered the cancellation: raise_if_cancelled may be unnecessary"
        assert len(rounds) == 2
        assert task.cancelling() == 1
    finally:
        task.cancel()
        await asyncio.wait([task])
