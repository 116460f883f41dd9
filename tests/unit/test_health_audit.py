"""What the release health check (agent.health) writes to the audit log: metadata, never completion text.

The one fake is the model pool (``ApiState.pool``, the seam the check loads its model through): it hands out an
engine whose completion ends abnormally, as a model closed mid-request does.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from agent import health
from agent.errors import AgentError
from agent.inference.base import Finished, TextDelta, Usage

SECRET = "SECRET completion text"


class CancelledModel:
    """An engine whose completion is cut short after some text."""

    capabilities = ("completion",)

    async def complete(self, prompt: str, params: Any) -> AsyncIterator[object]:
        yield TextDelta(f" Paris, and {SECRET}")
        yield Finished(finish_reason="cancelled", usage=Usage(5, 8))


class Pool:
    """The fake at the pool seam."""

    @contextlib.asynccontextmanager
    async def use(self, spec: object) -> AsyncIterator[CancelledModel]:
        yield CancelledModel()

    async def unload(self, name: str) -> None:
        return None


async def test_a_failed_health_check_audits_no_completion_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """A health prompt that ends abnormally is audited as failed, with no word of the model's output."""
    recorded: list[tuple[str, Mapping[str, Any]]] = []

    async def record(kind: str, actor: str, data: Mapping[str, Any]) -> None:
        recorded.append((kind, data))

    monkeypatch.setattr(health, "model_spec", lambda state, record: None)
    state = types.SimpleNamespace(pool=Pool(), record=record)
    model = types.SimpleNamespace(ref="m@1", format="gguf", name="m")
    with pytest.raises(AgentError) as info:
        await health.model_health_check(state)(model)  # type: ignore[arg-type]
    [(kind, data)] = recorded
    assert kind == "release.health_check"
    assert data["outcome"] == "failed"
    assert "cancelled" in data["error"]
    assert "Paris" not in repr(data)
    assert SECRET not in repr(data)
    assert SECRET not in str(info.value)
