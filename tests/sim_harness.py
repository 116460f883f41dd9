"""Fleet-scale runs for ``bench/fleet.py`` and ``tests/integration/test_fleet_scale.py``: real parts only.

A controller home made by ``FleetHome.init``; a private ``mosquitto`` running *the configuration init generated*
(TLS listener, per-device certificates, CRL, per-device ACL; only its port is chosen free); one or more real
``edge-fleet serve`` processes (``python -m controller serve``; a second one gets its own identity from
``edge-fleet controller add`` and ``EDGE_FLEET_CONTROLLER_NAME``, and shares the home's fleet DB); and the
simulated devices of :mod:`controller.simulate` in this process. Nothing is mocked: the counts checked come from
the fleet DB the controllers wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from broker import Mosquitto, free_port
from fleet_harness import spawn_serve

from controller.config import CONTROLLER_NAME_ENV, BrokerConfig, ControllerConfig, FleetConfig
from controller.home import FleetHome
from controller.simulate import Simulation, SimulationOptions, controller_keys, enroll_simulated
from protocols.link import seal
from protocols.messages import Assignment, DesiredModel, target_path
from protocols.topics import TopicKind

ROOT = Path(__file__).resolve().parent.parent
MODEL = DesiredModel(
    name="smollm2-135m-instruct",
    version=1,
    variant="q4_0",
    target_path=target_path("smollm2-135m-instruct", 1, "q4_0"),
    sha256="ab" * 32,
    length=98_000_000,
)


def raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one (mosquitto, started from here, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class ControllerProcess:
    """One ``edge-fleet serve`` child process, with its CPU time and peak memory sampled."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    peak_rss: int = 0
    _ps: psutil.Process | None = None

    def _family(self) -> list[psutil.Process]:
        """``serve`` and its children (the audit shards' worker processes, controller.audit_shards)."""
        if self._ps is None:
            self._ps = psutil.Process(self.process.pid)
        return [self._ps, *self._ps.children(recursive=True)]

    def sample(self) -> None:
        """Update the peak resident memory of ``serve`` and its workers, summed."""
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in self._family()))

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, ``serve``'s and its live workers'."""
        with contextlib.suppress(psutil.Error):
            return float(sum(t.user + t.system for t in (p.cpu_times() for p in self._family())))
        return 0.0

    def kill(self) -> None:
        """SIGKILL: nothing is flushed, nothing is said to the broker."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class ScaleFleet:
    """Home + broker + controllers for one run."""

    tmp: Path
    session_expiry_s: int = 0
    heartbeat_timeout_s: int = 120
    home: FleetHome = field(init=False)
    broker: Mosquitto = field(init=False)
    controllers: list[ControllerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        port = free_port()
        config = FleetConfig(
            broker=BrokerConfig(
                host="127.0.0.1",
                port=port,
                bind="127.0.0.1",
                max_queued_messages=10_000,
                user="root" if os.geteuid() == 0 else "",
            ),
            # Session expiry 0: a controller that dies leaves the shared group at once, so the broker sends
            # the group's messages to the survivor (devices re-send what the dead one never acked).
            controller=ControllerConfig(
                keepalive_s=10,
                session_expiry_s=self.session_expiry_s,
                heartbeat_timeout_s=self.heartbeat_timeout_s,
                assignment_poll_s=0.2,
            ),
        )
        self.home = FleetHome.init(self.tmp / "home", config)
        self.broker = Mosquitto(self.tmp / "broker", config_file=self.home.mosquitto_conf_path, port=port)

    def start_broker(self) -> None:
        raise_fd_limit()
        self.broker.start()

    def broker_pid(self) -> int:
        """The mosquitto process id (for its CPU use; tests/broker.py keeps the Popen private)."""
        process = self.broker._process
        assert process is not None, "the broker is not running"
        return process.pid

    def add_controller_identity(self, name: str) -> None:
        """``edge-fleet controller add NAME`` and an ACL reload."""
        self.home.add_controller(name)
        self.broker.reload()
        time.sleep(0.5)

    def start_controller(self, name: str = "main") -> ControllerProcess:
        log_path = self.tmp / f"serve-{name}.log"
        process = spawn_serve(self.home.root, log_path, {CONTROLLER_NAME_ENV: name}, new_session=True)
        controller = ControllerProcess(name, process, log_path)
        self.controllers.append(controller)
        return controller

    def simulation(self, count: int, options: SimulationOptions, prefix: str = "sim") -> Simulation:
        identities = enroll_simulated(self.home, count, prefix)
        return Simulation(
            identities,
            host="127.0.0.1",
            port=self.broker.port,
            controller_keys=controller_keys(self.home),
            options=options,
        )

    def deploy(self, devices: list[str]) -> int:
        """A signed assignment of :data:`MODEL` for every device in one transaction (what ``edge-fleet device
        assign`` writes for one device); ``serve`` publishes them. Returns the generation (the same for all)."""
        key = self.home.assignment_key()
        store = self.home.open_store()
        generations = set()
        try:
            with store.transaction():
                for device in devices:
                    generation = store.next_generation(device)
                    assignment = Assignment(
                        device=device, generation=generation, issued_ts_ms=int(time.time() * 1000), models=(MODEL,)
                    )
                    store.add_assignment(
                        device, generation, seal(assignment, TopicKind.ASSIGN, [key]), [MODEL.to_dict()]
                    )
                    generations.add(generation)
        finally:
            store.close()
        assert len(generations) == 1
        return generations.pop()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the fleet DB (a separate read-only connection; WAL lets it run beside the writers)."""
        conn = sqlite3.connect(f"file:{self.home.db_path}?mode=ro", uri=True, timeout=30.0)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def counts(self, prefix: str = "sim") -> dict[str, int]:
        """Online devices, stored audit records and reports, and the duplicates the controllers counted."""
        like = (f"{prefix}-%",)
        return {
            "online": self.query("SELECT count(*) FROM devices WHERE id LIKE ? AND status = 'online'", like)[0][0],
            "audit_records": self.query("SELECT count(*) FROM audit_records WHERE device LIKE ?", like)[0][0],
            "audit_duplicates": self.query(
                "SELECT coalesce(sum(duplicates), 0) FROM audit_heads WHERE device LIKE ?", like
            )[0][0],
            "reports": self.query("SELECT count(*) FROM reports WHERE device LIKE ?", like)[0][0],
            "report_duplicates": self.query(
                "SELECT coalesce(sum(duplicates), 0) FROM reports WHERE device LIKE ?", like
            )[0][0],
            "alerts": self.query("SELECT count(*) FROM audit_alerts WHERE device LIKE ?", like)[0][0],
            "rejections": self.query("SELECT count(*) FROM rejections WHERE device LIKE ?", like)[0][0],
        }

    def close(self) -> None:
        for controller in self.controllers:
            controller.stop()
        self.broker.kill()


@contextlib.asynccontextmanager
async def scale_fleet(tmp: Path, **options: Any) -> AsyncIterator[ScaleFleet]:
    fleet = ScaleFleet(tmp, **options)
    fleet.start_broker()
    try:
        yield fleet
    finally:
        fleet.close()


async def wait_until(predicate: Any, within: float, *, what: str, every: float = 0.25, sample: Any = None) -> float:
    """Poll ``predicate()`` until truthy; returns the seconds it took. Raises AssertionError after ``within``."""
    started = time.monotonic()
    while True:
        if sample is not None:
            sample()
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(every)
