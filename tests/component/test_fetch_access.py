"""``serve``'s fetch handler serves model chunks only to enrolled devices that are not revoked.

Real parts: a fleet home, its SQLite DB and release repository, the real ``_serve_chunks`` handler. The broker is
the one seam (a link that records what is published).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from controller.config import BrokerConfig, FleetConfig
from controller.daemon import FleetServer, _serve_chunks
from controller.home import FleetHome
from controller.link.mqtt import InboundMessage
from controller.releases import ReleaseRepository
from controller.store import FleetStore
from protocols.messages import FetchRequest
from protocols.topics import TopicKind, device_topic

pytestmark = [pytest.mark.component, pytest.mark.timeout(60)]


class RecordingLink:
    """The broker seam: records (topic, payload length) of every publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sent.append((topic, len(payload)))


async def _fetch(tmp_path: Path, device: str, *, enroll: bool, revoke: bool) -> tuple[RecordingLink, FleetStore]:
    home = FleetHome.init(tmp_path / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
    if enroll:
        home.enroll_device(device, tmp_path / f"{device}.bundle")
    if revoke:
        home.revoke_device(device)
    repo = ReleaseRepository(home.repo_dir)
    blob = tmp_path / "m.gguf"
    blob.write_bytes(b"GGUF" + b"x" * 5000)
    entry = repo.add_model(blob, name="m", variant="q8_0")
    repo.publish()
    server = FleetServer(home)
    link = RecordingLink()
    server.link = link  # type: ignore[assignment]  # the broker seam
    server._store = await server.db(FleetStore.open, home.db_path)
    request = FetchRequest(
        device=device,
        transfer_id=secrets.token_hex(16),
        target_path=entry.path,
        sha256=entry.sha256,
        chunk_size=entry.fields.chunk_size,
        indices=(0,),
    )
    try:
        await _serve_chunks(
            server, InboundMessage(device_topic(device, TopicKind.FETCH), request.encode(), False), device
        )
    finally:
        await server.db(server.store.close)
    return link, home.open_store()


@pytest.mark.parametrize(("enroll", "revoke"), [(True, True), (False, False)])
async def test_a_revoked_or_unknown_device_gets_no_chunks(tmp_path: Path, enroll: bool, revoke: bool) -> None:
    """A fetch from a revoked or never-enrolled device is refused and recorded as a rejection."""
    link, store = await _fetch(tmp_path, "stolen", enroll=enroll, revoke=revoke)
    assert link.sent == []
    reasons = [r["reason"] for r in store.rejections("stolen")]
    assert reasons == ["device is revoked" if revoke else "unknown device: not enrolled"]


async def test_an_enrolled_device_gets_its_chunks(tmp_path: Path) -> None:
    """The same fetch from an enrolled device is answered with the chunk it asked for."""
    link, store = await _fetch(tmp_path, "shop-1", enroll=True, revoke=False)
    assert [topic for topic, _ in link.sent] == [device_topic("shop-1", TopicKind.CHUNK)]
    assert store.rejections("shop-1") == []
