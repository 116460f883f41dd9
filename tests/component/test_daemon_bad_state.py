"""Bad local state: `edge-agent run` starts degraded wherever it can, and exits 78 (not restarted) where it cannot.

Each daemon here is the real process (`python -m agent ... run`), as systemd starts it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.client import ApiClient, ApiClientError
from agent.config import AgentConfig, ApiConfig, LinkConfig, RegistryConfig
from agent.errors import EXIT_BAD_LOCAL_STATE

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "efa_0123abcd_" + "ab" * 32
GARBAGE = b"\xab" * 8192


class Daemon:
    """One `edge-agent run` process on ``state`` (its output in ``log``)."""

    def __init__(self, state: Path, socket_path: Path, config: Path | None, log: Path) -> None:
        self.socket_path = socket_path
        self.log = log
        args = [sys.executable, "-m", "agent", "--state-dir", str(state), "--socket", str(socket_path)]
        if config is not None:
            args += ["--config", str(config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "EDGE_AGENT_"))}
        with log.open("wb") as out:
            self.process = subprocess.Popen([*args, "run"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait_serving(self, timeout: float = 60.0) -> ApiClient:
        """Wait until the agent is ready (`agent.ready` logged, after the link and audit log are opened) and
        `/readyz` answers; fail with the log if the process exits first."""
        client = ApiClient(self.socket_path, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.output()}"
            if "agent.ready" in self.output() and client.is_running():
                client.request("GET", "/readyz")
                return client
            time.sleep(0.2)
        raise AssertionError(f"not serving after {timeout} s: {self.output()}")

    def exit_status(self, timeout: float = 60.0) -> int:
        """The process's exit status (it must exit by itself)."""
        return self.process.wait(timeout)

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then wait (kill if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the API socket (sun_path is 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="efa-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start(tmp_path: Path, socket_dir: Path) -> Iterator[Any]:
    """Start daemons on ``tmp_path/state`` (or a given state dir); all are stopped at the end."""
    started: list[Daemon] = []

    def starter(state: Path | None = None, config_text: str | None = None) -> Daemon:
        config = None
        if config_text is not None:
            config = tmp_path / "agent.toml"
            config.write_text(config_text)
        daemon = Daemon(state or tmp_path / "state", socket_dir / "api.sock", config, tmp_path / f"log{len(started)}")
        started.append(daemon)
        return daemon

    yield starter
    for daemon in started:
        daemon.stop()


def _degraded(client: ApiClient) -> dict[str, str]:
    status = client.request("GET", "/v1/admin/status")
    assert isinstance(status, dict)
    degraded = status["degraded"]
    assert isinstance(degraded, dict)
    return degraded


def _assert_tokens_unavailable(client: ApiClient, cause: str) -> None:
    """uid callers are served; a token caller gets 503 naming the cause; the status reports it."""
    assert client.request("GET", "/v1/models")["object"] == "list"
    with pytest.raises(ApiClientError) as info:
        ApiClient(client.socket_path, token=FAKE_TOKEN, timeout=10).request("GET", "/v1/models")
    assert info.value.status == 503
    assert info.value.code == "token_store_unavailable"
    assert cause in str(info.value)
    assert cause in _degraded(client)["tokens"]


def test_garbage_tokens_db_serves_uid_callers(tmp_path: Path, start: Any) -> None:
    """A garbage tokens.db: uid callers are served, token callers get 503 naming it, the status says degraded."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "tokens.db").write_bytes(GARBAGE)
    daemon = start()
    client = daemon.wait_serving()
    _assert_tokens_unavailable(client, "not a database")
    assert "tokens.unavailable" in daemon.output()


def test_locked_tokens_db_serves_uid_callers(tmp_path: Path, start: Any) -> None:
    """A tokens.db another process holds locked: served within seconds, degraded, not a traceback after 10 s."""
    state = tmp_path / "state"
    state.mkdir()
    holder_code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('BEGIN EXCLUSIVE')\n"
        "c.execute('CREATE TABLE IF NOT EXISTS x (a)')\n"
        "print('locked', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(state / "tokens.db")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        client = start().wait_serving()
        assert time.monotonic() - started < 30
        _assert_tokens_unavailable(client, "locked")
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_garbage_link_db_on_an_enrolled_device_serves_without_the_link(tmp_path: Path, start: Any) -> None:
    """An enrolled device whose link.db is garbage serves its API without the link, and says so."""
    from agent.link.enrollment import install_bundle
    from controller.config import BrokerConfig, FleetConfig
    from controller.home import FleetHome

    home = FleetHome.init(tmp_path / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=9)))
    home.enroll_device("dev-1", tmp_path / "dev-1.bundle")
    state = tmp_path / "state"
    install_bundle(state, (tmp_path / "dev-1.bundle").read_bytes())
    (state / "link").mkdir(exist_ok=True)
    (state / "link" / "link.db").write_bytes(GARBAGE)
    daemon = start()
    client = daemon.wait_serving()
    assert client.request("GET", "/v1/models")["object"] == "list"
    assert "link" in _degraded(client)
    assert "link.store_unusable" in daemon.output()


def _registry_with_model(state: Path, config: Path, model: Path) -> None:
    from agent.cli import main as agent_cli

    args = ["--config", str(config), "--state-dir", str(state)]
    command = ["models", "import", str(model), "--name", "vad", "--variant", "fp32"]
    result = CliRunner().invoke(agent_cli, [*args, *command])
    assert result.exit_code == 0, result.output


def _fill(path: Path) -> None:
    """Write ``path`` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_serves_installed_models_read_only(tmp_path: Path, start: Any, silero_vad_path: Path) -> None:
    """A disk filled by something else: installed models are listed and served, installs get 507 "disk full"."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = silero_vad_path.stat().st_size + (1 << 20)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        state = mount / "state"
        config = tmp_path / "agent.toml"
        config.write_text('device_id = "dev-1"\n[registry]\nmin_free_bytes = 0\n')
        _registry_with_model(state, config, silero_vad_path)
        _fill(mount / "filler")
        daemon = start(state=state, config_text=config.read_text())
        client = daemon.wait_serving()
        listed = client.request("GET", "/v1/models")
        assert [m["id"] for m in listed["data"]] == ["vad"], listed
        inputs = {  # served: loaded without the load mark the registry cannot write now
            "input": {"data": [[0.0] * 512]},
            "state": {"data": [0.0] * 256, "shape": [2, 1, 128]},
            "sr": {"data": 16000, "shape": []},
        }
        answer = client.request("POST", "/v1/infer/vad", {"inputs": inputs})
        assert set(answer["outputs"]) >= {"output"}, answer
        degraded = _degraded(client)
        assert "disk full" in degraded["registry"]
        assert {"registry", "tokens", "audit"} <= set(degraded)
        with pytest.raises(ApiClientError) as info:
            client.request(
                "POST", "/v1/admin/models", {"path": str(silero_vad_path), "name": "vad2", "variant": "fp32"}
            )
        assert info.value.status == 507
        assert "disk full" in str(info.value)
        assert str(state) in str(info.value)
        assert "bytes free" in str(info.value)
        daemon.stop()
        assert daemon.process.returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_garbage_registry_db_exits_78_with_one_line(tmp_path: Path, start: Any) -> None:
    """A garbage registry.db: exit status 78 (not restarted by the unit) and one clear line on stderr."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "registry.db").write_bytes(GARBAGE)
    daemon = start()
    assert daemon.exit_status() == EXIT_BAD_LOCAL_STATE, daemon.output()
    last = daemon.output().strip().splitlines()[-1]
    assert last.startswith("edge-agent: bad local state: the registry database"), last
    assert "Traceback" not in daemon.output()


def test_invalid_config_exits_78(tmp_path: Path, start: Any) -> None:
    """An invalid agent.toml: exit status 78 and a one-line message naming the file."""
    daemon = start(config_text="[inference\nbroken")
    assert daemon.exit_status() == EXIT_BAD_LOCAL_STATE, daemon.output()
    assert daemon.output().strip().splitlines()[-1].startswith("edge-agent: bad configuration: config file")


def test_a_device_id_the_protocol_refuses_exits_78(tmp_path: Path, start: Any) -> None:
    """A device_id in agent.toml that is not a valid id (upper case): exit 78 and one line naming it."""
    daemon = start(config_text='device_id = "Edge-Box-1"\n[link]\nenabled = false\n')
    assert daemon.exit_status() == EXIT_BAD_LOCAL_STATE, daemon.output()
    last = daemon.output().strip().splitlines()[-1]
    assert last.startswith("edge-agent: bad configuration: device_id must be"), last
    assert "Edge-Box-1" in last
    assert "Traceback" not in daemon.output()


async def test_a_device_id_the_audit_chain_refuses_degrades_only_the_audit_log(
    tmp_path: Path, socket_dir: Path
) -> None:
    """A device id the audit chain refuses that reaches the daemon (not through agent.toml): it serves, degraded."""
    from agent import daemon

    config = AgentConfig(
        state_dir=tmp_path / "state",
        device_id="Edge-Box-1",
        api=ApiConfig(socket_path=socket_dir / "api.sock"),
        registry=RegistryConfig(min_free_bytes=0),
        link=LinkConfig(enabled=False),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(config, stop=stop))
    try:
        client = ApiClient(socket_dir / "api.sock", timeout=10)
        for _ in range(300):
            assert not task.done(), task.result()
            if await asyncio.to_thread(client.is_running):
                break
            await asyncio.sleep(0.1)
        degraded = await asyncio.to_thread(_degraded, client)
        assert "audit log unavailable" in degraded["audit"]
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


def test_regular_file_at_socket_path_exits_78(tmp_path: Path, start: Any, socket_dir: Path) -> None:
    """A regular file at the socket path: never deleted, exit status 78."""
    (socket_dir / "api.sock").write_text("x")
    daemon = start()
    assert daemon.exit_status() == EXIT_BAD_LOCAL_STATE, daemon.output()
    assert "is not a socket" in daemon.output().strip().splitlines()[-1]
    assert (socket_dir / "api.sock").read_text() == "x"


def test_unit_does_not_restart_on_bad_local_state() -> None:
    """The shipped unit lists the bad-local-state exit status in RestartPreventExitStatus=."""
    unit = (ROOT / "systemd" / "edge-agent.service").read_text().splitlines()
    assert f"RestartPreventExitStatus={EXIT_BAD_LOCAL_STATE}" in unit


def test_registry_db_locked_is_not_bad_local_state(tmp_path: Path) -> None:
    """A registry.db another process holds is transient: not reported as bad local state (systemd restarts)."""
    from agent.config import AgentConfig
    from agent.daemon import _open_registry
    from agent.errors import LocalStateError, RegistryError
    from agent.registry import Registry

    config = AgentConfig(state_dir=tmp_path / "state")
    Registry.open(config.state_dir, config.registry).close()
    holder = sqlite3.connect(config.state_dir / "registry.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RegistryError) as info:
            _open_registry(config, {})
        assert not isinstance(info.value, LocalStateError)
    finally:
        holder.close()


def _registry(state: Path, model: Path) -> Any:
    from agent.config import RegistryConfig
    from agent.registry import Registry

    registry = Registry.open(state, RegistryConfig(min_free_bytes=0))
    registry.import_file(model, name="vad", variant="fp32")
    return registry


def test_unreadable_blob_at_recovery_is_logged_not_fatal(tmp_path: Path, silero_vad_path: Path) -> None:
    """EACCES from stat on a live model's blob: recovery goes on (no crash loop), logs it, quarantines nothing."""
    from unittest import mock

    from structlog.testing import capture_logs

    registry = _registry(tmp_path / "state", silero_vad_path)
    blobs = str(registry.state_dir / "blobs")
    real_stat = os.stat

    def denied(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:  # the one seam: stat of a blob
        if str(path).startswith(blobs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    try:
        with mock.patch("agent.registry.store.os.stat", denied), capture_logs() as events:
            report = registry.recover()
        assert [m.split(":")[0] for m in report.unreadable_models] == ["vad/fp32/v1"], report
        assert report.broken_models == []
        warning = next(e for e in events if e["event"] == "registry.blob_unreadable")
        assert warning["log_level"] == "warning"
        assert warning["model"] == "vad/fp32/v1"
        assert "Permission denied" in warning["reason"]
        assert registry.active_models()[0].name == "vad", "not quarantined for an error that may be fixed"
    finally:
        registry.close()


def test_truncated_blob_at_recovery_is_a_warning_naming_the_model(tmp_path: Path, silero_vad_path: Path) -> None:
    """A truncated blob found at recovery: the model is quarantined with a warning naming it and the reason."""
    from structlog.testing import capture_logs

    registry = _registry(tmp_path / "state", silero_vad_path)
    try:
        blob = next(p for p in (registry.state_dir / "blobs").rglob("*") if p.is_file())
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:1000])
        with capture_logs() as events:
            report = registry.recover()
        assert report.broken_models == ["vad/fp32/v1"]
        warning = next(e for e in events if e["event"] == "registry.model_quarantined")
        assert warning["log_level"] == "warning"
        assert warning["model"] == "vad/fp32/v1"
        assert "wrong size" in warning["reason"]
    finally:
        registry.close()


async def test_recovery_extends_the_start_timeout(tmp_path: Path) -> None:
    """While recovery runs (a resumed import can take minutes) systemd is asked for more start time."""
    import socket

    from agent.daemon import _recover
    from agent.systemd import SystemdNotifier

    directory = Path(tempfile.mkdtemp(prefix="efn-"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify"))
    sock.settimeout(5)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(directory / "notify")})

    class SlowRecovery:  # a fake at one seam: the registry's recover(), here a slow resumed import
        def recover(self) -> str:
            time.sleep(0.5)
            return "resumed 1"

    try:
        await _recover(SlowRecovery(), notifier)  # type: ignore[arg-type]
        message = sock.recv(256).decode()
        assert message.startswith("EXTEND_TIMEOUT_USEC="), message
        assert int(message.split("=")[1]) >= 60_000_000
    finally:
        notifier.close()
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)
