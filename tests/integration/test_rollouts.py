"""Fleet rollouts end to end: variant choice per device, waves, health gates, rollback, restart, catch-up.

Several real agents in one run (``tests/fleet_harness.py``: private Mosquitto with the configuration
``edge-fleet init`` generated, the real ``serve``, real agent links and registries). Every agent runs the real
post-install health check (llama.cpp loads the model and completes a fixed prompt) and reports its measured
tokens/s and TTFT. They share the real SmolLM2 variants (``smollm2_variants``: q4_0, q5_1, q8_0 made by
edgefleet's quantizer). Releases go over the controller's HTTP artifact server (the delivery itself is tested in
``test_releases.py``) to keep the run short.

Variant thresholds (the publisher's signed ``--min-ram``, checked together with the memory estimate):
q4_0 ≥ 512 MiB, q5_1 ≥ 2 GiB, q8_0 ≥ 8 GiB of RAM budget. So 1 GiB → q4_0, 4 GiB → q5_1, 16 GiB → q8_0, and a
256 MiB device fits nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from broker import free_port
from fleet_harness import FAST_LINK, Agent, Fleet, TcpProxy, running_fleet, wait_for

from agent.api import ApiState, TokenStore
from agent.audit import AuditLog
from agent.config import InferenceConfig
from agent.health import model_health_check
from agent.inference import ModelPool
from agent.link.mqtt import open_agent_link
from controller.cli_rollouts import rollout_document
from protocols.gguf import GgmlType, build_gguf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GiB = 1 << 30
MiB = 1 << 20
FAMILY = "smollm2"
MIN_RAM = {"q4_0": "512M", "q5_1": "2G", "q8_0": "8G"}


async def start_agent(
    fleet: Fleet, agent: Agent, *, fault: Callable[[str], None] | None = None, audit: AuditLog | None = None
) -> None:
    """Start ``agent``'s link with the real health check (a model pool under its RAM budget).

    With ``audit``, the audit log is connected as the agent daemon connects it (health checks, assignments).
    """
    tokens = TokenStore.open(agent.config.state_dir)
    pool = ModelPool(agent.config.inference.memory_budget_bytes)
    state = ApiState(config=agent.config, registry=agent.registry, pool=pool, tokens=tokens)
    if audit is not None:
        state.audit = audit.record
    agent._stack.callback(tokens.close)
    agent._stack.push_async_callback(pool.aclose)
    link = await agent._stack.enter_async_context(
        open_agent_link(
            agent.config, agent.registry, agent_version="test", health_check=model_health_check(state), fault=fault
        )
    )
    assert link is not None
    if audit is not None:
        link.dispatcher.audit = audit.record
    agent.link = link
    agent.task = asyncio.create_task(link.run(), name=f"agent-{agent.name}")


def enroll(fleet: Fleet, name: str, budget: int, artifact_url: str) -> Agent:
    """Enroll ``name`` with a RAM budget of ``budget`` bytes and a small inference configuration."""
    agent = fleet.enroll(name, models=(1,), link=dataclasses.replace(FAST_LINK, artifact_url=artifact_url))
    inference = InferenceConfig(memory_budget_bytes=budget, n_ctx=512, n_parallel=1, n_threads=1)
    agent.config = dataclasses.replace(agent.config, inference=inference)
    return agent


@contextlib.asynccontextmanager
async def fleet_with(tmp: Path, budgets: dict[str, int]) -> AsyncIterator[Fleet]:
    """A fleet whose ``serve`` has an artifact server, and one started agent per ``budgets`` entry."""
    async with running_fleet(tmp) as fleet:
        port = free_port()
        controller = dataclasses.replace(fleet.home.config.controller, artifact_port=port)
        fleet.home.config = dataclasses.replace(fleet.home.config, controller=controller)
        for name, budget in budgets.items():
            enroll(fleet, name, budget, f"http://127.0.0.1:{port}")
        await fleet.start_server()
        for agent in fleet.agents.values():
            await start_agent(fleet, agent)
        for name in budgets:
            await wait_for(lambda n=name: has_state(fleet, n), what=f"{name}'s hardware in the fleet DB")
        yield fleet


def has_state(fleet: Fleet, device: str) -> bool:
    state = fleet.device_row(device).state or {}
    return bool(state.get("hardware")) and fleet.devices()[device]["online"]


def add_variants(fleet: Fleet, variants: dict[str, Path], *, version: int = 1) -> None:
    """Stage every variant as one release ``FAMILY@version``, and publish."""
    for variant, path in variants.items():
        fleet.cli(
            "model", "add", str(path), "--name", FAMILY, "--variant", variant, "--min-ram", MIN_RAM[variant],
            "--version", str(version),
        )  # fmt: skip
    fleet.cli("model", "publish")


def rollout(fleet: Fleet, rollout_id: str) -> dict[str, Any]:
    """What ``edge-fleet rollout show ID --json`` prints (read from the fleet DB)."""
    store = fleet.home.open_store()
    try:
        return rollout_document(store, rollout_id)
    finally:
        store.close()


def started_id(output: str) -> str:
    return output.split("rollout ")[1].split()[0]


async def wait_rollout(fleet: Fleet, rollout_id: str, status: str, within: float = 150.0) -> dict[str, Any]:
    """Wait until the rollout has ``status`` and no device is still waiting for its report."""

    def done() -> dict[str, Any] | None:
        r = rollout(fleet, rollout_id)
        settled = not any(d["status"] in ("assigned", "pending") for d in r["devices"])
        return r if r["status"] == status and settled else None

    return await wait_for(done, within=within, what=f"rollout {rollout_id} {status}")  # type: ignore[no-any-return]


def active(agent: Agent) -> str | None:
    record = agent.registry.active(FAMILY)
    return None if record is None else f"{record.version}:{record.variant}"


async def test_each_device_gets_the_variant_that_fits(tmp_path: Path, smollm2_variants: dict[str, Path]) -> None:
    """1 / 4 / 16 GiB → q4_0 / q5_1 / q8_0; a 256 MiB device is refused in the dry run and never assigned."""
    budgets = {"d1-small": GiB, "d2-medium": 4 * GiB, "d3-large": 16 * GiB, "d4-tiny": 256 * MiB}
    async with fleet_with(tmp_path, budgets) as fleet:
        add_variants(fleet, smollm2_variants)
        plan = fleet.cli("deploy", FAMILY, "--to", "all", "--waves", "50%,100%", "--dry-run")
        assert "dry run: nothing sent" in plan, plan
        rows = {line.split()[1]: line for line in plan.splitlines() if line.startswith("│ d")}
        assert " q4_0 " in rows["d1-small"], plan
        assert " q5_1 " in rows["d2-medium"]
        assert " q8_0 " in rows["d3-large"]
        assert "refused d4-tiny: nothing fits" in plan
        assert "q4_0: needs 512.0 MiB of RAM (signed minimum)" in plan
        assert fleet.reports() == []  # nothing was sent

        out = fleet.cli("deploy", FAMILY, "--to", "all", "--waves", "50%,100%", "--wave-timeout", "120s")
        result = await wait_rollout(fleet, started_id(out), "completed")
        by_device = {d["device"]: d for d in result["devices"]}
        assert {k: v["status"] for k, v in by_device.items()} == {
            "d1-small": "ok",
            "d2-medium": "ok",
            "d3-large": "ok",
            "d4-tiny": "unfit",
        }
        assert [active(fleet.agents[n]) for n in ("d1-small", "d2-medium", "d3-large", "d4-tiny")] == [
            "1:q4_0",
            "1:q5_1",
            "1:q8_0",
            None,
        ]
        for name in ("d1-small", "d2-medium", "d3-large"):  # the health check's measured numbers came back
            metrics = by_device[name]["metrics"]
            assert metrics["tokens_per_s"] > 0, metrics
            assert metrics["ttft_ms"] > 0, metrics
        assert [g["passed"] for g in result["gate_log"]] == [True, True]
        view = fleet.cli("rollout", "show", started_id(out), "--follow")
        assert "completed" in view
        assert "tokens/s" in view


def broken_gguf(path: Path) -> Path:
    """A validly signed GGUF whose header parses but whose weights llama.cpp cannot load (no tensors)."""
    meta = {
        "general.architecture": "llama",
        "general.name": "broken",
        "llama.block_count": 30,
        "llama.context_length": 2048,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.vocab_size": 49152,
    }
    path.write_bytes(build_gguf(meta, [("output_norm.weight", [576], GgmlType.F32)]))
    return path


async def test_failing_canary_halts_and_rolls_back(tmp_path: Path, smollm2_variants: dict[str, Path]) -> None:
    """v2 fails its health check on the canary: halted, the canary is back on v1, later waves never get v2."""
    budgets = {"a-canary": GiB, "b-second": GiB, "c-third": GiB}
    async with fleet_with(tmp_path, budgets) as fleet:
        add_variants(fleet, {"q4_0": smollm2_variants["q4_0"]})
        fleet.cli("group", "add", "kiosks", *budgets)
        assert "kiosks: a-canary, b-second, c-third" in fleet.cli("group", "list")
        first = fleet.cli("deploy", f"{FAMILY}@1", "--to", "group:kiosks")  # no waves: assigned at once
        assert first.count("assignment generation 1 -> models/smollm2/1/q4_0.gguf") == 3, first
        await wait_for(
            lambda: {active(a) for a in fleet.agents.values()} == {"1:q4_0"}, within=90, what="v1 on every device"
        )
        await wait_for(lambda: all(fleet.reports(n) for n in budgets), what="v1's install reports")
        reports = {n: len(fleet.reports(n)) for n in budgets}

        fleet.cli("model", "add", str(broken_gguf(tmp_path / "broken.gguf")), "--name", FAMILY, "--variant", "q4_0")
        fleet.cli("model", "publish")
        out = fleet.cli("deploy", f"{FAMILY}@2", "--to", "all", "--waves", "5%,50%,100%", "--wave-timeout", "120s")
        result = await wait_rollout(fleet, started_id(out), "halted")
        assert "FAILED" in fleet.cli("rollout", "show", started_id(out))
        by_device = {d["device"]: d for d in result["devices"]}
        assert by_device["a-canary"]["status"] == "rolled_back", by_device["a-canary"]
        assert "health" in by_device["a-canary"]["reason"] or "install" in by_device["a-canary"]["reason"]
        assert by_device["b-second"]["status"] == "skipped"
        assert by_device["c-third"]["status"] == "skipped"
        assert "wave 1 failed its gates" in result["reason"]
        # the canary's desired state is v1 again, and it runs v1
        store = fleet.home.open_store()
        try:
            newest = store.assignments("a-canary", limit=1)[0].models
            later = {n: [m["version"] for a in store.assignments(n) for m in a.models] for n in ("b-second", "c-third")}
        finally:
            store.close()
        assert [(m["name"], m["version"]) for m in newest if m["name"] == FAMILY] == [(FAMILY, 1)]
        await wait_for(lambda: active(fleet.agents["a-canary"]) == "1:q4_0", what="the canary back on v1")
        assert later == {"b-second": [1], "c-third": [1]}  # never assigned v2
        for name in ("b-second", "c-third"):
            assert active(fleet.agents[name]) == "1:q4_0"
            assert [m.version for m in fleet.agents[name].registry.list_models(FAMILY, include_removed=True)] == [1]
            assert len(fleet.reports(name)) == reports[name]


# Known leak, not yet fixed: killing serve mid-transfer can leave one artifact-server keep-alive socket for the
# garbage collector (seen once in ten clean-clone runs); the process exits on a real stop, so it is tolerated here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_restart_mid_rollout_and_offline_catch_up(tmp_path: Path, smollm2_variants: dict[str, Path]) -> None:
    """serve restarted mid-wave finishes the rollout; an offline device does not block it and catches up later."""
    budgets = {"a-one": GiB, "b-offline": GiB, "c-three": GiB}
    async with fleet_with(tmp_path, budgets) as fleet:
        add_variants(fleet, {"q4_0": smollm2_variants["q4_0"]})
        await fleet.agents["b-offline"].stop()
        await wait_for(lambda: not fleet.devices()["b-offline"]["online"], what="b-offline offline")
        for name in budgets:
            fleet.cli("device", "label", name, "site=lab", "ring=one")
        fleet.cli("device", "label", "a-one", "--remove", "ring")
        assert json.loads(fleet.cli("device", "show", "a-one", "--json"))["labels"] == {"site": "lab"}
        out = fleet.cli("deploy", FAMILY, "--to", "site=lab", "--waves", "5%,50%,100%", "--wave-timeout", "120s")
        rollout_id = started_id(out)
        await wait_for(
            lambda: any(d["status"] == "assigned" for d in rollout(fleet, rollout_id)["devices"]),
            what="the canary wave to start",
        )
        await fleet.stop_server()  # mid-wave: the canary is installing
        await asyncio.sleep(1.0)
        await fleet.start_server()
        result = await wait_rollout(fleet, rollout_id, "completed")
        by_device = {d["device"]: d["status"] for d in result["devices"]}
        assert by_device == {"a-one": "ok", "b-offline": "offline", "c-three": "ok"}
        assert active(fleet.agents["a-one"]) == active(fleet.agents["c-three"]) == "1:q4_0"

        await start_agent(fleet, fleet.agents["b-offline"])  # back: caught up, without a gate
        caught = await wait_for(
            lambda: (
                next(d for d in rollout(fleet, rollout_id)["devices"] if d["device"] == "b-offline")["status"] == "ok"
            ),
            within=120,
            what="b-offline caught up",
        )
        assert caught
        device = next(d for d in rollout(fleet, rollout_id)["devices"] if d["device"] == "b-offline")
        assert device["caught_up"] == 1
        assert active(fleet.agents["b-offline"]) == "1:q4_0"


async def test_failed_health_check_rolls_back_locally_without_the_controller(
    tmp_path: Path, smollm2_variants: dict[str, Path]
) -> None:
    """Cut from the broker right after accepting v2, the device fails v2's check, keeps v1, and says so later."""
    async with running_fleet(tmp_path) as fleet:
        port = free_port()
        controller = dataclasses.replace(fleet.home.config.controller, artifact_port=port)
        fleet.home.config = dataclasses.replace(fleet.home.config, controller=controller)
        proxy = TcpProxy(fleet.port)
        await proxy.start()
        try:
            agent = enroll(fleet, "solo", GiB, f"http://127.0.0.1:{port}")
            agent.config = dataclasses.replace(
                agent.config, link=dataclasses.replace(agent.config.link, port=proxy.port)
            )
            await fleet.start_server()
            cut = {"armed": False}

            def fault(point: str) -> None:  # the dispatcher's crash-test seam: right after an assignment is stored
                if point == "accepted" and cut["armed"]:
                    proxy.pause()

            audit = await asyncio.to_thread(AuditLog.open, agent.registry, "solo")
            await start_agent(fleet, agent, fault=fault, audit=audit)
            await wait_for(lambda: has_state(fleet, "solo"), what="solo's state")
            add_variants(fleet, {"q4_0": smollm2_variants["q4_0"]})
            fleet.cli("deploy", f"{FAMILY}@1", "--to", "solo")
            await wait_for(lambda: active(agent) == "1:q4_0", within=60, what="v1 active")

            fleet.cli("model", "add", str(broken_gguf(tmp_path / "broken.gguf")), "--name", FAMILY, "--variant", "q4_0")
            fleet.cli("model", "publish")
            cut["armed"] = True
            fleet.cli("deploy", f"{FAMILY}@2", "--to", "solo")

            def quarantined() -> bool:
                return any(
                    m.version == 2 and m.state == "quarantined"
                    for m in agent.registry.list_models(FAMILY, include_removed=True)
                )

            await wait_for(quarantined, within=60, what="v2 quarantined on the device")
            assert proxy.paused
            assert active(agent) == "1:q4_0"  # rolled back on its own, the controller unreachable
            assert not [r for r in fleet.reports("solo") if r["model"] and '"version": 2' in r["model"]]

            proxy.heal()
            report = await wait_for(
                lambda: next((r for r in fleet.reports("solo") if r["model"] and '"version": 2' in r["model"]), None),
                within=60,
                what="the report once the link is back",
            )
            assert report["kind"] == "health"
            assert report["outcome"] == "failed"
            assert "rolled back locally" in report["reason"]
            # the device's audit log: both assignments applied, both health checks with their outcome
            records = [(r.kind, dict(r.data)) for r in audit.tail(100)]
            checks = [d["outcome"] for k, d in records if k == "release.health_check"]
            applied = [d["generation"] for k, d in records if k == "assignment.applied"]
            assert checks == ["ok", "failed"], records
            assert applied == [1, 2], records
            ok_check = next(d for k, d in records if k == "release.health_check")
            assert float(ok_check["tokens_per_s"]) > 0  # measured numbers (floats are stored as text)
        finally:
            await proxy.close()


async def test_serve_notifies_systemd_when_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edge-fleet serve` sends READY=1 over NOTIFY_SOCKET once connected to the broker, STOPPING=1 on stop."""
    import socket

    from controller.daemon import serve

    async with running_fleet(tmp_path) as fleet:
        path = tmp_path / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        stop = asyncio.Event()
        task = asyncio.create_task(serve(fleet.home, stop=stop))
        try:
            loop = asyncio.get_running_loop()
            ready = await asyncio.wait_for(loop.sock_recv(sock, 4096), 20)
            assert ready.startswith(b"READY=1\nSTATUS=connected to 127.0.0.1:")
            stop.set()
            assert await asyncio.wait_for(task, 20) == 0
            assert await asyncio.wait_for(loop.sock_recv(sock, 4096), 5) == b"STOPPING=1"
        finally:
            stop.set()
            sock.close()
