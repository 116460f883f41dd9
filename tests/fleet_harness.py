"""A whole fleet on this box for the link's integration tests: controller home, broker, `serve`, agents.

Real parts only: the home is made by ``FleetHome.init`` (what ``edge-fleet init`` runs), the broker is a private
``mosquitto`` running *the configuration that init generated* (only its port is chosen free), ``serve`` is the
real :class:`controller.daemon.FleetServer`, and each agent is the real :class:`agent.link.mqtt.AgentLink` over a
real registry holding the real silero-vad ONNX model. Timers are shortened (keepalive 2 s) so that fault tests
stay bounded. The one seam a test may swap is the network path between an agent and the broker
(:class:`TcpProxy`, a real TCP proxy that can stop forwarding without closing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import Mosquitto, free_port
from click.testing import CliRunner

from agent.config import AgentConfig, LinkConfig, RegistryConfig
from agent.link.enrollment import install_bundle
from agent.link.mqtt import AgentLink, open_agent_link
from agent.registry import Registry
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, ControllerConfig, FleetConfig
from controller.daemon import FleetServer
from controller.home import FleetHome
from controller.link.mqtt import Backoff
from controller.store import DeviceRow

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "silero-vad"
MODEL_VARIANT = "onnx-fp32"

FAST_LINK = LinkConfig(
    keepalive_s=2,
    connect_timeout_s=3.0,
    reconnect_min_s=0.2,
    reconnect_max_s=1.0,
    state_interval_s=1.0,
    state_check_interval_s=0.2,
    resend_after_s=1.0,
    resend_max_s=2.0,
)


async def wait_for(predicate: Callable[[], Any], within: float = 15.0, *, what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Agent:
    """One in-process agent: its state dir, registry and running link."""

    name: str
    state_dir: Path
    registry: Registry
    config: AgentConfig
    link: AgentLink | None = None
    task: asyncio.Task[Any] | None = None
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def start(self, *, fault: Callable[[str], None] | None = None) -> AgentLink:
        """Open the link and run it as a task."""
        link = await self._stack.enter_async_context(
            open_agent_link(self.config, self.registry, agent_version="0.1.0-test", fault=fault)
        )
        assert link is not None, "the agent is not enrolled"
        self.link = link
        self.task = asyncio.create_task(link.run(), name=f"agent-{self.name}")
        return link

    async def stop(self) -> None:
        """Cancel the link (a clean stop: it publishes its offline state) and close its database."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        self.link = None


class Fleet:
    """Controller home + broker + serve + agents under one temporary directory."""

    def __init__(
        self,
        tmp: Path,
        *,
        max_queued_messages: int = 1000,
        max_packet_size: int = 2 * 1024 * 1024,
        audit_workers: int = -1,
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        config = FleetConfig(
            broker=BrokerConfig(
                host="127.0.0.1",
                port=self.port,
                bind="127.0.0.1",
                max_packet_size=max_packet_size,
                max_queued_messages=max_queued_messages,
                user="root" if os.geteuid() == 0 else "",
            ),
            controller=ControllerConfig(
                keepalive_s=2, heartbeat_timeout_s=4, assignment_poll_s=0.2, audit_workers=audit_workers
            ),
        )
        self.home = FleetHome.init(tmp / "home", config)
        self.broker = Mosquitto(tmp / "broker", config_file=self.home.mosquitto_conf_path, port=self.port)
        self.server: FleetServer | None = None
        self.server_task: asyncio.Task[Any] | None = None
        self.agents: dict[str, Agent] = {}

    # --- controller -------------------------------------------------------------------------------------

    async def start_server(self) -> FleetServer:
        """Run ``serve`` in-process and wait until it is connected."""
        self.server = FleetServer(self.home, backoff=Backoff(0.2, 1.0))
        self.server_task = asyncio.create_task(self.server.run(), name="fleet-server")
        await wait_for(self.server.link.connected.is_set, what="serve to connect")
        return self.server

    async def stop_server(self) -> None:
        if self.server_task is not None:
            self.server_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.server_task
            self.server_task = None

    def cli(self, *args: str) -> str:
        """Run ``edge-fleet --home HOME ARGS`` (in-process, as the console script would); return its output."""
        result = CliRunner().invoke(fleet_cli, ["--home", str(self.home.root), *args], catch_exceptions=False)
        assert result.exit_code == 0, f"edge-fleet {' '.join(args)} failed ({result.exit_code}): {result.output}"
        return result.output

    def devices(self) -> dict[str, dict[str, Any]]:
        """``edge-fleet devices --json`` by device id."""
        return {d["id"]: d for d in json.loads(self.cli("devices", "--json"))}

    def device_row(self, device: str) -> DeviceRow:
        store = self.home.open_store()
        try:
            row = store.get_device(device)
        finally:
            store.close()
        assert row is not None
        return row

    def reports(self, device: str | None = None) -> list[dict[str, Any]]:
        store = self.home.open_store()
        try:
            return store.reports(device, limit=100_000)
        finally:
            store.close()

    def rejections(self, device: str | None = None) -> list[dict[str, Any]]:
        store = self.home.open_store()
        try:
            return store.rejections(device, limit=1000)
        finally:
            store.close()

    # --- agents -----------------------------------------------------------------------------------------

    def enroll(self, name: str, *, models: tuple[int, ...] = (1, 2), link: LinkConfig = FAST_LINK) -> Agent:
        """Enroll device ``name``, install its bundle in a fresh state dir holding silero-vad ``models``."""
        bundle = self.tmp / f"{name}.bundle"
        self.cli("device", "enroll", name, "--out", str(bundle))
        state_dir = self.tmp / "agents" / name
        install_bundle(state_dir, bundle.read_bytes())
        registry = Registry.open(state_dir, RegistryConfig())
        registry.recover()
        model = ROOT / ".cache" / "models" / "silero_vad.onnx"
        for version in models:
            registry.import_file(model, name=MODEL_NAME, variant=MODEL_VARIANT, version=version, activate=version == 1)
        config = dataclasses.replace(AgentConfig(), state_dir=state_dir, link=link)
        agent = Agent(name, state_dir, registry, config)
        self.agents[name] = agent
        return agent

    def assign(self, device: str, version: int) -> int:
        """``edge-fleet device assign DEVICE --model silero-vad@VERSION:onnx-fp32``; returns the generation."""
        output = self.cli(
            "device", "assign", device, "--model", f"{MODEL_NAME}@{version}:{MODEL_VARIANT}", "--format", "onnx"
        )
        return int(output.split("generation ")[1].split()[0])

    async def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                await agent.stop()
            agent.registry.close()
        await self.stop_server()
        self.broker.kill()


@contextlib.asynccontextmanager
async def running_fleet(tmp: Path, **options: Any) -> AsyncIterator[Fleet]:
    """A fleet with its broker started (``serve`` and agents are started by the test)."""
    fleet = Fleet(tmp, **options)
    fleet.broker.start()
    try:
        yield fleet
    finally:
        await fleet.close()


class TcpProxy:
    """A loopback TCP proxy to ``target_port`` that can black-hole traffic without closing connections.

    While ``paused``, bytes from either side are read and dropped and EOFs are ignored: to both ends the path
    looks like a half-open connection (nothing arrives, nothing is closed). New connections are accepted and
    black-holed too. ``heal()`` forwards again for connections made from then on.

    With ``max_chunk``, a read of more than that many bytes from the client closes both sides: a path that
    cannot carry large packets and says nothing about it (no MQTT reason code, no announced limit).
    """

    def __init__(self, target_port: int, *, max_chunk: int | None = None) -> None:
        self.target_port = target_port
        self.max_chunk = max_chunk
        self.port = 0
        self.paused = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        self.paused = True

    def heal(self) -> None:
        self.paused = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._proxy(reader, writer)
        except asyncio.CancelledError:
            return  # closing the proxy; the stream machinery would log a cancelled handler as an error
        finally:
            self._tasks.discard(task)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connections += 1
        if self.paused:
            await self._drain_forever(reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, limit=self.max_chunk, peer=writer),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        limit: int | None = None,
        peer: asyncio.StreamWriter | None = None,
    ) -> None:
        while True:
            data = await reader.read(65536)
            if self.paused:
                await self._drain_forever(reader, first=data)
                return
            if not data or (limit is not None and len(data) > limit):
                writer.close()
                if peer is not None and data:
                    peer.close()
                return
            writer.write(data)
            await writer.drain()

    async def _drain_forever(self, reader: asyncio.StreamReader, first: bytes = b"x") -> None:
        data = first
        while data:
            data = await reader.read(65536)
        await asyncio.sleep(3600)  # EOF seen: keep the other side open, say nothing


def spawn_serve(
    home_root: Path, log: Path, env: Mapping[str, str] | None = None, *, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """``edge-fleet serve`` for the home at ``home_root`` as a child process (``python -m controller``, as systemd
    runs it), the repository on its path, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "controller", "--home", str(home_root), "serve"],
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


async def run_subprocess(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start ``python ARGS`` with the repository on the path."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=str(ROOT),
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


Predicate = Callable[[], Awaitable[bool] | bool]
