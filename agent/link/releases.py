"""Install an assigned release: TUF lookup, fit and space checks, fetch, verify, install, health check.

:meth:`ReleaseInstaller.install` is what the dispatcher calls for a desired model that is not in the registry
(DESIGN.md §4, Uptane's "director + image repository" rule: the assignment is signed by the controller, the
target by the TUF repository, and both must agree). Steps, each refusing with a reason that is reported:

1. Refresh TUF and get the verified target info (:class:`~agent.link.updater.ReleaseUpdater`). An expired
   timestamp refuses the install (freeze); installed models keep serving, nothing here touches them.
2. The assignment's sha256, length and target path must be the TUF target's.
3. The target must fit the device (arch, RAM budget, accelerators) — checked before any byte is fetched.
4. Free space and quota for the download and the install copy — also before any byte is fetched.
5. Fetch into ``<state_dir>/downloads/fetch-<sha256>`` (per-chunk verification, resume). For a GGUF target
   the header is validated *while* the blob arrives, on its own thread, reading only bytes already verified
   against the signed chunk list (:class:`~agent.link.fetch.VerifiedPrefix`): an invalid header refuses the
   install exactly as the registry's validator would (a hostile GGUF is never loaded), and a valid one's facts
   are handed to the registry, which then does not parse the header a second time.
6. Install through the registry's state machine with the expected sha256 (length, sha256 and the format's
   header validator — the facts of step 5, or the registry's own parse when there are none), not yet active.
7. Health check (injected: load + a fixed prompt at temperature 0 in the daemon); on failure the model is
   quarantined and the active model is unchanged — the device rolls itself back without the controller, and the
   report (kept in the outbox until acked) says so when the link is back; on success it is activated.
   :meth:`ReleaseInstaller.activate_checked` is this step alone: the dispatcher calls it for a release it finds
   staged (a restart interrupted its check), so no path activates a delivered release unchecked. Attempts are
   counted durably before each check starts (``health_checks`` in the link store): after
   ``max_check_attempts`` checks that never finished (each killed the agent) the release is quarantined and
   reported failed, instead of crash-looping the device.

Between the phases (before the download, before the health check, before the activation) the installer asks
whether the assignment it applies is still wanted (``superseded``): a rollback accepted meanwhile stops it, and
the newer generation alone decides what is active.

The outcome is an :class:`InstallOutcome`; ``retry`` marks failures worth retrying later (the link is down);
``metrics`` carries what the health check measured (``ttft_ms``, ``tokens_per_s``, ...) into the report, for the
controller's rollout gates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from agent.errors import AgentError, InvalidModelError, LinkError
from agent.link.fetch import (
    DOWNLOADS_DIR,
    FetchError,
    FetchPolicy,
    FetchRefusedError,
    HttpBlobFetcher,
    MqttBlobFetcher,
    VerifiedPrefix,
)
from agent.link.store import HealthCheckKey, LinkStore
from agent.link.updater import (
    HttpMetadataSource,
    MetadataSource,
    ReleaseRefusedError,
    ReleaseUnavailableError,
    ReleaseUpdater,
    VerifiedTarget,
)
from agent.registry.formats import ModelFacts, inspect_gguf_file
from protocols.messages import DesiredModel, HardwareProfile, TransferProgress
from protocols.topics import repo_topic

__all__ = [
    "HealthCheck",
    "InstallOutcome",
    "InstallRegistry",
    "LinkMetadataSource",
    "ReleaseInstaller",
    "Superseded",
    "build_installer",
]

log = structlog.get_logger(__name__)

HealthCheck = Callable[[Any], Awaitable[Mapping[str, float] | None]]
"""Called with the installed (staged) model record; raises ``AgentError`` if the model is unhealthy, else returns
what it measured (or None)."""

Superseded = Callable[[], Awaitable[str | None]]
"""Asked between the phases of an install: None while the assignment being applied still asks for the model,
else why not (a newer generation was accepted that does not)."""


@runtime_checkable
class InstallRegistry(Protocol):
    """The registry operations an install needs (:class:`agent.registry.Registry`); blocking."""

    state_dir: Path

    def check_space(self, needed: int, what: str) -> None:
        """Raise ``InsufficientSpaceError`` if ``needed`` bytes do not fit."""
        ...

    def import_file(self, src: Path, **kwargs: Any) -> Any:
        """Install a file through the state machine."""
        ...

    def activate(self, name: str, variant: str | None = None, version: int | None = None) -> Any:
        """Make a model active."""
        ...

    def quarantine(self, record: Any, reason: str) -> Any:
        """Quarantine a model."""
        ...


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """What an install attempt did."""

    kind: str
    outcome: str
    reason: str
    changed: bool
    retry: bool = False
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


class ReleaseInstaller:
    """Fetches and installs assigned releases, one at a time (see the module docstring)."""

    def __init__(
        self,
        *,
        registry: InstallRegistry,
        updater: ReleaseUpdater,
        fetcher: MqttBlobFetcher,
        hardware: Callable[[], HardwareProfile],
        store: LinkStore,
        health_check: HealthCheck | None = None,
        max_check_attempts: int = 3,
        on_progress: Callable[[str, int, int], None] | None = None,
        http: HttpBlobFetcher | None = None,
        artifact_url: str = "",
    ) -> None:
        self.store = store
        """The link's database: health-check attempts and the numbers of passed checks (durable)."""
        self.max_check_attempts = max(1, max_check_attempts)
        """Health checks of one release that may start and never finish before it is quarantined."""
        self.http = http
        """Fetches over HTTP from ``artifact_url`` and the target's signed mirrors, before MQTT (None: MQTT only)."""
        self.artifact_url = artifact_url.rstrip("/")
        self.registry = registry
        self.updater = updater
        self.fetcher = fetcher
        self.hardware = hardware
        self.health_check = health_check
        self.on_progress = on_progress or (lambda path, done, total: None)
        self.on_change: Callable[[], None] = lambda: None
        """Called when a download starts or ends and after an install (the device state changed)."""
        self.on_progress_change: Callable[[], None] = lambda: None
        """Called after every batch of a download (the link publishes progress at a bounded rate)."""
        self._transfers: dict[str, TransferProgress] = {}

    def partial_path(self, sha256: str) -> Path:
        """Where the download of blob ``sha256`` is assembled (kept across restarts for resume)."""
        return self.registry.state_dir / DOWNLOADS_DIR / f"fetch-{sha256}"

    async def install(self, model: DesiredModel, *, superseded: Superseded | None = None) -> InstallOutcome:
        """Install and activate ``model`` (see the module docstring); never raises for a refusal.

        ``superseded`` is asked before the download, before the health check and before the activation: once it
        answers (a newer assignment no longer asks for ``model``), nothing more is done — a downloaded blob is
        kept, staged, for a later assignment — and the outcome says so.
        """
        key = model.ref.key
        if (newer := await _superseded(superseded)) is not None:
            return _superseded_outcome(key, newer, "before its download")
        try:
            target = await self.updater.target(model.target_path)
        except ReleaseUnavailableError as exc:
            return InstallOutcome("error", "failed", f"{key}: {exc}", False, retry=True)
        except ReleaseRefusedError as exc:
            return InstallOutcome("refusal", "refused", f"{key} is not installed and cannot be: {exc}", False)
        problem = await asyncio.to_thread(self._precheck, model, target)
        if problem is not None:
            return InstallOutcome("refusal", "refused", f"{key}: {problem}", False)
        dest = self.partial_path(target.sha256)
        transfer_id = secrets.token_hex(16)
        self._transfers[target.path] = TransferProgress(transfer_id, model.ref, 0, target.length)
        self.on_change()
        # the GGUF header is validated while the blob arrives, from verified bytes only (module docstring, 5.)
        prefix = VerifiedPrefix(target, dest) if target.fields.format == "gguf" else None
        header = _HeaderCheck(prefix) if prefix is not None else None
        try:
            await self._fetch(target, dest, prefix)
        except FetchRefusedError as exc:
            await asyncio.to_thread(_unlink, dest)
            return InstallOutcome("refusal", "refused", f"{key}: {exc}", False)
        except FetchError as exc:
            return InstallOutcome("error", "failed", f"{key}: {exc}", False, retry=True)
        except OSError as exc:  # the download file (disk full, permissions): report it, try again later
            return InstallOutcome("error", "failed", f"{key}: cannot write the download: {exc}", False, retry=True)
        finally:
            self._transfers.pop(target.path, None)
            self.on_change()
            validated = await header.result() if header is not None else None
        if isinstance(validated, InvalidModelError):
            await asyncio.to_thread(_unlink, dest)
            return InstallOutcome("install", "failed", f"{key}: install refused: {validated}", False)
        return await self._install(model, target, dest, validated, superseded)

    def http_urls(self, target: VerifiedTarget) -> list[str]:
        """HTTP sources of ``target``, in order: the artifact server, then the signed mirrors."""
        urls = [f"{self.artifact_url}/targets/{target.path}"] if self.artifact_url else []
        return [*urls, *target.mirrors] if self.http is not None else []

    async def _fetch(self, target: VerifiedTarget, dest: Path, prefix: VerifiedPrefix | None) -> None:
        """HTTP sources first (a failing or lying one is skipped), then the MQTT link."""

        def progress(done: int, total: int) -> None:
            self._progress(target.path, done, total)

        for url in self.http_urls(target):
            assert self.http is not None
            try:
                await self.http.fetch(target, dest, url, progress, prefix)
                return
            except FetchRefusedError as exc:
                log.warning("release.source_refused", url=url, error=str(exc))
                if prefix is not None:  # its file is replaced: the registry validates the header instead
                    prefix.discard()
                    prefix = None
                await asyncio.to_thread(_unlink, dest)
            except FetchError as exc:
                log.warning("release.source_failed", url=url, error=str(exc))
        await self.fetcher.fetch(target, dest, progress, prefix)

    def transfers(self) -> tuple[TransferProgress, ...]:
        """Downloads in progress, for the device state (safe to call from a worker thread)."""
        return tuple(self._transfers.values())

    def _progress(self, path: str, done: int, total: int) -> None:
        current = self._transfers.get(path)
        if current is not None:
            self._transfers[path] = dataclasses.replace(current, received_bytes=min(done, total))
            self.on_progress_change()  # the link publishes it at most every progress_interval_s
        self.on_progress(path, done, total)

    def _precheck(self, model: DesiredModel, target: VerifiedTarget) -> str | None:
        if (model.sha256, model.length) != (target.sha256, target.length):
            return "the assignment and the signed target disagree on sha256 or length"
        if target.fields.format != model.target_path.rsplit(".", 1)[1]:
            return f"signed format {target.fields.format} does not match {model.target_path}"
        hw = self.hardware()
        misfit = target.fields.fit_problem(arch=hw.arch, ram_bytes=hw.ram_budget_bytes, accelerators=hw.accelerators)
        if misfit is not None:
            return f"does not fit this device: {misfit} (nothing downloaded)"
        already = self.partial_path(target.sha256)
        have = already.stat().st_size if already.exists() else 0
        try:  # the download (minus what is there) and the registry's install copy, before any byte is fetched
            self.registry.check_space(2 * target.length - have, f"{model.ref.key} ({target.length} bytes)")
        except AgentError as exc:
            return f"{exc} (refused before download)"
        return None

    async def _install(
        self,
        model: DesiredModel,
        target: VerifiedTarget,
        dest: Path,
        validated: ModelFacts | None,
        superseded: Superseded | None,
    ) -> InstallOutcome:
        key = model.ref.key
        try:
            record = await asyncio.to_thread(
                self.registry.import_file,
                dest,
                name=model.name,
                variant=model.variant,
                version=model.version,
                origin=f"release:{target.path}",
                expected_sha256=target.sha256,
                activate=False,
                metadata={"licence": target.fields.licence, "quant": target.fields.quant},
                move=True,  # the fetcher verified (every chunk, length) and fsynced it: no second copy
                validated=validated,  # the header, validated while the blob arrived (None: validate it here)
            )
        except AgentError as exc:
            return InstallOutcome("install", "failed", f"{key}: install refused: {exc}", False)
        finally:
            await asyncio.to_thread(_unlink, dest)
        return await self.activate_checked(model, record, superseded=superseded)

    async def activate_checked(
        self, model: DesiredModel, record: Any, *, superseded: Superseded | None = None
    ) -> InstallOutcome:
        """Health-check the installed (staged) ``record`` of ``model``, then activate it (module docstring, 7.).

        Whatever path reaches a staged release — right after its install, or after a restart that interrupted
        its health check (the dispatcher finds it staged) — it goes through here: it is never activated
        unchecked. Each attempt is counted in the link store *before* the check starts and the count is cleared
        when the check ends, so a release whose check kills the agent (llama.cpp crash, OOM kill, power cut) is
        checked again after the restart, and after ``max_check_attempts`` attempts that never finished it is
        quarantined and reported failed instead of crash-looping the device. A check that passed is recorded
        with its numbers before the activation, so a crash between the activation and the report loses nothing.
        Nothing is activated once ``superseded`` says a newer assignment no longer asks for the model.
        """
        key = model.ref.key
        check_key: HealthCheckKey = (model.name, model.variant, model.version, str(record.sha256))
        if (newer := await _superseded(superseded)) is not None:
            return _superseded_outcome(key, newer, "before its health check")
        if self.health_check is None:
            metrics: Mapping[str, float] = {}
        else:
            recorded = await self.store.run(self.store.health_check, check_key)
            if recorded is not None and recorded.state == "passed":
                metrics = recorded.metrics  # it passed, then the agent stopped before activating it
            else:
                unfinished = 0 if recorded is None else recorded.attempts
                if unfinished >= self.max_check_attempts:
                    return await self._quarantine_unfinished(key, record, check_key, unfinished)
                checked = await self._check(key, record, check_key)
                if isinstance(checked, InstallOutcome):
                    return checked
                metrics = checked
            if (newer := await _superseded(superseded)) is not None:
                return _superseded_outcome(key, newer, "after its health check passed")
        try:
            await asyncio.to_thread(self.registry.activate, model.name, model.variant, model.version)
        except AgentError as exc:
            return InstallOutcome("install", "failed", f"{key}: cannot activate: {exc}", False)
        log.info("release.installed", model=key, **metrics)
        return InstallOutcome(
            "install", "ok", f"installed and activated {key} from {model.target_path}", True, metrics=dict(metrics)
        )

    async def _check(self, key: str, record: Any, check_key: HealthCheckKey) -> Mapping[str, float] | InstallOutcome:
        """One counted health check: its numbers, or the outcome of a failed check (quarantined)."""
        assert self.health_check is not None
        attempt = await self.store.run(self.store.begin_health_check, check_key)
        log.info("release.health_check_started", model=key, attempt=attempt)
        try:
            metrics = await self.health_check(record) or {}
        except AgentError as exc:
            await asyncio.to_thread(self.registry.quarantine, record, f"health check failed: {exc}")
            await self.store.run(self.store.forget_health_check, check_key)
            log.warning("release.rolled_back_locally", model=key, error=str(exc))
            return InstallOutcome(
                "health",
                "failed",
                f"{key}: health check failed, quarantined; rolled back locally (the previously active model "
                f"stays active): {exc}",
                True,
            )
        except asyncio.CancelledError:  # the agent stops (SIGTERM): not the model's doing, do not count it
            await asyncio.shield(self.store.run(self.store.uncount_health_check, check_key))
            raise
        await self.store.run(self.store.pass_health_check, check_key, metrics)
        return metrics

    async def _quarantine_unfinished(
        self, key: str, record: Any, check_key: HealthCheckKey, unfinished: int
    ) -> InstallOutcome:
        reason = (
            f"health check never finished in {unfinished} attempt(s): the agent stopped during each "
            "(a crash in the inference engine, an OOM kill, a power cut or a restart)"
        )
        await asyncio.to_thread(self.registry.quarantine, record, reason)
        await self.store.run(self.store.forget_health_check, check_key)
        log.warning("release.rolled_back_locally", model=key, error=reason)
        return InstallOutcome(
            "health",
            "failed",
            f"{key}: {reason}; quarantined, rolled back locally (the previously active model stays active)",
            True,
        )


async def _superseded(superseded: Superseded | None) -> str | None:
    return None if superseded is None else await superseded()


def _superseded_outcome(key: str, newer: str, when: str) -> InstallOutcome:
    log.info("release.superseded", model=key, when=when, reason=newer)
    return InstallOutcome(
        "install", "failed", f"{key}: not activated, superseded {when}: {newer} (the newer assignment decides)", False
    )


class _HeaderCheck:
    """The GGUF header validation of one download, on its own thread while the blob arrives.

    :meth:`result` (once the transfer has ended, successfully or not): the facts, the ``InvalidModelError``
    that refuses the file, or None when the check could not see the whole verified file (the transfer failed,
    or its file was replaced) — the registry then validates the header itself.
    """

    def __init__(self, prefix: VerifiedPrefix) -> None:
        self.prefix = prefix
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="header-check")
        self._future = self._executor.submit(self._run)

    def _run(self) -> ModelFacts | InvalidModelError:
        try:
            with self.prefix.open() as f:
                return inspect_gguf_file(f)
        except InvalidModelError as exc:
            return exc
        except OSError as exc:  # the transfer ended before the header was there
            return InvalidModelError(str(exc))

    async def result(self) -> ModelFacts | InvalidModelError | None:
        """Ends the check (the transfer is over) and returns its outcome (see the class docstring)."""
        complete = self.prefix.complete
        self.prefix.close()
        try:
            outcome = await asyncio.wrap_future(self._future)
        finally:
            self._executor.shutdown(wait=False)
        return outcome if complete else None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def describe(outcomes: Sequence[InstallOutcome]) -> str:
    """One line for logs."""
    return "; ".join(f"{o.outcome}: {o.reason}" for o in outcomes)


class RepoLink(Protocol):
    """What :class:`LinkMetadataSource` needs of the MQTT link (:class:`agent.link.mqtt.AgentLink`)."""

    async def repo_document(self, topic: str, *, absent_after: float, within: float) -> bytes | None:
        """The retained document on ``topic``, or None."""
        ...

    def forget_repo_document(self, topic: str) -> None:
        """Drop the copy of ``topic``'s document kept by the link, if any."""
        ...


class LinkMetadataSource:
    """:class:`~agent.link.updater.MetadataSource` over the MQTT link's retained ``repo/...`` messages.

    Called from the updater's worker thread; the lookups run on the event loop.
    """

    def __init__(
        self, link: RepoLink, loop: asyncio.AbstractEventLoop, *, absent_after: float = 1.0, timeout: float = 30.0
    ) -> None:
        self.link = link
        self.loop = loop
        self.absent_after = absent_after
        self.timeout = timeout

    def get(self, role: str, version: int | None, max_length: int) -> bytes | None:
        """The document from its retained topic (None if the broker has none)."""
        try:
            topic = repo_topic(role, version)
        except ValueError:
            return None
        future = asyncio.run_coroutine_threadsafe(
            self.link.repo_document(topic, absent_after=self.absent_after, within=self.timeout), self.loop
        )
        try:
            return future.result(self.timeout + 5.0)
        except LinkError as exc:
            raise ReleaseUnavailableError(str(exc)) from exc
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise ReleaseUnavailableError(f"no answer for {topic} within {self.timeout:.0f} s") from exc

    def forget(self, role: str, version: int) -> None:
        """Drop the link's cached copy of the document (TUF refused a refresh that used it)."""
        with contextlib.suppress(ValueError):
            self.loop.call_soon_threadsafe(self.link.forget_repo_document, repo_topic(role, version))


class DeliveryLink(RepoLink, Protocol):
    """The MQTT link as both a metadata source and a chunk transport."""

    device: str
    connected: asyncio.Event
    chunk_sink: Callable[[bytes], None] | None

    async def publish_fetch(self, payload: bytes) -> None:
        """Publish a fetch request."""
        ...


def build_installer(
    link: DeliveryLink,
    registry: object,
    *,
    metadata_dir: Path,
    bootstrap: bytes | None,
    hardware: Callable[[], HardwareProfile],
    store: LinkStore,
    health_check: HealthCheck | None = None,
    max_check_attempts: int = 3,
    policy: FetchPolicy | None = None,
    artifact_url: str = "",
) -> ReleaseInstaller | None:
    """The installer for an enrolled link, or None when there is no trusted root (nothing can be verified).

    Must be called on the event loop (the metadata source bridges the updater's thread back to it).
    """
    if not isinstance(registry, InstallRegistry):
        return None
    source: MetadataSource = (
        HttpMetadataSource(artifact_url) if artifact_url else LinkMetadataSource(link, asyncio.get_running_loop())
    )
    updater = ReleaseUpdater(metadata_dir, source, bootstrap=bootstrap)
    if not updater.bootstrapped:
        log.warning("release.no_trusted_root", hint="re-enroll with a bundle from a controller with a repository")
        return None
    return ReleaseInstaller(
        registry=registry,
        updater=updater,
        fetcher=MqttBlobFetcher(link, policy),
        hardware=hardware,
        store=store,
        health_check=health_check,
        max_check_attempts=max_check_attempts,
        http=HttpBlobFetcher(policy),
        artifact_url=artifact_url,
    )
