"""The health check a delivered release passes before it becomes active (DESIGN.md §4, agent/link/releases.py).

A model is healthy when its engine loads it through the agent's own model pool (so the memory budget applies) and,
for a text model, a fixed prompt completes at temperature 0 with at least one token and a normal finish. Anything
else raises :class:`~agent.errors.AgentError` and the installer quarantines the release; the previously active
model stays active (the pool reloads it on the next request if the check displaced it): the device has rolled
itself back without asking the controller, and its report says so when the link is back.

The check returns what it measured (``ttft_ms``, ``tokens_per_s``, ``load_ms``, ``completion_tokens``): they go
into the install report, and the controller's rollout gates compare them with the previous model's numbers on the
same device (controller/rollout.py). Both outcomes are written to the audit log (``release.health_check``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from agent.api.app import ApiState
from agent.api.openai import model_spec
from agent.errors import AgentError, InferenceError
from agent.inference.base import Finished, SamplingParams, TextDelta
from agent.registry.store import ModelRecord

__all__ = ["HEALTH_PROMPT", "HEALTH_TOKENS", "model_health_check"]

log = structlog.get_logger(__name__)

HEALTH_PROMPT = "The capital of France is"
HEALTH_TOKENS = 16
"""Enough decoded tokens for a tokens/s figure, few enough to keep an install quick."""
HEALTH_TIMEOUT_S = 300.0


def model_health_check(state: ApiState) -> Callable[[Any], Awaitable[Mapping[str, float]]]:
    """A health check bound to the agent's pool and configuration; returns the measured numbers."""

    async def check(record: ModelRecord) -> Mapping[str, float]:
        spec = model_spec(state, record)
        metrics: dict[str, float] = {}
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                started = time.perf_counter()
                async with state.pool.use(spec) as model:
                    loaded = time.perf_counter()
                    metrics["load_ms"] = round((loaded - started) * 1000, 1)
                    if record.format == "gguf" and "completion" in model.capabilities:
                        metrics.update(await _complete(model))
                        log.info("release.health_ok", model=record.ref, **metrics)
        except TimeoutError as exc:
            error: AgentError = InferenceError(
                f"health check of {record.ref} took longer than {HEALTH_TIMEOUT_S:.0f} s"
            )
            await _audit(state, record, False, {"error": str(error)})
            raise error from exc
        except AgentError as exc:
            try:
                await state.pool.unload(record.name)
            except AgentError as unload_error:  # stuck behind a wedged engine thread: the watchdog sees it
                log.error("release.health_unload_failed", model=record.ref, error=str(unload_error))
            await _audit(state, record, False, {"error": str(exc)})
            raise
        await _audit(state, record, True, metrics)
        return metrics

    return check


async def _complete(model: Any) -> dict[str, float]:
    """The fixed prompt at temperature 0: time to first token and decode rate."""
    text, finish, tokens = "", None, 0
    params = SamplingParams(max_tokens=HEALTH_TOKENS, temperature=0.0)
    start = time.perf_counter()
    first: float | None = None
    async for event in model.complete(HEALTH_PROMPT, params):
        if isinstance(event, TextDelta):
            first = first if first is not None else time.perf_counter()
            text += event.text
        elif isinstance(event, Finished):
            finish = event.finish_reason
            tokens = event.usage.completion_tokens
    end = time.perf_counter()
    if finish not in ("stop", "length") or (finish == "length" and not text):
        # the length only: completion text never reaches the audit log (docs/audit.md), which records this error
        raise InferenceError(f"health prompt finished with {finish!r} after {len(text)} characters of output")
    first = first if first is not None else end
    # decode rate after the first token (the first one pays for the prompt); whole span if only one token
    rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else tokens / max(end - start, 1e-6)
    return {"ttft_ms": round((first - start) * 1000, 1), "tokens_per_s": round(rate, 2), "completion_tokens": tokens}


async def _audit(state: ApiState, record: ModelRecord, ok: bool, data: Mapping[str, Any]) -> None:
    await state.record(
        "release.health_check", "agent", {"model": record.ref, "outcome": "ok" if ok else "failed", **data}
    )
