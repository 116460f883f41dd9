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
directories holding keys are 0700/0750. Enrolling writes the device to the DB before its bundle exists, so a
device can hold credentials the controller does not know about only if the DB is lost.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from controller import brokerconf, pki
from controller.config import FleetConfig, dump_config, load_config, validate
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

__all__ = ["FleetHome", "TlsFiles", "atomic_write"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The files an MQTT client needs: CA, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` atomically with ``mode`` from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen beyond ``mode`` though
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

        ``release_thresholds`` sets the signature threshold (and so the number of keys made) per TUF role.

        Raises:
            HomeError: ``root`` already holds a home (``fleet.toml`` exists) or cannot be written.
            ConfigError: ``config`` is invalid.
        """
        validate(config)
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

            server = pki.issue_server_cert(ca, [config.broker.host, *config.broker.extra_names])
            atomic_write(home.broker_dir / "server.key", pki.key_pem(server.key), 0o600)
            atomic_write(home.broker_dir / "server.crt", pki.cert_pem(server.cert))

            store = FleetStore.open(home.db_path)
            try:
                with store.transaction():
                    store.record_certificate(
                        server.serial, server.cert.subject.rfc4514_string(), "server", server.cert.not_valid_after_utc
                    )
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

    def write_broker_files(self) -> None:
        """Rewrite ``mosquitto.conf``, the ACL and the CRL (e.g. after editing fleet.toml)."""
        store = self.open_store()
        try:
            self._write_revocation_files(store, self._ca())
        finally:
            store.close()
        atomic_write(self.mosquitto_conf_path, self.render_mosquitto_conf().encode())

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
            EnrollmentError: invalid id, or already enrolled without ``force``.
        """
        try:
            validate_device_id(device)
        except DecodeError as exc:
            raise EnrollmentError(str(exc)) from exc
        ca = self._ca()
        signing = generate_private_key()
        issued = pki.issue_client_cert(ca, device, days=days, not_before=not_before, not_after=not_after)
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
        except StoreError as exc:
            raise EnrollmentError(str(exc)) from exc
        finally:
            store.close()
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
        try:
            atomic_write(out, encode_bundle(bundle, [key]), 0o600)
        except OSError as exc:
            raise EnrollmentError(f"cannot write the bundle to {out}: {exc}") from exc
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
