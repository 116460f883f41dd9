"""``serve``'s assignment publisher: a retained assignment is never left older than the fleet DB's newest.

Real parts: a fleet home made by ``FleetHome.init``, its fleet DB (one SQLite file, shared by two servers in the
second test), the real :class:`FleetServer` publisher and group commit. The fake is the broker, at one named seam:
``FleetServer.link`` is replaced by :class:`FakeLink`, which keeps the retained message per topic like a broker
and takes a configurable time per PUBACK (so the races are deterministic).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.config import BrokerConfig, ControllerConfig, FleetConfig
from controller.daemon import FleetServer
from controller.home import FleetHome
from controller.rollout import issue_assignment
from controller.store import FleetStore
from protocols.keys import keyid
from protocols.link import open_sealed
from protocols.messages import Assignment, DesiredModel

pytestmark = [pytest.mark.component, pytest.mark.timeout(60)]

DEVICES = [f"d{i:02d}" for i in range(10)]


class FakeBroker:
    """The retained store: the newest message published per topic, and every assignment publish in order."""

    def __init__(self) -> None:
        self.retained: dict[str, int] = {}
        self.log: list[tuple[str, str, int]] = []


class FakeLink:
    """The seam for the broker (see the module docstring): ``publish`` takes ``delay`` seconds, then the message
    is retained and acknowledged (release metadata is acknowledged at once and not kept)."""

    def __init__(self, broker: FakeBroker, server: FleetServer, name: str, delay: float) -> None:
        self.broker, self.name, self.delay = broker, name, delay
        self.connected = asyncio.Event()
        self.connects = 1
        self.up_since: float | None = None
        key = server.home.assignment_key()
        self._trusted = {keyid(key): key.public_key()}

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if "/assign" not in topic:
            return  # release metadata
        await asyncio.sleep(self.delay)
        message = open_sealed(topic, payload, self._trusted).message
        assert isinstance(message, Assignment)
        self.broker.retained[message.device] = message.generation
        self.broker.log.append((self.name, message.device, message.generation))


def _home(tmp: Path) -> FleetHome:
    config = FleetConfig(
        broker=BrokerConfig(host="127.0.0.1", port=1883), controller=ControllerConfig(assignment_poll_s=0.1)
    )
    return FleetHome.init(tmp / "home", config)


def _enroll(store: FleetStore, device: str) -> None:
    """A device row as enrolment writes it (the publisher skips revoked devices only)."""
    with store.transaction():
        store.add_device(
            device,
            cert_serial=secrets.randbits(64),
            cert_not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
            signing_keyid="k",
            signing_key_pem="-",
        )


def _model(version: int) -> DesiredModel:
    return DesiredModel("m", version, "q4_0", f"models/m/{version}/q4_0.gguf", f"{version:064x}", 1000)


def _assign(server: FleetServer, store: FleetStore, device: str, version: int) -> int:
    with store.transaction():
        return issue_assignment(store, server.home.assignment_key(), device, [_model(version)])


@contextlib.asynccontextmanager
async def _serving(server: FleetServer, link: FakeLink) -> AsyncIterator[None]:
    server._store = await server.db(FleetStore.open, server.home.db_path)
    server.link = link  # type: ignore[assignment]  # the broker seam
    tasks = [asyncio.create_task(server.ingest.run()), asyncio.create_task(server._assignment_loop())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.db(server.store.close)


def _newest(store: FleetStore) -> dict[str, int]:
    return {row.device: row.generation for row in store.latest_assignments()}


async def test_a_reconnect_never_republishes_an_older_generation_over_a_newer_one(tmp_path: Path) -> None:
    """A reconnect's republish runs while a newer generation is inserted (a rollback): the broker ends with the
    newest generation of every device, and no device's generations are published out of order."""
    home = _home(tmp_path)
    store = FleetStore.open(home.db_path)
    server = FleetServer(home)
    for device in DEVICES:
        _enroll(store, device)
        _assign(server, store, device, 1)
        generation = _assign(server, store, device, 2)
        store.mark_published(device, generation, now=0.0)
    broker = FakeBroker()
    link = FakeLink(broker, server, "a", delay=0.05)
    async with _serving(server, link):
        link.connected.set()
        link.up_since = 0.0
        reconnect = asyncio.create_task(server._on_connect(link))  # type: ignore[arg-type]
        await asyncio.sleep(0.12)
        rolled_back = _assign(server, store, "d09", 1)  # the driver halts a rollout: d09 back to v1
        await reconnect
        await asyncio.sleep(1.5)
    assert broker.retained == _newest(store)
    assert broker.retained["d09"] == rolled_back
    for device in DEVICES:
        sent = [generation for _, d, generation in broker.log if d == device]
        assert sent == sorted(sent), (device, sent)
    store.close()


async def test_two_servers_leave_the_newest_generation_retained(tmp_path: Path) -> None:
    """Two `serve` processes (ADR 0012): the slow one's publish of generation N lands after the fast one published
    N+1; the slow one sees N+1 after its PUBACK and publishes it again, so the broker ends with N+1."""
    home = _home(tmp_path)
    store = FleetStore.open(home.db_path)
    slow, fast = FleetServer(home), FleetServer(home)
    _enroll(store, "d00")
    broker = FakeBroker()
    slow_link = FakeLink(broker, slow, "slow", delay=0.6)
    fast_link = FakeLink(broker, fast, "fast", delay=0.01)
    async with _serving(slow, slow_link), _serving(fast, fast_link):
        for link in (slow_link, fast_link):
            link.connected.set()
        await asyncio.sleep(0.3)  # both idle: nothing unpublished
        first = _assign(slow, store, "d00", 1)
        await asyncio.sleep(0.25)  # the slow one has picked it up (its poll is 0.1 s) and is still publishing
        second = _assign(slow, store, "d00", 2)
        await asyncio.sleep(2.0)
    assert first < second
    assert ("slow", "d00", first) in broker.log
    assert broker.log.index(("slow", "d00", first)) > broker.log.index(("fast", "d00", second))  # the race happened
    assert broker.retained["d00"] == second
    store.close()
