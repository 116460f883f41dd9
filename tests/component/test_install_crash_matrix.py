"""The install crash matrix: kill the import at every named fault point, restart, check the invariant.

Each case runs the import in a subprocess with ``EDGE_AGENT_FAULT=<point>`` so that it ``os._exit(86)``s at that
point (as ``kill -9`` would), with an older model already active under the same name. Then the registry is
opened again and the invariant is checked, before and after ``recover()``:

- the active model is a complete blob whose sha256 matches its record: the old model or the new one;
- no partial file is used, and after recovery none is left behind; no install is left unfinished;
- the install was resumed (new model active) or, if its source vanished before verification, abandoned;
- a subsequent import succeeds.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import RegistryConfig
from agent.errors import IntegrityError, QuarantinedError
from agent.registry import FAULT_ENV, FAULT_EXIT_CODE, FAULT_POINTS, Registry
from agent.registry.gguf import GgmlType, build_gguf
from agent.registry.install import InstallRequest, plan_install, run_install

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]
CONFIG = RegistryConfig(min_free_bytes=0, crash_quarantine_after=3)
NAME, VARIANT = "crashy", "q4_0"
NEEDS_SOURCE = {"planned", "copying"}
"""Crash points whose recovery needs the source (after ``copied`` the partial file, re-hashed, is enough)."""

CHILD = """
import sys
from pathlib import Path
from agent.config import RegistryConfig
from agent.registry import Registry
state, op = Path(sys.argv[1]), sys.argv[2]
with Registry.open(state, RegistryConfig(min_free_bytes=0, crash_quarantine_after=3)) as reg:
    if op == "import":
        reg.import_file(Path(sys.argv[3]), name=sys.argv[4], variant=sys.argv[5])
    elif op == "import-move":
        reg.import_file(
            Path(sys.argv[3]), name=sys.argv[4], variant=sys.argv[5], expected_sha256=sys.argv[6], move=True
        )
    else:
        reg.recover()
"""


def child(state_dir: Path, *args: str, fault: str | None) -> subprocess.CompletedProcess[str]:
    """Run a registry operation in a fresh process, optionally with a fault point armed."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(state_dir), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def tiny_gguf(path: Path, tag: str) -> Path:
    """A small valid GGUF (2 MiB of tensor data, so the copy takes several chunks) whose content depends on tag."""
    path.write_bytes(
        build_gguf(
            {"general.architecture": "llama", "general.name": f"tiny-{tag}", "llama.context_length": 128},
            [("token_embd.weight", [1024, 512], GgmlType.F32)],
            fill=len(tag),
        )
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_invariant(reg: Registry, allowed: set[str]) -> str:
    """The active model is a complete, hash-verified blob whose content is one of ``allowed``; return its sha256."""
    active = reg.active(NAME)
    assert active is not None
    assert active.sha256 in allowed
    blob = reg.blob_path(active)
    assert blob.parent == reg.state_dir / "blobs" / "sha256"
    assert blob.stat().st_size == active.size
    assert sha256(blob) == active.sha256
    for other in reg.list_models():
        if other.state in ("staged", "previous", "active"):
            assert sha256(reg.blob_path(other)) == other.sha256
    for entry in (reg.state_dir / "blobs" / "sha256").iterdir():
        assert sha256(entry) == entry.name, "a blob's content must match its address"
    return active.sha256


def crash_install(state_dir: Path, new: Path, fault: str) -> None:
    result = child(state_dir, "import", str(new), NAME, VARIANT, fault=fault)
    assert result.returncode == FAULT_EXIT_CODE, result.stderr


def matrix_case(state_dir: Path, old: Path, new: Path, fault: str, *, keep_source: bool, tmp_path: Path) -> None:
    with Registry.open(state_dir, CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    crash_install(state_dir, new, fault)
    if not keep_source:
        new_sha = sha256(new)
        new.unlink()
    else:
        new_sha = sha256(new)
    old_sha = sha256(old)

    with Registry.open(state_dir, CONFIG) as reg:
        # before recovery: the active pointer already satisfies the invariant
        before = assert_invariant(reg, {old_sha, new_sha})
        expected_before = new_sha if FAULT_POINTS.index(fault) >= FAULT_POINTS.index("activated") else old_sha
        assert before == expected_before

        report = reg.recover()
        after = assert_invariant(reg, {old_sha, new_sha})
        assert reg.installs(unfinished_only=True) == []
        assert list((state_dir / "partial").iterdir()) == []
        install = reg.installs()[0]
        if fault in NEEDS_SOURCE and not keep_source:
            assert install["step"] == "abandoned"
            assert after == old_sha
            assert report.abandoned == [f"{NAME}/{VARIANT}/v2"]
        else:
            assert install["step"] == "done"
            assert after == new_sha
            # the crashed run was attempt 1 (a crash right after planning had not started one yet); recovery adds one
            expected_attempts = {"planned": 1, "done": 1}.get(fault, 2)
            assert install["attempts"] == expected_attempts
        kinds = {e.kind for e in reg.events(limit=1000)}
        assert "install_started" in kinds

        # and the registry keeps working
        third = reg.import_file(tiny_gguf(tmp_path / "third.gguf", "third-model"), name=NAME, variant=VARIANT)
        assert third.state == "active"
        assert_invariant(reg, {third.sha256})
        assert reg.rollback(NAME).sha256 in {old_sha, new_sha}


@pytest.mark.parametrize("keep_source", [True, False], ids=["source-kept", "source-gone"])
@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_crash_matrix_synthetic(tmp_path: Path, fault: str, keep_source: bool) -> None:
    """At every fault point, after a crash the active model is a verified old-or-new blob; recovery cleans up."""
    old = tiny_gguf(tmp_path / "old.gguf", "old")
    new = tiny_gguf(tmp_path / "new.gguf", "new-model")
    matrix_case(tmp_path / "state", old, new, fault, keep_source=keep_source, tmp_path=tmp_path)


@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_crash_matrix_move(tmp_path: Path, fault: str) -> None:
    """A moved (hard-linked) download survives a crash at every point: old or new active, then the new one."""
    state_dir = tmp_path / "state"
    old = tiny_gguf(tmp_path / "old.gguf", "old")
    new = tiny_gguf(tmp_path / "new.gguf", "new-model")
    old_sha, new_sha = sha256(old), sha256(new)
    with Registry.open(state_dir, CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    result = child(state_dir, "import-move", str(new), NAME, VARIANT, new_sha, fault=fault)
    assert result.returncode == FAULT_EXIT_CODE, result.stderr
    # the source keeps its name until ``copied`` is committed, and loses it right after
    assert new.exists() == (fault in NEEDS_SOURCE)
    with Registry.open(state_dir, CONFIG) as reg:
        assert_invariant(reg, {old_sha, new_sha})
        reg.recover()
        assert assert_invariant(reg, {new_sha}) == new_sha
        assert reg.installs(unfinished_only=True) == []
        assert reg.installs()[0]["step"] == "done"
        assert list((state_dir / "partial").iterdir()) == []


def test_move_takes_the_file_without_copying(tmp_path: Path) -> None:
    """``move=True`` installs the verified file by hard link: same inode in blobs/, the source name is gone."""
    new = tiny_gguf(tmp_path / "new.gguf", "new-model")
    inode, digest = new.stat().st_ino, sha256(new)
    with Registry.open(tmp_path / "state", CONFIG) as reg:
        record = reg.import_file(new, name=NAME, variant=VARIANT, expected_sha256=digest, move=True)
        blob = reg.blob_path(record)
        assert record.sha256 == digest
        assert blob.stat().st_ino == inode
        assert not new.exists()
        assert list((tmp_path / "state" / "partial").iterdir()) == []


def test_move_refuses_a_wrong_length(tmp_path: Path) -> None:
    """A moved file whose length changed after the plan is refused, and the partial name is removed."""
    new = tiny_gguf(tmp_path / "new.gguf", "new-model")
    digest = sha256(new)
    with Registry.open(tmp_path / "state", CONFIG) as reg:
        request = InstallRequest.build(
            new, name=NAME, variant=VARIANT, version=None, origin="test", expected_sha256=digest, activate=True,
            metadata=None,
        )  # fmt: skip
        install_id = plan_install(reg, request)
        with new.open("ab") as f:
            f.write(b"x")
        with pytest.raises(IntegrityError):
            run_install(reg, install_id, move=True)
        assert list((tmp_path / "state" / "partial").iterdir()) == []
        assert reg.active(NAME) is None


@pytest.mark.parametrize("fault", FAULT_POINTS)
def test_crash_matrix_real_smollm2(tmp_path: Path, smollm2_path: Path, fault: str) -> None:
    """The full matrix with the real 98 MB SmolLM2 as the new model (mid-copy crash after 20 chunks)."""
    old = tiny_gguf(tmp_path / "old.gguf", "old")
    point = "copying:20" if fault == "copying" else fault
    with Registry.open(tmp_path / "state", CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    crash_install(tmp_path / "state", smollm2_path, point)
    with Registry.open(tmp_path / "state", CONFIG) as reg:
        if fault == "copying":
            partials = list((tmp_path / "state" / "partial").iterdir())
            assert len(partials) == 1
            assert 0 < partials[0].stat().st_size < smollm2_path.stat().st_size
        assert_invariant(reg, {sha256(old), sha256(smollm2_path)})
        reg.recover()
        active = reg.active(NAME)
        assert active is not None
        assert active.sha256 == sha256(smollm2_path)
        assert active.context_length == 8192
        assert_invariant(reg, {active.sha256})
        assert list((tmp_path / "state" / "partial").iterdir()) == []
        assert reg.installs(unfinished_only=True) == []


@pytest.mark.parametrize("fault", ["copying", "renaming", "activating"])
def test_crash_matrix_real_silero(tmp_path: Path, silero_vad_path: Path, fault: str) -> None:
    """ONNX installs survive crashes the same way (real silero-vad)."""
    old = tiny_gguf(tmp_path / "old.gguf", "old")
    matrix_case(tmp_path / "state", old, silero_vad_path, fault, keep_source=True, tmp_path=tmp_path)


def test_crash_through_the_cli(tmp_path: Path) -> None:
    """`edge-agent models import` honours the fault points too, and the next command recovers the install."""
    state_dir = tmp_path / "state"
    old, new = tiny_gguf(tmp_path / "old.gguf", "old"), tiny_gguf(tmp_path / "new.gguf", "new-model")
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["EDGE_AGENT_CONFIG"] = str(tmp_path / "agent.toml")
    (tmp_path / "agent.toml").write_text("[registry]\nmin_free_bytes = 0\n")

    def cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
        run_env = {**env, FAULT_ENV: fault} if fault else env
        return subprocess.run(
            [sys.executable, "-m", "agent", "--state-dir", str(state_dir), "models", *args],
            env=run_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    assert cli("import", str(old), "--name", NAME, "--variant", VARIANT).returncode == 0
    crashed = cli("import", str(new), "--name", NAME, "--variant", VARIANT, fault="fsynced")
    assert crashed.returncode == FAULT_EXIT_CODE
    listing = cli("list")
    assert listing.returncode == 0, listing.stderr
    assert "recovered interrupted installs" in listing.stderr
    with Registry.open(state_dir, CONFIG) as reg:
        assert assert_invariant(reg, {sha256(new)}) == sha256(new)


def test_crash_loop_quarantined_before_verification(tmp_path: Path) -> None:
    """An install that crashed the agent 3 times (mid-copy) is quarantined instead of retried a 4th time."""
    state_dir = tmp_path / "state"
    old, new = tiny_gguf(tmp_path / "old.gguf", "old"), tiny_gguf(tmp_path / "new.gguf", "new-model")
    with Registry.open(state_dir, CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    crash_install(state_dir, new, "copying")
    for _ in range(2):  # each restart resumes the install, which crashes again
        assert child(state_dir, "recover", fault="copying").returncode == FAULT_EXIT_CODE
    with Registry.open(state_dir, CONFIG) as reg:
        assert reg.installs(unfinished_only=True)[0]["attempts"] == 3
        report = reg.recover()
        assert report.quarantined == [f"{NAME}/{VARIANT}/v2"]
        assert report.resumed == []
        assert reg.installs()[0]["step"] == "quarantined"
        assert assert_invariant(reg, {sha256(old)}) == sha256(old)
        assert list((state_dir / "partial").iterdir()) == []
        assert "install_quarantined" in {e.kind for e in reg.events(limit=1000)}
        assert reg.import_file(new, name=NAME, variant=VARIANT).state == "active"


def test_crash_loop_quarantines_verified_content(tmp_path: Path) -> None:
    """A release that crashed activation 3 times is quarantined; importing the same content again is refused."""
    state_dir = tmp_path / "state"
    old, new = tiny_gguf(tmp_path / "old.gguf", "old"), tiny_gguf(tmp_path / "new.gguf", "new-model")
    with Registry.open(state_dir, CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    crash_install(state_dir, new, "activating")
    for _ in range(2):
        assert child(state_dir, "recover", fault="activating").returncode == FAULT_EXIT_CODE
    with Registry.open(state_dir, CONFIG) as reg:
        report = reg.recover()
        assert report.quarantined == [f"{NAME}/{VARIANT}/v2"]
        assert reg.get(NAME, version=2).state == "quarantined"
        assert assert_invariant(reg, {sha256(old)}) == sha256(old)
        with pytest.raises(QuarantinedError):
            reg.import_file(new, name=NAME, variant=VARIANT)
        assert reg.active(NAME) is not None
        # a different release installs fine
        other = reg.import_file(tiny_gguf(tmp_path / "other.gguf", "other-model"), name=NAME, variant=VARIANT)
        assert other.state == "active"


def test_fewer_crashes_than_the_limit_resume(tmp_path: Path) -> None:
    """Two crashes (below crash_quarantine_after=3) still resume and finish the install."""
    state_dir = tmp_path / "state"
    old, new = tiny_gguf(tmp_path / "old.gguf", "old"), tiny_gguf(tmp_path / "new.gguf", "new-model")
    with Registry.open(state_dir, CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    crash_install(state_dir, new, "verified")
    assert child(state_dir, "recover", fault="renaming").returncode == FAULT_EXIT_CODE
    with Registry.open(state_dir, CONFIG) as reg:
        report = reg.recover()
        assert report.resumed == [f"{NAME}/{VARIANT}/v2"]
        assert assert_invariant(reg, {sha256(new)}) == sha256(new)
        assert reg.installs()[0]["attempts"] == 3


def test_partial_damaged_after_crash_is_recopied(tmp_path: Path) -> None:
    """If a verified-but-unfsynced partial file lost data in the crash, recovery re-copies instead of using it."""
    state_dir = tmp_path / "state"
    old, new = tiny_gguf(tmp_path / "old.gguf", "old"), tiny_gguf(tmp_path / "new.gguf", "new-model")
    with Registry.open(state_dir, CONFIG) as reg:
        reg.import_file(old, name=NAME, variant=VARIANT)
    crash_install(state_dir, new, "verified")
    (partial,) = (state_dir / "partial").iterdir()
    with partial.open("r+b") as f:
        f.truncate(1000)
    with Registry.open(state_dir, CONFIG) as reg:
        reg.recover()
        assert assert_invariant(reg, {sha256(new)}) == sha256(new)
        steps = [e.data.get("step") for e in reg.events(limit=1000) if e.kind == "install_started"]
        assert steps[-1] == "verified"
        assert "install_copying" in [e.kind for e in reg.events(limit=1000)][-12:]


def test_missing_active_blob_is_quarantined_at_recovery(tmp_path: Path) -> None:
    """If the active blob vanished, recovery quarantines that model and falls back to the previous one."""
    state_dir = tmp_path / "state"
    with Registry.open(state_dir, CONFIG) as reg:
        first = reg.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name=NAME, variant=VARIANT)
        second = reg.import_file(tiny_gguf(tmp_path / "b.gguf", "bb"), name=NAME, variant=VARIANT)
        path = reg.blob_path(second)
    path.unlink()
    with Registry.open(state_dir, CONFIG) as reg:
        report = reg.recover()
        assert report.broken_models == [second.ref]
        assert reg.get(NAME, version=2).state == "quarantined"
        assert assert_invariant(reg, {first.sha256}) == first.sha256
