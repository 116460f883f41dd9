"""The controller home (``--home`` / ``EDGE_FLEET_HOME``): keys, the device CA, broker files, the fleet DB.

Layout::

    fleet.toml                      configuration (controller.config)
    fleet.db                        fleet database (controller.store)
    keys/assignment.key  (0600)     Ed25519 key signing assignments, acks and enrollment bundles
    keys/assignment.pub
    ca/ca.crt  ca/ca.key (0600)     the device CA (X.509, ECDSA P-256)
    ca/crl.pem                      its revocation list (re-issued on every revocation)
    broker/server.crt  broker/server.key (0600)
    broker/mosquitto.conf  broker/acl  broker/data/   (persistence)
    controllers/<name>.crt  controllers/<name>.key (0600)   controller MQTT identities
    repo/                           the TUF release repository and its keys (controller.releases)

Invariants: private keys are created 0600 (never world- or group-readable at any moment: the file is created
with that mode), every file is written atomically (temp file, fsync, ``os.replace``, fsync of the directory),
directories holding keys are 0700/0750. Enrolling writes the bundle to a temp file first, then commits the
device to the DB, then renames the bundle into place: a bundle that cannot be written leaves nothing enrolled, and
a device can hold credentials the controller does not know about only if the DB is lost. The ACL and CRL are
re-written whenever a revocation changes (revoke, and re-enrolling a revoked or --force'd device).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller import brokerconf, pki
from controller.config import LEGACY_SHARE_GROUP, FleetConfig, dump_config, load_config, new_share_group, validate
from controller.errors import EnrollmentError, HomeError, StoreError
from controller.store import FleetStore
from protocols.enrollment import BrokerAddress, EnrollmentBundle, encode_bundle
from protocols.errors import DecodeError
from protocols.keys import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    generate_private_key,
    keyid,
    private_key_from_pem,
    private_key_to_pem,
    public_key_to_pem,
)
from protocols.topics import validate_device_id

SERVER_CERT_RENEW_BEFORE = dt.timedelta(days=30)
"""``edge-fleet broker config`` re-issues the broker's server certificate when it expires sooner than this."""

__all__ = ["FleetHome", "TlsFiles", "atomic_write", "publish_staged", "stage_write"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files an MQTT client needs: CA, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` atomically with ``mode`` from the first byte on."""
    publish_staged(stage_write(path, data, mode), path)


def stage_write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` (fsynced, ``mode`` from the first byte on) to a temp file next to ``path``; return it.

    The first half of :func:`atomic_write`, for callers that must know the file can be written *before* they
    commit something else (enrolling: the DB row), then :func:`publish_staged` it, or unlink it on failure.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen beyond ``mode`` though
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish_staged(tmp: Path, path: Path) -> None:
    """Move a :func:`stage_write` temp file onto ``path`` and fsync the directory (unlinks ``tmp`` on failure)."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FleetHome:
    """One controller home directory."""

    def __init__(self, root: Path, config: FleetConfig) -> None:
        self.root = root
        self.config = config

    # --- paths ------------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def db_path(self) -> Path:
        return self.root / "fleet.db"

    @property
    def assignment_key_path(self) -> Path:
        return self.root / "keys" / "assignment.key"

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def mosquitto_conf_path(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def repo_dir(self) -> Path:
        """The TUF release repository (controller.releases)."""
        return self.root / "repo"

    def _tuf_root(self) -> str:
        """The latest root of the release repository (a device's TUF trust anchor), or "" without one."""
        roots = sorted(
            (int(p.name.split(".", 1)[0]), p)
            for p in (self.repo_dir / "metadata").glob("*.root.json")
            if p.name.split(".", 1)[0].isdigit()
        )
        return roots[-1][1].read_text(encoding="utf-8") if roots else ""

    def controller_tls(self, name: str | None = None) -> TlsFiles:
        """TLS files of controller identity ``name`` (default: this home's ``controller.name``)."""
        name = name or self.config.controller.name
        base = self.root / "controllers" / name
        return TlsFiles(ca=self.ca_cert_path, cert=base.with_suffix(".crt"), key=base.with_suffix(".key"))

    # --- create / open ----------------------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, config: FleetConfig, *, release_thresholds: Mapping[str, int] | None = None) -> FleetHome:
        """Create a new home: keys, CA, server and controller certificates, broker files, fleet DB, TUF repository.

        ``release_thresholds`` sets the signature threshold (and so the number of keys made) per TUF role. A
        ``controller.share_group`` left at the old fixed default is replaced by a random one (written to
        fleet.toml, and in :attr:`config` of the returned home).

        Raises:
            HomeError: ``root`` already holds a home (``fleet.toml`` exists) or cannot be written.
            ConfigError: ``config`` is invalid.
        """
        validate(config)
        if config.controller.share_group == LEGACY_SHARE_GROUP:
            # The fixed name is public: any enrolled device could join the group and take a share of the
            # reports/audit/fetch meant for controllers (docs/THREAT_MODEL.md). A new home gets a random one.
            config = replace(config, controller=replace(config.controller, share_group=new_share_group()))
        home = cls(root, config)
        if home.config_path.exists():
            exists = HomeError(f"{root} already holds an edge-fleet home (fleet.toml exists): not overwriting keys")
            exists.hint = "Use another --home, or remove the old home first if you really mean to replace its keys."
            raise exists
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o750)
            for sub, mode in (("keys", 0o700), ("ca", 0o750), ("broker", 0o750), ("controllers", 0o700)):
                (root / sub).mkdir(mode=mode, exist_ok=True)
            (home.broker_dir / "data").mkdir(mode=0o750, exist_ok=True)

            key = generate_private_key()
            atomic_write(home.assignment_key_path, private_key_to_pem(key), 0o600)
            atomic_write(home.assignment_key_path.with_suffix(".pub"), public_key_to_pem(key))

            ca = pki.create_ca()
            atomic_write(home.ca_key_path, pki.key_pem(ca.key), 0o600)
            atomic_write(home.ca_cert_path, pki.cert_pem(ca.cert))

            store = FleetStore.open(home.db_path)
            try:
                home._issue_server_cert(store, ca)
                home._issue_controller(store, ca, config.controller.name)
                home._write_revocation_files(store, ca)
            finally:
                store.close()
            atomic_write(home.mosquitto_conf_path, home.render_mosquitto_conf().encode())
            from controller.releases import ReleaseRepository  # imports this module (atomic_write)

            ReleaseRepository.create(home.repo_dir, thresholds=release_thresholds)
            # Last: fleet.toml marks the home as complete.
            atomic_write(home.config_path, dump_config(config).encode())
        except OSError as exc:
            raise HomeError(f"cannot create the controller home in {root}: {exc}") from exc
        return home

    @classmethod
    def open(cls, root: Path) -> FleetHome:
        """Open an existing home.

        Raises:
            HomeError: no home there.
            ConfigError: ``fleet.toml`` is invalid.
        """
        if not (root / "fleet.toml").exists():
            raise HomeError(f"no edge-fleet home in {root} (fleet.toml is missing)")
        return cls(root, load_config(root / "fleet.toml"))

    def open_store(self) -> FleetStore:
        """Open the fleet DB."""
        return FleetStore.open(self.db_path)

    # --- keys -------------------------------------------------------------------------------------------

    def assignment_key(self) -> Ed25519PrivateKey:
        """The Ed25519 key that signs assignments, acks and bundles."""
        try:
            return private_key_from_pem(self.assignment_key_path.read_bytes())
        except (OSError, DecodeError) as exc:
            raise HomeError(f"cannot load the assignment key {self.assignment_key_path}: {exc}") from exc

    def controller_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """The controller's public keys by key id (what devices trust)."""
        public = self.assignment_key().public_key()
        return {keyid(public): public}

    def _ca(self) -> pki.Issued:
        try:
            return pki.Issued(
                pki.load_cert(self.ca_cert_path.read_bytes()), pki.load_key(self.ca_key_path.read_bytes())
            )
        except (OSError, ValueError) as exc:
            raise HomeError(f"cannot load the device CA from {self.ca_cert_path.parent}: {exc}") from exc

    # --- broker files -----------------------------------------------------------------------------------

    def render_mosquitto_conf(self) -> str:
        """``mosquitto.conf`` for this home's settings."""
        files = brokerconf.BrokerFiles(
            cafile=self.ca_cert_path.resolve(),
            certfile=(self.broker_dir / "server.crt").resolve(),
            keyfile=(self.broker_dir / "server.key").resolve(),
            crlfile=self.crl_path.resolve(),
            acl_file=self.acl_path.resolve(),
            persistence_dir=(self.broker_dir / "data").resolve(),
        )
        return brokerconf.render_mosquitto_conf(self.config.broker, files)

    def _controller_identities(self) -> list[str]:
        return sorted(pki.controller_common_name(p.stem) for p in (self.root / "controllers").glob("*.crt"))

    def _write_revocation_files(self, store: FleetStore, ca: pki.Issued) -> None:
        """Re-issue the CRL and the ACL from the DB."""
        with store.transaction():
            number = store.next_counter("crl_number")
        crl = pki.build_crl(ca, store.revoked_serials(), number=number)
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        atomic_write(
            self.acl_path, brokerconf.render_acl(self._controller_identities(), store.revoked_devices()).encode()
        )

    def write_broker_files(self) -> str:
        """Rewrite ``mosquitto.conf``, the ACL and the CRL (e.g. after editing fleet.toml).

        Also re-issues the broker's server certificate when it no longer names every configured host (``host``
        or ``extra_names`` changed) or expires within :data:`SERVER_CERT_RENEW_BEFORE`: ``init`` is otherwise the
        only place it is made, and clients refuse a broker whose certificate is expired or names another host.

        Returns:
            Why the server certificate was re-issued, or "" if it was kept.
        """
        store = self.open_store()
        try:
            ca = self._ca()
            reason = self._server_cert_outdated()
            if reason:
                self._issue_server_cert(store, ca)
            self._write_revocation_files(store, ca)
        finally:
            store.close()
        atomic_write(self.mosquitto_conf_path, self.render_mosquitto_conf().encode())
        return reason

    def _server_names(self) -> list[str]:
        broker = self.config.broker
        return list(dict.fromkeys([broker.host, *broker.extra_names]))

    def _server_cert_outdated(self) -> str:
        """Why the broker's server certificate must be re-issued, or "" if it is fine."""
        try:
            cert = pki.load_cert((self.broker_dir / "server.crt").read_bytes())
        except (OSError, ValueError):
            return "it is missing or unreadable"
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
            names |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            names = set()
        missing = [n for n in self._server_names() if str(_normalise_host(n)) not in names]
        if missing:
            return f"it does not name {', '.join(missing)}"
        end = cert.not_valid_after_utc
        if end - dt.datetime.now(dt.UTC) < SERVER_CERT_RENEW_BEFORE:
            return f"it expires {end:%Y-%m-%d}"
        return ""

    def _issue_server_cert(self, store: FleetStore, ca: pki.Issued) -> None:
        server = pki.issue_server_cert(ca, self._server_names())
        with store.transaction():
            store.record_certificate(
                server.serial, server.cert.subject.rfc4514_string(), "server", server.cert.not_valid_after_utc
            )
        # Key first, 0600 from its first byte: the certificate must never pair with a key that is not on disk.
        atomic_write(self.broker_dir / "server.key", pki.key_pem(server.key), 0o600)
        atomic_write(self.broker_dir / "server.crt", pki.cert_pem(server.cert))

    def _issue_controller(self, store: FleetStore, ca: pki.Issued, name: str) -> TlsFiles:
        files = self.controller_tls(name)
        cn = pki.controller_common_name(name)
        issued = pki.issue_client_cert(ca, cn)
        with store.transaction():
            store.record_certificate(issued.serial, cn, "controller", issued.cert.not_valid_after_utc)
        atomic_write(files.key, pki.key_pem(issued.key), 0o600)
        atomic_write(files.cert, pki.cert_pem(issued.cert))
        return files

    def add_controller(self, name: str) -> TlsFiles:
        """Issue another controller identity (for a second ``edge-fleet serve``); rewrites the ACL.

        Raises:
            EnrollmentError: that controller exists or the name is invalid.
        """
        try:
            validate(replace(self.config, controller=replace(self.config.controller, name=name)))
        except HomeError as exc:
            raise EnrollmentError(str(exc)) from exc
        if self.controller_tls(name).cert.exists():
            raise EnrollmentError(f"controller {name!r} exists already")
        store = self.open_store()
        try:
            ca = self._ca()
            files = self._issue_controller(store, ca, name)
            self._write_revocation_files(store, ca)
        finally:
            store.close()
        return files

    # --- devices ----------------------------------------------------------------------------------------

    def enroll_device(
        self,
        device: str,
        out: Path,
        *,
        days: int = 730,
        force: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> EnrollmentBundle:
        """Issue credentials for ``device`` and write its provisioning bundle to ``out`` (0600).

        Args:
            device: The device id (:data:`~protocols.limits.DEVICE_ID_RE`).
            out: Where to write the bundle.
            days: Certificate validity.
            force: Re-enroll a device that is enrolled now (its old credentials are revoked first).
            not_before: Explicit certificate validity start (tests of expired certificates).
            not_after: Explicit certificate validity end.

        Raises:
            EnrollmentError: invalid id, already enrolled without ``force``, a validity the device CA does not
                cover, or ``out`` cannot be written (then nothing is changed: the device is not enrolled).
        """
        try:
            validate_device_id(device)
        except DecodeError as exc:
            raise EnrollmentError(str(exc)) from exc
        ca = self._ca()
        _check_validity(ca, days=days, not_after=not_after)
        signing = generate_private_key()
        issued = pki.issue_client_cert(ca, device, days=days, not_before=not_before, not_after=not_after)
        key = self.assignment_key()
        broker = self.config.broker
        bundle = EnrollmentBundle(
            device=device,
            issued_ts_ms=int(time.time() * 1000),
            broker=BrokerAddress(host=broker.host, port=broker.port, max_packet_size=broker.max_packet_size),
            ca_pem=pki.cert_pem(ca.cert).decode(),
            cert_pem=pki.cert_pem(issued.cert).decode(),
            tls_key_pem=pki.key_pem(issued.key).decode(),
            signing_key_pem=private_key_to_pem(signing).decode(),
            controller_keys={keyid(key): public_key_to_pem(key).decode()},
            controller_threshold=1,
            tuf_root=self._tuf_root(),
        )
        # The bundle is written (to a temp file beside ``out``) before the DB commits: an unwritable ``out``
        # must not leave the device enrolled without credentials, which a retry would then refuse ("already
        # enrolled") and which --force would revoke the working old credentials for.
        if out.is_dir():
            raise EnrollmentError(f"cannot write the bundle to {out}: it is a directory")
        try:
            staged = stage_write(out, encode_bundle(bundle, [key]), 0o600)
        except OSError as exc:
            raise EnrollmentError(f"cannot write the bundle to {out}: {exc}") from exc
        store = self.open_store()
        try:
            existing = store.get_device(device)
            if existing is not None and not existing.revoked:
                if not force:
                    raise EnrollmentError(f"device {device!r} is already enrolled (use --force to re-enroll it)")
                self._revoke(store, ca, device)
            with store.transaction():
                store.record_certificate(issued.serial, device, "device", issued.cert.not_valid_after_utc)
                store.add_device(
                    device,
                    cert_serial=issued.serial,
                    cert_not_after=issued.cert.not_valid_after_utc,
                    signing_keyid=keyid(signing),
                    signing_key_pem=public_key_to_pem(signing).decode(),
                )
            if existing is not None:
                # Re-enrolled (after a revocation or with --force): the ACL must stop denying the device, and
                # the CRL must list the certificate --force just revoked.
                self._write_revocation_files(store, ca)
            publish_staged(staged, out)
        except StoreError as exc:
            raise EnrollmentError(str(exc)) from exc
        except OSError as exc:
            raise EnrollmentError(f"cannot write the bundle to {out}: {exc}") from exc
        finally:
            staged.unlink(missing_ok=True)
            store.close()
        return bundle

    def _revoke(self, store: FleetStore, ca: pki.Issued, device: str) -> None:
        with store.transaction():
            store.revoke_device(device)
        self._write_revocation_files(store, ca)

    def revoke_device(self, device: str) -> None:
        """Revoke ``device``: DB, CRL and ACL. The broker must re-read them (see docs/operations.md).

        Raises:
            EnrollmentError: no such device, or already revoked.
        """
        store = self.open_store()
        try:
            self._revoke(store, self._ca(), device)
        except StoreError as exc:
            raise EnrollmentError(str(exc)) from exc
        finally:
            store.close()


def _normalise_host(name: str) -> object:
    """An IP address as :mod:`ipaddress` prints it (how a SAN entry compares), a DNS name as it is."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return name


def _check_validity(ca: pki.Issued, *, days: int, not_after: dt.datetime | None) -> None:
    """Refuse a device certificate that would outlive the CA that signs it.

    Past the CA's notAfter the whole chain is invalid, so such a certificate only looks longer-lived; and a huge
    ``days`` would overflow the date arithmetic.

    Raises:
        EnrollmentError: naming the latest date (and most days) the CA allows.
    """
    ca_end = ca.cert.not_valid_after_utc
    max_days = max(0, (ca_end - dt.datetime.now(dt.UTC)).days)
    if not_after is not None:
        if not_after > ca_end:
            raise EnrollmentError(
                f"the certificate would end {not_after:%Y-%m-%d}, after the device CA expires ({ca_end:%Y-%m-%d})"
            )
        return
    if days > max_days:
        error = EnrollmentError(
            f"--days {days}: the certificate would outlive the device CA, which expires {ca_end:%Y-%m-%d} "
            f"(at most {max_days} days from now)"
        )
        error.hint = f"Use --days {max_days} or fewer."
        raise error
