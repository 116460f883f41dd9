"""The home's PKI and broker files under enrollment: re-enrolling lifts the ACL's deny, a new home's share group is
random, a bundle that cannot be written enrolls nothing, a device certificate never outlives the CA.

Real parts: homes made by ``edge-fleet init`` / ``FleetHome.init``, the CLI run in-process, the real fleet DB, ACL,
CRL and certificates on disk.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from controller import pki
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, FleetConfig, load_config
from controller.home import FleetHome
from protocols.enrollment import decode_bundle
from protocols.topics import controller_subscriptions

pytestmark = [pytest.mark.component, pytest.mark.timeout(90)]

DEVICE = "dev-r"


def _home(tmp: Path, name: str = "home") -> FleetHome:
    return FleetHome.init(tmp / name, FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))


def _cli(home: FleetHome, *args: str) -> Result:
    return CliRunner().invoke(fleet_cli, ["--home", str(home.root), *args])


def _ok(home: FleetHome, *args: str) -> str:
    result = _cli(home, *args)
    assert result.exit_code == 0, result.output
    return result.output


def _denied(home: FleetHome, device: str) -> bool:
    return f"user {device}\ntopic deny #" in home.acl_path.read_text()


def _crl_serials(home: FleetHome) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(home.crl_path.read_bytes())}


def _cert_serial(bundle: Path) -> int:
    return x509.load_pem_x509_certificate(decode_bundle(bundle.read_bytes()).cert_pem.encode()).serial_number


def _enrolled(home: FleetHome, device: str) -> bool:
    store = home.open_store()
    try:
        return store.get_device(device) is not None
    finally:
        store.close()


# --- re-enrolling --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["force", "revoke-then-enroll"])
def test_reenrolling_a_device_lifts_its_acl_deny_and_asks_for_a_broker_reload(tmp_path: Path, how: str) -> None:
    """After `enroll --force` or `revoke` + `enroll`, the ACL no longer denies the device and the CLI says SIGHUP."""
    home = _home(tmp_path)
    first = tmp_path / "1.bundle"
    _ok(home, "device", "enroll", DEVICE, "--out", str(first))
    assert not _denied(home, DEVICE)
    if how == "force":
        output = _ok(home, "device", "enroll", DEVICE, "--out", str(tmp_path / "2.bundle"), "--force")
    else:
        _ok(home, "device", "revoke", DEVICE)
        assert _denied(home, DEVICE)
        output = _ok(home, "device", "enroll", DEVICE, "--out", str(tmp_path / "2.bundle"))
    assert not _denied(home, DEVICE), home.acl_path.read_text()
    assert "SIGHUP" in output, output
    assert "CRL" in output, output
    # The previous certificate stays revoked in the CRL; the new one is not in it.
    assert _cert_serial(first) in _crl_serials(home)
    assert _cert_serial(tmp_path / "2.bundle") not in _crl_serials(home)


def test_a_first_enrollment_does_not_ask_for_a_broker_reload(tmp_path: Path) -> None:
    """A new device changes neither ACL nor CRL, so the CLI does not ask for a SIGHUP."""
    home = _home(tmp_path)
    assert "SIGHUP" not in _ok(home, "device", "enroll", DEVICE, "--out", str(tmp_path / "1.bundle"))


# --- share group ---------------------------------------------------------------------------------------------


def test_init_writes_a_random_share_group_that_serve_subscribes_with(tmp_path: Path) -> None:
    """`edge-fleet init` writes an unguessable share group to fleet.toml, one per home, that serve's filters use."""
    groups = []
    for name in ("a", "b"):
        root = tmp_path / name
        result = CliRunner().invoke(fleet_cli, ["--home", str(root), "init", "--broker-host", "127.0.0.1"])
        assert result.exit_code == 0, result.output
        group = load_config(root / "fleet.toml").controller.share_group
        assert re.fullmatch(r"edge-fleet-[0-9a-f]{16}", group), group
        assert FleetHome.open(root).config.controller.share_group == group
        groups.append(group)
    assert groups[0] != groups[1]
    # What daemon.py subscribes with: controller_subscriptions(config.controller.share_group).
    shared = [f for f in controller_subscriptions(groups[0]) if f.startswith("$share/")]
    assert shared
    assert all(f.startswith(f"$share/{groups[0]}/") for f in shared)


def test_a_home_without_a_share_group_keeps_the_old_default(tmp_path: Path) -> None:
    """An existing fleet.toml without share_group still loads (with the old fixed name): serve keeps working."""
    home = _home(tmp_path)
    text = home.config_path.read_text()
    home.config_path.write_text(re.sub(r"(?m)^share_group = .*\n", "", text))
    assert load_config(home.config_path).controller.share_group == "edge-fleet"


# --- bundle write failures -----------------------------------------------------------------------------------


def test_an_unwritable_bundle_path_enrolls_nothing_and_a_retry_works(tmp_path: Path) -> None:
    """`--out` under a regular file fails cleanly, leaves the device unenrolled, and a retry needs no --force."""
    home = _home(tmp_path)
    (tmp_path / "afile").write_text("x")
    result = _cli(home, "device", "enroll", DEVICE, "--out", str(tmp_path / "afile" / "d.bundle"))
    assert result.exit_code == 1, result.output
    assert "cannot write the bundle" in result.output
    assert "Traceback" not in result.output
    assert not _enrolled(home, DEVICE)
    _ok(home, "device", "enroll", DEVICE, "--out", str(tmp_path / "d.bundle"))
    assert _enrolled(home, DEVICE)
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_unwritable_bundle_path_with_force_keeps_the_old_credentials(tmp_path: Path) -> None:
    """A failed `enroll --force` write neither revokes the working certificate nor denies the device."""
    home = _home(tmp_path)
    first = tmp_path / "1.bundle"
    _ok(home, "device", "enroll", DEVICE, "--out", str(first))
    (tmp_path / "afile").write_text("x")
    result = _cli(home, "device", "enroll", DEVICE, "--force", "--out", str(tmp_path / "afile" / "d.bundle"))
    assert result.exit_code == 1, result.output
    assert _cert_serial(first) not in _crl_serials(home)
    assert not _denied(home, DEVICE)
    store = home.open_store()
    try:
        row = store.get_device(DEVICE)
    finally:
        store.close()
    assert row is not None
    assert not row.revoked


# --- validity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("days", ["3000000", "3651"])
def test_a_validity_past_the_ca_is_refused_clearly(tmp_path: Path, days: str) -> None:
    """`--days` reaching past the device CA's notAfter is refused with a message (no traceback), nothing enrolled."""
    home = _home(tmp_path)
    result = _cli(home, "device", "enroll", DEVICE, "--days", days, "--out", str(tmp_path / "d.bundle"))
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "outlive the device CA" in result.output, result.output
    assert "--days" in result.output, result.output
    assert not _enrolled(home, DEVICE)
    assert not (tmp_path / "d.bundle").exists()


def test_the_longest_validity_the_ca_allows_is_accepted(tmp_path: Path) -> None:
    """The bound is the CA's end, not a smaller guess: a certificate ending just before it is issued."""
    home = _home(tmp_path)
    _ok(home, "device", "enroll", DEVICE, "--days", "3640", "--out", str(tmp_path / "d.bundle"))
    cert = x509.load_pem_x509_certificate(decode_bundle((tmp_path / "d.bundle").read_bytes()).cert_pem.encode())
    ca = x509.load_pem_x509_certificate(home.ca_cert_path.read_bytes())
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc


# --- the broker's server certificate -------------------------------------------------------------------------


def _server_names(home: FleetHome) -> set[str]:
    cert = x509.load_pem_x509_certificate((home.broker_dir / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    }


def test_broker_config_reissues_the_server_certificate_for_a_changed_host(tmp_path: Path) -> None:
    """After `host` changes in fleet.toml, `broker config` issues a server certificate naming it (key 0600)."""
    home = _home(tmp_path)
    before = (home.broker_dir / "server.crt").read_bytes()
    assert "re-issued" not in _ok(home, "broker", "config")
    assert (home.broker_dir / "server.crt").read_bytes() == before  # unchanged host: kept
    home.config_path.write_text(
        home.config_path.read_text().replace('host = "127.0.0.1"', 'host = "broker.example"'), encoding="utf-8"
    )
    output = _ok(home, "broker", "config")
    assert "re-issued the broker's server certificate" in output, output
    assert "broker.example" in _server_names(home)
    assert (home.broker_dir / "server.key").stat().st_mode & 0o777 == 0o600
    key = x509.load_pem_x509_certificate((home.broker_dir / "server.crt").read_bytes()).public_key()
    assert load_pem_private_key((home.broker_dir / "server.key").read_bytes(), None).public_key() == key


def test_broker_config_reissues_a_server_certificate_that_expires_soon(tmp_path: Path) -> None:
    """A server certificate within 30 days of its end is re-issued by `broker config`."""
    home = _home(tmp_path)
    ca = pki.Issued(pki.load_cert(home.ca_cert_path.read_bytes()), pki.load_key(home.ca_key_path.read_bytes()))
    short = pki.issue_server_cert(ca, ["127.0.0.1"], days=10)
    (home.broker_dir / "server.crt").write_bytes(pki.cert_pem(short.cert))
    (home.broker_dir / "server.key").write_bytes(pki.key_pem(short.key))
    output = _ok(home, "broker", "config")
    assert "re-issued the broker's server certificate" in output, output
    cert = x509.load_pem_x509_certificate((home.broker_dir / "server.crt").read_bytes())
    assert cert.not_valid_after_utc > short.cert.not_valid_after_utc
