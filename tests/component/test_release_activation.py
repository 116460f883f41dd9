"""A delivered release is activated only after its health check, whatever interrupts it, and only while wanted.

Real parts: ``ReleaseRepository`` (signed metadata) behind ``ArtifactServer`` on a loopback port, python-tuf through
``HttpMetadataSource``, ``HttpBlobFetcher``, the registry and the link store on real SQLite files, the real
``Dispatcher`` and ``ReleaseInstaller``. The one fake is the installer's injected health check (its seam): it
measures fixed numbers, or "kills the agent" by raising :class:`Killed` — a ``BaseException`` nothing in the agent
catches, so the durable state is exactly what a ``kill -9`` at that point leaves. A "restart" is a new dispatcher
and installer over the same registry and link store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import RegistryConfig
from agent.hardware import hardware_profile
from agent.link.dispatch import AssignmentVerifier, Dispatcher
from agent.link.fetch import HttpBlobFetcher
from agent.link.outbox import Outbox
from agent.link.releases import ReleaseInstaller
from agent.link.store import LinkStore
from agent.link.updater import HttpMetadataSource, ReleaseUpdater
from agent.registry import Registry
from controller.link.http import ArtifactServer
from controller.releases import ModelDetails, ReleaseRepository
from protocols.gguf import GgmlType, build_gguf
from protocols.keys import generate_private_key, keyid
from protocols.link import open_sealed, seal
from protocols.messages import Assignment, DesiredModel, Report
from protocols.topics import TopicKind, device_topic

pytestmark = [pytest.mark.component, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent.parent
SILERO = ROOT / ".cache" / "models" / "silero_vad.onnx"
METRICS = {"ttft_ms": 12.5, "tokens_per_s": 40.0, "load_ms": 3.0, "completion_tokens": 16}


class Killed(BaseException):
    """The agent dies here (nothing in the agent catches a BaseException that is not a cancellation)."""


def make_gguf(path: Path, data_bytes: int) -> Path:
    """A valid GGUF of about ``data_bytes`` bytes (one F32 tensor)."""
    path.write_bytes(
        build_gguf(
            {"general.architecture": "llama", "general.name": path.stem},
            [("w.weight", [data_bytes // 4], GgmlType.F32)],
        )
    )
    return path


@dataclass
class Device:
    """One device's durable state (registry, link store) and its current incarnation (dispatcher, installer)."""

    tmp: Path
    registry: Registry
    store: LinkStore
    server: ArtifactServer
    repo: ReleaseRepository
    controller: Any = field(default_factory=generate_private_key)
    key: Any = field(default_factory=generate_private_key)
    checks: list[str] = field(default_factory=list)
    dispatcher: Dispatcher | None = None
    installer: ReleaseInstaller | None = None

    def start(
        self, health: Callable[[Any], Awaitable[Mapping[str, float]]], *, fault: Callable[[str], None] | None = None
    ) -> Dispatcher:
        """(Re)start the agent's link with ``health`` as its health check."""

        async def check(record: Any) -> Mapping[str, float]:
            self.checks.append(record.ref)
            return await health(record)

        self.installer = ReleaseInstaller(
            registry=self.registry,
            updater=ReleaseUpdater(
                self.tmp / "tuf", HttpMetadataSource(self.server.url), bootstrap=self.repo.metadata_bytes("root", 1)
            ),
            fetcher=None,  # type: ignore[arg-type]  # HTTP only: the artifact server always answers
            hardware=lambda: hardware_profile(self.tmp, 2**31),
            store=self.store,
            health_check=check,
            max_check_attempts=3,
            http=HttpBlobFetcher(),
            artifact_url=self.server.url,
        )
        verifier = AssignmentVerifier("dev-1", {keyid(self.controller): self.controller.public_key()}, 1)
        self.dispatcher = Dispatcher(
            store=self.store,
            outbox=Outbox(self.store),
            verifier=verifier,
            registry=self.registry,
            signing_key=self.key,
            installer=self.installer,
            fault=fault,
        )
        return self.dispatcher

    def assignment(self, generation: int, *models: DesiredModel) -> bytes:
        return seal(Assignment("dev-1", generation, 0, models), TopicKind.ASSIGN, [self.controller])

    async def reports(self) -> list[Report]:
        found = []
        for item in await Outbox(self.store).due(limit=100):
            opened = open_sealed(
                device_topic("dev-1", TopicKind.REPORT), item.payload, {keyid(self.key): self.key.public_key()}
            )
            assert isinstance(opened.message, Report)
            found.append(opened.message)
        return found

    def active_version(self, name: str = "tiny") -> int | None:
        active = self.registry.active(name)
        return None if active is None else active.version


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[Device]:
    """silero-vad v1 active; the repository publishes tiny v2 (a GGUF)."""
    repo = ReleaseRepository.create(tmp_path / "repo")
    repo.add_model(
        make_gguf(tmp_path / "tiny-2.gguf", 300_000),
        name="tiny",
        variant="q4_0",
        version=2,
        details=ModelDetails(chunk_size=64 * 1024),
    )
    repo.publish()
    registry = Registry.open(tmp_path / "agent", RegistryConfig())
    registry.recover()
    registry.import_file(SILERO, name="silero-vad", variant="onnx-fp32", version=1, activate=True)
    store = await asyncio.to_thread(LinkStore.open, tmp_path / "link.db")
    async with ArtifactServer(repo, "127.0.0.1", 0) as server:
        yield Device(tmp_path, registry, store, server, repo)
    await asyncio.to_thread(store.close)
    registry.close()


def tiny(device: Device, version: int = 2) -> DesiredModel:
    target = device.repo.target(f"models/tiny/{version}/q4_0.gguf")
    return DesiredModel("tiny", version, "q4_0", target.path, target.hashes["sha256"], target.length)


def vad(device: Device) -> DesiredModel:
    record = device.registry.get("silero-vad", "onnx-fp32", 1)
    return DesiredModel("silero-vad", 1, "onnx-fp32", "models/silero-vad/1/onnx-fp32.onnx", record.sha256, record.size)


def with_tiny_v1(device: Device) -> None:
    """tiny v1 installed and active: the model a failed v2 must leave active."""
    device.registry.import_file(make_gguf(device.tmp / "tiny-1.gguf", 200_000), name="tiny", variant="q4_0", version=1)


async def healthy(record: Any) -> Mapping[str, float]:
    return METRICS


async def killed(record: Any) -> Mapping[str, float]:
    raise Killed


# --- fault 1: a health check the agent did not survive ---------------------------------------------------------------


async def test_release_whose_health_check_was_interrupted_is_checked_again_after_a_restart(device: Device) -> None:
    """A restart during the health check never activates the release unchecked: it is checked again, and the
    report carries the numbers of that check."""
    with_tiny_v1(device)
    dispatcher = device.start(killed)
    assert await dispatcher.on_assign(device.assignment(2, vad(device), tiny(device))) == "accepted"
    with pytest.raises(Killed):
        await dispatcher.reconcile()
    assert device.registry.get("tiny", "q4_0", 2).state == "staged"
    assert device.active_version() == 1

    await device.start(healthy).reconcile()  # the restart
    assert device.checks == ["tiny/q4_0/v2", "tiny/q4_0/v2"], "checked again before it was activated"
    assert device.active_version() == 2
    (report,) = [r for r in await device.reports() if r.model is not None and r.model.name == "tiny"]
    assert (report.generation, report.kind, report.outcome) == (2, "install", "ok")
    assert dict(report.metrics) == METRICS, "the controller's tokens/s and TTFT gates get the device's numbers"
    assert await device.store.run(device.store.health_check, ("tiny", "q4_0", 2, tiny(device).sha256)) is None


async def test_release_that_kills_the_agent_in_every_health_check_is_quarantined_after_the_limit(
    device: Device,
) -> None:
    """A release whose health check never finishes (crash, OOM kill) is checked at most max_check_attempts times,
    then quarantined and reported failed; the previous model stays active and the device stops crash-looping."""
    with_tiny_v1(device)
    dispatcher = device.start(killed)
    assert await dispatcher.on_assign(device.assignment(2, vad(device), tiny(device))) == "accepted"
    for _ in range(3):  # the install's own check, then two restarts: each dies in the check
        with pytest.raises(Killed):
            await dispatcher.reconcile()
        dispatcher = device.start(killed)
    await dispatcher.reconcile()  # the fourth start: no fourth check
    assert device.checks == ["tiny/q4_0/v2"] * 3
    assert device.registry.get("tiny", "q4_0", 2).state == "quarantined"
    assert device.active_version() == 1, "the previously active model stays active"
    assert await dispatcher.accepted_generation() == (2, 2)
    (report,) = [r for r in await device.reports() if r.model is not None and r.model.name == "tiny"]
    assert (report.generation, report.kind, report.outcome) == (2, "health", "failed")
    assert "never finished in 3 attempt" in report.reason
    await dispatcher.reconcile()  # the retained assignment again: nothing changes, nothing is reported
    assert device.active_version() == 1
    assert len(await device.reports()) == 2


async def test_crash_between_activation_and_report_keeps_the_health_check_numbers(device: Device) -> None:
    """A crash after the activation, before the "applied" mark and its report, loses neither: the report after
    the restart carries the numbers the check measured, and the model is not checked a second time."""
    dispatcher = device.start(
        healthy, fault=lambda point: (_ for _ in ()).throw(Killed()) if point == "applied" else None
    )
    assert await dispatcher.on_assign(device.assignment(2, tiny(device))) == "accepted"
    with pytest.raises(Killed):
        await dispatcher.reconcile()
    assert device.active_version() == 2
    assert await device.reports() == []

    await device.start(healthy).reconcile()
    assert device.checks == ["tiny/q4_0/v2"]
    (report,) = await device.reports()
    assert (report.generation, report.kind, report.outcome) == (2, "install", "ok")
    assert dict(report.metrics) == METRICS


async def test_health_check_cancelled_by_a_clean_stop_is_not_counted(device: Device) -> None:
    """A check cancelled because the agent stops (SIGTERM) is not the model's doing: it does not count towards
    the quarantine, and the release stays staged for the next start to check."""
    started = asyncio.Event()

    async def hangs(record: Any) -> Mapping[str, float]:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    dispatcher = device.start(hangs)
    assert await dispatcher.on_assign(device.assignment(2, tiny(device))) == "accepted"
    task = asyncio.create_task(dispatcher.reconcile())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await device.store.run(device.store.health_check, ("tiny", "q4_0", 2, tiny(device).sha256))
    assert row is not None
    assert (row.state, row.attempts) == ("running", 0)
    assert device.registry.get("tiny", "q4_0", 2).state == "staged"
    await device.start(healthy).reconcile()
    assert device.active_version() == 2


async def test_staged_release_is_health_checked_before_the_dispatcher_activates_it(device: Device) -> None:
    """A desired release found staged (imported without activation) goes through the same health check, and a
    failing one is quarantined with the previous model kept active."""
    with_tiny_v1(device)
    device.registry.import_file(
        make_gguf(device.tmp / "tiny-2-local.gguf", 100_000), name="tiny", variant="q4_0", version=3, activate=False
    )
    staged = device.registry.get("tiny", "q4_0", 3)
    model = DesiredModel("tiny", 3, "q4_0", "models/tiny/3/q4_0.gguf", staged.sha256, staged.size)

    async def unhealthy(record: Any) -> Mapping[str, float]:
        from agent.errors import InferenceError

        raise InferenceError("cannot load")

    dispatcher = device.start(unhealthy)
    assert await dispatcher.on_assign(device.assignment(2, model)) == "accepted"
    await dispatcher.reconcile()
    assert device.checks == ["tiny/q4_0/v3"]
    assert device.registry.get("tiny", "q4_0", 3).state == "quarantined"
    assert device.active_version() == 1
    (report,) = await device.reports()
    assert (report.kind, report.outcome) == ("health", "failed")


# --- fault 2: a newer assignment (a rollback) accepted while an install runs -----------------------------------------


async def test_rollback_accepted_during_the_health_check_stops_the_activation(device: Device) -> None:
    """The first release of a family, rolled back while it is health-checked, is never activated: the newer
    generation alone decides (the family keeps no active model), and the old one's report says why."""
    dispatcher: Dispatcher | None = None

    async def rollback_meanwhile(record: Any) -> Mapping[str, float]:
        assert dispatcher is not None
        assert await dispatcher.on_assign(device.assignment(3, vad(device))) == "accepted"
        return METRICS

    dispatcher = device.start(rollback_meanwhile)
    assert await dispatcher.on_assign(device.assignment(2, vad(device), tiny(device))) == "accepted"
    await dispatcher.reconcile()
    assert device.checks == ["tiny/q4_0/v2"]
    assert device.active_version() is None, "the rolled-back release is not activated"
    assert device.registry.get("tiny", "q4_0", 2).state == "staged", "its verified blob is kept"
    await dispatcher.reconcile()  # woken by the accepted rollback
    assert await dispatcher.accepted_generation() == (3, 3)
    assert device.active_version() is None
    assert device.active_version("silero-vad") == 1
    reports = [(r.generation, r.model.name if r.model else None, r.kind, r.outcome) for r in await device.reports()]
    assert reports == [
        (2, "silero-vad", "install", "ok"),
        (2, "tiny", "install", "failed"),
        (3, "silero-vad", "install", "ok"),
    ]
    tiny_report = (await device.reports())[1]
    assert "superseded" in tiny_report.reason
    assert "generation 3" in tiny_report.reason


async def test_rollback_accepted_before_the_download_fetches_nothing(device: Device) -> None:
    """An install asked to stop before its download fetches nothing; asked after the download, it keeps the
    verified blob staged and neither health-checks nor activates it."""
    installer = device.start(healthy) and device.installer
    assert installer is not None

    async def stop() -> str | None:
        return "generation 3 was accepted meanwhile"

    outcome = await installer.install(tiny(device), superseded=stop)
    assert (outcome.kind, outcome.outcome) == ("install", "failed")
    assert "superseded before its download" in outcome.reason
    assert device.registry.list_models("tiny") == []
    assert not installer.partial_path(tiny(device).sha256).exists()

    answers = iter([None, "generation 3 was accepted meanwhile"])

    async def after_download() -> str | None:
        return next(answers)

    outcome = await installer.install(tiny(device), superseded=after_download)
    assert "superseded before its health check" in outcome.reason
    assert device.registry.get("tiny", "q4_0", 2).state == "staged"
    assert device.checks == []
    assert device.active_version() is None


async def test_newer_generation_that_still_wants_the_release_does_not_stop_it(device: Device) -> None:
    """A newer generation that asks for the same release (re-signed after a key rotation, another model's deploy)
    lets the install finish: only an assignment that no longer wants the model stops it."""
    dispatcher: Dispatcher | None = None

    async def resigned_meanwhile(record: Any) -> Mapping[str, float]:
        assert dispatcher is not None
        assert await dispatcher.on_assign(device.assignment(3, vad(device), tiny(device))) == "accepted"
        return METRICS

    dispatcher = device.start(resigned_meanwhile)
    assert await dispatcher.on_assign(device.assignment(2, vad(device), tiny(device))) == "accepted"
    await dispatcher.reconcile()
    assert device.active_version() == 2
    tiny_reports = [r for r in await device.reports() if r.model is not None and r.model.name == "tiny"]
    assert [(r.generation, r.outcome, dict(r.metrics)) for r in tiny_reports] == [(2, "ok", METRICS)]


# --- fault 3: a crash right after the assignment was applied ---------------------------------------------------------


async def test_assignment_applied_is_audited_before_the_applied_mark_so_a_crash_never_loses_it(device: Device) -> None:
    """``assignment.applied`` is recorded before link.db marks the generation applied: a crash in between applies
    and records it again (at least once), never leaves an applied generation without its record."""
    recorded: list[tuple[str, int, tuple[int, int]]] = []
    crash = [True]

    async def audit(kind: str, actor: str, data: Mapping[str, Any]) -> None:
        assert device.dispatcher is not None
        recorded.append((kind, data["generation"], await device.dispatcher.accepted_generation()))
        if crash[0]:
            crash[0] = False
            raise Killed  # the agent dies right after the record was committed

    dispatcher = device.start(healthy)
    dispatcher.audit = audit
    assert await dispatcher.on_assign(device.assignment(2, vad(device))) == "accepted"
    with pytest.raises(Killed):
        await dispatcher.reconcile()
    dispatcher = device.start(healthy)  # the restart
    dispatcher.audit = audit
    await dispatcher.reconcile()
    assert await dispatcher.accepted_generation() == (2, 2)
    assert [(kind, generation) for kind, generation, _ in recorded] == [("assignment.applied", 2)] * 2
    assert all(applied == (2, 0) for _, _, applied in recorded)  # each record came before the mark
