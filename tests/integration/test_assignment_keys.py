"""Assignment key rotation end to end: real Mosquitto, real ``serve``, a real agent link (DESIGN.md §4).

``edge-fleet keys rotate assignments`` publishes the new key as the TUF target ``keys/assignments.json``; the
device learns it over the link's retained repository metadata, accepts the re-signed and the new assignments,
accepts acks signed by the new key, and refuses an assignment signed by the removed key.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet_harness import running_fleet, wait_for

from agent.link.mqtt import AgentLink
from protocols.keys import keyid
from protocols.link import seal
from protocols.messages import Assignment
from protocols.topics import TopicKind, device_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DEVICE = "dev-rotate"


async def outbox_empty(link: AgentLink) -> bool:
    return (await link.outbox.counts())["pending"] == 0


async def test_rotated_assignment_key_is_learnt_through_tuf_and_the_old_one_refused(tmp_path: Path) -> None:
    """After a rotation the device follows the new key (assignments and acks) and refuses the removed one."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll(DEVICE)
        link = await agent.start()
        await wait_for(lambda: fleet.devices()[DEVICE]["online"], what="the device online")
        first = fleet.assign(DEVICE, 2)

        async def accepted() -> int:
            return (await link.dispatcher.accepted_generation())[0]

        await wait_for(lambda: accepted(), what="the first assignment")
        assert await accepted() == first
        old = fleet.home.assignment_key()
        assert set(link.keyring.keys) == {keyid(old)}

        assert "re-signed 1 assignment" in fleet.cli("keys", "rotate", "assignments")
        new = fleet.home.assignment_key()
        await fleet.stop_server()
        await fleet.start_server()  # signs with the new key from now on, publishes the new metadata

        # the re-signed assignment (generation + 1) fails with the enrollment key, the keyring refreshes, accepts
        await wait_for(lambda: _at_least(link, first + 1), within=45, what="the re-signed assignment accepted")
        assert set(link.keyring.keys) == {keyid(new)}
        second = fleet.assign(DEVICE, 1)
        await wait_for(lambda: _at_least(link, second), what="an assignment signed by the new key")
        await wait_for(lambda: outbox_empty(link), what="reports acked with the new key")

        # someone holding the removed key signs a newer assignment: refused (signed report), nothing changes
        def refusals() -> int:
            return sum(1 for r in fleet.reports(DEVICE) if r["outcome"] == "refused" and "trusted key" in r["reason"])

        before = refusals()
        forged = Assignment(device=DEVICE, generation=second + 10, issued_ts_ms=int(time.time() * 1000), models=())
        assert fleet.server is not None
        await fleet.server.link.publish(device_topic(DEVICE, TopicKind.ASSIGN), seal(forged, TopicKind.ASSIGN, [old]))
        await wait_for(lambda: refusals() > before, within=30, what="the refusal report")
        assert await accepted() == second


async def _at_least(link: AgentLink, generation: int) -> bool:
    return (await link.dispatcher.accepted_generation())[0] >= generation


async def test_an_assignment_waiting_at_reconnect_is_verified_with_the_refreshed_keys(tmp_path: Path) -> None:
    """The device is offline during a rotation; an assignment signed by the removed key waits for it on the broker
    (retained, a high generation). On reconnect it is held until the keys are refreshed, so it is refused, and the
    re-signed assignment is accepted."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll(DEVICE)
        link = await agent.start()
        await wait_for(lambda: fleet.devices()[DEVICE]["online"], what="the device online")
        first = fleet.assign(DEVICE, 2)
        await wait_for(lambda: _at_least(link, first), what="the first assignment")
        old = fleet.home.assignment_key()
        await agent.stop()

        fleet.cli("keys", "rotate", "assignments")
        new = fleet.home.assignment_key()
        await fleet.stop_server()
        await fleet.start_server()  # publishes the new metadata and the re-signed assignment (retained)
        forged = Assignment(device=DEVICE, generation=2**62, issued_ts_ms=int(time.time() * 1000), models=())
        assert fleet.server is not None
        topic = device_topic(DEVICE, TopicKind.ASSIGN)
        await fleet.server.link.publish(topic, seal(forged, TopicKind.ASSIGN, [old]), retain=True)

        link = await agent.start()
        await wait_for(lambda: _refreshed(link, keyid(new)), within=45, what="the keys refreshed")
        second = fleet.assign(DEVICE, 1)
        await wait_for(lambda: _at_least(link, second), what="an assignment signed by the new key")
        assert (await link.dispatcher.accepted_generation())[0] == second


def _refreshed(link: AgentLink, key: str) -> bool:
    return set(link.keyring.keys) == {key}
