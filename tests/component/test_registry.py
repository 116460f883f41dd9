"""Component tests for agent/registry: real SQLite files, real blob store, the real SmolLM2 and silero models.

Small synthetic GGUF files (``build_gguf``) stand in where only distinct valid content matters.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import AgentContext
from agent.cli_models import models
from agent.config import RegistryConfig
from agent.errors import (
    InsufficientSpaceError,
    IntegrityError,
    InvalidModelError,
    ModelNotFoundError,
    ModelStateError,
    QuarantinedError,
    RegistryError,
)
from agent.registry import Registry, validate_gguf
from agent.registry.formats import validate_onnx
from agent.registry.gguf import GgmlType, build_gguf

pytestmark = pytest.mark.component

CONFIG = RegistryConfig(min_free_bytes=0)


def tiny_gguf(path: Path, tag: str, *, context_length: int = 256) -> Path:
    """Write a small valid GGUF whose content (and so sha256) depends on ``tag``."""
    path.write_bytes(
        build_gguf(
            {
                "general.architecture": "llama",
                "general.name": f"tiny-{tag}",
                "llama.context_length": context_length,
                "tokenizer.chat_template": "{{ messages }}",
            },
            [("output_norm.weight", [8], GgmlType.F32)],
        )
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def registry(state_dir: Path) -> Iterator[Registry]:
    reg = Registry.open(state_dir, CONFIG)
    reg.recover()
    yield reg
    reg.close()


def snapshot(reg: Registry) -> dict[str, Any]:
    """Everything an import could change: models, installs, blobs, partial files."""
    return {
        "models": [(m.ref, m.state, m.sha256) for m in reg.list_models(include_removed=True)],
        "installs": [(i["id"], i["step"]) for i in reg.installs()],
        "blobs": sorted(p.name for p in (reg.state_dir / "blobs" / "sha256").iterdir()),
        "partial": sorted(p.name for p in (reg.state_dir / "partial").iterdir()),
    }


# --- real models ----------------------------------------------------------------------------------------------


def test_gguf_validator_on_real_smollm2(smollm2_path: Path) -> None:
    """The real SmolLM2 file validates: llama architecture, 8192 context, chat template, Q4_1, 49152 tokens."""
    started = time.perf_counter()
    info = validate_gguf(smollm2_path)
    assert time.perf_counter() - started < 1.0
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert info.has_chat_template
    assert info.quant == "Q4_1"
    assert info.vocab_size == 49152
    assert info.tensor_count == 272
    assert 130_000_000 < info.parameter_count < 140_000_000
    assert info.data_offset + max(t.offset + t.n_bytes for t in info.tensors) == smollm2_path.stat().st_size


def test_import_real_smollm2_and_silero(registry: Registry, smollm2_path: Path, silero_vad_path: Path) -> None:
    """Importing the real GGUF and ONNX models records their facts and stores byte-identical, read-only blobs."""
    llm = registry.import_file(smollm2_path, name="smollm2-135m-instruct", variant="q4_1")
    assert (llm.format, llm.version, llm.state) == ("gguf", 1, "active")
    assert llm.sha256 == sha256(smollm2_path)
    assert llm.size == smollm2_path.stat().st_size
    assert llm.context_length == 8192
    assert llm.licence == "apache-2.0"
    assert llm.params is not None
    assert llm.params > 100_000_000
    assert llm.metadata["architecture"] == "llama"
    assert llm.metadata["chat_template"] is True
    assert llm.metadata["quant"] == "Q4_1"
    vad = registry.import_file(silero_vad_path, name="silero-vad", variant="onnx-fp32")
    assert (vad.format, vad.state) == ("onnx", "active")
    assert vad.metadata["ir_version"] >= 3
    for record, source in ((llm, smollm2_path), (vad, silero_vad_path)):
        blob = registry.blob_path(record)
        assert blob == registry.state_dir / "blobs" / "sha256" / record.sha256
        assert blob.read_bytes() == source.read_bytes()
        assert blob.stat().st_mode & 0o222 == 0
    assert {m.name for m in registry.active_models()} == {"smollm2-135m-instruct", "silero-vad"}
    assert list((registry.state_dir / "partial").iterdir()) == []


def test_import_with_matching_expected_sha256(registry: Registry, silero_vad_path: Path) -> None:
    """An import whose expected sha256 matches (any case) succeeds."""
    record = registry.import_file(
        silero_vad_path, name="silero-vad", variant="onnx-fp32", expected_sha256=sha256(silero_vad_path).upper()
    )
    assert record.sha256 == sha256(silero_vad_path)


def test_onnx_check_rejects_truncated_silero(silero_vad_path: Path, tmp_path: Path) -> None:
    """The ONNX structural check accepts the real model and rejects it cut short at any of several points."""
    data = silero_vad_path.read_bytes()
    assert validate_onnx(silero_vad_path).ir_version == 8
    for cut in (1, 3, 10, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidModelError):
            validate_onnx(path)


@settings(max_examples=200)
@given(body=st.binary(max_size=200))
def test_onnx_check_never_crashes(body: bytes) -> None:
    """Arbitrary bytes given to the ONNX check yield InvalidModelError or a result, never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.onnx"
        path.write_bytes(b"\x08\x08" + body)
        with contextlib.suppress(InvalidModelError):
            validate_onnx(path)


def test_tensorless_gguf_rejected(registry: Registry, tmp_path: Path) -> None:
    """A GGUF without tensors (vocabulary only) is not accepted as a model."""
    src = tmp_path / "vocab.gguf"
    src.write_bytes(build_gguf({"general.architecture": "llama"}))
    with pytest.raises(InvalidModelError, match="no tensors"):
        registry.import_file(src, name="vocab", variant="f32")


# --- activate / rollback / rm / gc ----------------------------------------------------------------------------


def test_versions_activate_and_rollback(registry: Registry, tmp_path: Path) -> None:
    """New versions number upwards and take over; rollback is to the previous one; activate picks any version."""
    v1 = registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
    v2 = registry.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="f32")
    assert (v1.version, v2.version) == (1, 2)
    assert registry.get("tiny", version=1).state == "previous"
    assert registry.active("tiny") == registry.get("tiny")
    assert registry.get("tiny").version == 2

    rolled = registry.rollback("tiny")
    assert (rolled.version, rolled.state) == (1, "active")
    assert registry.get("tiny", version=2).state == "staged"
    with pytest.raises(ModelStateError, match="no previous"):
        registry.rollback("tiny")

    again = registry.activate("tiny", version=2)
    assert again.state == "active"
    assert registry.get("tiny", version=1).state == "previous"
    kinds = [e.kind for e in registry.events(limit=10, name="tiny")]
    assert "model_rolled_back" in kinds
    assert kinds[-1] == "model_activated"


def test_no_activate_stages_only(registry: Registry, tmp_path: Path) -> None:
    """--no-activate installs the model as staged and leaves the active one alone."""
    registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
    staged = registry.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="f32", activate=False)
    assert staged.state == "staged"
    active = registry.active("tiny")
    assert active is not None
    assert active.version == 1


def test_one_active_model_per_name_enforced_by_database(registry: Registry, tmp_path: Path) -> None:
    """Even a direct SQL write cannot make two models of one name active."""
    registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
    registry.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="q8_0", activate=False)
    with pytest.raises(sqlite3.IntegrityError):
        registry._db.execute("UPDATE models SET state = 'active' WHERE variant = 'q8_0'")


def test_ambiguous_and_missing_selectors(registry: Registry, tmp_path: Path) -> None:
    """Unknown models are not found; several variants of one version without --variant is ambiguous."""
    with pytest.raises(ModelNotFoundError):
        registry.get("nothing")
    with pytest.raises(ModelNotFoundError):
        registry.activate("nothing")
    registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32", version=3, activate=False)
    registry.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="q8_0", version=3, activate=False)
    with pytest.raises(ModelStateError, match="several variants"):
        registry.activate("tiny")
    assert registry.activate("tiny", variant="q8_0").variant == "q8_0"
    with pytest.raises(ModelStateError, match="already exists"):
        registry.import_file(tmp_path / "a.gguf", name="tiny", variant="f32", version=3)


def test_remove_refuses_active_without_force(registry: Registry, tmp_path: Path) -> None:
    """rm refuses the active model unless forced; removed blobs are deleted once unreferenced."""
    v1 = registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
    v2 = registry.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="f32")
    with pytest.raises(ModelStateError, match="is active"):
        registry.remove("tiny")
    assert registry.get("tiny").state == "active"

    removed = registry.remove("tiny", version=1)
    assert [r.ref for r in removed] == [v1.ref]
    assert not registry.blob_path(v1).exists()
    with pytest.raises(ModelNotFoundError):
        registry.get("tiny", version=1)
    assert [m.state for m in registry.list_models(include_removed=True) if m.version == 1] == ["removed"]

    registry.remove("tiny", force=True)
    assert registry.active("tiny") is None
    assert not registry.blob_path(v2).exists()
    with pytest.raises(ModelNotFoundError):
        registry.remove("tiny")


def test_shared_blob_kept_while_referenced(registry: Registry, tmp_path: Path) -> None:
    """Two models with identical content share one blob, deleted only when the last reference goes."""
    src = tiny_gguf(tmp_path / "a.gguf", "a")
    one = registry.import_file(src, name="tiny", variant="f32")
    registry.import_file(src, name="other", variant="f32")
    registry.remove("tiny", force=True)
    assert registry.blob_path(one).exists()
    registry.remove("other", force=True)
    assert not registry.blob_path(one).exists()


def test_gc_keeps_active_and_previous(state_dir: Path, tmp_path: Path) -> None:
    """GC keeps the active model and keep_previous previous ones, removes older ones, orphans and stale partials."""
    with Registry.open(state_dir, RegistryConfig(min_free_bytes=0, keep_previous=1)) as reg:
        records = [
            reg.import_file(tiny_gguf(tmp_path / f"{i}.gguf", str(i)), name="tiny", variant="f32") for i in range(4)
        ]
        orphan = state_dir / "blobs" / "sha256" / ("0" * 64)
        orphan.write_bytes(b"orphan")
        stale = state_dir / "partial" / "deadbeef.part"
        stale.write_bytes(b"partial")
        result = reg.gc()
        assert set(result.removed_models) == {records[0].ref, records[1].ref}
        assert result.deleted_blobs == 3
        assert result.deleted_partials == 1
        assert not orphan.exists()
        assert not stale.exists()
        states = {m.version: m.state for m in reg.list_models("tiny")}
        assert states == {4: "active", 3: "previous"}
        assert reg.rollback("tiny").version == 3
        assert reg.gc().removed_models == ()


def test_gc_disk_quota_removes_staged_then_previous(state_dir: Path, tmp_path: Path, silero_vad_path: Path) -> None:
    """Over quota, GC removes staged then previous models, never the active one, and reports if still over."""
    size = silero_vad_path.stat().st_size
    with Registry.open(state_dir, RegistryConfig(min_free_bytes=0, keep_previous=5)) as reg:
        reg.import_file(silero_vad_path, name="vad", variant="onnx-fp32")
        reg.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
        reg.import_file(tiny_gguf(tmp_path / "b.gguf", "b"), name="tiny", variant="f32")
        reg.import_file(tiny_gguf(tmp_path / "c.gguf", "c"), name="tiny", variant="f32", activate=False)
    with Registry.open(
        state_dir, RegistryConfig(min_free_bytes=0, keep_previous=5, disk_quota_bytes=size + 500)
    ) as reg:
        result = reg.gc()
        assert result.removed_models == ("tiny/f32/v3", "tiny/f32/v1")
        assert not result.over_quota
        assert {m.ref for m in reg.active_models()} == {"vad/onnx-fp32/v1", "tiny/f32/v2"}
    with Registry.open(state_dir, RegistryConfig(min_free_bytes=0, disk_quota_bytes=100)) as reg:
        result = reg.gc()
        assert result.over_quota
        assert len(reg.active_models()) == 2


def test_quarantine_active_rolls_back(registry: Registry, tmp_path: Path) -> None:
    """Quarantining the active model re-activates the previous one and blocks re-activation and re-import."""
    src = tiny_gguf(tmp_path / "b.gguf", "b")
    registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
    bad = registry.import_file(src, name="tiny", variant="f32")
    quarantined = registry.quarantine(bad, "health check failed")
    assert quarantined.state == "quarantined"
    active = registry.active("tiny")
    assert active is not None
    assert active.version == 1
    with pytest.raises(QuarantinedError, match="health check failed"):
        registry.activate("tiny", version=2)
    before = snapshot(registry)
    with pytest.raises(QuarantinedError):
        registry.import_file(src, name="tiny", variant="f32")
    after = snapshot(registry)
    assert after["models"] == before["models"]
    assert after["partial"] == []
    with pytest.raises(QuarantinedError):
        registry.import_file(src, name="tiny", variant="f32", expected_sha256=bad.sha256)
    registry.remove("tiny", version=2)
    assert registry.import_file(src, name="tiny", variant="f32").version == 3


def test_events_are_append_only(registry: Registry, tmp_path: Path) -> None:
    """Every state change leaves an event, and the event table refuses UPDATE and DELETE."""
    registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32")
    kinds = [e.kind for e in registry.events()]
    assert kinds[0] == "install_planned"
    assert {"model_staged", "model_activated", "install_done"} <= set(kinds)
    assert [e.seq for e in registry.events()] == sorted(e.seq for e in registry.events())
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        registry._db.execute("UPDATE model_events SET kind = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        registry._db.execute("DELETE FROM model_events")


def test_second_process_lock_refused(registry: Registry, state_dir: Path) -> None:
    """Only one Registry may have a state directory open; the second gets a clear error."""
    with pytest.raises(RegistryError, match="in use by another process"):
        Registry.open(state_dir, CONFIG)


def test_database_settings(registry: Registry) -> None:
    """The registry database runs in WAL mode with synchronous=FULL."""
    assert registry._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert registry._db.execute("PRAGMA synchronous").fetchone()[0] == 2


# --- refusals that change nothing -----------------------------------------------------------------------------

BAD_NAMES = ["../x", "%2e%2e", "..", "a\x00b", "x" * 10_000, "", "UPPER", "a/b", " a", "a\n", "é"]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_names_rejected_nothing_changed(registry: Registry, tmp_path: Path, bad: str) -> None:
    """Path-traversal, encoded, NUL, 10 kB and other odd names and variants are rejected and change nothing."""
    src = tiny_gguf(tmp_path / "a.gguf", "a")
    registry.import_file(src, name="tiny", variant="f32")
    before = snapshot(registry)
    with pytest.raises(InvalidModelError, match="invalid model name") as name_error:
        registry.import_file(src, name=bad, variant="f32")
    with pytest.raises(InvalidModelError, match="invalid variant"):
        registry.import_file(src, name="tiny", variant=bad)
    assert len(str(name_error.value)) < 300
    assert snapshot(registry) == before


@pytest.mark.parametrize("bad", [-1, True, "3", 2**60])
def test_bad_versions_rejected(registry: Registry, tmp_path: Path, bad: Any) -> None:
    """Versions must be non-negative integers of sane size."""
    with pytest.raises(InvalidModelError, match="invalid version"):
        registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="tiny", variant="f32", version=bad)


def test_wrong_sha256_rejected_active_unchanged(registry: Registry, tmp_path: Path, silero_vad_path: Path) -> None:
    """A wrong expected sha256 raises IntegrityError; the active model, blobs and partial dir are unchanged."""
    old = registry.import_file(silero_vad_path, name="vad", variant="onnx-fp32")
    before = snapshot(registry)
    with pytest.raises(IntegrityError, match="sha256"):
        registry.import_file(tiny_gguf(tmp_path / "a.gguf", "a"), name="vad", variant="f32", expected_sha256="ab" * 32)
    after = snapshot(registry)
    assert registry.active("vad") == old
    assert after["models"] == before["models"]
    assert after["blobs"] == before["blobs"]
    assert after["partial"] == []
    assert registry.installs()[0]["step"] == "failed"
    assert registry.events()[-1].kind == "install_rejected"


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        (b"not a model at all", ".bin", "unknown model format"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, ".gguf", "tensor count"),
        (b"\x08\x08\x12\x02ab", ".onnx", "no graph"),
    ],
)
def test_invalid_files_rejected(registry: Registry, tmp_path: Path, content: bytes, suffix: str, match: str) -> None:
    """Files that are not valid GGUF or ONNX are rejected with a clear error and leave no model or partial file."""
    src = tmp_path / f"bad{suffix}"
    src.write_bytes(content)
    with pytest.raises(InvalidModelError, match=match):
        registry.import_file(src, name="bad", variant="x")
    assert registry.list_models() == []
    assert list((registry.state_dir / "partial").iterdir()) == []
    assert list((registry.state_dir / "blobs" / "sha256").iterdir()) == []


def test_unreadable_sources_rejected(registry: Registry, tmp_path: Path) -> None:
    """Missing files, directories and empty files are rejected before anything is planned."""
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for src, match in ((tmp_path / "missing.gguf", "cannot read"), (tmp_path, "not a regular file"), (empty, "empty")):
        with pytest.raises(InvalidModelError, match=match):
            registry.import_file(src, name="x", variant="y")
    assert registry.installs() == []


def test_disk_quota_refused_before_copying(state_dir: Path, silero_vad_path: Path) -> None:
    """An import over the disk quota is refused before any byte is copied: no partial file, no model."""
    with Registry.open(state_dir, RegistryConfig(min_free_bytes=0, disk_quota_bytes=1000)) as reg:
        with pytest.raises(InsufficientSpaceError, match="quota"):
            reg.import_file(silero_vad_path, name="vad", variant="onnx-fp32")
        assert reg.list_models() == []
        assert reg.installs() == []
        assert list((state_dir / "partial").iterdir()) == []
        assert [e.kind for e in reg.events()] == ["install_refused"]


def test_free_space_floor_refused_before_copying(state_dir: Path, silero_vad_path: Path) -> None:
    """An import that would leave less than min_free_bytes free is refused before copying."""
    with Registry.open(state_dir, RegistryConfig(min_free_bytes=2**62)) as reg:
        with pytest.raises(InsufficientSpaceError, match="not enough disk space"):
            reg.import_file(silero_vad_path, name="vad", variant="onnx-fp32")
        assert reg.installs() == []
        assert list((state_dir / "partial").iterdir()) == []


# --- CLI ------------------------------------------------------------------------------------------------------


def run_cli(state_dir: Path, *args: str) -> Any:
    ctx = AgentContext(config_path=None, state_dir=state_dir, socket_path=None)
    return CliRunner().invoke(models, list(args), obj=ctx, catch_exceptions=False)


def test_cli_import_list_show_activate_rollback_rm_gc(state_dir: Path, tmp_path: Path, silero_vad_path: Path) -> None:
    """The models commands work end to end on a state directory."""
    a, b = tiny_gguf(tmp_path / "a.gguf", "a"), tiny_gguf(tmp_path / "b.gguf", "b")
    result = run_cli(state_dir, "import", str(a), "--name", "tiny", "--variant", "f32")
    assert result.exit_code == 0, result.output
    assert "imported tiny/f32/v1" in result.output
    assert run_cli(state_dir, "import", str(b), "--name", "tiny", "--variant", "f32").exit_code == 0
    assert run_cli(state_dir, "import", str(silero_vad_path), "--name", "vad", "--variant", "onnx").exit_code == 0
    listing = run_cli(state_dir, "list")
    assert listing.exit_code == 0
    for text in ("tiny", "vad", "onnx", "previous", "active", sha256(a)[:12]):
        assert text in listing.output
    show = run_cli(state_dir, "show", "tiny")
    assert "tiny/f32/v2" in show.output
    assert "chat_template" in show.output
    assert "rolled back: tiny/f32/v1" in run_cli(state_dir, "rollback", "tiny").output
    assert "active: tiny/f32/v2" in run_cli(state_dir, "activate", "tiny", "--version", "2").output
    assert "removed tiny/f32/v1" in run_cli(state_dir, "rm", "tiny", "--version", "1").output
    assert "deleted 0 blob(s)" in run_cli(state_dir, "gc").output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "{a}", "--name", "../x", "--variant", "f32"], "invalid model name"),
        (["import", "{a}", "--name", "x" * 10_000, "--variant", "f32"], "invalid model name"),
        (["import", "{missing}", "--name", "x", "--variant", "f32"], "cannot read"),
        (["import", "{a}", "--name", "x", "--variant", "f32", "--sha256", "00" * 32], "sha256"),
        (["import", "{a}", "--name", "x", "--variant", "f32", "--sha256", "nothex"], "invalid expected sha256"),
        (["activate", "nothing"], "no model"),
        (["rollback", "nothing"], "no previous"),
        (["rm", "nothing"], "no model"),
        (["show", "nothing"], "no model"),
    ],
)
def test_cli_errors_are_clean(state_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    """Bad names, files, hashes and selectors exit non-zero with one clear line, never a traceback."""
    a = tiny_gguf(tmp_path / "a.gguf", "a")
    argv = [arg.format(a=a, missing=tmp_path / "missing.gguf") for arg in args]
    result = run_cli(state_dir, *argv)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output) < 400


def test_cli_space_error_is_clean(tmp_path: Path, silero_vad_path: Path) -> None:
    """No space: a clear error and exit status 1 (the config file sets the quota)."""
    config = tmp_path / "agent.toml"
    config.write_text("[registry]\ndisk_quota_bytes = 1000\nmin_free_bytes = 0\n")
    ctx = AgentContext(config_path=config, state_dir=tmp_path / "state", socket_path=None)
    result = CliRunner().invoke(
        models, ["import", str(silero_vad_path), "--name", "v", "--variant", "x"], obj=ctx, catch_exceptions=False
    )
    assert result.exit_code == 1
    assert "disk quota exceeded" in result.output
