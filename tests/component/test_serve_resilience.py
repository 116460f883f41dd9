"""``serve`` must never stop on one bad step: a failed group commit or a failing rollout tick is logged and the
daemon goes on (the devices re-send what was not acked; the rollout state is in the DB and the next tick retries).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controller.config import BrokerConfig, FleetConfig
from controller.daemon import FleetServer
from controller.home import FleetHome
from controller.link.mqtt import InboundMessage
from controller.store import FleetStore

pytestmark = [pytest.mark.component, pytest.mark.timeout(60)]


@pytest.fixture
def server(tmp_path: Path) -> FleetServer:
    home = FleetHome.init(tmp_path / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
    return FleetServer(home)


async def test_a_failed_commit_is_not_acked_and_does_not_raise(server: FleetServer) -> None:
    loop = asyncio.get_running_loop()
    message = InboundMessage("edgefleet/v1/d/dev-1/report", b"", False)
    for audit in (True, False):
        future: asyncio.Future[object] = loop.create_future()
        future.set_exception(OSError("database or disk is full"))
        if audit:  # returns: no ack, nothing raised into serve's task group
            await server._after_audit("dev-1", future)
        else:
            await server._after_sealed(server.link, message, "dev-1", future)
    assert server.acks_sent == 0


async def test_a_failing_rollout_tick_is_retried_and_serve_goes_on(
    server: FleetServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    retried = asyncio.Event()
    loop = asyncio.get_running_loop()

    def tick(store: FleetStore) -> None:
        nonlocal calls
        calls += 1
        if calls >= 2:
            loop.call_soon_threadsafe(retried.set)
        raise RuntimeError("database is locked")

    monkeypatch.setattr(server.rollouts, "tick", tick)
    server._store = FleetStore.open(tmp_path / "fleet.db")
    task = asyncio.create_task(server._rollout_loop())
    try:
        await asyncio.wait_for(retried.wait(), 20)
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server._store.close()
