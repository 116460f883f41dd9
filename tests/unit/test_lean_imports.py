"""The daemon imports only what it uses (memory, start-up time): not the link's stack on a device that is not
enrolled, not numpy while it serves GGUF models, not rich while it logs JSON.

Each check runs in a fresh interpreter: this test process has imported everything already.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

LINK_STACK = ("aiomqtt", "paho", "tuf", "cryptography", "agent.link.mqtt", "agent.audit")
ROOT = Path(__file__).resolve().parents[2]


def _imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_daemon_and_its_engine_do_not_import_the_link_stack() -> None:
    modules = _imported_after("import agent.cli, agent.daemon, agent.inference.llama")
    assert not [name for name in LINK_STACK if name in modules]


def test_edge_agent_run_imports_neither_numpy_nor_rich(tmp_path: Path) -> None:
    """`edge-agent run` (its command up to the event loop, then the llama engine) imports neither numpy, which
    sqlite-utils and llama-cpp-python's high-level package would load, nor rich, which structlog would load."""
    code = (
        "import asyncio\n"
        "from click.testing import CliRunner\n"
        "from agent.cli import main\n"
        "asyncio.run = lambda coroutine: coroutine.close()  # the one seam faked: the daemon is not started\n"
        f"result = CliRunner().invoke(main, ['--state-dir', {str(tmp_path)!r}, 'run'])\n"
        "assert result.exit_code == 0, result.output\n"
        "import agent.inference.llama"
    )
    modules = _imported_after(code)
    assert {"agent.daemon", "agent.inference.llama", "sqlite_utils", "structlog"} <= modules
    assert not [name for name in modules if name.split(".")[0] in ("numpy", "rich", "pygments")]


def test_import_without_hides_optional_packages_only_meanwhile() -> None:
    """A library imported with import_without sees its optional package as missing; the package still imports."""
    code = (
        "import sys\n"
        "from agent.imports import import_without\n"
        "import_without('sqlite_utils', 'numpy')\n"
        "import sqlite_utils.db\n"
        "assert sqlite_utils.db.np is None and 'numpy' not in sys.modules\n"
        "import numpy\n"
        "assert numpy.zeros(1).sum() == 0"
    )
    modules = _imported_after(code)
    assert {"sqlite_utils", "numpy"} <= modules


@pytest.fixture
def daemon_serving_smollm2(smollm2_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`edge-agent run` (a real process) with SmolLM2 imported, and its API socket (short path: sun_path)."""
    work = Path(tempfile.mkdtemp(prefix="efl-"))
    agent = [sys.executable, "-m", "agent", "--state-dir", str(work / "state"), "--socket", str(work / "api.sock")]
    subprocess.run(
        [*agent, "models", "import", str(smollm2_path), "--name", "smollm2-135m-instruct", "--variant", "q4_1"],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    process = subprocess.Popen([*agent, "run"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (work / "api.sock").exists():
            assert process.poll() is None, "the daemon exited during start-up"
            assert time.monotonic() < deadline, "the daemon's socket did not appear within 60 s"
            time.sleep(0.05)
        yield process, str(work / "api.sock")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()
            shutil.rmtree(work, ignore_errors=True)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=120)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _post(api_socket: str, path: str, body: dict[str, object]) -> dict[str, Any]:
    connection = _UnixConnection(api_socket)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        text = reply.read()
        assert reply.status == 200, text
        answer: dict[str, Any] = json.loads(text)
        return answer
    finally:
        connection.close()


@pytest.mark.component
def test_a_daemon_serving_a_gguf_model_does_not_load_numpy(
    daemon_serving_smollm2: tuple[subprocess.Popen[bytes], str],
) -> None:
    """The real daemon answers chat and embedding requests with a GGUF model and has no numpy extension mapped."""
    process, api_socket = daemon_serving_smollm2
    chat = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    assert _post(api_socket, "/v1/chat/completions", chat)["usage"]["completion_tokens"] >= 1
    texts = {"model": "smollm2-135m-instruct", "input": ["a cat sat on the mat", "taxes"]}
    floats = [item["embedding"] for item in _post(api_socket, "/v1/embeddings", texts)["data"]]
    packed = [
        item["embedding"]
        for item in _post(api_socket, "/v1/embeddings", {**texts, "encoding_format": "base64"})["data"]
    ]
    for vector, text in zip(floats, packed, strict=True):
        assert math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-9)
        assert base64.b64decode(text) == struct.pack(f"<{len(vector)}f", *vector)  # the same, as float32 LE
    maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert "libllama" in maps  # the engine is loaded...
    assert f"{os.sep}numpy{os.sep}" not in maps  # ...and numpy's native core is not


@pytest.mark.parametrize("command", ["models", "token", "link", "audit"])
def test_a_subcommand_is_imported_when_named(command: str) -> None:
    code = (
        "from click.testing import CliRunner\n"
        "from agent.cli import main\n"
        f"assert CliRunner().invoke(main, [{command!r}, '--help']).exit_code == 0"
    )
    modules = _imported_after(code)
    assert f"agent.cli_{'tokens' if command == 'token' else command}" in modules
    assert "agent.cli_bench" not in modules


def test_an_unreadable_link_directory_is_left_to_the_link_to_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deciding whether to import the link must not crash the daemon (a `link/` owned by another user: the link
    then logs why it cannot be used and the agent serves without it, as before)."""
    from agent import daemon

    assert not daemon._may_be_enrolled(tmp_path)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "bundle").write_bytes(b"x")
    assert daemon._may_be_enrolled(tmp_path)

    def denied(self: Path, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    assert daemon._may_be_enrolled(tmp_path)
