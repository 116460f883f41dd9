"""Component tests of the agent's link state on a real SQLite file: outbox, desired state, enrollment install."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main as agent_cli
from agent.config import RegistryConfig
from agent.errors import EnrollmentError, OutboxFullError
from agent.hardware import cpu_features, hardware_profile
from agent.link.dispatch import AssignmentVerifier, Dispatcher
from agent.link.enrollment import install_bundle, load_enrollment
from agent.link.outbox import Outbox
from agent.link.store import LinkStore
from agent.registry import Registry
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from protocols.keys import generate_private_key, keyid
from protocols.link import open_sealed, seal
from protocols.messages import Assignment, DesiredModel, HardwareProfile, Report
from protocols.topics import TopicKind, device_topic

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parent.parent.parent
SILERO = ROOT / ".cache" / "models" / "silero_vad.onnx"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LinkStore]:
    link_store = await asyncio.to_thread(LinkStore.open, tmp_path / "link.db")
    yield link_store
    await asyncio.to_thread(link_store.close)


# --- outbox -----------------------------------------------------------------------------------------------


async def test_outbox_keeps_messages_in_order_until_acked(store: LinkStore) -> None:
    """Messages come out oldest first, a PUBACK only reschedules them, and only an ack removes them."""
    clock = [1000.0]
    outbox = Outbox(store, resend_after=10, resend_max=40, clock=lambda: clock[0])
    for i in range(3):
        assert await outbox.put(TopicKind.REPORT, f"m{i}", b"payload %d" % i)
    assert not await outbox.put(TopicKind.REPORT, "m1", b"again"), "the same id is stored once"
    due = await outbox.due()
    assert [item.msg_id for item in due] == ["m0", "m1", "m2"]
    for item in due:
        await outbox.begin_send(item)
        await outbox.sent(item)
    assert await outbox.due() == []
    assert await outbox.next_due_in() == pytest.approx(10)
    clock[0] += 10
    assert [i.msg_id for i in await outbox.due()] == ["m0", "m1", "m2"], "unacked messages are re-sent"
    assert await outbox.acked(["m1", "unknown"]) == 1
    assert await outbox.counts() == {"pending": 2, "undeliverable": 0}
    await outbox.resend_all()
    assert [i.msg_id for i in await outbox.due(limit=1)] == ["m0"], "windowed: never more than asked for"


async def test_outbox_resend_delay_doubles_up_to_a_cap(store: LinkStore) -> None:
    """Each unacked re-send waits twice as long as the one before, up to resend_max."""
    clock = [0.0]
    outbox = Outbox(store, resend_after=1, resend_max=5, clock=lambda: clock[0])
    await outbox.put(TopicKind.REPORT, "m", b"x")
    delays = []
    for _ in range(5):
        (item,) = await outbox.due()
        await outbox.sent(item)
        delay = await outbox.next_due_in()
        assert delay is not None
        delays.append(delay)
        clock[0] += delay
    assert delays == [1, 2, 4, 5, 5]


async def test_outbox_counts_connections_that_died_with_a_message_in_flight(store: LinkStore) -> None:
    """The in-flight count survives a crash (it is written before sending) and is reset by the broker's PUBACK."""
    outbox = Outbox(store)
    await outbox.put(TopicKind.REPORT, "m", b"x")
    (item,) = await outbox.due()
    assert await outbox.begin_send(item) == 1
    (item,) = await outbox.due()  # as after a reconnect (or a restart): the count is persistent
    assert item.strikes == 1
    assert await outbox.begin_send(item) == 2
    await outbox.sent(item)
    await outbox.resend_all()
    (item,) = await outbox.due()
    assert item.strikes == 0
    await outbox.set_undeliverable(item, "too big")
    assert await outbox.due() == []
    assert await outbox.counts() == {"pending": 0, "undeliverable": 1}
    events = await store.run(store.events, "outbox_undeliverable")
    assert events[0]["data"] == {"msg_id": "m", "kind": "report", "bytes": 1, "reason": "too big"}


async def test_outbox_refuses_rather_than_drops_when_full(store: LinkStore) -> None:
    """Past max_messages waiting for acks, new messages are refused with an error; nothing is dropped."""
    outbox = Outbox(store, max_messages=2)
    await outbox.put(TopicKind.REPORT, "a", b"1")
    await outbox.put(TopicKind.REPORT, "b", b"2")
    with pytest.raises(OutboxFullError):
        await outbox.put(TopicKind.REPORT, "c", b"3")
    assert [i.msg_id for i in await outbox.due()] == ["a", "b"]
    assert await outbox.put_own(TopicKind.REPORT, "notice", b"4"), "the link's own rare notices are never refused"


# --- desired state ----------------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = Registry.open(tmp_path / "agent", RegistryConfig())
    reg.recover()
    reg.import_file(SILERO, name="silero-vad", variant="onnx-fp32", version=1, activate=True)
    reg.import_file(SILERO, name="silero-vad", variant="onnx-fp32", version=2, activate=False)
    yield reg  # type: ignore[misc]
    reg.close()


async def test_dispatcher_applies_once_refuses_replays_and_reports_signed(store: LinkStore, registry: Registry) -> None:
    """Accepted assignments are persisted, applied once and reported; duplicates and replays change nothing."""
    controller, device = generate_private_key(), generate_private_key()
    verifier = AssignmentVerifier("dev-1", {keyid(controller): controller.public_key()}, 1)
    outbox = Outbox(store)
    crashes: list[str] = []
    dispatcher = Dispatcher(
        store=store, outbox=outbox, verifier=verifier, registry=registry, signing_key=device, fault=crashes.append
    )
    record = registry.get("silero-vad", "onnx-fp32", 2)

    def signed(generation: int, version: int, sha256: str = record.sha256) -> bytes:
        model = DesiredModel(
            "silero-vad", version, "onnx-fp32", f"models/silero-vad/{version}/onnx-fp32.onnx", sha256, record.size
        )
        return seal(Assignment("dev-1", generation, 0, (model,)), TopicKind.ASSIGN, [controller])

    g2 = signed(2, 2)
    assert await dispatcher.on_assign(g2) == "accepted"
    assert crashes == ["accepted"]
    assert await dispatcher.accepted_generation() == (2, 0), "persisted before acting"
    await dispatcher.reconcile()
    assert registry.active("silero-vad").version == 2
    assert await dispatcher.accepted_generation() == (2, 2)

    assert await dispatcher.on_assign(g2) == "duplicate"
    assert await dispatcher.on_assign(signed(1, 1)) == "refused"
    assert await dispatcher.on_assign(signed(3, 1, "ee" * 32)) == "accepted"
    await dispatcher.reconcile()
    assert registry.active("silero-vad").version == 2, "a copy that differs from the signed digest is refused"
    forged = seal(Assignment("dev-1", 9, 0, ()), TopicKind.ASSIGN, [device])
    assert await dispatcher.on_assign(forged) == "refused"

    reports = []
    for item in await outbox.due(limit=100):
        opened = open_sealed(
            device_topic("dev-1", TopicKind.REPORT), item.payload, {keyid(device): device.public_key()}
        )
        assert isinstance(opened.message, Report)
        reports.append((opened.message.generation, opened.message.kind, opened.message.outcome))
    assert reports == [
        (2, "install", "ok"),
        (1, "refusal", "refused"),
        (3, "refusal", "refused"),
        (None, "refusal", "refused"),
    ]
    events = await store.run(store.events, "assignment_refused")
    assert len(events) == 2


# --- enrollment -------------------------------------------------------------------------------------------


def test_enroll_installs_a_checked_bundle_0600_and_refuses_bad_ones(tmp_path: Path) -> None:
    """Keys are 0600; `edge-agent enroll` installs a checked bundle 0600, honours pins, refuses tampering."""
    home = FleetHome.init(tmp_path / "home", FleetConfig(broker=BrokerConfig(port=18883)))
    for key in ("keys/assignment.key", "ca/ca.key", "broker/server.key", "controllers/main.key"):
        assert stat.S_IMODE((home.root / key).stat().st_mode) == 0o600, key
    home.enroll_device("dev-1", tmp_path / "dev-1.bundle")
    home.enroll_device("dev-2", tmp_path / "dev-2.bundle")
    assert stat.S_IMODE((tmp_path / "dev-1.bundle").stat().st_mode) == 0o600
    kid = next(iter(home.controller_public_keys()))
    state = tmp_path / "agent"
    runner = CliRunner()

    def enroll(*args: str) -> tuple[int, str]:
        result = runner.invoke(agent_cli, ["--state-dir", str(state), "enroll", *args])
        return result.exit_code, result.output

    code, output = enroll(str(tmp_path / "dev-1.bundle"), "--expect-keyid", "0" * 64)
    assert code == 1
    assert "not signed by any pinned controller key" in output
    tampered = tmp_path / "tampered.bundle"
    data = bytearray((tmp_path / "dev-1.bundle").read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    assert enroll(str(tampered))[0] == 1
    assert load_enrollment(state) is None, "nothing installed by a failed enrollment"

    code, output = enroll(str(tmp_path / "dev-1.bundle"), "--expect-keyid", kid)
    assert code == 0, output
    assert "enrolled as dev-1" in output
    for name in ("link/bundle", "link/tls/device.key"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    enrollment = load_enrollment(state)
    assert enrollment is not None
    assert enrollment.device == "dev-1"

    code, output = enroll(str(tmp_path / "dev-2.bundle"))
    assert code == 1
    assert "enrolled as 'dev-1'" in output
    assert enroll(str(tmp_path / "dev-2.bundle"), "--force")[0] == 0
    with pytest.raises(EnrollmentError, match="configured as device 'dev-1'"):
        load_enrollment(state, device_id="dev-1")
    with pytest.raises(EnrollmentError, match="this agent is configured as 'dev-9'"):
        install_bundle(state, (tmp_path / "dev-1.bundle").read_bytes(), device_id="dev-9")


# --- hardware profile -------------------------------------------------------------------------------------


def test_hardware_profile_reports_inference_cpu_features_and_is_a_valid_message(tmp_path: Path) -> None:
    """CPU flags relevant to inference are picked from /proc/cpuinfo (x86 and arm), and the profile validates."""
    x86 = tmp_path / "x86"
    x86.write_text("processor: 0\nflags\t\t: fpu sse3 avx avx2 fma f16c avx512f ht\nprocessor: 1\nflags: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp sve i8mm cpuid\n")
    assert cpu_features(x86) == ("avx", "avx2", "avx512f", "f16c", "fma", "sse3")
    assert cpu_features(arm) == ("asimd", "asimddp", "i8mm", "sve")
    assert cpu_features(tmp_path / "missing") == ()
    profile = hardware_profile(tmp_path, memory_budget_bytes=1 << 62)
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    assert profile.ram_budget_bytes == profile.ram_bytes  # capped at the RAM
    assert profile.disk_free_bytes > 0
