"""The installed enrollment: re-enrolling into another fleet forgets the old fleet's trust anchors (renewing keeps
the state), and loading it does not depend on the local clock.

Real parts: two fleet homes made by ``FleetHome.init`` and their CLI-made bundles, ``install_bundle``, the
agent's real :class:`ReleaseUpdater` (over the :class:`DirectorySource` seam) and :class:`ControllerKeyring`
with their files where the agent keeps them (``link/tuf/``, ``link/assignment-keys.json``), a real ``link.db``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.link import KEYRING_FILE, link_dir
from agent.link.enrollment import Enrollment, install_bundle, load_enrollment
from agent.link.keyring import ControllerKeyring
from agent.link.updater import DirectorySource, ReleaseUpdater
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from controller.releases import ReleaseRepository
from protocols.keys import keyid

pytestmark = [pytest.mark.component, pytest.mark.timeout(90)]

DEVICE = "dev-1"


def _fleet(tmp: Path, name: str) -> tuple[FleetHome, bytes]:
    home = FleetHome.init(tmp / name, FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
    out = tmp / f"{name}.bundle"
    result = CliRunner().invoke(fleet_cli, ["--home", str(home.root), "device", "enroll", DEVICE, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return home, out.read_bytes()


def _link(state: Path, home: FleetHome, enrollment: Enrollment) -> tuple[ReleaseUpdater, ControllerKeyring]:
    """The updater and keyring as ``open_agent_link`` builds them."""
    updater = ReleaseUpdater(
        link_dir(state) / "tuf",
        DirectorySource(ReleaseRepository(home.repo_dir).metadata_dir),
        bootstrap=enrollment.bundle.tuf_root.encode(),
    )
    keyring = ControllerKeyring(
        enrollment.controller_keys, enrollment.controller_threshold, link_dir(state) / KEYRING_FILE
    )
    return updater, keyring


async def _learn_rotated_keys(tmp: Path, state: Path) -> tuple[FleetHome, bytes]:
    """Fleet A, which rotated its assignment key; the device enrolled in it learnt the rotated key through TUF."""
    home, bundle = _fleet(tmp, "fleet-a")
    result = CliRunner().invoke(fleet_cli, ["--home", str(home.root), "keys", "rotate", "assignments"])
    assert result.exit_code == 0, result.output
    updater, keyring = _link(state, home, install_bundle(state, bundle))
    assert await keyring.refresh(updater.assignment_keys)
    assert keyid(home.assignment_key().public_key()) in keyring.keys
    (link_dir(state) / "link.db").write_bytes(b"accepted generations of fleet A")
    assert (link_dir(state) / "tuf" / "root.json").exists()
    assert (link_dir(state) / KEYRING_FILE).exists()
    return home, bundle


async def test_enrolling_into_another_fleet_forgets_the_old_fleets_trust(tmp_path: Path) -> None:
    """``enroll --force`` with another fleet's bundle (same device id): the old TUF root, the old fleet's assignment
    key list and its link.db are gone; the device trusts exactly the new bundle's keys and TUF root."""
    state = tmp_path / "state"
    home_a, _ = await _learn_rotated_keys(tmp_path, state)
    home_b, bundle_b = _fleet(tmp_path, "fleet-b")

    enrollment = install_bundle(state, bundle_b, force=True)

    assert sorted(p.name for p in link_dir(state).iterdir()) == ["bundle", "tls"]
    updater, keyring = _link(state, home_b, enrollment)
    assert keyring.keys.keys() == enrollment.controller_keys.keys()
    assert keyid(home_a.assignment_key().public_key()) not in keyring.keys
    await keyring.refresh(updater.assignment_keys)  # against fleet B's repository: its root is the one trusted
    assert keyring.keys.keys() == {keyid(home_b.assignment_key().public_key())}
    assert (link_dir(state) / "tuf" / "root.json").read_bytes() == enrollment.bundle.tuf_root.encode()


async def test_re_enrolling_with_the_same_anchors_keeps_the_link_state(tmp_path: Path) -> None:
    """Installing the same fleet's bundle again (a renewed certificate: same controller keys and TUF root) keeps the
    TUF metadata, the learnt key list and link.db."""
    state = tmp_path / "state"
    _, bundle = await _learn_rotated_keys(tmp_path, state)
    before = {p.name for p in link_dir(state).iterdir()}

    install_bundle(state, bundle)

    assert {p.name for p in link_dir(state).iterdir()} == before
    assert (link_dir(state) / "link.db").read_bytes() == b"accepted generations of fleet A"


@pytest.mark.parametrize(
    "now",
    [dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime.now(dt.UTC) + dt.timedelta(days=731)],
    ids=["clock at 1970", "after the certificate"],
)
def test_loading_the_enrollment_does_not_depend_on_the_local_clock(tmp_path: Path, now: dt.datetime) -> None:
    """A board booting with its clock at 1970, or an air-gapped one past its certificate's end, still loads its
    enrollment (the link starts, the broker judges the certificate; offline bundles import against its TUF root)."""
    _, bundle = _fleet(tmp_path, "fleet")
    installed = install_bundle(tmp_path / "state", bundle)
    loaded = load_enrollment(tmp_path / "state", now=now)
    assert loaded is not None
    assert loaded.bundle == installed.bundle


def test_an_older_bundle_does_not_replace_a_newer_one_unless_forced(tmp_path: Path) -> None:
    """A bundle issued before the installed one (a stale copy) is refused; ``force`` installs it."""
    import time

    from agent.errors import EnrollmentError

    home, older = _fleet(tmp_path, "fleet")
    time.sleep(0.01)  # issued_ts_ms is in milliseconds
    out = tmp_path / "newer.bundle"
    args = ["--home", str(home.root), "device", "enroll", DEVICE, "--force", "--out", str(out)]
    result = CliRunner().invoke(fleet_cli, args)
    assert result.exit_code == 0, result.output
    newer = out.read_bytes()
    state = tmp_path / "state"
    install_bundle(state, newer)
    with pytest.raises(EnrollmentError, match="issued before the installed one"):
        install_bundle(state, older)
    assert load_enrollment(state).bundle.issued_ts_ms == install_bundle(state, newer).bundle.issued_ts_ms
    assert install_bundle(state, older, force=True).bundle.device == DEVICE
