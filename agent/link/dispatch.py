"""Desired state: verify signed assignments, persist the accepted one, then reconcile the device to it.

The controller expresses everything a device must do as one retained, signed :class:`Assignment` with a
monotonic ``generation`` (DESIGN.md §4–§5). The device never depends on the broker having queued anything: it
gets the retained assignment on every (re)connect and reconciles to it.

Two parts (the python-tuf habit: trust rules apart from the driver):

- :class:`AssignmentVerifier` is pure and always raises: the envelope must verify with the controller keys
  from the enrollment bundle (at their threshold), name this device, and (against what was accepted before)
  carry a higher generation — an equal generation must be byte-identical (a duplicate), a lower one is a
  replay (``RollbackError``).
- :class:`Dispatcher` is the driver. ``on_assign`` verifies, then *persists the accepted assignment before
  acting* (``desired`` row); the reconcile loop applies the newest accepted one. Applying writes
  ``applied_generation`` and the reports about it in one transaction, so after a crash at any point the
  assignment takes effect exactly once: activation is idempotent in the registry, and the reports and the
  "applied" mark commit together.

A desired model that is not installed is fetched and installed by the ``installer``
(:class:`agent.link.releases.ReleaseInstaller`) when a *new* generation is applied; without one, or when the
installed copy differs from the signed sha256/length, it is refused with a signed report. A refused release stays
refused until a new generation arrives; a transient failure (link or repository unreachable) is retried after
``retry_after_s`` without being reported.

With an installer, a desired model found ``staged`` is never activated directly: it goes through the installer's
health check (:meth:`~agent.link.releases.ReleaseInstaller.activate_checked`), like a fresh install — this is
how a release whose check a crash interrupted is checked again after the restart. ``previous`` models (active
before) are re-activated directly: rollback is instant. The numbers of a passed check are kept in the link store
until the report that carries them commits with the "applied" mark.

Every install step asks :meth:`Dispatcher._superseded` whether the generation being applied still stands: once a
newer accepted generation no longer asks for the model (a rollback), nothing more is activated for the old one; its
report says so, and the newer generation is reconciled next.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import structlog

from agent.errors import AgentError
from agent.link.outbox import Outbox
from agent.link.store import HealthCheckKey, LinkStore
from protocols.backoff import raise_if_cancelled
from protocols.errors import ProtocolError, RollbackError, VerificationError
from protocols.keys import Ed25519PrivateKey, Ed25519PublicKey
from protocols.link import open_sealed, seal
from protocols.messages import Assignment, DesiredModel, ModelRef, Report
from protocols.topics import TopicKind, device_topic

if TYPE_CHECKING:
    from agent.link.keyring import ControllerKeyring

__all__ = ["AssignmentVerifier", "Dispatcher", "ModelRecordLike", "ModelRegistry"]

log = structlog.get_logger(__name__)

MAX_REFUSALS_REMEMBERED = 256


class ModelRecordLike(Protocol):
    """What the dispatcher reads of a registry record (:class:`agent.registry.ModelRecord`)."""

    @property
    def name(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def state(self) -> str: ...


class ModelRegistry(Protocol):
    """The registry operations the link uses (:class:`agent.registry.Registry`); blocking, thread-safe."""

    def list_models(self, name: str | None = None, *, include_removed: bool = False) -> Sequence[ModelRecordLike]:
        """Models of ``name`` (or all)."""
        ...

    def activate(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecordLike:
        """Make a model the active one of its name (idempotent)."""
        ...


class AssignmentVerifier:
    """The trust rules for assignments (pure; raises on every failure)."""

    def __init__(
        self,
        device: str,
        keys: Mapping[str, Ed25519PublicKey],
        threshold: int,
        *,
        keyring: ControllerKeyring | None = None,
    ) -> None:
        self.device = device
        self.keys = dict(keys)
        self.threshold = threshold
        self.keyring = keyring
        """When set, the keys come from it (the TUF-published assignment keys, agent/link/keyring.py)."""
        self.topic = device_topic(device, TopicKind.ASSIGN)

    def verify(self, data: bytes) -> Assignment:
        """Signature, payload type and device (docs/protocol.md, "Assignments", steps 1–3).

        Raises:
            DecodeError: malformed.
            VerificationError: bad or missing controller signatures, or for another device.
        """
        keyring = self.keyring
        keys, threshold = keyring.current if keyring is not None else (self.keys, self.threshold)
        try:
            message = open_sealed(self.topic, data, keys, threshold=threshold).message
        except VerificationError:
            if keyring is not None:
                keyring.unverified(data)  # a rotated key? refresh the list through TUF, then verify again
            raise
        assert isinstance(message, Assignment)
        return message

    def verifies(self, data: bytes) -> bool:
        """Whether ``data`` verifies (steps 1–3) under the keys in force now; no key refresh is asked for."""
        keys, threshold = self.keyring.current if self.keyring is not None else (self.keys, self.threshold)
        try:
            message = open_sealed(self.topic, data, keys, threshold=threshold).message
        except ProtocolError:
            return False
        return isinstance(message, Assignment)

    @staticmethod
    def check_generation(new: Assignment, data: bytes, accepted: tuple[int, bytes] | None) -> bool:
        """Step 4: the generation against the accepted one. True: accept; False: a duplicate, ignore.

        Raises:
            RollbackError: a lower generation (a replay), or the same generation with other content.
        """
        if accepted is None:
            return True
        generation, envelope = accepted
        if new.generation > generation:
            return True
        if new.generation == generation:
            if data == envelope:
                return False
            raise RollbackError(f"a different assignment with the accepted generation {generation}")
        raise RollbackError(f"generation {new.generation} is older than the accepted generation {generation}")


@dataclass(frozen=True, slots=True)
class _Desired:
    generation: int
    envelope: bytes
    applied_generation: int


@dataclass(frozen=True, slots=True)
class _Outcome:
    model: DesiredModel
    kind: str
    outcome: str
    reason: str
    changed: bool
    missing: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)
    unchecked: bool = False
    """Installed but staged: it is activated only through the installer's health check."""
    record: Any = None


class InstallResult(Protocol):
    """What :meth:`ReleaseInstaller.install` returns (:class:`agent.link.releases.InstallOutcome`)."""

    @property
    def kind(self) -> str: ...
    @property
    def outcome(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def changed(self) -> bool: ...
    @property
    def retry(self) -> bool: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


class ReleaseInstall(Protocol):
    """Installs a desired model missing from the registry (:class:`agent.link.releases.ReleaseInstaller`)."""

    async def install(
        self, model: DesiredModel, *, superseded: Callable[[], Awaitable[str | None]] | None = None
    ) -> InstallResult:
        """Install, health-check and activate ``model``; never raises for a refusal."""
        ...

    async def activate_checked(
        self, model: DesiredModel, record: Any, *, superseded: Callable[[], Awaitable[str | None]] | None = None
    ) -> InstallResult:
        """Health-check the staged ``record`` of ``model``, then activate it (quarantine it if it fails)."""
        ...


class Dispatcher:
    """Accepts assignments and reconciles the registry to the newest one (see the module docstring)."""

    def __init__(
        self,
        *,
        store: LinkStore,
        outbox: Outbox,
        verifier: AssignmentVerifier,
        registry: ModelRegistry,
        signing_key: Ed25519PrivateKey,
        on_change: Callable[[], None] | None = None,
        fault: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        installer: ReleaseInstall | None = None,
        retry_after_s: float = 15.0,
    ) -> None:
        self.installer = installer
        """Installs desired models that are not in the registry (release delivery); None: refuse them."""
        self.retry_after_s = retry_after_s
        self.store = store
        self.outbox = outbox
        self.verifier = verifier
        self.device = verifier.device
        self.registry = registry
        self.signing_key = signing_key
        self.on_change = on_change or (lambda: None)
        self.fault = fault or (lambda point: None)
        self.clock = clock
        self.wake = asyncio.Event()
        self._refused: dict[bytes, None] = {}
        self.audit: Callable[[str, str, Mapping[str, Any]], Awaitable[None]] | None = None
        """The audit log's hook (the daemon connects it): assignments applied and refused are recorded."""

    # --- incoming ---------------------------------------------------------------------------------------

    async def on_assign(self, data: bytes) -> str:
        """Handle a message from the ``assign`` topic; returns ``accepted``, ``duplicate`` or ``refused``."""
        try:
            assignment = self.verifier.verify(data)
        except ProtocolError as exc:
            await self._refuse(data, exc, None)
            return "refused"
        try:
            accepted = await self.store.run(self._accept, assignment, data)
        except RollbackError as exc:
            await self._refuse(data, exc, assignment.generation)
            return "refused"
        if not accepted:
            self.wake.set()  # the retained copy on every (re)connect: reconcile (drift check) all the same
            return "duplicate"
        log.info("assignment.accepted", device_id=self.device, generation=assignment.generation)
        self.fault("accepted")  # crash-test seam: the assignment is persisted, nothing applied yet
        self.wake.set()
        return "accepted"

    def _accept(self, assignment: Assignment, data: bytes) -> bool:
        with self.store.transaction() as db:
            row = db.execute("SELECT generation, envelope FROM desired WHERE id = 1").fetchone()
            current = None if row is None else (int(row[0]), bytes(row[1]))
            if current is not None and not self.verifier.verifies(current[1]):
                # accepted under keys no longer in force (rotated away, perhaps because one leaked): its
                # generation must not block the ones signed with the current keys (docs/protocol.md §4.2, step 4)
                log.warning("assignment.stored_unverified", device_id=self.device, generation=current[0])
                current = None
            if not AssignmentVerifier.check_generation(assignment, data, current):
                return False
            db.execute(
                "INSERT INTO desired (id, generation, envelope, accepted_ts) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET generation = excluded.generation, envelope = excluded.envelope, "
                "accepted_ts = excluded.accepted_ts",
                [assignment.generation, data, self.clock()],
            )
            return True

    async def _refuse(self, data: bytes, exc: ProtocolError, generation: int | None) -> None:
        digest = hashlib.sha256(data).digest()
        if digest in self._refused:
            return  # the same bytes again (a retained or queued copy): refused and reported already
        self._refused[digest] = None
        while len(self._refused) > MAX_REFUSALS_REMEMBERED:
            del self._refused[next(iter(self._refused))]
        reason = f"assignment refused: {type(exc).__name__}: {exc}"
        log.warning("assignment.refused", device_id=self.device, reason=reason)
        report = self._report("refusal", "refused", reason[:4000], generation=generation)
        await self.store.run(self._store_refusal, report, reason)
        self.outbox.wake.set()
        await self._audit("assignment.refused", {"generation": generation, "reason": reason[:1000]})

    def _store_refusal(self, report: Report, reason: str) -> None:
        with self.store.transaction():
            self.store.add_event("assignment_refused", {"reason": reason}, now=self.clock())
            self.outbox.put_in_transaction(TopicKind.REPORT, report.report_id, self._seal(report))

    # --- reconcile --------------------------------------------------------------------------------------

    async def run(self) -> NoReturn:
        """Reconcile now (a crash may have left an accepted assignment unapplied), then whenever woken."""
        while True:
            raise_if_cancelled()  # installs fetch over aiomqtt, which may swallow a stop (protocols/backoff.py)
            await self.reconcile()
            await self.wake.wait()
            self.wake.clear()

    async def accepted_generation(self) -> tuple[int, int]:
        """``(accepted generation, applied generation)``, ``(0, 0)`` before the first assignment."""
        desired = await self.store.run(self._load)
        return (0, 0) if desired is None else (desired.generation, desired.applied_generation)

    def _load(self) -> _Desired | None:
        row = self.store.db.execute(
            "SELECT generation, envelope, applied_generation FROM desired WHERE id = 1"
        ).fetchone()
        return None if row is None else _Desired(int(row[0]), bytes(row[1]), int(row[2]))

    async def reconcile(self) -> None:
        """Bring the registry to the newest accepted assignment.

        A generation not applied yet is applied completely and reported (once). An applied one is checked
        for drift: a desired model that is installed but no longer active is activated again.
        """
        desired = await self.store.run(self._load)
        if desired is None:
            return
        try:
            assignment = self.verifier.verify(desired.envelope)  # what is on disk is re-checked, not trusted
        except ProtocolError as exc:
            log.error("assignment.stored_invalid", device_id=self.device, error=str(exc))
            return
        first = assignment.generation > desired.applied_generation
        outcomes = [await asyncio.to_thread(self._apply_model, model) for model in assignment.models]
        if self.installer is not None and any(o.unchecked or (first and o.missing) for o in outcomes):
            outcomes, retry = await self._install_missing(assignment.generation, outcomes, install=first)
            if retry:  # the link or repository is unreachable: try again later, report nothing yet
                asyncio.get_running_loop().call_later(self.retry_after_s, self.wake.set)
                if any(o.changed for o in outcomes):
                    self.on_change()
                return
        if first:
            outcomes = await self.store.run(self._with_checked_metrics, outcomes)
            self.fault("applied")  # crash-test seam: the registry changed, the "applied" mark is not written
            reports = [self._model_report(assignment, o) for o in outcomes]
            if not assignment.models:
                reports.append(self._report("install", "ok", "no models desired", generation=assignment.generation))
            # Recorded before link.db marks the generation applied (another database, no shared transaction): a
            # crash in between applies it again and records it again (at least once), never loses the record.
            await self._audit(
                "assignment.applied",
                {
                    "generation": assignment.generation,
                    "rollout_id": assignment.rollout_id,
                    "outcomes": {o.model.ref.key: f"{o.kind}:{o.outcome}" for o in outcomes},
                },
            )
            await self.store.run(self._commit_applied, assignment.generation, reports, assignment.models)
            self.outbox.wake.set()
            log.info(
                "assignment.applied",
                device_id=self.device,
                generation=assignment.generation,
                outcomes=[f"{o.model.ref.key}:{o.outcome}" for o in outcomes],
            )
        else:
            drift = [o for o in outcomes if o.changed]
            if drift:
                reports = [self._model_report(assignment, o, reason_prefix="drift corrected: ") for o in drift]
                models = [o.model for o in drift]
                await self.store.run(self._commit_applied, assignment.generation, reports, models)
                self.outbox.wake.set()
        if any(o.changed for o in outcomes) or first:
            self.on_change()

    async def _install_missing(
        self, generation: int, outcomes: list[_Outcome], *, install: bool
    ) -> tuple[list[_Outcome], bool]:
        """Health-check and activate the staged desired models; with ``install`` (a new assignment), also fetch
        and install those that are not installed (one at a time).

        Each step first asks whether ``generation`` is still wanted (:meth:`_superseded`): a newer assignment
        accepted meanwhile (a rollback) stops it before anything more is activated.
        """
        assert self.installer is not None
        done: list[_Outcome] = []
        retry = False
        for o in outcomes:
            superseded = functools.partial(self._superseded, generation, o.model)
            if o.unchecked:
                result = await self.installer.activate_checked(o.model, o.record, superseded=superseded)
            elif install and o.missing:
                result = await self.installer.install(o.model, superseded=superseded)
            else:
                done.append(o)
                continue
            retry = retry or result.retry
            done.append(
                _Outcome(o.model, result.kind, result.outcome, result.reason, result.changed, metrics=result.metrics)
            )
            log.info("release.outcome", device_id=self.device, model=o.model.ref.key, outcome=result.outcome)
        return done, retry

    async def _superseded(self, generation: int, model: DesiredModel) -> str | None:
        """None while the newest accepted assignment is ``generation`` or still asks for ``model``, else why not."""
        desired = await self.store.run(self._load)
        if desired is None or desired.generation <= generation:
            return None
        try:
            newer = self.verifier.verify(desired.envelope)
        except ProtocolError:
            return None  # reconcile will not apply it either; the generation being applied stays in force
        if model in newer.models:
            return None  # e.g. re-signed after a key rotation, or another model's deploy: the same release
        return f"generation {desired.generation} was accepted meanwhile and does not ask for {model.ref.key}"

    def _with_checked_metrics(self, outcomes: list[_Outcome]) -> list[_Outcome]:
        """Outcomes with the numbers of a passed health check whose report a crash prevented (store thread)."""
        done = []
        for o in outcomes:
            if o.kind == "install" and o.outcome == "ok" and not o.metrics:
                row = self.store.health_check(_check_key(o.model))
                if row is not None and row.state == "passed":
                    o = replace(o, metrics=row.metrics)
            done.append(o)
        return done

    def _commit_applied(self, generation: int, reports: list[Report], models: Sequence[DesiredModel] = ()) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE desired SET applied_generation = max(applied_generation, ?), applied_ts = ? WHERE id = 1",
                [generation, self.clock()],
            )
            for report in reports:
                self.outbox.put_in_transaction(TopicKind.REPORT, report.report_id, self._seal(report))
            for model in models:  # their health checks' numbers are in these reports now
                self.store.forget_health_check(_check_key(model), passed_only=True)

    def _apply_model(self, model: DesiredModel) -> _Outcome:
        """Make ``model`` active if it is installed and intact; blocking (runs in a worker thread)."""
        try:
            records = [
                r
                for r in self.registry.list_models(model.name)
                if r.variant == model.variant and r.version == model.version
            ]
            if not records:
                return _Outcome(model, "refusal", "refused", f"not installed: {model.ref.key}", False, missing=True)
            record = records[0]
            if record.sha256 != model.sha256 or record.size != model.length:
                return _Outcome(
                    model,
                    "refusal",
                    "refused",
                    f"installed copy of {model.ref.key} differs from the assignment (sha256 or length)",
                    False,
                )
            if record.state == "active":
                return _Outcome(model, "install", "ok", f"{model.ref.key} is active", False)
            if record.state == "staged" and self.installer is not None:
                # never activated, or a restart interrupted its health check: the installer checks it first
                return _Outcome(model, "install", "ok", "", False, unchecked=True, record=record)
            self.registry.activate(model.name, model.variant, model.version)
            return _Outcome(model, "install", "ok", f"activated {model.ref.key}", True)
        except AgentError as exc:
            return _Outcome(model, "error", "failed", f"cannot activate {model.ref.key}: {exc}", False)

    async def _audit(self, kind: str, data: Mapping[str, Any]) -> None:
        if self.audit is not None:
            await self.audit(kind, "controller", data)

    # --- reports ----------------------------------------------------------------------------------------

    def _model_report(self, assignment: Assignment, outcome: _Outcome, *, reason_prefix: str = "") -> Report:
        return self._report(
            outcome.kind,
            outcome.outcome,
            (reason_prefix + outcome.reason)[:4000],
            generation=assignment.generation,
            model=outcome.model.ref,
            metrics=outcome.metrics,
        )

    def _report(
        self,
        kind: str,
        outcome: str,
        reason: str,
        *,
        generation: int | None = None,
        model: ModelRef | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> Report:
        return Report(
            report_id=secrets.token_hex(16),
            device=self.device,
            ts_ms=int(self.clock() * 1000),
            kind=kind,
            outcome=outcome,
            reason=reason,
            generation=generation,
            model=model,
            metrics=dict(metrics or {}),
        )

    def _seal(self, report: Report) -> bytes:
        return seal(report, TopicKind.REPORT, [self.signing_key])


def _check_key(model: DesiredModel) -> HealthCheckKey:
    return (model.name, model.variant, model.version, model.sha256)
