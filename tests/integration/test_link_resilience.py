"""The link survives unexpected errors in its own loops (a full disk, an SQLite error): logged, retried, never the
end of the agent.

A private Mosquitto, the real ``serve`` and a real agent link (``tests/fleet_harness.py``). The fault is injected
at one named seam: the dispatcher's ``reconcile`` raises ``sqlite3.OperationalError`` once, as ``LinkStore.run``
does when the database is locked or the disk is full.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fleet_harness import running_fleet, wait_for

import agent.link.mqtt as mqtt_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_an_unexpected_error_in_the_dispatcher_is_retried_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatcher's loop fails with an SQLite error: the link task keeps running, the loop starts again after a
    backoff and applies the assignment."""
    monkeypatch.setattr(mqtt_module, "LOOP_RESTART_MIN_S", 0.2, raising=False)
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-1")
        link = await agent.start()
        await wait_for(lambda: fleet.devices()["dev-1"]["online"], what="the device online")
        reconcile = link.dispatcher.reconcile
        failures: list[str] = []

        async def failing_once() -> Any:
            if not failures:
                failures.append("reconcile")
                raise sqlite3.OperationalError("database or disk is full")
            return await reconcile()

        monkeypatch.setattr(link.dispatcher, "reconcile", failing_once)
        generation = fleet.assign("dev-1", 2)
        await wait_for(lambda: failures, what="the injected failure")
        await wait_for(
            lambda: [r for r in fleet.reports("dev-1") if r["generation"] == generation], what="the assignment applied"
        )
        assert agent.task is not None
        assert not agent.task.done(), "the link ended"
        assert link.connected.is_set()
