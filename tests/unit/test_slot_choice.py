"""Which KV slot a new request takes (agent/inference/llama.py::_choose_slot): prefix reuse against contiguity."""

from __future__ import annotations

from typing import Any

import pytest

from agent.inference.llama import _REUSE_MIN_TOKENS, _choose_slot, _Slot

pytestmark = pytest.mark.unit


def _slots(*histories: list[int], busy: tuple[int, ...] = ()) -> list[_Slot]:
    slots = []
    for seq, history in enumerate(histories):
        slot = _Slot(seq)
        slot.history = list(history)
        if seq in busy:
            slot.request = object()  # type: ignore[assignment]
        slots.append(slot)
    return slots


def _choice(slots: list[_Slot], tokens: list[int], min_reuse: int) -> tuple[int, int]:
    slot, shared = _choose_slot(slots, tokens, min_reuse)
    return slot.seq, shared


PROMPT = [5, 6, 7, 40, 41, 42]


def test_a_short_shared_prefix_keeps_the_lowest_free_slot_when_contiguity_matters() -> None:
    slots = _slots([1, 2, 3], [9, 9], [5, 6, 7, 8], [])
    assert _choice(slots, PROMPT, _REUSE_MIN_TOKENS) == (0, 0)


def test_a_short_shared_prefix_decides_when_every_free_slot_is_filled() -> None:
    slots = _slots([1, 2, 3], [9, 9], [5, 6, 7, 8], [])
    assert _choice(slots, PROMPT, 1) == (2, 3)


def test_a_long_shared_prefix_always_decides() -> None:
    long = list(range(100, 100 + _REUSE_MIN_TOKENS + 4))
    slots = _slots([1], [*long, 7, 7], [])
    assert _choice(slots, [*long, 1, 2], _REUSE_MIN_TOKENS) == (1, len(long))


def test_the_lowest_free_slot_reuses_what_it_shares_and_ties_go_low() -> None:
    slots = _slots([5, 6, 1], [5, 6, 2], [5, 6, 3])
    assert _choice(slots, PROMPT, 1) == (0, 2)
    assert _choice(slots, PROMPT, _REUSE_MIN_TOKENS) == (0, 2)


@pytest.mark.parametrize("min_reuse", [1, _REUSE_MIN_TOKENS])
def test_a_busy_slot_is_never_taken(min_reuse: int) -> None:
    slots: list[Any] = _slots(list(PROMPT), [1], [5, 6], busy=(0,))
    assert _choice(slots, PROMPT, min_reuse) == ((2, 2) if min_reuse == 1 else (1, 0))
