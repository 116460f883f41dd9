"""deploy/install-agent.sh in a throwaway root: files, permissions, unit, enrollment; idempotent; clean uninstall."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.component,
    pytest.mark.skipif(os.geteuid() != 0, reason="the installer creates a system user: it needs root"),
]

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "deploy" / "install-agent.sh"


def _fake_root(path: Path) -> Path:
    """A root with just the account databases useradd/groupadd --prefix need."""
    etc = path / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    return path


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", str(INSTALLER), *args], capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _bundle(tmp_path: Path) -> Path:
    home, out = tmp_path / "fleet", tmp_path / "kiosk-1.bundle"
    fleet = [str(ROOT / ".venv" / "bin" / "edge-fleet"), "--home", str(home)]
    subprocess.run([*fleet, "init"], check=True, capture_output=True, timeout=120)
    subprocess.run([*fleet, "device", "enroll", "kiosk-1", "--out", str(out)], check=True, capture_output=True)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_is_complete_idempotent_and_uninstalls_cleanly(tmp_path: Path) -> None:
    """Install creates user, venv, config, state and unit with the right modes, applies the bundle once, and
    --uninstall --purge leaves nothing of it behind."""
    root = _fake_root(tmp_path / "root")
    bundle = _bundle(tmp_path)
    first = _run("--root", str(root), "--source", str(ROOT), "--bundle", str(bundle))
    assert "applied enrollment bundle" in first.stdout

    passwd = (root / "etc" / "passwd").read_text()
    user = next(line for line in passwd.splitlines() if line.startswith("edge-agent:")).split(":")
    assert user[5] == "/var/lib/edge-agent"
    assert user[6] == "/usr/sbin/nologin"
    uid, gid = int(user[2]), int(user[3])
    assert uid < 1000, "a system account"

    agent = root / "opt" / "edge-agent" / "venv" / "bin" / "edge-agent"
    version = subprocess.run([str(agent), "--version"], capture_output=True, text=True, check=True)
    assert "edge-agent, version" in version.stdout
    config = root / "etc" / "edge-agent" / "agent.toml"
    assert _mode(config) == 0o640
    assert config.stat().st_gid == gid
    state = root / "var" / "lib" / "edge-agent"
    assert _mode(state) == 0o750
    assert state.stat().st_uid == uid
    assert all(p.stat().st_uid == uid for p in state.rglob("*")), "the agent owns its whole state directory"
    unit = root / "etc" / "systemd" / "system" / "edge-agent.service"
    assert unit.read_bytes() == (ROOT / "systemd" / "edge-agent.service").read_bytes()

    status = subprocess.run(
        [str(agent), "--config", str(config), "--state-dir", str(state), "link", "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kiosk-1" in status.stdout

    config.write_text(config.read_text() + "# operator's edit\n")
    second = _run("--root", str(root), "--source", str(ROOT), "--bundle", str(bundle))
    assert "already enrolled with this bundle" in second.stdout
    assert "operator's edit" in config.read_text(), "a second run never overwrites the configuration"
    accounts = [line for line in (root / "etc" / "passwd").read_text().splitlines() if line.startswith("edge-agent:")]
    assert len(accounts) == 1

    _run("--root", str(root), "--uninstall")
    assert not (root / "opt" / "edge-agent").exists()
    assert not unit.exists()
    assert state.exists(), "plain --uninstall keeps the state"
    _run("--root", str(root), "--uninstall", "--purge")
    assert not state.exists()
    assert not (root / "etc" / "edge-agent").exists()
    for database in ("passwd", "group"):
        lines = (root / "etc" / database).read_text().splitlines()
        assert not [line for line in lines if line.startswith("edge-agent:")], database


def test_installer_refuses_bad_options(tmp_path: Path) -> None:
    """An unknown option is a clear error that changes nothing."""
    root = _fake_root(tmp_path / "root")
    result = _run("--root", str(root), "--frobnicate", check=False)
    assert result.returncode != 0
    assert "unknown option --frobnicate" in result.stderr
    assert not (root / "opt").exists()
