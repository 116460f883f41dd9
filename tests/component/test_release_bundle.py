"""Offline release bundles: `edge-fleet model bundle` → `edge-agent models import --bundle`, verified like a delivery.

Real parts: a controller home made by ``FleetHome.init``, a device enrolled with its bundle (which carries the
TUF root), both real CLIs in-process. No broker: bundles are for air-gapped devices.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from fleet_harness import Fleet

from agent.cli import main as agent_cli
from agent.config import RegistryConfig
from agent.registry import Registry
from protocols.gguf import GgmlType, build_gguf

pytestmark = pytest.mark.component


def _gguf(path: Path) -> Path:
    path.write_bytes(build_gguf({"general.architecture": "llama"}, [("w.weight", [50_000], GgmlType.F32)]))
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """A controller home with one published release, and an enrolled (offline) device."""
    fleet = Fleet(tmp_path)
    fleet.cli("model", "add", str(_gguf(tmp_path / "tiny.gguf")), "--name", "tiny", "--variant", "q4_0")
    fleet.cli("model", "publish")
    agent = fleet.enroll("dev1", models=(1,))
    agent.registry.close()
    return fleet


def _import(fleet: Fleet, bundle: Path) -> tuple[int, str]:
    state_dir = fleet.agents["dev1"].state_dir
    result = CliRunner().invoke(
        agent_cli,
        [
            "--state-dir",
            str(state_dir),
            "--socket",
            str(state_dir / "none.sock"),
            "models",
            "import",
            "--bundle",
            str(bundle),
        ],
    )
    return result.exit_code, result.output


def _active(fleet: Fleet) -> str | None:
    registry = Registry.open(fleet.agents["dev1"].state_dir, RegistryConfig())
    try:
        active = registry.active("tiny")
        return None if active is None else active.sha256
    finally:
        registry.close()


def test_bundle_is_verified_and_installed(fleet: Fleet, tmp_path: Path) -> None:
    """A bundle of a published release installs and activates the exact signed bytes."""
    bundle = tmp_path / "tiny.bundle"
    fleet.cli("model", "bundle", "tiny@1", "--out", str(bundle))
    code, output = _import(fleet, bundle)
    assert code == 0, output
    assert _active(fleet) == hashlib.sha256((tmp_path / "tiny.gguf").read_bytes()).hexdigest()


def test_bundle_with_a_changed_blob_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    """A bundle whose blob differs from the signed target (same length) is refused; nothing is installed."""
    bundle = tmp_path / "tiny.bundle"
    fleet.cli("model", "bundle", "tiny@1", "--out", str(bundle))
    data = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        blob = tar.getmember("blob")
    data[blob.offset_data + blob.size - 7] ^= 0x01
    bundle.write_bytes(bytes(data))
    code, output = _import(fleet, bundle)
    assert code == 1
    assert "does not match the signed chunk list" in output
    assert _active(fleet) is None


def test_bundle_with_foreign_metadata_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    """A bundle made by another repository (not this fleet's root keys) is refused by TUF."""
    other = Fleet(tmp_path / "other")
    other.cli("model", "add", str(_gguf(tmp_path / "tiny2.gguf")), "--name", "tiny", "--variant", "q4_0")
    other.cli("model", "publish")
    bundle = tmp_path / "foreign.bundle"
    other.cli("model", "bundle", "tiny@1", "--out", str(bundle))
    code, output = _import(fleet, bundle)
    assert code == 1
    assert "TUF refused" in output
    assert _active(fleet) is None
