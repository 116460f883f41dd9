"""The release repository and the agent's TUF client against each other, through a metadata directory.

Real parts: ``controller.releases.ReleaseRepository`` writes real signed metadata; ``agent.link.updater``
verifies it with python-tuf. The transport is the one seam (``DirectorySource`` over a copy of the metadata
directory), so each attack of TUF's threat model is staged by editing what the "mirror" serves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile
from tuf.ngclient import Updater

from agent.link.fetch import FetchPolicy, FetchRefusedError, FetchTimeoutError, MqttBlobFetcher
from agent.link.updater import (
    DirectorySource,
    ReleaseRefusedError,
    ReleaseStaleError,
    ReleaseUnavailableError,
    ReleaseUpdater,
    VerifiedTarget,
)
from controller.releases import ReleaseError, ReleaseRepository
from protocols.messages import FetchRequest, decode, encode_chunk
from protocols.releases import chunk_span

pytestmark = pytest.mark.component

PATH = "models/tiny/1/q4_0.gguf"


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    """A repository with one published 300 kB target in 64 KiB chunks."""
    repo = ReleaseRepository.create(tmp_path / "repo")
    model = tmp_path / "tiny.gguf"
    model.write_bytes(bytes(range(256)) * 1200)
    from controller.releases import ModelDetails

    repo.add_model(model, name="tiny", variant="q4_0", details=ModelDetails(chunk_size=64 * 1024))
    assert repo.publish() == 1
    return repo


class Mirror:
    """What devices are served: a copy of the repository's metadata directory that tests may tamper with."""

    def __init__(self, repo: ReleaseRepository, directory: Path) -> None:
        self.repo = repo
        self.directory = directory
        self.sync()

    def sync(self) -> None:
        shutil.copytree(self.repo.metadata_dir, self.directory, dirs_exist_ok=True)

    def write(self, name: str, md: Metadata[object]) -> None:
        (self.directory / name).write_bytes(md.to_bytes())


@pytest.fixture
def mirror(repo: ReleaseRepository, tmp_path: Path) -> Mirror:
    return Mirror(repo, tmp_path / "mirror")


def device(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> ReleaseUpdater:
    """A device bootstrapped with root v1 (as from its enrollment bundle)."""
    return ReleaseUpdater(
        tmp_path / "device", DirectorySource(mirror.directory), bootstrap=repo.metadata_bytes("root", 1)
    )


def resign_chain(repo: ReleaseRepository, mirror: Mirror, *, targets_version: int, snapshot_extra: int = 1) -> None:
    """Serve a new snapshot naming ``targets_version`` and a new timestamp, validly signed by the online keys."""
    snapshot = repo.load("snapshot")
    snapshot.signed.version += snapshot_extra
    snapshot.signed.meta["targets.json"] = MetaFile(targets_version)
    snapshot.signatures.clear()
    for signer in repo.signers("snapshot"):
        snapshot.sign(signer, append=True)
    mirror.write(f"{snapshot.signed.version}.snapshot.json", snapshot)
    timestamp = repo.load("timestamp")
    timestamp.signed.version += snapshot_extra
    timestamp.signed.snapshot_meta = MetaFile(snapshot.signed.version)
    timestamp.signatures.clear()
    for signer in repo.signers("timestamp"):
        timestamp.sign(signer, append=True)
    mirror.write("timestamp.json", timestamp)


# --- the happy path and the repository ------------------------------------------------------------------


def test_published_target_verifies_with_its_custom_fields(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path
) -> None:
    """A device bootstrapped from root v1 gets the target's length, sha256 and per-chunk digests."""
    target = device(repo, mirror, tmp_path).lookup(PATH)
    data = repo.blob_path(target.sha256).read_bytes()
    assert target.length == len(data)
    assert target.sha256 == hashlib.sha256(data).hexdigest()
    assert target.fields.chunks[0] == hashlib.sha256(data[: 64 * 1024]).hexdigest()
    assert len(target.fields.chunks) == 5


def test_releases_are_immutable(repo: ReleaseRepository, tmp_path: Path) -> None:
    """Adding a second file under a published target path is refused."""
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x" * 10)
    with pytest.raises(ReleaseError, match="exists already"):
        repo.add_model(other, name="tiny", variant="q4_0", version=1)
    assert repo.add_model(other, name="tiny", variant="q4_0").path == "models/tiny/2/q4_0.gguf"


def test_timestamp_is_resigned_before_it_expires(repo: ReleaseRepository) -> None:
    """refresh_timestamp writes a new version only when the current one is about to expire."""
    before = repo.load("timestamp").signed.version
    assert repo.refresh_timestamp(if_expiring_within=dt.timedelta(hours=1)) is False
    assert repo.refresh_timestamp(if_expiring_within=dt.timedelta(days=2)) is True
    assert repo.load("timestamp").signed.version == before + 1


# --- attacks ------------------------------------------------------------------------------------------------


def test_target_signed_by_an_unknown_key_is_refused(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """Targets metadata signed by a key the root does not list (arbitrary software) is refused."""
    updater = device(repo, mirror, tmp_path)
    targets = repo.load("targets")
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(CryptoSigner.generate_ed25519(), append=True)
    mirror.write(f"{targets.signed.version}.targets.json", targets)
    resign_chain(repo, mirror, targets_version=targets.signed.version)
    with pytest.raises(ReleaseRefusedError, match="TUF refused"):
        updater.lookup(PATH)


def test_target_below_threshold_is_refused(tmp_path: Path) -> None:
    """With a targets threshold of 2, targets signed by one of the two keys are refused."""
    repo = ReleaseRepository.create(tmp_path / "repo", thresholds={"targets": 2})
    mirror = Mirror(repo, tmp_path / "mirror")
    updater = device(repo, mirror, tmp_path)
    targets = repo.load("targets")
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(repo.signers("targets")[0], append=True)
    mirror.write(f"{targets.signed.version}.targets.json", targets)
    resign_chain(repo, mirror, targets_version=targets.signed.version)
    with pytest.raises(ReleaseRefusedError, match="TUF refused"):
        updater.lookup(PATH)


def test_replayed_older_release_is_refused(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """After a device saw timestamp vN, a validly signed older timestamp (a rollback) is refused — as stale, to be
    tried again (a replay on the way must not refuse the release until a new generation); the current one then
    verifies."""
    old_timestamp = (mirror.directory / "timestamp.json").read_bytes()
    updater = device(repo, mirror, tmp_path)
    updater.lookup(PATH)
    other = tmp_path / "v2.gguf"
    other.write_bytes(b"y" * 1000)
    repo.add_model(other, name="tiny", variant="q4_0")
    repo.publish()
    mirror.sync()
    assert updater.lookup("models/tiny/2/q4_0.gguf").length == 1000
    current_timestamp = (mirror.directory / "timestamp.json").read_bytes()
    (mirror.directory / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(ReleaseStaleError, match="rollback"):
        updater.lookup(PATH)
    (mirror.directory / "timestamp.json").write_bytes(current_timestamp)
    assert updater.lookup(PATH).path == PATH


def test_a_full_disk_storing_metadata_is_unavailable_not_refused(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-tuf re-raises an OSError from persisting verified metadata (ENOSPC): the lookup is unavailable (try
    again later), not an exception that ends the link, nor a refusal; with space again it succeeds."""
    updater = device(repo, mirror, tmp_path)
    updater.lookup(PATH)
    repo.refresh_timestamp(if_expiring_within=dt.timedelta(days=3650))  # a new timestamp to store
    mirror.sync()
    persist = Updater._persist_file

    def full(self: Updater, filename: str, data: bytes) -> None:  # the seam: python-tuf's one write
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(Updater, "_persist_file", full)
    with pytest.raises(ReleaseUnavailableError, match="No space left"):
        updater.lookup(PATH)
    monkeypatch.setattr(Updater, "_persist_file", persist)
    assert updater.lookup(PATH).path == PATH


class CachingSource(DirectorySource):
    """Keeps every versioned document it served, as the MQTT link does with retained messages (a seam fake: the
    transport's cache, over the mirror directory); forgets one when told."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.kept: dict[tuple[str, int], bytes | None] = {}

    def get(self, role: str, version: int | None, max_length: int) -> bytes | None:
        if version is None:
            return super().get(role, version, max_length)
        if (role, version) not in self.kept:
            self.kept[role, version] = super().get(role, version, max_length)
        return self.kept[role, version]

    def forget(self, role: str, version: int) -> None:
        self.kept.pop((role, version), None)


def test_a_bogus_cached_document_is_forgotten_when_tuf_refuses_it(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path
) -> None:
    """A bogus copy of a versioned document (a forged retained message) fails one refresh, not every later one: the
    updater tells the source to forget what it served, and the next refresh gets the real document."""
    source = CachingSource(mirror.directory)
    updater = ReleaseUpdater(tmp_path / "device", source, bootstrap=repo.metadata_bytes("root", 1))
    snapshot = repo.versions("snapshot")[-1]
    genuine = (mirror.directory / f"{snapshot}.snapshot.json").read_bytes()
    (mirror.directory / f"{snapshot}.snapshot.json").write_bytes(genuine.replace(b'"version"', b'"versio_"', 1))
    with pytest.raises(ReleaseRefusedError):
        updater.lookup(PATH)
    (mirror.directory / f"{snapshot}.snapshot.json").write_bytes(genuine)  # the broker has the real one again
    assert updater.lookup(PATH).path == PATH


def test_expired_timestamp_refuses_lookups(tmp_path: Path) -> None:
    """A timestamp past its expiry (an indefinite freeze) is refused: nothing new can be installed; stale, so the
    install is tried again later (a re-signed timestamp ends the freeze without a new generation)."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    clock: Callable[[], dt.datetime] = lambda: now - dt.timedelta(days=2)  # noqa: E731
    repo = ReleaseRepository.create(tmp_path / "repo", clock=clock)
    mirror = Mirror(repo, tmp_path / "mirror")
    with pytest.raises(ReleaseStaleError, match="expired"):
        device(repo, mirror, tmp_path).lookup(PATH)


def test_snapshot_naming_other_targets_version_is_refused(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path
) -> None:
    """Targets metadata of another version than the snapshot names (mix-and-match) is refused."""
    updater = device(repo, mirror, tmp_path)
    named = repo.versions("targets")[-1] + 5
    resign_chain(repo, mirror, targets_version=named)
    (mirror.directory / f"{named}.targets.json").write_bytes(repo.metadata_bytes("targets"))  # current, not v{named}
    with pytest.raises(ReleaseRefusedError, match="TUF refused"):
        updater.lookup(PATH)


def test_unsigned_target_path_is_refused(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """A path the signed targets do not list (a wrong target) is refused."""
    with pytest.raises(ReleaseRefusedError, match="not a target"):
        device(repo, mirror, tmp_path).lookup("models/tiny/9/q4_0.gguf")


@pytest.mark.parametrize("sha256", ["../../../etc/x", "AB" * 32, "ab" * 31 + "zz"])
def test_a_signed_target_whose_sha256_is_not_hex_is_refused(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path, sha256: str
) -> None:
    """python-tuf does not check that a hash is hex, and the sha256 names files on the device (a bundle's copy, a
    download): a validly signed target whose sha256 is not 64 lower-case hex is refused."""
    targets = repo.load("targets")
    targets.signed.version += 1
    targets.signed.targets[PATH].hashes["sha256"] = sha256
    targets.signatures.clear()
    for signer in repo.signers("targets"):
        targets.sign(signer, append=True)
    mirror.write(f"{targets.signed.version}.targets.json", targets)
    resign_chain(repo, mirror, targets_version=targets.signed.version)
    with pytest.raises(ReleaseRefusedError, match="64 lower-case hex"):
        device(repo, mirror, tmp_path).lookup(PATH)


# --- key rotation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_key_rotation_is_followed_by_devices(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path, role: str
) -> None:
    """`keys rotate ROLE`: a device that trusts the old root moves to the new keys and still verifies targets."""
    updater = device(repo, mirror, tmp_path)
    updater.lookup(PATH)
    new = repo.rotate_keys(role)
    mirror.sync()
    assert updater.lookup(PATH).length > 0
    root = Metadata.from_bytes((tmp_path / "device" / "root.json").read_bytes())
    assert set(root.signed.roles[role].keyids) == set(new)


@pytest.mark.parametrize("signed_by", ["old", "new"])
def test_root_rotation_signed_by_one_side_only_is_refused(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path, signed_by: str
) -> None:
    """A new root must be signed by the old root keys *and* its own: either side alone is refused."""
    updater = device(repo, mirror, tmp_path)
    root = repo.load("root")
    old = repo.signers("root")
    new = CryptoSigner.generate_ed25519()
    for keyid in list(root.signed.roles["root"].keyids):
        root.signed.revoke_key(keyid, "root")
    root.signed.add_key(new.public_key, "root")
    root.signed.version += 1
    root.signatures.clear()
    for signer in old if signed_by == "old" else [new]:
        root.sign(signer, append=True)
    mirror.write(f"{root.signed.version}.root.json", root)
    with pytest.raises(ReleaseRefusedError, match="TUF refused"):
        updater.lookup(PATH)


# --- chunks (the fetcher against a hostile sender at its link seam) ---------------------------------------


class ChunkSender:
    """A fake MQTT link (the fetcher's one seam): answers fetch requests from ``data``, optionally hostile."""

    def __init__(self, device: str, data: bytes, chunk_size: int, tamper: Callable[[int, bytes], bytes] | None = None):
        self.device = device
        self.data = data
        self.chunk_size = chunk_size
        self.tamper = tamper or (lambda index, chunk: chunk)
        self.connected = asyncio.Event()
        self.connected.set()
        self.chunk_sink: Callable[[bytes], None] | None = None
        self.requests: list[FetchRequest] = []

    async def publish_fetch(self, payload: bytes) -> None:
        request = decode(payload)
        assert isinstance(request, FetchRequest)
        self.requests.append(request)
        for index in request.indices:
            offset, size = chunk_span(index, len(self.data), self.chunk_size)
            frame = encode_chunk(request.transfer_id, index, self.tamper(index, self.data[offset : offset + size]))
            assert self.chunk_sink is not None
            asyncio.get_running_loop().call_soon(self.chunk_sink, frame)


def _target(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> tuple[VerifiedTarget, bytes]:
    target = device(repo, mirror, tmp_path).lookup(PATH)
    return target, repo.blob_path(target.sha256).read_bytes()


async def test_chunks_are_verified_and_assembled(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """Every chunk is requested once and the assembled file has the signed sha256."""
    target, data = _target(repo, mirror, tmp_path)
    sender = ChunkSender("dev1", data, target.fields.chunk_size)
    stats = await MqttBlobFetcher(sender, FetchPolicy(window=2)).fetch(target, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert set(stats.requested.values()) == {1}
    assert set(stats.verified.values()) == {1}


async def test_tampered_chunk_of_the_same_length_is_refused(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path
) -> None:
    """A chunk whose bytes differ (same length) never reaches the file; repeated, the transfer is refused."""
    target, data = _target(repo, mirror, tmp_path)
    flip = lambda index, chunk: (bytes([chunk[0] ^ 1]) + chunk[1:]) if index == 2 else chunk  # noqa: E731
    sender = ChunkSender("dev1", data, target.fields.chunk_size, flip)
    with pytest.raises(FetchRefusedError, match="chunk 2 failed verification \\(sha256\\)"):
        await MqttBlobFetcher(sender, FetchPolicy(window=2)).fetch(target, tmp_path / "out")


async def test_more_bytes_than_signed_are_refused(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """A chunk longer than its signed span (endless data) is refused, and the file never grows past the length."""
    target, data = _target(repo, mirror, tmp_path)
    last = len(target.fields.chunks) - 1
    extend = lambda index, chunk: chunk + b"\0" * 1000 if index == last else chunk  # noqa: E731
    sender = ChunkSender("dev1", data, target.fields.chunk_size, extend)
    with pytest.raises(FetchRefusedError, match="\\(length\\)"):
        await MqttBlobFetcher(sender, FetchPolicy(window=2)).fetch(target, tmp_path / "out")
    assert (tmp_path / "out").stat().st_size <= target.length


async def test_fetch_resumes_from_verified_chunks(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """Chunks already in the partial file that match the signed list are not requested again."""
    target, data = _target(repo, mirror, tmp_path)
    out = tmp_path / "out"
    out.write_bytes(data[: 3 * target.fields.chunk_size] + b"garbage")
    sender = ChunkSender("dev1", data, target.fields.chunk_size)
    stats = await MqttBlobFetcher(sender, FetchPolicy(window=4)).fetch(target, out)
    assert out.read_bytes() == data
    assert stats.resumed == {0, 1, 2}
    assert sorted(stats.requested) == [3, 4]


async def test_slow_retrieval_hits_the_deadline(repo: ReleaseRepository, mirror: Mirror, tmp_path: Path) -> None:
    """A sender that never answers (slow retrieval) ends in FetchTimeoutError at the total deadline."""
    target, data = _target(repo, mirror, tmp_path)
    sender = ChunkSender("dev1", data, target.fields.chunk_size)

    async def silent(payload: bytes) -> None:
        sender.requests.append(decode(payload))  # type: ignore[arg-type]

    sender.publish_fetch = silent  # type: ignore[method-assign]
    policy = FetchPolicy(window=2, request_timeout_s=0.1, deadline_s=0.5)
    with pytest.raises(FetchTimeoutError, match="not complete after"):
        await MqttBlobFetcher(sender, policy).fetch(target, tmp_path / "out")
    assert len(sender.requests) > 1  # the window was asked for again while waiting


# --- expiry and renewal -------------------------------------------------------------------------------------


def _published_days_ago(tmp_path: Path, days: int) -> ReleaseRepository:
    """A repository whose one target was published ``days`` ago (its clock), reopened with the real clock."""
    then = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=days)
    old = ReleaseRepository.create(tmp_path / "repo", clock=lambda: then)
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    old.add_model(model, name="tiny", variant="q4_0")
    assert old.publish() == 1
    return ReleaseRepository(tmp_path / "repo")


async def test_serve_re_signs_an_expired_snapshot(tmp_path: Path) -> None:
    """Eight days without a publish: serve's refresh re-signs the snapshot too, and devices refresh again."""
    from controller.link.blobs import RepositoryPublisher

    repo = _published_days_ago(tmp_path, 8)
    mirror = Mirror(repo, tmp_path / "mirror")
    with pytest.raises(ReleaseStaleError, match="expired"):
        device(repo, mirror, tmp_path).lookup(PATH)
    snapshot_before = repo.versions("snapshot")[-1]

    class NullLink:
        async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            pass

    await RepositoryPublisher(repo).publish_new(NullLink())
    assert repo.versions("snapshot")[-1] == snapshot_before + 1
    assert repo.load("timestamp").signed.snapshot_meta.version == snapshot_before + 1
    mirror.sync()
    assert device(repo, mirror, tmp_path).lookup(PATH).path == PATH


def test_snapshot_is_re_signed_only_when_half_expired(repo: ReleaseRepository) -> None:
    """A fresh snapshot is left alone; one expiring within half its lifetime gets a new version."""
    before = repo.versions("snapshot")[-1]
    repo.refresh_timestamp(if_expiring_within=dt.timedelta(hours=12))
    assert repo.versions("snapshot")[-1] == before
    later = repo.clock() + dt.timedelta(days=4)
    repo.clock = lambda: later
    assert repo.refresh_timestamp(if_expiring_within=dt.timedelta(hours=12)) is True
    assert repo.versions("snapshot")[-1] == before + 1
    assert repo.load("snapshot").signed.expires == later + dt.timedelta(days=7)


@pytest.mark.parametrize(("role", "days"), [("targets", 91), ("root", 366)])
def test_renew_extends_an_expired_role_and_devices_accept_it(tmp_path: Path, role: str, days: int) -> None:
    """`keys renew targets|root`: a role past its expiry gets a fresh one and devices verify targets again."""
    repo = _published_days_ago(tmp_path, days)
    repo.refresh_timestamp(if_expiring_within=dt.timedelta(hours=12))
    mirror = Mirror(repo, tmp_path / "mirror")
    with pytest.raises(ReleaseStaleError, match="expired"):
        device(repo, mirror, tmp_path).lookup(PATH)
    if role == "root":  # a year old: the targets expired too, and renewing them alone is not enough
        repo.renew("targets")
        mirror.sync()
        with pytest.raises(ReleaseStaleError, match="expired"):
            device(repo, mirror, tmp_path).lookup(PATH)
    version = repo.renew(role)
    assert repo.load(role).signed.version == version
    assert repo.load(role).signed.expires - repo.clock() > dt.timedelta(days=80)
    mirror.sync()
    assert device(repo, mirror, tmp_path).lookup(PATH).path == PATH


@pytest.mark.parametrize("role", ["root", "targets"])
def test_rotation_gives_the_role_a_fresh_expiry(tmp_path: Path, role: str) -> None:
    """`keys rotate ROLE` signs the role with a fresh expiry, not the old one."""
    repo = _published_days_ago(tmp_path, 60)
    old = repo.load(role).signed.expires
    repo.rotate_keys(role)
    assert repo.load(role).signed.expires - old >= dt.timedelta(days=59)


@pytest.mark.parametrize("role", ["root", "snapshot", "timestamp"])
def test_rotating_an_online_key_does_not_need_the_offline_targets_key(
    repo: ReleaseRepository, mirror: Mirror, tmp_path: Path, role: str
) -> None:
    """An emergency rotation of root, snapshot or timestamp works with repo/keys/targets moved away."""
    updater = device(repo, mirror, tmp_path)
    updater.lookup(PATH)
    shutil.move(repo.keys_dir / "targets", tmp_path / "offline-targets")
    repo.rotate_keys(role)
    mirror.sync()
    assert updater.lookup(PATH).path == PATH


async def test_serve_warns_once_a_day_when_root_or_targets_expires_soon(tmp_path: Path) -> None:
    """A targets role 70 days old (20 left) is logged as expiring, at most once a day."""
    from structlog.testing import capture_logs

    from controller.link.blobs import RepositoryPublisher

    repo = _published_days_ago(tmp_path, 70)
    publisher = RepositoryPublisher(repo)

    class NullLink:
        async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            pass

    now = repo.clock()
    with capture_logs() as events:
        await publisher.publish_new(NullLink())
        await publisher.publish_new(NullLink())
        repo.clock = lambda: now + dt.timedelta(days=1, minutes=1)
        await publisher.publish_new(NullLink())
    warnings = [e for e in events if e["event"] == "repo.expiring_soon"]
    assert [w["role"] for w in warnings] == ["targets", "targets"]
