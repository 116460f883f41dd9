"""Enrollment on the device: install the provisioning bundle, and load it when the link starts.

Layout in the state directory::

    link/bundle        (0600) the bundle exactly as ``edge-fleet device enroll`` wrote it: the one source of truth
    link/tls/          (0700) ca.crt, device.crt, device.key (0600): derived from the bundle at every start
    link/link.db              the link's database (outbox, desired state; agent.link.store)

The bundle is checked completely (:func:`protocols.enrollment.decode_bundle`: signature, certificate chain,
key match, validity) when it is installed *and* every time it is loaded (then without the validity period, which
the local clock at boot cannot be trusted to judge: the broker checks it); the TLS files are rewritten from it,
so they can never disagree with it. Enrolling a device that is enrolled already as another device is refused
unless forced. A bundle with other trust anchors than the installed one removes what was learnt under the old
ones first (``link/tuf/``, ``link/assignment-keys.json``, and with other controller keys or another device
``link.db``): see :func:`_forget_trust`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.errors import EnrollmentError
from agent.link import KEYRING_FILE, bundle_path, link_dir
from protocols.enrollment import BrokerAddress, EnrollmentBundle, decode_bundle
from protocols.errors import ProtocolError
from protocols.keys import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["Enrollment", "install_bundle", "link_dir", "load_enrollment"]

log = structlog.get_logger(__name__)

MAX_BUNDLE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A loaded, verified enrollment."""

    device: str
    broker: BrokerAddress
    ca_file: Path
    cert_file: Path
    key_file: Path
    signing_key: Ed25519PrivateKey
    controller_keys: dict[str, Ed25519PublicKey]
    controller_threshold: int
    bundle: EnrollmentBundle


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _decode(
    data: bytes, pinned: Collection[str] | None, now: dt.datetime | None, *, check_time: bool = True
) -> EnrollmentBundle:
    if len(data) > MAX_BUNDLE_BYTES:
        raise EnrollmentError(f"the bundle is {len(data)} bytes, more than {MAX_BUNDLE_BYTES}: not a bundle")
    try:
        return decode_bundle(data, pinned_keyids=pinned, now=now, check_time=check_time)
    except ProtocolError as exc:
        raise EnrollmentError(f"invalid enrollment bundle: {exc.diagnostics()}") from exc


def install_bundle(
    state_dir: Path,
    data: bytes,
    *,
    expected_keyids: Collection[str] | None = None,
    device_id: str | None = None,
    force: bool = False,
    now: dt.datetime | None = None,
) -> Enrollment:
    """Check ``data`` and install it as this device's enrollment.

    Args:
        state_dir: The agent's state directory.
        data: The bundle file's bytes.
        expected_keyids: Controller key ids to pin (``--expect-keyid``): the bundle must be signed by them.
        device_id: The configured device id, if any: the bundle must be for it.
        force: Replace an enrollment for another device (its link database is removed), or one issued later.
        now: Time for the certificate validity check (tests).

    Raises:
        EnrollmentError: invalid bundle, wrong device, enrolled already as another device, or the installed bundle
            was issued after this one.
    """
    bundle = _decode(data, expected_keyids, now)
    if device_id is not None and bundle.device != device_id:
        raise EnrollmentError(f"the bundle is for device {bundle.device!r}, this agent is configured as {device_id!r}")
    directory = link_dir(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        current = bundle_path(state_dir)
        if current.exists():
            old: EnrollmentBundle | None
            try:
                old = _decode(current.read_bytes(), None, None, check_time=False)
            except EnrollmentError as exc:
                if not force:
                    raise EnrollmentError(
                        f"the installed bundle is unusable ({exc}); use --force to replace it"
                    ) from exc
                old = None
            previous = old.device if old is not None else None
            if previous != bundle.device and not force:
                raise EnrollmentError(
                    f"this agent is enrolled as {previous!r}; use --force to enroll it as {bundle.device!r}"
                )
            if old is not None and bundle.issued_ts_ms < old.issued_ts_ms and not force:
                # an old bundle (a stale copy, a revoked certificate) must not silently replace a renewed one
                raise EnrollmentError(
                    f"the bundle was issued before the installed one ({_issued(bundle)} < {_issued(old)}); "
                    "use --force to install it anyway"
                )
            # before the new bundle is written: a crash in between leaves the old bundle with less state, never
            # the new bundle with the old fleet's
            _forget_trust(directory, old, bundle)
        _atomic_write(current, data, 0o600)
    except OSError as exc:
        raise EnrollmentError(f"cannot install the bundle in {directory}: {exc}") from exc
    return _materialize(state_dir, bundle)


def _issued(bundle: EnrollmentBundle) -> str:
    return dt.datetime.fromtimestamp(bundle.issued_ts_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _forget_trust(directory: Path, old: EnrollmentBundle | None, new: EnrollmentBundle) -> None:
    """Remove the link state learnt under ``old``'s trust anchors that ``new`` does not share.

    - Another TUF root (or another device, or an unknown old bundle): ``tuf/`` (the trusted metadata, which would
      override the new bundle's ``tuf_root``) and ``assignment-keys.json`` (the key list learnt through it, which
      would override the new controller keys) go; the next refresh starts from the new bundle's root.
    - Other controller keys or threshold, or another device, too: ``link.db`` goes as well (accepted
      generations, which would refuse the new controller's lower ones as replays, and the outbox, signed for
      the old fleet).

    Re-enrolling with the same anchors (a renewed certificate) keeps everything.
    """
    same_controller = (
        old is not None
        and old.device == new.device
        and dict(old.controller_keys) == dict(new.controller_keys)
        and old.controller_threshold == new.controller_threshold
    )
    if same_controller and old is not None and old.tuf_root == new.tuf_root:
        return
    log.info("enrollment.trust_reset", device=new.device, link_db=not same_controller)
    if (directory / "tuf").exists():
        shutil.rmtree(directory / "tuf")
    (directory / KEYRING_FILE).unlink(missing_ok=True)
    if not same_controller:
        for name in ("link.db", "link.db-wal", "link.db-shm"):
            (directory / name).unlink(missing_ok=True)


def load_enrollment(
    state_dir: Path, *, device_id: str | None = None, now: dt.datetime | None = None
) -> Enrollment | None:
    """The installed enrollment, checked again (but for the certificate's validity period, only logged if the
    local clock is outside it); None if the device is not enrolled.

    Raises:
        EnrollmentError: the installed bundle is invalid, or for another device than ``device_id``.
    """
    path = bundle_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnrollmentError(f"cannot read {path}: {exc}") from exc
    # Not gated on the local clock: a board may boot with its clock at 1970 (no RTC, NTP not synced yet), or be
    # air-gapped past the certificate's end and still import signed offline bundles. The broker enforces the
    # certificate's validity against its own clock; here a certificate not valid now is only logged.
    bundle = _decode(data, None, now, check_time=False)
    if device_id is not None and bundle.device != device_id:
        raise EnrollmentError(f"enrolled as {bundle.device!r}, but configured as device {device_id!r}")
    try:
        _decode(data, None, now)
    except EnrollmentError as exc:
        log.warning("enrollment.certificate_not_valid_now", device_id=bundle.device, error=str(exc))
    return _materialize(state_dir, bundle)


def _materialize(state_dir: Path, bundle: EnrollmentBundle) -> Enrollment:
    tls = link_dir(state_dir) / "tls"
    try:
        tls.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = {
            "ca.crt": (bundle.ca_pem.encode(), 0o644),
            "device.crt": (bundle.cert_pem.encode(), 0o644),
            "device.key": (bundle.tls_key_pem.encode(), 0o600),
        }
        for name, (content, mode) in files.items():
            target = tls / name
            if not target.exists() or target.read_bytes() != content:
                _atomic_write(target, content, mode)
    except OSError as exc:
        raise EnrollmentError(f"cannot write the TLS files in {tls}: {exc}") from exc
    return Enrollment(
        device=bundle.device,
        broker=bundle.broker,
        ca_file=tls / "ca.crt",
        cert_file=tls / "device.crt",
        key_file=tls / "device.key",
        signing_key=bundle.signing_key(),
        controller_keys=bundle.controller_public_keys(),
        controller_threshold=bundle.controller_threshold,
        bundle=bundle,
    )
