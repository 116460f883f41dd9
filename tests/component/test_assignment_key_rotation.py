"""Assignment keys rotate through TUF: ``edge-fleet keys rotate assignments`` → the device's keyring.

Real parts: a fleet home made by ``FleetHome.init`` (its TUF repository and assignment key), a device enrolled by
the CLI, the agent's real :class:`ReleaseUpdater` reading the repository's metadata directory (the
:class:`DirectorySource` seam instead of the broker; the integration tests cover transport), the real
:class:`ControllerKeyring` and :class:`AssignmentVerifier`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.link.dispatch import AssignmentVerifier, Dispatcher
from agent.link.enrollment import Enrollment, install_bundle, load_enrollment
from agent.link.keyring import ControllerKeyring
from agent.link.outbox import Outbox
from agent.link.store import LinkStore
from agent.link.updater import DirectorySource, ReleaseUpdater
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from controller.releases import ReleaseRepository
from protocols.errors import VerificationError
from protocols.keys import Ed25519PrivateKey, keyid
from protocols.link import open_sealed, seal
from protocols.messages import Assignment
from protocols.topics import TopicKind, device_topic

pytestmark = [pytest.mark.component, pytest.mark.timeout(90)]

DEVICE = "dev-rotate"


class Setup:
    """A fleet home, an enrolled device's enrollment, its TUF updater and keyring."""

    def __init__(self, tmp: Path) -> None:
        self.home = FleetHome.init(tmp / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
        self.tmp = tmp
        bundle = tmp / "bundle"
        self.fleet("device", "enroll", DEVICE, "--out", str(bundle))
        install_bundle(tmp / "state", bundle.read_bytes())
        enrollment = load_enrollment(tmp / "state")
        assert enrollment is not None
        self.enrollment: Enrollment = enrollment
        self.repo = ReleaseRepository(self.home.repo_dir)
        self.updater = ReleaseUpdater(
            tmp / "tuf", DirectorySource(self.repo.metadata_dir), bootstrap=enrollment.bundle.tuf_root.encode()
        )
        self.cache = tmp / "assignment-keys.json"
        self.keyring = self.new_keyring()
        self.verifier = AssignmentVerifier(
            DEVICE, enrollment.controller_keys, enrollment.controller_threshold, keyring=self.keyring
        )

    def new_keyring(self) -> ControllerKeyring:
        return ControllerKeyring(self.enrollment.controller_keys, self.enrollment.controller_threshold, self.cache)

    def fleet(self, *args: str) -> str:
        result = CliRunner().invoke(fleet_cli, ["--home", str(self.home.root), *args])
        assert result.exit_code == 0, result.output
        return result.output


def assignment(key: Ed25519PrivateKey, generation: int) -> bytes:
    """A signed, empty assignment of ``generation`` for the device."""
    message = Assignment(device=DEVICE, generation=generation, issued_ts_ms=int(time.time() * 1000), models=())
    return seal(message, TopicKind.ASSIGN, [key])


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """An initialised fleet with one enrolled device."""
    return Setup(tmp_path)


async def test_rotation_end_to_end_and_removed_keys_are_refused(setup: Setup) -> None:
    """After ``keys rotate assignments`` and a TUF refresh the device verifies only the new key's assignments."""
    old = setup.home.assignment_key()
    setup.verifier.verify(assignment(old, 1))
    assert not await setup.keyring.refresh(setup.updater.assignment_keys)  # nothing published: enrollment keys
    assert set(setup.keyring.keys) == {keyid(old)}

    output = setup.fleet("keys", "rotate", "assignments")
    new = setup.home.assignment_key()
    assert keyid(new) != keyid(old)
    assert keyid(new) in output
    assert "restart" not in output  # serve reloads the key file itself (FleetServer.signing_key)

    fresh = assignment(new, 2)
    with pytest.raises(VerificationError):
        setup.verifier.verify(fresh)  # the device has not refreshed yet: an unknown key...
    assert setup.keyring.stale.is_set()  # ...which asks for a refresh
    assert await setup.keyring.refresh(setup.updater.assignment_keys)
    assert setup.verifier.verify(fresh).generation == 2
    with pytest.raises(VerificationError):
        setup.verifier.verify(assignment(old, 3))  # the removed key is refused from now on

    # a restart keeps the rotated keys, even before the next refresh
    assert set(setup.new_keyring().keys) == {keyid(new)}

    # a second rotation retires the first new key too; model targets are unaffected by the keys target
    setup.fleet("keys", "rotate", "assignments")
    newer = setup.home.assignment_key()
    assert await setup.keyring.refresh(setup.updater.assignment_keys)
    setup.verifier.verify(assignment(newer, 4))
    with pytest.raises(VerificationError):
        setup.verifier.verify(assignment(new, 5))
    assert setup.repo.entries() == []
    assert setup.repo.assignment_keys() is not None


async def test_rotation_re_signs_the_newest_assignment_of_every_device(setup: Setup) -> None:
    """The newest assignment is re-issued under a new generation, signed by the new key, same desired state."""
    old = setup.home.assignment_key()
    store = setup.home.open_store()
    try:
        with store.transaction():
            store.add_assignment(DEVICE, 1, assignment(old, 1), [])
    finally:
        store.close()
    assert "re-signed 1 assignment" in setup.fleet("keys", "rotate", "assignments")
    new = setup.home.assignment_key()
    store = setup.home.open_store()
    try:
        latest = store.latest_assignments()
    finally:
        store.close()
    assert [(row.device, row.generation) for row in latest] == [(DEVICE, 2)]
    message = open_sealed(device_topic(DEVICE, TopicKind.ASSIGN), latest[0].envelope, {keyid(new): new.public_key()})
    assert isinstance(message.message, Assignment)
    assert message.message.models == ()


@pytest.mark.parametrize("serve_signs_with", ["old key", "new key"])
def test_rotation_re_signs_what_is_newest_when_it_re_signs_not_an_older_snapshot(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, serve_signs_with: str
) -> None:
    """A rollback inserted by serve after the rotation listed the devices is what gets re-signed: the rotation
    never re-assigns the release that was just rolled back; one serve already signed with the new key (it reloaded
    it) is left as it is."""
    from controller.assignment_keys import rotate_assignment_key
    from controller.store import FleetStore
    from protocols.messages import DesiredModel

    def model(version: int) -> DesiredModel:
        return DesiredModel("m", version, "q4_0", f"models/m/{version}/q4_0.gguf", f"{version:064x}", 1000)

    def insert(store: FleetStore, key: Ed25519PrivateKey, generation: int, version: int) -> None:
        message = Assignment(DEVICE, generation, int(time.time() * 1000), (model(version),), rollout_id="r-m-1")
        with store.transaction():
            store.add_assignment(DEVICE, generation, seal(message, TopicKind.ASSIGN, [key]), [model(version).to_dict()])

    old = setup.home.assignment_key()
    serve_store = setup.home.open_store()  # serve's own connection
    insert(serve_store, old, 1, 1)
    insert(serve_store, old, 2, 2)  # a wave reached the device: m v2
    listed = FleetStore.latest_assignments

    def list_then_serve_rolls_back(self: FleetStore, **kw: object) -> object:
        rows = listed(self, **kw)  # type: ignore[arg-type]
        if not kw and self is not serve_store:  # the rotation's listing; serve halts the rollout right after it
            monkeypatch.setattr(FleetStore, "latest_assignments", listed)
            signer = old if serve_signs_with == "old key" else setup.home.assignment_key()  # installed by now
            insert(serve_store, signer, 3, 1)  # the rollback: m v1 again
        return rows

    monkeypatch.setattr(FleetStore, "latest_assignments", list_then_serve_rolls_back)
    rotation = rotate_assignment_key(setup.home, setup.repo)
    new = setup.home.assignment_key()
    try:
        rows = serve_store.assignments(DEVICE)
        resigned = serve_signs_with == "old key"
        assert [row.generation for row in rows] == ([4, 3, 2, 1] if resigned else [3, 2, 1])
        assert [m["version"] for m in rows[0].models] == [1]  # the rollback (re-signed or not); not v2 again
        sealed = open_sealed(device_topic(DEVICE, TopicKind.ASSIGN), rows[0].envelope, {keyid(new): new.public_key()})
        assert isinstance(sealed.message, Assignment)
        assert [m.version for m in sealed.message.models] == [1]
        assert sealed.message.rollout_id == "r-m-1"
        assert rotation.resigned == (1 if resigned else 0)
    finally:
        serve_store.close()


@contextlib.asynccontextmanager
async def _keyring_running(
    setup: Setup, lookup: Callable[[], Awaitable[object]]
) -> AsyncIterator[asyncio.Queue[bytes]]:
    """The keyring's task, connected, with ``lookup``; yields the queue of assignments it handed back and that
    verified."""
    retried: asyncio.Queue[bytes] = asyncio.Queue()

    async def retry(data: bytes) -> None:
        setup.verifier.verify(data)
        await retried.put(data)

    connected = asyncio.Event()
    connected.set()
    task = asyncio.create_task(setup.keyring.run(lookup, retry, connected=connected))  # type: ignore[arg-type]
    try:
        yield retried
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_refused_assignment_is_verified_again_after_the_keys_refresh(setup: Setup) -> None:
    """The keyring's task refreshes on demand and hands the refused assignment back for a second verification."""
    setup.fleet("keys", "rotate", "assignments")
    fresh = assignment(setup.home.assignment_key(), 2)
    with pytest.raises(VerificationError):
        setup.verifier.verify(fresh)
    async with _keyring_running(setup, setup.updater.assignment_keys) as retried:
        assert await asyncio.wait_for(retried.get(), 30) == fresh


async def test_an_assignment_refused_during_a_refresh_is_answered_by_the_next_one(setup: Setup) -> None:
    """A refresh (the link's connect) is running, its lookup already past the repository, when the controller
    publishes the rotated key and the re-signed assignment is refused: that refresh finds no change, and must not
    drop the assignment; the next refresh (asked for by the refusal) learns the key and verifies it again. Seen
    in CI under load: the device never accepted the re-signed assignment."""
    looked_up = asyncio.Event()
    resume = asyncio.Event()
    lookups = 0

    async def lookup() -> object:
        nonlocal lookups
        lookups += 1
        listing = await setup.updater.assignment_keys()
        if lookups == 1:  # the connect's refresh: read before the rotation, returns after the refusal
            looked_up.set()
            await resume.wait()
        return listing

    setup.keyring.stale.set()  # the connect
    async with _keyring_running(setup, lookup) as retried:
        await asyncio.wait_for(looked_up.wait(), 30)
        setup.fleet("keys", "rotate", "assignments")
        fresh = assignment(setup.home.assignment_key(), 2)
        with pytest.raises(VerificationError):
            setup.verifier.verify(fresh)  # refused with the enrollment key, while the first refresh runs
        resume.set()
        assert await asyncio.wait_for(retried.get(), 30) == fresh
        assert lookups == 2


async def test_a_frozen_repository_keeps_the_current_keys(setup: Setup) -> None:
    """When TUF refuses the metadata (expired timestamp), the refresh fails and the keys stay as they were."""
    setup.fleet("keys", "rotate", "assignments")
    new = setup.home.assignment_key()
    assert await setup.keyring.refresh(setup.updater.assignment_keys)
    (setup.repo.metadata_dir / "timestamp.json").write_bytes(b"{}")  # unusable metadata from now on
    assert not await setup.keyring.refresh(setup.updater.assignment_keys)
    assert set(setup.keyring.keys) == {keyid(new)}


async def test_an_interrupted_rotation_is_finished_with_the_key_it_published(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the new list is published but before the key is installed: the next run finishes the
    rotation with the very key the devices were told to trust, never a key that exists nowhere."""
    old = setup.home.assignment_key()
    import controller.assignment_keys as rotation
    from controller.home import atomic_write as real_write

    calls = 0

    def write_then_crash(path: Path, data: bytes, mode: int = 0o644) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # the pending key is written; the retirement after the publication fails
            raise OSError("disk full")
        real_write(path, data, mode)

    monkeypatch.setattr(rotation, "atomic_write", write_then_crash)
    result = CliRunner().invoke(fleet_cli, ["--home", str(setup.home.root), "keys", "rotate", "assignments"])
    assert result.exit_code != 0
    monkeypatch.setattr(rotation, "atomic_write", real_write)
    assert keyid(setup.home.assignment_key()) == keyid(old)  # not installed yet...
    assert await setup.keyring.refresh(setup.updater.assignment_keys)  # ...but published: devices trust it
    (published,) = setup.keyring.keys

    setup.fleet("keys", "rotate", "assignments")  # the operator runs it again
    assert keyid(setup.home.assignment_key()) == published
    setup.verifier.verify(assignment(setup.home.assignment_key(), 2))
    assert not list(setup.home.assignment_key_path.parent.glob("*.pending"))


async def test_a_failed_refresh_keeps_the_refused_assignment_for_the_next_try(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup fails once (metadata not there yet): the refused assignment is not dropped but verified after
    the next successful refresh."""
    import agent.link.keyring as keyring_module

    monkeypatch.setattr(keyring_module, "RETRY_AFTER_FAILED_REFRESH_S", 0.05)
    setup.fleet("keys", "rotate", "assignments")
    fresh = assignment(setup.home.assignment_key(), 2)
    with pytest.raises(VerificationError):
        setup.verifier.verify(fresh)
    lookups = 0

    async def flaky_lookup() -> object:
        nonlocal lookups
        lookups += 1
        if lookups == 1:
            raise OSError("metadata not reachable yet")
        return await setup.updater.assignment_keys()

    async with _keyring_running(setup, flaky_lookup) as retried:
        assert await asyncio.wait_for(retried.get(), 30) == fresh
        assert lookups == 2


async def test_serve_signs_with_the_rotated_key_without_a_restart(setup: Setup) -> None:
    """A running ``serve`` picks the rotated key up for its acks and its rollouts' assignments."""
    from controller.daemon import FleetServer

    server = FleetServer(setup.home)
    old = keyid(server.signing_key())
    setup.fleet("keys", "rotate", "assignments")
    new = keyid(setup.home.assignment_key())
    assert new != old
    assert keyid(server.signing_key()) == new
    assert server.rollouts.key is server.signing_key()


class _NoRegistry:
    """The dispatcher's registry seam, never reached: only assignments are accepted or refused here."""

    def list_models(self, name: str | None = None, *, include_removed: bool = False) -> list[object]:
        return []


async def test_a_generation_accepted_under_a_removed_key_does_not_block_the_new_keys(setup: Setup) -> None:
    """An assignment accepted under the old key (e.g. a huge generation from whoever leaked it) stops counting once
    the key is rotated away: the stored envelope no longer verifies, so the new key's lower generations are
    accepted, not refused as replays."""
    old = setup.home.assignment_key()
    store = LinkStore.open(setup.tmp / "link.db")
    try:
        dispatcher = Dispatcher(
            store=store,
            outbox=Outbox(store),
            verifier=setup.verifier,
            registry=_NoRegistry(),  # type: ignore[arg-type]
            signing_key=setup.enrollment.signing_key,
        )
        assert await dispatcher.on_assign(assignment(old, 5)) == "accepted"
        assert await dispatcher.on_assign(assignment(old, 2**62)) == "accepted"
        setup.fleet("keys", "rotate", "assignments")
        assert await setup.keyring.refresh(setup.updater.assignment_keys)
        new = setup.home.assignment_key()

        assert await dispatcher.on_assign(assignment(old, 2**62 + 1)) == "refused"
        assert await dispatcher.on_assign(assignment(new, 6)) == "accepted"
        assert await dispatcher.on_assign(assignment(new, 5)) == "refused", "the new key's generations still count"
        assert (await dispatcher.accepted_generation())[0] == 6
    finally:
        store.close()
