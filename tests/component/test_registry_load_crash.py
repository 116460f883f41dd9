"""The crash-loop breaker for model loads: a model whose load kills the agent N times in a row is quarantined.

Real registry files and a real agent process per attempt: a child process opens the registry and recovers it as
the daemon does, then loads the active model through the daemon's marked loader and the real pool and llama
engine. The one seam faked is llama.cpp's native open (``LlamaModel._open``), which kills the child with
``os._exit(139)`` the way a segfault or the OOM killer would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from agent.api.app import ApiState
from agent.api.openai import resolve_model
from agent.api.validation import ModelRef
from agent.audit import AuditLog
from agent.config import RegistryConfig
from agent.daemon import marked_loader
from agent.errors import EngineLoadError, QuarantinedError
from agent.inference import ModelSpec
from agent.registry import Registry
from tests.component.test_registry import tiny_gguf

pytestmark = [pytest.mark.component, pytest.mark.timeout(120)]

CONFIG = RegistryConfig(min_free_bytes=0, load_crash_quarantine_after=3)
WORKTREE = Path(__file__).resolve().parents[2]

# One agent start: recover the registry, then load the active model of "tiny" (llama.cpp's open kills the process).
_CHILD = """
import asyncio, json, os, sys
from pathlib import Path
from agent.config import RegistryConfig
from agent.daemon import marked_loader
from agent.inference import ModelPool, ModelSpec
from agent.inference.llama import LlamaModel
from agent.registry import Registry

registry = Registry.open(Path(sys.argv[1]), RegistryConfig(min_free_bytes=0, load_crash_quarantine_after=3))
report = registry.recover()
record = registry.active("tiny")
print(json.dumps({"quarantined": report.quarantined, "active": record.version if record else None}), flush=True)
if record is None or record.version == 1:
    sys.exit(0)
spec = ModelSpec(name=record.name, variant=record.variant, path=registry.blob_path(record), format="gguf",
                 sha256=record.sha256, size=record.size, n_ctx=256, n_threads=1, n_parallel=1)
LlamaModel._open = staticmethod(lambda spec: os._exit(139))  # a segfault in the native open

async def main():
    async with ModelPool(2**31, marked_loader(registry)).use(spec):
        pass

asyncio.run(main())
"""


def _start_agent(state_dir: Path) -> tuple[int, dict[str, Any]]:
    """Run one agent start in a child process; its exit status and what its recovery found."""
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(state_dir)], cwd=WORKTREE, env=env, capture_output=True, timeout=60
    )
    lines = done.stdout.decode().splitlines()
    assert lines, done.stderr.decode()
    return done.returncode, json.loads(lines[0])


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A registry with "tiny" v1 (previous) and v2 (active), and an initialised audit log."""
    state = tmp_path / "state"
    with Registry.open(state, CONFIG) as registry:
        registry.recover()
        registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
        registry.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="f32")
        AuditLog.open(registry, "device-1")
    return state


def test_a_load_that_kills_the_agent_three_times_is_quarantined(state_dir: Path) -> None:
    """Three starts killed while loading v2: the fourth quarantines it (events, audit) and v1 is active again."""
    for attempt in range(3):
        status, found = _start_agent(state_dir)
        assert status == 139, f"attempt {attempt}: the load did not reach the native open"
        assert found == {"quarantined": [], "active": 2}
    status, found = _start_agent(state_dir)
    assert status == 0
    assert found == {"quarantined": ["tiny/f32/v2"], "active": 1}

    with Registry.open(state_dir, CONFIG) as registry:
        events = [(e.kind, e.version, e.data) for e in registry.events(name="tiny")]
        crashes = [data["crashes"] for kind, version, data in events if kind == "model_load_crashed"]
        assert crashes == [1, 2, 3]
        reason = "loading it crashed the agent 3 times in a row"
        assert ("model_quarantined", 2) in [(kind, version) for kind, version, data in events]
        assert any(kind == "model_quarantined" and data["reason"] == reason for kind, _, data in events)
        audit = registry.query_readonly("SELECT kind, data FROM audit_log ORDER BY seq")
        assert any(row["kind"] == "registry.model_quarantined" and reason in row["data"] for row in audit)
        assert not registry.query_readonly("SELECT * FROM model_loads")


def test_a_clean_load_resets_the_count(state_dir: Path, tmp_path: Path) -> None:
    """Crashes count only in a row: a load that ends (here: refused cleanly) forgets the earlier ones."""
    spec_of: dict[str, ModelSpec] = {}
    for _ in range(2):
        assert _start_agent(state_dir)[0] == 139
    with Registry.open(state_dir, CONFIG) as registry:
        assert registry.recover().quarantined == []
        record = registry.active("tiny")
        assert record is not None
        spec_of["v2"] = ModelSpec(
            name=record.name,
            variant=record.variant,
            path=tmp_path / "missing.gguf",  # the engine refuses it: a clean failure, the agent survives
            format="gguf",
            sha256=record.sha256,
            size=record.size,
            n_ctx=256,
            n_threads=1,
            n_parallel=1,
        )
        with pytest.raises(EngineLoadError):
            marked_loader(registry)(spec_of["v2"])
        assert not registry.query_readonly("SELECT * FROM model_loads")
    for _ in range(2):
        assert _start_agent(state_dir) == (139, {"quarantined": [], "active": 2})
    assert _start_agent(state_dir)[1] == {"quarantined": [], "active": 2}  # 2 in a row, not 4


class _State:
    """The two things :func:`resolve_model` uses of the API's state."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def in_thread(self, fn: Any, /, *args: Any) -> Any:
        return fn(*args)


async def test_requests_for_a_quarantined_model_name_the_quarantine(tmp_path: Path) -> None:
    """With no previous version to fall back on, a request gets QuarantinedError with the reason, not 'not found'."""
    with Registry.open(tmp_path / "state", CONFIG) as registry:
        registry.recover()
        record = registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
        registry.begin_load(record.name, record.sha256)
    for _ in range(2):  # two more starts that died during the load (three in all)
        with Registry.open(tmp_path / "state", CONFIG) as registry:
            registry.recover()
            registry.begin_load(record.name, record.sha256)
    with Registry.open(tmp_path / "state", CONFIG) as registry:
        assert registry.recover().quarantined == ["tiny/f32/v1"]
        state = cast(ApiState, _State(registry))
        for ref in (ModelRef("tiny", None), ModelRef("tiny", "f32")):
            with pytest.raises(QuarantinedError, match="quarantined: loading it crashed the agent 3 times in a row"):
                await resolve_model(state, ref)
