"""The health check a delivered release passes before it becomes active (DESIGN.md §4, agent/link/releases.py).

A model is healthy when its engine loads it through the agent's own model pool (so the memory budget applies) and,
for a text model, a fixed prompt completes at temperature 0 with at least one token and a normal finish. Anything
else raises :class:`~agent.errors.AgentError` and the installer quarantines the release; the previously active
model stays active (the pool reloads it on the next request if the check displaced it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent.api.app import ApiState
from agent.api.openai import model_spec
from agent.errors import AgentError, InferenceError
from agent.inference.base import Finished, SamplingParams, TextDelta
from agent.registry.store import ModelRecord

__all__ = ["HEALTH_PROMPT", "model_health_check"]

log = structlog.get_logger(__name__)

HEALTH_PROMPT = "The capital of France is"
HEALTH_TIMEOUT_S = 300.0


def model_health_check(state: ApiState) -> Callable[[Any], Awaitable[None]]:
    """A health check bound to the agent's pool and configuration."""

    async def check(record: ModelRecord) -> None:
        spec = model_spec(state, record)
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                async with state.pool.use(spec) as model:
                    if record.format == "gguf" and "completion" in model.capabilities:
                        text, finish = "", None
                        params = SamplingParams(max_tokens=8, temperature=0.0)
                        async for event in model.complete(HEALTH_PROMPT, params):
                            if isinstance(event, TextDelta):
                                text += event.text
                            elif isinstance(event, Finished):
                                finish = event.finish_reason
                        if finish not in ("stop", "length") or (finish == "length" and not text):
                            raise InferenceError(f"health prompt finished with {finish!r} after {text!r}")
                        log.info("release.health_ok", model=record.ref, output=text[:80])
        except TimeoutError as exc:
            raise InferenceError(f"health check of {record.ref} took longer than {HEALTH_TIMEOUT_S:.0f} s") from exc
        except AgentError:
            await state.pool.unload(record.name)
            raise

    return check
