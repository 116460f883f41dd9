"""The daemon's log lines reach its stdout, also while the llama engine silences what llama.cpp prints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_SCRIPT = """
import structlog
from agent.logs import configure_logging
from agent.inference.llama import _quiet_stdio

configure_logging("info", json=True)
log = structlog.get_logger("test")
log.info("before")
with _quiet_stdio():  # what a model load does to descriptors 1 and 2
    log.info("while_loading", n=1)
    print("a native library's chatter", flush=True)
log.info("after")
"""


@pytest.mark.component
def test_log_lines_written_while_a_model_loads_are_kept() -> None:
    """Lines logged while descriptors 1 and 2 point at /dev/null still arrive, in order, as JSON; the silenced
    output does not."""
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True, timeout=60)
    events = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert events == ["before", "while_loading", "after"]
    assert "chatter" not in done.stdout + done.stderr
