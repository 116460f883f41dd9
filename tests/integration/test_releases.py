"""Signed model releases end to end: `model add/publish`, `deploy`, TUF over MQTT, chunked delivery, install.

Each test runs a private Mosquitto with the configuration ``edge-fleet init`` generated, the real ``serve`` and a
real agent link over a real registry (see ``tests/fleet_harness.py``). Models are small synthetic but valid GGUF
files (``protocols.gguf.build_gguf``) except where the real SmolLM2 file is named.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import free_port
from fleet_harness import FAST_LINK, Fleet, TcpProxy, running_fleet, wait_for

from agent.api import ApiServer, ApiState, TokenStore
from agent.config import ApiConfig, InferenceConfig, RegistryConfig
from agent.health import model_health_check
from agent.inference import ModelPool
from agent.link.mqtt import open_agent_link
from agent.registry import Registry
from controller.releases import ReleaseRepository
from protocols.gguf import GgmlType, build_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHUNK = 64 * 1024


def make_gguf(path: Path, data_bytes: int, *, name: str = "tiny") -> Path:
    """A valid GGUF of about ``data_bytes`` bytes (one F32 tensor) at ``path``."""
    floats = data_bytes // 4
    path.write_bytes(
        build_gguf({"general.architecture": "llama", "general.name": name}, [("w.weight", [floats], GgmlType.F32)])
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outcome_reports(fleet: Fleet, device: str) -> list[dict[str, Any]]:
    """Reports about models (install, health, refusal), oldest first."""
    return [r for r in fleet.reports(device) if r["kind"] in ("install", "health", "refusal", "error")]


async def wait_report(fleet: Fleet, device: str, *, count: int = 1, within: float = 40.0) -> dict[str, Any]:
    """The ``count``-th model report of ``device`` (waits for it)."""

    def enough() -> list[dict[str, Any]] | None:
        found = [r for r in outcome_reports(fleet, device) if r.get("model")]
        return found if len(found) >= count else None

    found = await wait_for(enough, within=within, what=f"{count} model report(s) from {device}")
    return found[count - 1]  # type: ignore[no-any-return]


def publish(fleet: Fleet, path: Path, *args: str, name: str = "tiny", variant: str = "q4_0") -> None:
    fleet.cli("model", "add", str(path), "--name", name, "--variant", variant, "--chunk-size", str(CHUNK), *args)
    fleet.cli("model", "publish")


async def test_published_release_is_delivered_installed_and_activated(tmp_path: Path) -> None:
    """add → publish → deploy: the agent verifies TUF metadata over MQTT, fetches the chunks, installs, activates."""
    async with running_fleet(tmp_path) as fleet:
        model = make_gguf(tmp_path / "tiny.gguf", 600_000)
        publish(fleet, model)
        agent = fleet.enroll("dev1", models=(1,))
        await fleet.start_server()
        await agent.start()
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1")
        assert report["outcome"] == "ok", report
        active = agent.registry.active("tiny")
        assert active is not None
        assert active.sha256 == sha256(model)
        assert active.version == 1
        assert agent.registry.active("silero-vad") is not None  # the installed model is untouched


async def started(fleet: Fleet, device: str = "dev1", **enroll: Any) -> Any:
    """Enroll ``device`` (silero-vad v1 active), start serve and the agent; return the agent."""
    agent = fleet.enroll(device, models=(1,), **enroll)
    await fleet.start_server()
    await agent.start()
    return agent


def assert_unchanged(agent: Any, name: str = "tiny") -> None:
    """The refused release left no model behind, and the model that was active still is."""
    assert [m for m in agent.registry.list_models(name, include_removed=True)] == []
    active = agent.registry.active("silero-vad")
    assert active is not None
    assert active.version == 1


async def test_tampered_chunk_is_refused_and_reported(tmp_path: Path) -> None:
    """A blob changed on the server (same length) fails per-chunk verification: refused, registry unchanged."""
    async with running_fleet(tmp_path) as fleet:
        model = make_gguf(tmp_path / "tiny.gguf", 600_000)
        publish(fleet, model)
        blob = fleet.home.repo_dir / "blobs" / "sha256" / sha256(model)
        data = bytearray(blob.read_bytes())
        data[3 * CHUNK + 10] ^= 0xFF
        blob.write_bytes(bytes(data))
        agent = await started(fleet)
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1")
        assert report["outcome"] == "refused"
        assert "chunk 3 failed verification (sha256)" in report["reason"]
        assert_unchanged(agent)


async def test_target_that_does_not_fit_is_refused_before_download(tmp_path: Path) -> None:
    """A validly signed target for another architecture is refused and not a single chunk is fetched."""
    async with running_fleet(tmp_path) as fleet:
        publish(fleet, make_gguf(tmp_path / "tiny.gguf", 200_000), "--arch", "riscv64")
        agent = await started(fleet)
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1")
        assert report["outcome"] == "refused"
        assert "does not fit this device" in report["reason"]
        assert fleet.server is not None
        assert fleet.server.chunks is not None
        assert fleet.server.chunks.chunks_sent == 0
        assert_unchanged(agent)


async def test_disk_too_small_is_refused_before_download(tmp_path: Path) -> None:
    """A model that does not fit the registry's quota is refused with a clear reason, before any chunk."""
    async with running_fleet(tmp_path) as fleet:
        publish(fleet, make_gguf(tmp_path / "tiny.gguf", 1_000_000))
        agent = fleet.enroll("dev1", models=(1,))
        agent.registry.close()
        agent.registry = Registry.open(agent.state_dir, RegistryConfig(disk_quota_bytes=3_000_000))
        agent.config = dataclasses.replace(agent.config, registry=RegistryConfig(disk_quota_bytes=3_000_000))
        await fleet.start_server()
        await agent.start()
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1")
        assert report["outcome"] == "refused"
        assert "disk quota exceeded" in report["reason"]
        assert "refused before download" in report["reason"]
        assert fleet.server is not None
        assert fleet.server.chunks is not None
        assert fleet.server.chunks.chunks_sent == 0
        assert_unchanged(agent)


async def test_hostile_gguf_validly_signed_is_rejected_by_the_header_validator(tmp_path: Path) -> None:
    """A signed file whose GGUF header lies (huge tensor count) is delivered, then refused by the validator."""
    async with running_fleet(tmp_path) as fleet:
        hostile = tmp_path / "hostile.gguf"
        hostile.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + bytes(200_000))
        publish(fleet, hostile)
        agent = await started(fleet)
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1")
        assert report["outcome"] == "failed", report
        assert "install refused" in report["reason"]
        assert_unchanged(agent)


async def test_expired_timestamp_stops_installs_not_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an expired timestamp (freeze) nothing is installed and the active model stays active; the release is not
    refused for good: once the controller re-signs the timestamp, the same generation installs."""
    async with running_fleet(tmp_path) as fleet:
        publish(fleet, make_gguf(tmp_path / "tiny.gguf", 200_000))
        past = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=3)
        assert ReleaseRepository(fleet.home.repo_dir, clock=lambda: past).refresh_timestamp(
            if_expiring_within=dt.timedelta(days=365)
        )
        monkeypatch.setattr(ReleaseRepository, "refresh_timestamp", lambda self, **_: False)  # a stalled signer
        agent = await started(fleet)
        agent.link.dispatcher.retry_after_s = 1.0
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        await wait_for(lambda: _accepted(agent), what="the assignment accepted")
        await asyncio.sleep(3)  # a few refreshes against the expired timestamp
        assert outcome_reports(fleet, "dev1") == [], "an expired timestamp refused the release"
        assert_unchanged(agent)
        assert (await agent.link.dispatcher.accepted_generation())[1] == 0, "applied without the release"

        monkeypatch.undo()  # the signer is back: serve re-signs the timestamp and publishes it
        report = await wait_report(fleet, "dev1", within=60)
        assert report["outcome"] == "ok", report
        active = agent.registry.active("tiny")
        assert active is not None


async def _accepted(agent: Any) -> bool:
    return (await agent.link.dispatcher.accepted_generation())[0] > 0


def _watch_progress(agent: Any, at: float, reached: Any) -> None:
    """Set the event ``reached`` once the agent's transfer passes fraction ``at``."""

    def on_progress(path: str, done: int, total: int) -> None:
        if done >= at * total:
            reached.set()

    agent.link.dispatcher.installer.on_progress = on_progress


def _assert_no_verified_chunk_fetched_twice(agent: Any, *, window: int, cuts: int) -> None:
    stats = agent.link.dispatcher.installer.fetcher.last_stats
    assert stats is not None
    assert set(stats.verified.values()) == {1}, "a chunk was verified twice"
    # only chunks in flight at a cut (at most one window per cut) may be requested again
    assert sum(count - 1 for count in stats.requested.values()) <= window * cuts


@pytest.mark.parametrize("cut_at", [0.3, 0.6, 0.99])
async def test_link_cut_mid_transfer_resumes(tmp_path: Path, cut_at: float) -> None:
    """The broker path goes dark at 30/60/99 %: after the reconnect the transfer resumes, no verified chunk twice."""
    async with running_fleet(tmp_path) as fleet:
        model = make_gguf(tmp_path / "tiny.gguf", 3_000_000)
        fleet.cli("model", "add", str(model), "--name", "tiny", "--variant", "q4_0", "--chunk-size", "16384")
        fleet.cli("model", "publish")
        proxy = TcpProxy(fleet.port)
        await proxy.start()
        try:
            agent = await started(fleet, link=dataclasses.replace(FAST_LINK, port=proxy.port))
            reached = asyncio.Event()
            _watch_progress(agent, cut_at, reached)
            fleet.cli("deploy", "tiny@1", "--to", "dev1")
            await asyncio.wait_for(reached.wait(), 30)
            proxy.pause()
            await asyncio.sleep(1.0)
            proxy.heal()
            report = await wait_report(fleet, "dev1", within=60)
            assert report["outcome"] == "ok", report
            active = agent.registry.active("tiny")
            assert active is not None
            assert active.sha256 == sha256(model)
            _assert_no_verified_chunk_fetched_twice(agent, window=16, cuts=1)
        finally:
            await proxy.close()


async def test_agent_restart_mid_transfer_resumes(tmp_path: Path) -> None:
    """Progress is in the device state; the agent stops at 50 % and restarts: no verified chunk is fetched again."""
    async with running_fleet(tmp_path) as fleet:
        model = make_gguf(tmp_path / "tiny.gguf", 3_000_000)
        fleet.cli("model", "add", str(model), "--name", "tiny", "--variant", "q4_0", "--chunk-size", "16384")
        fleet.cli("model", "publish")
        agent = await started(fleet)
        reached = asyncio.Event()
        _watch_progress(agent, 0.5, reached)
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        await asyncio.wait_for(reached.wait(), 30)
        row = await wait_for(lambda: (fleet.device_row("dev1").state or {}).get("transfers"), what="progress in state")
        assert row[0]["model"]["name"] == "tiny"
        assert 0 < row[0]["received_bytes"] <= row[0]["total_bytes"]
        assert "transfers" in fleet.cli("device", "show", "dev1")  # the CLI shows the progress
        await agent.stop()
        agent.registry.recover()  # what the daemon does at every start
        await agent.start()
        report = await wait_report(fleet, "dev1", within=60)
        assert report["outcome"] == "ok", report
        stats = agent.link.dispatcher.installer.fetcher.last_stats  # the transfer after the restart
        chunks = -(-model.stat().st_size // 16384)
        assert len(stats.resumed) >= chunks // 2  # what was verified before the stop
        assert not set(stats.requested) & stats.resumed, "a chunk verified before the restart was fetched again"
        assert set(stats.verified.values()) == {1}
        assert len(stats.resumed) + len(stats.verified) == chunks


async def test_smollm2_release_is_delivered_health_checked_and_served(tmp_path: Path, smollm2_path: Path) -> None:
    """The real SmolLM2 GGUF: add, publish, deploy; the agent verifies, installs, health-checks and serves it."""
    async with running_fleet(tmp_path) as fleet:
        fleet.cli("model", "add", str(smollm2_path), "--name", "smollm2-135m-instruct", "--variant", "q4_1")
        fleet.cli("model", "publish")
        agent = fleet.enroll("dev1", models=(1,))
        config = dataclasses.replace(
            agent.config,
            api=ApiConfig(socket_path=tmp_path / "run" / "api.sock"),
            inference=InferenceConfig(n_ctx=512, n_parallel=1, n_threads=2),
        )
        tokens = TokenStore.open(config.state_dir)
        _, token = tokens.create("tests", ["infer"])
        pool = ModelPool(config.inference.memory_budget_bytes)
        state = ApiState(config=config, registry=agent.registry, pool=pool, tokens=tokens)
        await fleet.start_server()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(tokens.close)
            stack.push_async_callback(pool.aclose)
            await stack.enter_async_context(ApiServer(state))
            link = await stack.enter_async_context(
                open_agent_link(config, agent.registry, agent_version="test", health_check=model_health_check(state))
            )
            assert link is not None
            task = asyncio.create_task(link.run())
            stack.callback(task.cancel)
            fleet.cli("deploy", "smollm2-135m-instruct@1", "--to", "dev1")
            report = await wait_report(fleet, "dev1", within=90)
            assert report["outcome"] == "ok", report
            active = agent.registry.active("smollm2-135m-instruct")
            assert active is not None
            assert active.sha256 == sha256(smollm2_path)
            transport = httpx.AsyncHTTPTransport(uds=str(config.api.socket_path))
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
                response = await client.post(
                    "/v1/completions",
                    headers={"Authorization": f"Bearer {token}"},
                    json={"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
                )
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"]


async def test_release_over_http_from_the_artifact_server(tmp_path: Path) -> None:
    """With `artifact_port` and `link.artifact_url`, metadata and blob come over HTTP; no chunk goes over MQTT."""
    async with running_fleet(tmp_path) as fleet:
        model = make_gguf(tmp_path / "tiny.gguf", 600_000)
        publish(fleet, model)
        port = free_port()
        controller = dataclasses.replace(fleet.home.config.controller, artifact_port=port)
        fleet.home.config = dataclasses.replace(fleet.home.config, controller=controller)
        agent = await started(fleet, link=dataclasses.replace(FAST_LINK, artifact_url=f"http://127.0.0.1:{port}"))
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1")
        assert report["outcome"] == "ok", report
        active = agent.registry.active("tiny")
        assert active is not None
        assert active.sha256 == sha256(model)
        assert fleet.server is not None
        assert fleet.server.chunks is not None
        assert fleet.server.chunks.chunks_sent == 0


async def test_transfer_progress_is_published_at_a_bounded_rate(tmp_path: Path) -> None:
    """A download reports progress after every batch of chunks; the state goes out at most every progress_interval_s."""
    async with running_fleet(tmp_path) as fleet:
        model = make_gguf(tmp_path / "tiny.gguf", 3_000_000)
        fleet.cli("model", "add", str(model), "--name", "tiny", "--variant", "q4_0", "--chunk-size", "16384")
        fleet.cli("model", "publish")
        interval = 0.5
        link = dataclasses.replace(FAST_LINK, state_interval_s=600.0, state_check_interval_s=5.0)
        agent = await started(fleet, link=dataclasses.replace(link, progress_interval_s=interval))
        seen: list[tuple[float, int]] = []  # (time, states published so far) at every progress callback

        def on_progress(path: str, done: int, total: int) -> None:
            seen.append((time.monotonic(), agent.link.stats.states_published))

        agent.link.dispatcher.installer.on_progress = on_progress
        fleet.cli("deploy", "tiny@1", "--to", "dev1")
        report = await wait_report(fleet, "dev1", within=60)
        assert report["outcome"] == "ok", report
        assert len(seen) >= 8, "the transfer reported progress in batches"
        (first_at, first_count), (last_at, last_count) = seen[0], seen[-1]
        published = last_count - first_count
        assert published <= (last_at - first_at) / interval + 2, (published, len(seen), last_at - first_at)
