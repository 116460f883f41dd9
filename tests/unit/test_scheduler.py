"""The admission queue's rules (pure: no engine, no I/O) and the stop-string scanner."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.api.metrics import ApiMetrics
from agent.errors import BadRequestError, OverloadedError
from agent.inference import Admission
from agent.inference.scheduler import AdmissionQueue
from agent.inference.streams import Inbox, StopScanner, WakeBatch

pytestmark = pytest.mark.unit


def _queue(slots: int = 2, max_requests: int = 4, max_tokens: int = 100) -> AdmissionQueue[str]:
    return AdmissionQueue("m", slots=slots, max_requests=max_requests, max_tokens=max_tokens)


def test_interactive_leaves_before_batch_and_each_class_is_fifo() -> None:
    """take() returns every interactive ticket before any batch ticket, each class in submission order."""
    queue = _queue(max_requests=10)
    for name, priority in [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"), ("i2", "interactive")]:
        queue.submit(name, 1, priority)  # type: ignore[arg-type]
    assert [t.item for t in queue.take(3)] == ["i1", "i2", "b1"]
    assert [t.item for t in queue.take(3)] == ["b2"]


def test_request_limit_refuses_with_retry_after() -> None:
    """Past max_requests waiting, submit raises OverloadedError with a positive retry_after; nothing is queued."""
    queue = _queue(max_requests=2)
    queue.submit("a", 1, "batch")
    queue.submit("b", 1, "batch")
    with pytest.raises(OverloadedError, match="2 requests waiting") as refused:
        queue.submit("c", 1, "interactive")
    assert refused.value.retry_after >= 1
    stats = queue.stats()
    assert (stats.waiting, stats.rejected_total) == (2, 1)


def test_token_limit_bounds_the_backlog_not_a_lone_prompt() -> None:
    """A prompt larger than max_tokens is queued when nothing waits; behind others, one that overflows is refused."""
    queue = _queue(max_tokens=100)
    queue.submit("huge", 500, "interactive")
    with pytest.raises(OverloadedError, match="prompt tokens waiting"):
        queue.submit("more", 1, "interactive")
    queue.take(1)
    queue.submit("fits", 60, "batch")
    with pytest.raises(OverloadedError):
        queue.submit("overflows", 41, "batch")
    queue.submit("exactly", 40, "batch")
    assert queue.stats().waiting_tokens == 100


def test_a_queue_of_another_cost_names_its_unit_when_it_refuses() -> None:
    """A queue whose cost is not prompt tokens (input bytes of tensor runs) bounds that cost and names it."""
    queue: AdmissionQueue[str] = AdmissionQueue("m", 1, 4, 1000, unit="input bytes")
    queue.submit("a", 600, "interactive")
    with pytest.raises(OverloadedError, match="600 input bytes waiting"):
        queue.submit("b", 600, "interactive")


def test_metrics_export_every_queue_of_a_model_with_its_kind() -> None:
    """/metrics has one series per model and queue kind; a tensor queue's cost is in bytes, the others' in tokens."""
    generation, embeddings, tensor = (AdmissionQueue("m", 1, 4, 1000) for _ in range(3))
    embeddings.submit("e", 7, "batch")
    tensor.submit("t", 2304, "interactive")
    metrics = ApiMetrics()
    metrics.watch_schedulers(
        lambda: {
            "llm": {"generation": generation.stats(), "embeddings": embeddings.stats()},
            "vad": {"tensor": tensor.stats()},
        }
    )
    text = metrics.render().decode()
    assert 'edge_agent_scheduler_waiting{model="llm",priority="batch",queue="embeddings"} 1.0' in text
    assert 'edge_agent_scheduler_waiting_tokens{model="llm",queue="embeddings"} 7.0' in text
    assert 'edge_agent_scheduler_waiting_tokens{model="llm",queue="generation"} 0.0' in text
    assert 'edge_agent_scheduler_waiting_bytes{model="vad",queue="tensor"} 2304.0' in text
    assert 'edge_agent_scheduler_slots_busy{model="vad",queue="tensor"} 0.0' in text


def test_withdraw_frees_room_and_reports_whether_it_was_waiting() -> None:
    """A withdrawn ticket stops counting against the limits; withdrawing a taken ticket returns False."""
    queue = _queue(max_requests=1)
    ticket = queue.submit("a", 30, "batch")
    assert queue.position(ticket) == 0
    assert queue.withdraw(ticket)
    assert not queue.withdraw(ticket)
    assert queue.position(ticket) is None
    taken = queue.submit("b", 1, "batch")
    assert queue.take(1)[0] is taken
    assert not queue.withdraw(taken)
    assert queue.stats().waiting == 0


def test_slot_accounting_and_time_in_queue() -> None:
    """take() marks tickets admitted and counts busy slots; release() frees them; time in queue accumulates."""
    queue = _queue(slots=2)
    tickets = [queue.submit(str(i), 1, "interactive") for i in range(3)]
    taken = queue.take(2)
    assert taken == tickets[:2]
    assert all(t.admitted is not None and t.waited >= 0 for t in taken)
    stats = queue.stats()
    assert (stats.slots_busy, stats.slots_total, stats.waiting, stats.admitted_total) == (2, 2, 1, 2)
    for ticket in taken:
        queue.release(ticket)
    assert queue.stats().slots_busy == 0
    assert queue.stats().queue_seconds_total >= 0
    assert queue.drain() == tickets[2:]
    assert queue.stats().waiting == 0


def test_retry_after_grows_with_the_backlog() -> None:
    """The Retry-After estimate is at least 1 s and larger when more requests wait per slot."""
    short = _queue(slots=1, max_requests=1)
    long = _queue(slots=1, max_requests=8)
    short.submit("x", 1, "batch")
    for i in range(8):
        long.submit(str(i), 1, "batch")
    with pytest.raises(OverloadedError) as one:
        short.submit("y", 1, "batch")
    with pytest.raises(OverloadedError) as eight:
        long.submit("y", 1, "batch")
    assert 1 <= one.value.retry_after < eight.value.retry_after


def test_admission_validates_priority_and_timeout() -> None:
    """An unknown priority or a non-positive timeout is a BadRequestError naming the field."""
    with pytest.raises(BadRequestError, match="priority"):
        Admission(priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(BadRequestError, match="timeout"):
        Admission(timeout_s=0)
    assert Admission(priority="batch", timeout_s=2.5).timeout_s == 2.5


@given(st.lists(st.text(min_size=1, max_size=3), max_size=20), st.text(min_size=1, max_size=4))
def test_stop_scanner_emits_exactly_the_text_before_the_first_stop(pieces: list[str], stop: str) -> None:
    """However text is split into pieces, the scanner emits exactly the text before the first stop string."""
    whole = "".join(pieces)
    scanner = StopScanner([stop])
    emitted = ""
    stopped = False
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        emitted += text
        if stopped:
            break
    if not stopped:
        emitted += scanner.flush()
    cut = whole.find(stop)
    assert emitted == (whole if cut < 0 else whole[:cut])
    assert stopped == (cut >= 0)


async def test_inbox_wakes_its_consumer_once_per_flush_from_another_thread() -> None:
    """Events put by another thread reach the consumer in order after the thread flushes its wake batch."""
    inbox: Inbox[int] = Inbox(asyncio.get_running_loop())
    wakes = WakeBatch()

    def produce() -> None:
        for i in range(100):
            inbox.put(i)
            wakes.touch(inbox)  # type: ignore[arg-type]
            if i % 10 == 9:
                wakes.flush()

    thread = threading.Thread(target=produce)
    thread.start()
    received = [await asyncio.wait_for(inbox.get(), timeout=10) for _ in range(100)]
    thread.join()
    assert received == list(range(100))
