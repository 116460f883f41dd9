"""``edge-fleet simulate``: many light simulated agents in one asyncio process, speaking the real protocol.

What each simulated device does, on the wire exactly as ``edge-agent`` does it (DESIGN.md §5–§6):

- connects with **its own client certificate** issued by the fleet CA (:func:`enroll_simulated` enrolls the
  devices in the fleet DB, like ``edge-fleet device enroll``), so the broker's real listener, CRL and per-device
  ACL (``edgefleet/v1/devices/%u/...``) apply: nothing is bypassed. MQTT v5, ``clean_start=False``, a retained
  last will (its sealed ``offline`` state) — :class:`controller.link.mqtt.DeviceSession`;
- publishes its sealed state (retained) on connect and then as a heartbeat every ``heartbeat_s`` (jittered),
  and again when its models change;
- appends audit records to a real hash chain (:func:`protocols.audit.make_record`), at ``events_per_min`` per
  device with exponential inter-arrival times, and uploads them as the agent's uploader does: **one batch in
  flight at a time**, with a checkpoint signed by its Ed25519 device key, re-sent (doubling delay) until the
  controller's application-level ack names its head; the acked records are then dropped;
- verifies every retained assignment with the controller's key (newer generation only, as the agent's
  ``AssignmentVerifier``), then reports each desired model installed with a signed ``install`` report kept until
  acked — **the blob transfer is skipped** (the report's reason says so: ``simulated, blob transfer skipped``);
  the reported models then appear in its state.

What it does not simulate: the registry, inference, the local API, release metadata (TUF) and blob downloads.
Device ids are ``<prefix>-NNNNN``; the credentials live under ``HOME/simulated/<prefix>/`` and are reused by
the next run, which starts a new audit epoch linked to the head the controller stored (no false alerts).

Costs: every device is a TLS connection and a paho client in this one process; on 2 cores connection setup
(the TLS handshakes, on both sides) dominates start-up, and the steady state costs one Ed25519 signature per
heartbeat, batch and report. ``connect_rate`` spreads the connections out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from controller import pki
from controller.errors import ControllerError, LinkError
from controller.home import FleetHome, TlsFiles, atomic_write
from controller.link.mqtt import Backoff, DeviceSession, InboundMessage, tls_context
from protocols.audit import AuditHead, AuditRecord, Checkpoint, make_record, sign_checkpoint, start_epoch
from protocols.errors import ProtocolError
from protocols.keys import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    generate_private_key,
    keyid,
    private_key_from_pem,
    private_key_to_pem,
    public_key_to_pem,
)
from protocols.link import open_sealed, seal
from protocols.messages import (
    Ack,
    Assignment,
    AuditBatch,
    DeviceState,
    HardwareProfile,
    ModelInfo,
    Report,
)
from protocols.topics import TopicKind, agent_subscriptions, device_topic, parse_device_topic

__all__ = [
    "SimIdentity",
    "SimulatedDevice",
    "Simulation",
    "SimulationOptions",
    "SimulationStats",
    "controller_keys",
    "enroll_simulated",
    "parse_broker",
    "stored_heads",
]

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0-sim"
HARDWARE = HardwareProfile(
    arch="x86_64",
    cpu_features=("avx2", "f16c"),
    cores=4,
    ram_bytes=8 * 2**30,
    ram_budget_bytes=4 * 2**30,
    disk_free_bytes=64 * 2**30,
)
EVENT_KINDS = ("health.check", "api.request_served", "model.loaded", "config.checked")


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) as a pair.

    Raises:
        ValueError: not ``HOST:PORT`` with a port in 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, port


# --- enrollment -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimIdentity:
    """A simulated device's credentials: TLS client certificate and key files, Ed25519 signing key."""

    device: str
    tls: TlsFiles
    signing_key: Ed25519PrivateKey


def enroll_simulated(home: FleetHome, count: int, prefix: str = "sim") -> list[SimIdentity]:
    """Enroll ``<prefix>-00000`` … (reusing the ones enrolled by an earlier run) and return their credentials.

    All new devices go into the fleet DB in one transaction; certificates are issued by the home's device CA,
    exactly as ``edge-fleet device enroll`` issues them (no bundle file: the simulator is the device).

    Raises:
        ControllerError: the CA cannot be loaded or the DB written.
    """
    directory = home.root / "simulated" / prefix
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = pki.Issued(pki.load_cert(home.ca_cert_path.read_bytes()), pki.load_key(home.ca_key_path.read_bytes()))
    identities: list[SimIdentity] = []
    new: list[tuple[str, pki.Issued, Ed25519PrivateKey]] = []
    store = home.open_store()
    try:
        known = {row.id: row for row in store.list_devices() if row.id.startswith(f"{prefix}-")}
        for index in range(count):
            device = f"{prefix}-{index:05d}"
            files = TlsFiles(ca=home.ca_cert_path, cert=directory / f"{device}.crt", key=directory / f"{device}.key")
            sign_path = directory / f"{device}.sign"
            row = known.get(device)
            if row is not None and not row.revoked and sign_path.exists() and files.cert.exists():
                key = private_key_from_pem(sign_path.read_bytes())
                if keyid(key) == row.signing_keyid:
                    identities.append(SimIdentity(device, files, key))
                    continue
            if row is not None:
                raise ControllerError(f"{device} is enrolled but its simulator credentials are missing or differ")
            issued = pki.issue_client_cert(ca, device)
            key = generate_private_key()
            atomic_write(files.key, pki.key_pem(issued.key), 0o600)
            atomic_write(files.cert, pki.cert_pem(issued.cert))
            atomic_write(sign_path, private_key_to_pem(key), 0o600)
            new.append((device, issued, key))
            identities.append(SimIdentity(device, files, key))
        with store.transaction():
            for device, issued, key in new:
                store.record_certificate(issued.serial, device, "device", issued.cert.not_valid_after_utc)
                store.add_device(
                    device,
                    cert_serial=issued.serial,
                    cert_not_after=issued.cert.not_valid_after_utc,
                    signing_keyid=keyid(key),
                    signing_key_pem=public_key_to_pem(key).decode(),
                )
    finally:
        store.close()
    return identities


def stored_heads(db_path: Path, devices: list[str]) -> dict[str, AuditHead]:
    """The audit heads the controller accepted for ``devices`` (to link a new run's epoch to them)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30.0)
    try:
        rows = conn.execute("SELECT device, epoch, seq, hash FROM audit_heads").fetchall()
    finally:
        conn.close()
    wanted = set(devices)
    return {row[0]: AuditHead(row[1], row[2], row[3]) for row in rows if row[0] in wanted}


# --- the simulation -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """How the simulated devices behave.

    Attributes:
        heartbeat_s: Mean seconds between heartbeats (state messages), each jittered by +-20 %.
        events_per_min: Audit events per device per minute (Poisson arrivals); 0 = none after start-up.
        batch_delay_s: How long new records wait to be joined by more before an upload (a full batch goes at once).
        max_batch: Most records in one upload.
        connect_rate: New connections per second at start-up (the ramp), jittered.
        resend_after_s: First re-send of an unacked audit batch or report; doubles up to ``resend_max_s``.
        resend_max_s: Longest re-send delay.
        keepalive_s: MQTT keepalive.
        session_expiry_s: MQTT session expiry.
        reconnect_min_s: Shortest reconnect backoff.
        reconnect_max_s: Longest reconnect backoff.
        skip_blobs: Must be true: assignments are reported installed without downloading the blobs.
        seed: Random seed (jitter, event times), for repeatable runs.
    """

    heartbeat_s: float = 30.0
    events_per_min: float = 6.0
    batch_delay_s: float = 1.0
    max_batch: int = 200
    connect_rate: float = 200.0
    resend_after_s: float = 10.0
    resend_max_s: float = 60.0
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    skip_blobs: bool = True
    seed: int | None = None


@dataclass
class SimulationStats:
    """Counters over every simulated device (what the "no message lost" checks compare with the fleet DB)."""

    connects: int = 0
    disconnects: int = 0
    states: int = 0
    records_made: int = 0
    records_acked: int = 0
    batches_sent: int = 0
    batch_resends: int = 0
    reports_made: int = 0
    reports_acked: int = 0
    report_resends: int = 0
    acks: int = 0
    acks_refused: int = 0
    assignments_applied: int = 0
    started: float = field(default_factory=time.monotonic)
    all_connected_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every counter, for JSON output."""
        return {k: v for k, v in vars(self).items() if k != "started"}


@dataclass
class _Pending:
    payload: bytes
    sent_at: float = 0.0
    delay: float = 0.0


class SimulatedDevice:
    """One simulated agent (see the module docstring). Driven by :class:`Simulation`."""

    def __init__(self, identity: SimIdentity, sim: Simulation, previous: AuditHead | None) -> None:
        self.identity = identity
        self.device = identity.device
        self.sim = sim
        self.rng = random.Random(sim.rng.random())  # noqa: S311 - jitter, not secrets
        self.key = identity.signing_key
        now_ms = int(time.time() * 1000)
        epoch = max(now_ms // 1000, (previous.epoch + 1) if previous is not None else 1)
        first = start_epoch(
            self.device, epoch, previous=previous, reason="simulated agent start", actor="agent", ts_ms=now_ms
        )
        self.head: AuditRecord = first
        self.unsent: list[AuditRecord] = [first]
        self.unsent_since = time.monotonic()
        self.in_flight: tuple[AuditHead, int, _Pending] | None = None
        self.reports: dict[str, _Pending] = {}
        self.generation = 0
        self.models: tuple[ModelInfo, ...] = ()
        self.heartbeat = 0
        self.connected = False
        sim.stats.records_made += 1  # the epoch_start record
        self.acked_generation = 0
        """The newest generation whose install reports were all acked."""
        self._report_generation: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._state_due = False
        self.records_acked = 0

    # --- messages -------------------------------------------------------------------------------------

    def _state(self, status: str) -> bytes:
        state = DeviceState(
            device=self.device,
            status=status,
            ts_ms=int(time.time() * 1000),
            agent_version=AGENT_VERSION,
            hardware=HARDWARE,
            models=self.models,
            heartbeat=self.heartbeat + 1,
            audit_head=self.head.head,
        )
        return seal(state, TopicKind.STATE, [self.key])

    def _batch(self) -> tuple[AuditHead, int, bytes]:
        records = self.unsent[: self.sim.options.max_batch]
        head = records[-1]
        checkpoint = sign_checkpoint(Checkpoint(self.device, head.epoch, head.seq, head.hash, head.ts_ms), self.key)
        payload = AuditBatch(self.device, head.epoch, tuple(records), checkpoint).encode()
        return head.head, len(records), payload

    def add_event(self, kind: str, data: Mapping[str, Any]) -> None:
        """Append one audit record to the chain (uploaded with the next batch)."""
        record = make_record(self.head, kind, "agent", data, int(time.time() * 1000))
        self.head = record
        if not self.unsent:
            self.unsent_since = time.monotonic()
        self.unsent.append(record)
        self.sim.stats.records_made += 1
        self._wake.set()

    # --- connection -----------------------------------------------------------------------------------

    async def run(self, delay: float) -> None:
        """Connect after ``delay`` and stay connected (reconnecting with jittered backoff) until cancelled."""
        await asyncio.sleep(delay)
        options = self.sim.options
        backoff = Backoff(options.reconnect_min_s, options.reconnect_max_s, self.rng)
        tls = tls_context(self.identity.tls)
        while not self.sim.stopping:
            started = time.monotonic()
            try:
                await self._session(tls)
            except LinkError as exc:
                log.debug("sim.disconnected", device_id=self.device, error=str(exc))
            if self.connected:
                self.connected = False
                self.sim.stats.disconnects += 1
            if time.monotonic() - started > 10:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _session(self, tls: Any) -> None:
        options = self.sim.options
        session = DeviceSession(
            host=self.sim.host,
            port=self.sim.port,
            tls=tls,
            device=self.device,
            will_topic=device_topic(self.device, TopicKind.STATE),
            will_payload=self._state("offline"),
            keepalive=options.keepalive_s,
            session_expiry=options.session_expiry_s,
        )
        async with session:
            for topic_filter in agent_subscriptions(self.device):
                await session.subscribe(topic_filter)
            await self._publish_state(session, "online")
            self.connected = True
            self.sim.on_connected(self)
            # Everything unacked goes again on every new connection (the agent's outbox.resend_all()).
            if self.in_flight is not None:
                self.in_flight[2].sent_at = 0.0
            for pending in self.reports.values():
                pending.sent_at = 0.0
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._reader(session))
                    tasks.create_task(self._ticker(session))
            except* LinkError as group:
                raise group.exceptions[0] from None
            except* asyncio.CancelledError:
                with contextlib.suppress(LinkError, TimeoutError):  # a clean stop says goodbye, as the agent
                    async with asyncio.timeout(2.0):
                        await self._publish_state(session, "offline")
                raise

    async def _publish_state(self, session: DeviceSession, status: str) -> None:
        await session.publish(device_topic(self.device, TopicKind.STATE), self._state(status), retain=True)
        self.heartbeat += 1
        self.sim.stats.states += 1

    async def _ticker(self, session: DeviceSession) -> None:
        options = self.sim.options
        rng = self.rng
        next_heartbeat = time.monotonic() + options.heartbeat_s * rng.uniform(0.8, 1.2)
        rate = options.events_per_min / 60.0
        next_event = time.monotonic() + rng.expovariate(rate) if rate > 0 else float("inf")
        while not self.sim.stopping:
            now = time.monotonic()
            if now >= next_event:
                if self.sim.generating:
                    self.add_event(rng.choice(EVENT_KINDS), {"n": self.sim.stats.records_made % 1000, "ok": True})
                next_event = now + rng.expovariate(rate)
            if now >= next_heartbeat or self._state_due:
                self._state_due = False
                await self._publish_state(session, "online")
                next_heartbeat = now + options.heartbeat_s * rng.uniform(0.8, 1.2)
            await self._send_due(session, now)
            wake_at = min(next_event, next_heartbeat, self._next_due(now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake_at - time.monotonic())):
                    await self._wake.wait()

    def _next_due(self, now: float) -> float:
        options = self.sim.options
        due = float("inf")
        if self.in_flight is not None:
            pending = self.in_flight[2]
            due = pending.sent_at + pending.delay
        elif len(self.unsent) >= options.max_batch:
            due = now  # a full batch goes at once (the agent sends the next batch as soon as one is acked)
        elif self.unsent:
            due = self.unsent_since + options.batch_delay_s
        for pending in self.reports.values():
            due = min(due, pending.sent_at + pending.delay)
        return max(due, now + 0.001) if due != float("inf") else due

    async def _send_due(self, session: DeviceSession, now: float) -> None:
        options = self.sim.options
        stats = self.sim.stats
        full = len(self.unsent) >= options.max_batch
        if self.in_flight is None and self.unsent and (full or now >= self.unsent_since + options.batch_delay_s):
            head, count, payload = self._batch()
            self.in_flight = (head, count, _Pending(payload))
        if self.in_flight is not None:
            pending = self.in_flight[2]
            if now >= pending.sent_at + pending.delay:
                if pending.sent_at:
                    stats.batch_resends += 1
                pending.delay = (
                    options.resend_after_s if not pending.sent_at else min(options.resend_max_s, pending.delay * 2)
                )
                pending.sent_at = now
                await session.publish(device_topic(self.device, TopicKind.AUDIT), pending.payload)
                stats.batches_sent += 1
        for report_id, pending in list(self.reports.items()):
            if now >= pending.sent_at + pending.delay and report_id in self.reports:
                if pending.sent_at:
                    stats.report_resends += 1
                pending.delay = (
                    options.resend_after_s if not pending.sent_at else min(options.resend_max_s, pending.delay * 2)
                )
                pending.sent_at = now
                await session.publish(device_topic(self.device, TopicKind.REPORT), pending.payload)

    async def _reader(self, session: DeviceSession) -> None:
        async for message in session.messages():
            if self.sim.stopping:
                return
            if not message.payload:
                continue
            try:
                kind = parse_device_topic(message.topic).kind
            except ProtocolError:
                continue  # repository metadata: not simulated
            if kind is TopicKind.ACK:
                self._on_ack(message)
            elif kind is TopicKind.ASSIGN:
                self._on_assign(message)
            self._wake.set()

    def _on_ack(self, message: InboundMessage) -> None:
        stats = self.sim.stats
        try:
            ack = open_sealed(message.topic, message.payload, self.sim.controller_keys).message
        except ProtocolError as exc:
            stats.acks_refused += 1
            log.warning("sim.ack_refused", device_id=self.device, error=str(exc))
            return
        assert isinstance(ack, Ack)
        stats.acks += 1
        if ack.audit is not None and self.in_flight is not None and ack.audit == self.in_flight[0]:
            _, count, _ = self.in_flight
            self.unsent = self.unsent[count:]
            self.unsent_since = time.monotonic()
            self.in_flight = None
            self.records_acked += count
            stats.records_acked += count
        for report_id in ack.report_ids:
            if self.reports.pop(report_id, None) is not None:
                stats.reports_acked += 1
                generation = self._report_generation.pop(report_id, 0)
                if not any(g == generation for g in self._report_generation.values()):
                    self.acked_generation = max(self.acked_generation, generation)
                    self.sim.on_installed(self, generation)

    def _on_assign(self, message: InboundMessage) -> None:
        try:
            assignment = open_sealed(message.topic, message.payload, self.sim.controller_keys).message
        except ProtocolError as exc:
            log.warning("sim.assignment_refused", device_id=self.device, error=str(exc))
            return
        assert isinstance(assignment, Assignment)
        if assignment.generation <= self.generation:
            return  # the retained copy again, or a replay: nothing to do
        self.generation = assignment.generation
        self.sim.stats.assignments_applied += 1
        models = []
        reports = []
        for desired in assignment.models:
            models.append(
                ModelInfo(
                    name=desired.name,
                    variant=desired.variant,
                    version=desired.version,
                    sha256=desired.sha256,
                    size=desired.length,
                    state="active",
                    loaded=False,
                )
            )
            reason = f"activated {desired.ref.key} (simulated, blob transfer skipped)"
            reports.append(self._report("install", "ok", reason, assignment.generation, desired.ref))
            self.add_event("model.activated", {"model": desired.ref.key, "generation": assignment.generation})
        if not assignment.models:
            reports.append(self._report("install", "ok", "no models desired", assignment.generation, None))
        for report in reports:
            self.reports[report.report_id] = _Pending(seal(report, TopicKind.REPORT, [self.key]))
            self._report_generation[report.report_id] = assignment.generation
            self.sim.stats.reports_made += 1
        self.models = tuple(models)
        self._state_due = True

    def _report(self, kind: str, outcome: str, reason: str, generation: int, model: Any) -> Report:
        return Report(
            report_id=secrets.token_hex(16),
            device=self.device,
            ts_ms=int(time.time() * 1000),
            kind=kind,
            outcome=outcome,
            reason=reason,
            generation=generation,
            model=model,
        )

    @property
    def idle(self) -> bool:
        """Nothing waits for an ack and nothing is unsent."""
        return self.in_flight is None and not self.unsent and not self.reports


class Simulation:
    """N simulated devices against one broker (see the module docstring). Use as an async context manager."""

    def __init__(
        self,
        identities: list[SimIdentity],
        *,
        host: str,
        port: int,
        controller_keys: Mapping[str, Ed25519PublicKey],
        options: SimulationOptions = SimulationOptions(),
        previous_heads: Mapping[str, AuditHead] | None = None,
    ) -> None:
        if not options.skip_blobs:
            raise ControllerError("blob transfer is not simulated: run with skip_blobs (--skip-blobs)")
        self.host = host
        self.port = port
        self.controller_keys = dict(controller_keys)
        self.options = options
        self.rng = random.Random(options.seed)  # noqa: S311 - jitter, not secrets
        self.stats = SimulationStats()
        self.generating = True
        """False stops new audit events (to drain before counting)."""
        self.stopping = False
        """True once the simulation is being stopped: the devices' loops end."""
        heads = previous_heads or {}
        self.devices = [SimulatedDevice(i, self, heads.get(i.device)) for i in identities]
        self._ever_connected: set[str] = set()
        self.all_connected = asyncio.Event()
        self.installed: dict[int, set[str]] = {}
        """Per assignment generation, the devices whose install reports for it were all acked."""
        self._tasks: list[asyncio.Task[None]] = []

    def on_connected(self, device: SimulatedDevice) -> None:
        self.stats.connects += 1
        self._ever_connected.add(device.device)
        if len(self._ever_connected) == len(self.devices) and not self.all_connected.is_set():
            self.stats.all_connected_s = time.monotonic() - self.stats.started
            self.all_connected.set()

    def on_installed(self, device: SimulatedDevice, generation: int) -> None:
        self.installed.setdefault(generation, set()).add(device.device)

    async def __aenter__(self) -> Simulation:
        self.stats.started = time.monotonic()
        rate = max(self.options.connect_rate, 0.001)
        for index, device in enumerate(self.devices):
            delay = index / rate * self.rng.uniform(0.9, 1.1)
            self._tasks.append(asyncio.create_task(device.run(delay), name=f"sim-{device.device}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Cancel again until every device task has ended: on Python 3.11 ``asyncio.wait_for`` (inside aiomqtt's
        # publish) can swallow a cancellation that races with the PUBACK, and a single cancel would then leave a
        # device running (and this exit waiting) forever. ``stopping`` also ends the devices' loops.
        self.stopping = True
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=2.0)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                log.warning("sim.device_failed", error=repr(task.exception()))
        self._tasks.clear()

    async def drain(self, within: float) -> bool:
        """Stop new audit events and wait until every device has everything acked; False on timeout."""
        self.generating = False
        deadline = time.monotonic() + within
        for device in self.devices:
            device._wake.set()
        while time.monotonic() < deadline:
            if all(d.idle for d in self.devices):
                return True
            await asyncio.sleep(0.2)
        return False

    def summary(self) -> dict[str, Any]:
        """Counters plus how many devices are connected and idle now."""
        return {
            **self.stats.as_dict(),
            "devices": len(self.devices),
            "connected_now": sum(d.connected for d in self.devices),
            "idle_now": sum(d.idle for d in self.devices),
            "elapsed_s": round(time.monotonic() - self.stats.started, 3),
        }


def controller_keys(home: FleetHome) -> dict[str, Ed25519PublicKey]:
    """The keys acks and assignments are signed with, as a device pins them from its bundle."""
    key = home.assignment_key()
    return {keyid(key): key.public_key()}
