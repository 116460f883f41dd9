"""The agent runs exactly as systemd/edge-agent.service runs it, with the hardening the kernel can apply here.

There is no systemd (PID 1) in the test sandbox, so the test starts the unit's own ``ExecStart=`` command line
(paths moved into a temporary directory) with what systemd would give it: ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``
from ``WatchdogSec=``, ``UMask=``, and the two directives that are kernel process attributes and can be set
without systemd — ``NoNewPrivileges=`` (``PR_SET_NO_NEW_PRIVS``) and ``MemoryDenyWriteExecute=``
(``PR_SET_MDWE``, the same kernel mechanism). Under them, both engines must load and answer: llama.cpp with the
real SmolLM2 and onnxruntime with the real silero-vad.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.config import RegistryConfig
from agent.registry import Registry

pytestmark = pytest.mark.component

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "edge-agent.service"
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def unit_settings(path: Path) -> dict[str, list[str]]:
    """The unit's ``[Service]`` settings, each key with all its values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def _harden(umask: int) -> None:
    """In the child before exec: what NoNewPrivileges=, MemoryDenyWriteExecute= and UMask= make systemd do."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.umask(umask)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE failed")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="efu-"))
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def test_unit_declares_notify_watchdog_and_hardening() -> None:
    """The unit is Type=notify with a watchdog, restarts on failure and keeps its hardening directives."""
    settings = unit_settings(UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert int(settings["WatchdogSec"][0]) > 0
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute", "RestrictNamespaces"):
        assert settings[key] == ["yes"], key
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert settings["SystemCallFilter"][0] == "@system-service"


def test_agent_runs_as_the_unit_runs_it(
    tmp_path: Path, short_dir: Path, smollm2_path: Path, silero_vad_path: Path
) -> None:
    """Under the unit's command line, notify socket, watchdog, umask, NoNewPrivileges and W^X, both engines answer."""
    settings = unit_settings(UNIT)
    state, config, api_socket = tmp_path / "state", tmp_path / "agent.toml", short_dir / "api.sock"
    config.write_text('[inference]\nn_ctx = 512\nn_parallel = 1\nn_threads = 2\n[log]\nlevel = "info"\n')
    registry = Registry.open(state, RegistryConfig(min_free_bytes=0))
    try:
        registry.recover()
        registry.import_file(smollm2_path, name="smollm2-135m-instruct", variant="q4_1")
        registry.import_file(silero_vad_path, name="silero-vad", variant="onnx-fp32")
    finally:
        registry.close()
    replacements = {
        "/opt/edge-agent/venv/bin/edge-agent": str(Path(sys.executable).parent / "edge-agent"),
        "/etc/edge-agent/agent.toml": str(config),
        "/var/lib/edge-agent": str(state),
        "/run/edge-agent/api.sock": str(api_socket),
    }
    argv = [replacements.get(arg, arg) for arg in shlex.split(settings["ExecStart"][0])]
    assert argv[0].endswith("/edge-agent")
    assert argv[-1] == "run"
    watchdog_s = int(settings["WatchdogSec"][0])
    notify_path = short_dir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "WATCHDOG_"))}
    env |= {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": str(watchdog_s * 1_000_000)}
    umask = int(settings["UMask"][0], 8)
    process = subprocess.Popen(
        argv,
        env=env,
        preexec_fn=lambda: _harden(umask),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready_at = _wait_for(notify, "READY=1", deadline=time.monotonic() + 60, process=process)
        assert api_socket.exists()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(api_socket)), base_url="http://x", timeout=120) as http:
            chat = http.post(
                "/v1/chat/completions",
                json={
                    "model": "smollm2-135m-instruct",
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is the capital of France?"},
                    ],
                    "max_tokens": 12,
                    "temperature": 0,
                },
            )
            assert chat.status_code == 200, chat.text
            assert "Paris" in chat.json()["choices"][0]["message"]["content"]
            frame = {"data": [0.0] * 576, "shape": [1, 576], "dtype": "float32"}
            state_tensor = {"data": [0.0] * 256, "shape": [2, 1, 128], "dtype": "float32"}
            sr = {"data": 16000, "shape": [], "dtype": "int64"}
            infer = http.post(
                "/v1/infer/silero-vad", json={"inputs": {"input": frame, "state": state_tensor, "sr": sr}}
            )
            assert infer.status_code == 200, infer.text
            probability = json.loads(infer.text)["outputs"]["output"]["data"][0][0]
            assert 0.0 <= probability < 0.1  # silence
        # The first ping comes within half the watchdog interval of READY=1.
        ping_at = _wait_for(notify, "WATCHDOG=1", deadline=ready_at + watchdog_s / 2 + 5, process=process)
        assert ping_at - ready_at <= watchdog_s / 2 + 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        notify.close()
    assert "Permission denied" not in stderr, stderr


def _wait_for(sock: socket.socket, line: str, *, deadline: float, process: subprocess.Popen[bytes]) -> float:
    """Receive notifications until one contains ``line``; return when it arrived."""
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        assert process.poll() is None, f"the agent exited with {process.returncode}"
        sock.settimeout(min(left, 1.0))
        try:
            text = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(text)
        if line in text.splitlines():
            return time.monotonic()
    raise AssertionError(f"no {line} before the deadline; got {seen}")


def test_launchd_plist_runs_the_same_daemon_with_the_same_options() -> None:
    """The Apple Silicon plist starts the unit's command line (only the runtime socket directory differs)."""
    import plistlib

    plist = plistlib.loads((UNIT.parents[1] / "deploy" / "com.edgefleet.edge-agent.plist").read_bytes())
    unit_argv = shlex.split(unit_settings(UNIT)["ExecStart"][0])
    plist_argv = [arg.replace("/var/run/", "/run/") for arg in plist["ProgramArguments"]]
    assert plist_argv == unit_argv
    assert plist["KeepAlive"] == {"SuccessfulExit": False}, "restart on failure, like Restart=on-failure"
    assert plist["Umask"] == int(unit_settings(UNIT)["UMask"][0], 8)
