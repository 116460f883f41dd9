"""``edge-agent run``: the agent's one asyncio process.

Components are async context managers opened in one :class:`contextlib.AsyncExitStack`, in dependency order:
registry (recovered first, so that an install interrupted by a crash is resumed or abandoned before anything
serves), token store, model pool, API server. Long-lived loops (the systemd watchdog, and the MQTT link when
the device is enrolled) are named tasks in a :class:`asyncio.TaskGroup`.

Shutdown: SIGTERM or SIGINT sets the stop event; the daemon tells systemd ``STOPPING=1``, cancels the loops,
then closes the components in reverse order — the API server first stops accepting and drains in-flight
requests (up to ``api.drain_timeout_s``), then models unload and the databases close — and exits 0.
Anything unexpected propagates: the process exits non-zero and systemd restarts it.

The audit log (:mod:`agent.audit`) starts once the device id is known (enrolled, or ``device_id`` configured):
the API's audit hook is connected to it, start and stop are recorded, and its uploader runs on the link.

Readiness: ``READY=1`` is sent only once the registry is open and recovered and the API socket listens. An
interrupted import that recovery resumes can take minutes (a multi-GB copy and hash on a slow disk): while
recovery runs, the daemon asks systemd for more start time (``EXTEND_TIMEOUT_USEC``) so that
``TimeoutStartSec`` never counts it as a failed start.

Bad local state (docs/operations.md, "Bad local state"): the agent starts degraded wherever it can, logs each
degraded component at error level and lists it in ``GET /v1/admin/status`` (``degraded``) and in systemd's
``STATUS=`` line:

- ``tokens``: ``tokens.db`` cannot be opened (garbage, locked, unreadable): uid-authenticated socket callers are
  served, a caller presenting a token gets 503 ``token_store_unavailable`` naming the cause;
- ``registry``: the disk holding the state directory is full, so SQLite cannot open ``registry.db`` for writing:
  the registry is opened read-only (installed models are served; installs and changes get 507 naming the path
  and the free bytes; recovery is skipped);
- ``link``: ``link.db`` cannot be opened: the agent serves without the link (:func:`agent.link.mqtt.open_agent_link`);
- ``audit``: the audit log cannot be opened: the agent serves without it (nothing is recorded in the hash chain
  until a restart with a working log; the gap shows as a new epoch).

Where starting is impossible (``registry.db`` garbage or unreadable, the state directory unusable, a regular file
at the socket path; an invalid configuration, see :mod:`agent.cli`), :class:`~agent.errors.LocalStateError`
propagates and ``edge-agent run`` exits with :data:`~agent.errors.EXIT_BAD_LOCAL_STATE`, which the unit's
``RestartPreventExitStatus=`` keeps systemd from restarting into.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import hashlib
import importlib
import os
import shutil
import signal
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import sqlite_utils
import structlog

from agent import __version__
from agent.api.app import ApiState
from agent.api.server import ApiServer
from agent.api.tokens import TOKENS_DB, TokenStore, TokenStoreUnavailableError, UnavailableTokenStore
from agent.config import AgentConfig, RegistryConfig
from agent.errors import AgentError, InsufficientSpaceError, LocalStateError, RegistryError
from agent.health import model_health_check
from agent.inference import LoadedModel, ModelPool, ModelSpec, load_model
from agent.link import bundle_path
from agent.registry import Registry
from agent.systemd import SystemdNotifier, watchdog_loop

if TYPE_CHECKING:
    from agent.audit import AuditLog
    from agent.link.mqtt import AgentLink

__all__ = ["INFERENCE_STALL_S", "inference_progress", "marked_loader", "run"]

log = structlog.get_logger(__name__)

INFERENCE_STALL_S: Final = 60.0
"""A model's engine thread that owes progress this long (one decode step, or a wake-up not acted on) is wedged:
the watchdog pings stop and systemd restarts the agent after ``WatchdogSec`` (30 s in the shipped unit). A step
of this project's models takes milliseconds to a few seconds (a 512-token prompt chunk), but an overloaded 2-core
box was measured 50x slower than a quiet one; a native call that never returns is caught all the same."""


def inference_progress(pool: ModelPool, limit_s: float = INFERENCE_STALL_S) -> Callable[[], bool]:
    """The watchdog's health probe: every resident model's engine thread is idle or making progress."""

    def healthy() -> bool:
        stalled = pool.stalled(limit_s)
        if stalled:
            log.error("inference.stalled", models={name: round(s, 1) for name, s in stalled.items()}, limit_s=limit_s)
        return not stalled

    return healthy


def marked_loader(
    registry: Registry, load: Callable[[ModelSpec], LoadedModel] | None = None
) -> Callable[[ModelSpec], LoadedModel]:
    """The pool's loader, with the registry's crash-loop breaker around each load (runs in the load's thread).

    The mark is committed before the engine opens the file and cleared when the load ends, loaded or cleanly
    refused; a load that kills the process leaves it, and :meth:`Registry.recover` counts it at the next start
    (:mod:`agent.registry.loads`): a model that crashes the agent on load is quarantined, not retried forever.
    """
    if load is None:
        load = load_model

    def loader(spec: ModelSpec) -> LoadedModel:
        try:
            registry.begin_load(spec.name, spec.sha256)
        except (AgentError, sqlite3.Error, OSError) as exc:  # a read-only registry (disk full): serve unguarded
            log.warning("model_load_unmarked", model=spec.name, error=str(exc)[:200])
            return load(spec)
        try:
            return load(spec)
        finally:  # loaded, or cleanly refused (an exception): either way the agent survived this load
            try:
                registry.end_load(spec.name, spec.sha256)
            except (AgentError, sqlite3.Error, OSError) as exc:  # the next start counts one crash too many
                log.warning("model_load_mark_not_cleared", model=spec.name, error=str(exc)[:200])

    return loader


async def run(
    config: AgentConfig,
    *,
    notifier: SystemdNotifier | None = None,
    stop: asyncio.Event | None = None,
    freeze_gc: bool = False,
) -> int:
    """Run the agent until SIGTERM/SIGINT (or ``stop`` is set); return the exit status.

    Args:
        config: the agent's configuration.
        notifier: systemd notifier (default: from the environment; a no-op when not under systemd).
        stop: an event that ends the daemon when set (tests); signals set it too.
        freeze_gc: once ready, move every object allocated so far out of the garbage collector's sight
            (:func:`gc.freeze`; ``edge-agent run`` sets it, a test running the daemon in its own process not).
    """
    notifier = notifier or SystemdNotifier()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, _on_signal(stop, sig))
            installed.append(sig)
    structlog.contextvars.bind_contextvars(device_id=config.device_id)
    try:
        await _serve(config, notifier, stop, freeze_gc=freeze_gc)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        notifier.close()
    log.info("agent.stopped")
    return 0


TOKEN_OPEN_TIMEOUT_S: Final = 2.0
"""How long start-up waits for a ``tokens.db`` another process holds locked before serving without tokens."""

FULL_DISK_BYTES: Final = 1 << 20
"""Below this many free bytes a registry that SQLite cannot open is taken for a full disk (SQLite needs room for
its ``-wal`` and 32 KiB ``-shm``), and opened read-only."""

RECOVERY_EXTEND_S: Final = 60
"""While recovery runs, start-up time is extended by this much, every third of it (``EXTEND_TIMEOUT_USEC``)."""


@dataclass
class DaemonApiState(ApiState):
    """The daemon's API state: :class:`~agent.api.app.ApiState` plus what runs degraded.

    Attributes:
        degraded: component (``tokens``, ``registry``, ``link``, ``audit``) -> why it is degraded; shown by
            ``GET /v1/admin/status``.
    """

    degraded: dict[str, str] = field(default_factory=dict)


class ReadOnlyRegistry(Registry):
    """The registry opened read-only because the disk is full: serves what is installed, refuses every change.

    Every change goes through :meth:`Registry._transaction`; here it raises :class:`InsufficientSpaceError` (507)
    naming the state directory and its free bytes, before SQLite could answer with a bare "readonly database".
    """

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        free = _free_bytes(self.state_dir)
        raise InsufficientSpaceError(
            f"disk full: the registry in {self.state_dir} is read-only ({free} bytes free); installs and changes "
            "are refused until space is freed and the agent restarted"
        )
        yield  # type: ignore[unreachable]  # makes this a generator; never reached

    def recover(self) -> Any:
        """Nothing is recovered on a read-only registry (recovery writes); the next writable start does it."""
        raise InsufficientSpaceError(f"disk full: recovery in {self.state_dir} postponed")


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _open_read_only_registry(state_dir: Path, config: RegistryConfig) -> Registry:
    """Open ``registry.db`` read-only without creating ``-wal``/``-shm`` (``immutable``: no file is written).

    ``immutable`` ignores a ``-wal`` left by a crash: transactions committed after the last checkpoint are not
    seen (a warning is logged); the agent runs alone on the registry (its lock is taken), so nothing else changes
    the file meanwhile.
    """
    lock_fd = os.open(state_dir / "registry.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegistryError(f"the registry in {state_dir} is in use by another process") from None
        path = state_dir / "registry.db"
        wal = path.with_name(path.name + "-wal")
        with contextlib.suppress(OSError):
            if wal.stat().st_size > 0:
                log.warning("registry.read_only_wal_ignored", wal=str(wal), bytes=wal.stat().st_size)
        uri = f"file:{urllib.parse.quote(str(path))}?mode=ro&immutable=1"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("SELECT count(*) FROM models").fetchone()  # garbage or no registry: raises here
        except BaseException:
            conn.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    return ReadOnlyRegistry(state_dir, config, sqlite_utils.Database(conn), lock_fd)


def _open_registry(config: AgentConfig, degraded: dict[str, str]) -> Registry:
    """Open the registry; read-only on a full disk; :class:`LocalStateError` when no restart could help.

    Raises:
        LocalStateError: ``registry.db`` is garbage or unreadable, or the state directory is unusable.
        RegistryError: another process holds the registry (transient: systemd restarts the agent).
    """
    state_dir = config.state_dir
    try:
        return Registry.open(state_dir, config.registry)
    except (RegistryError, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc, RegistryError) else exc
        if cause is None:  # in use by another process: a restart may well succeed
            raise
        free = _free_bytes(state_dir)
        full = (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(cause, sqlite3.OperationalError) and 0 <= free < FULL_DISK_BYTES
        )
        if full:
            try:
                registry = _open_read_only_registry(state_dir, config.registry)
            except (OSError, sqlite3.Error, RegistryError) as ro_exc:
                raise LocalStateError(
                    f"the disk holding {state_dir} is full ({free} bytes free) and the registry cannot be opened "
                    f"even read-only: {ro_exc}"
                ) from exc
            reason = f"disk full: {free} bytes free in {state_dir}; registry read-only, installs refused"
            log.error("registry.read_only", reason=reason, error=str(exc))
            degraded["registry"] = reason
            return registry
        if isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause):
            raise  # another process holds registry.db: transient
        if isinstance(cause, (sqlite3.DatabaseError, OSError)):
            raise LocalStateError(
                f"{exc} (move {state_dir / 'registry.db'} away or restore it from a backup, see docs/operations.md)"
                if isinstance(cause, sqlite3.DatabaseError)
                else str(exc)
            ) from exc
        raise


def _open_tokens(config: AgentConfig, degraded: dict[str, str]) -> TokenStore:
    """The token store, or an :class:`UnavailableTokenStore` saying why it cannot be opened."""
    try:
        return TokenStore.open(config.state_dir, timeout=TOKEN_OPEN_TIMEOUT_S)
    except TokenStoreUnavailableError as exc:
        log.error("tokens.unavailable", error=str(exc), served="uid-authenticated socket callers only")
        degraded["tokens"] = str(exc)
        return UnavailableTokenStore(config.state_dir / TOKENS_DB, str(exc))


async def _recover(registry: Registry, notifier: SystemdNotifier) -> None:
    """Run recovery off the loop, extending systemd's start timeout while it runs (a resumed import is long)."""

    async def extend() -> None:
        while True:
            notifier.notify(EXTEND_TIMEOUT_USEC=RECOVERY_EXTEND_S * 1_000_000)
            await asyncio.sleep(RECOVERY_EXTEND_S / 3)

    extender = asyncio.create_task(extend(), name="recovery-extend-timeout")
    try:
        recovery = await asyncio.to_thread(registry.recover)
    finally:
        extender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extender
    log.info("registry.recovered", report=str(recovery))


def _start_facts(config: AgentConfig) -> dict[str, object]:
    """What ``agent.started`` records: version, pid, and the config file's sha256 (a config change shows)."""
    facts: dict[str, object] = {"version": __version__, "pid": os.getpid()}
    if config.config_path is not None:
        facts["config"] = str(config.config_path)
        with contextlib.suppress(OSError):
            facts["config_sha256"] = hashlib.sha256(config.config_path.read_bytes()).hexdigest()
    return facts


def _may_be_enrolled(state_dir: Path) -> bool:
    """False only if no enrollment bundle is installed; an unreadable one is left to the link to report."""
    try:
        return bundle_path(state_dir).exists()
    except OSError:  # e.g. link/ owned by another user: open_agent_link logs why and serves without the link
        return True


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> Callable[[], None]:
    def handler() -> None:
        log.info("agent.signal", signal=sig.name)
        stop.set()

    return handler


async def _serve(config: AgentConfig, notifier: SystemdNotifier, stop: asyncio.Event, *, freeze_gc: bool) -> None:
    log.info("agent.starting", version=__version__, state_dir=str(config.state_dir))
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        raise LocalStateError(f"cannot use state directory {config.state_dir}: {exc.strerror or exc}") from exc
    degraded: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        registry = await asyncio.to_thread(_open_registry, config, degraded)
        stack.callback(registry.close)
        if isinstance(registry, ReadOnlyRegistry):
            log.warning("registry.recovery_skipped", reason="read-only registry (disk full)")
        else:
            await _recover(registry, notifier)

        tokens = await asyncio.to_thread(_open_tokens, config, degraded)
        stack.callback(tokens.close)

        pool = ModelPool(
            config.inference.memory_budget_bytes,
            marked_loader(registry),
            load_timeout_s=config.inference.load_timeout_s,
        )
        stack.push_async_callback(pool.aclose)

        state = DaemonApiState(config=config, registry=registry, pool=pool, tokens=tokens, degraded=degraded)
        server = await stack.enter_async_context(ApiServer(state))

        # The MQTT link, if the device is enrolled (`edge-agent enroll`); None otherwise. Nothing waits for it.
        # Its modules (TLS, TUF, MQTT, ~20 MiB resident) are imported only then: a device that runs offline,
        # never enrolled, does not carry them.
        link: AgentLink | None = None
        if not config.link.enabled:
            log.info("link.disabled")
        elif not _may_be_enrolled(config.state_dir):
            log.info("link.not_enrolled", state_dir=str(config.state_dir))
        else:
            # imported off the loop: the API already serves (a second or two on a small box)
            await asyncio.to_thread(importlib.import_module, "agent.link.mqtt")
            from agent.link.mqtt import open_agent_link

            link = await stack.enter_async_context(
                open_agent_link(
                    config,
                    registry,
                    agent_version=__version__,
                    loaded_models=lambda: [(m.name, m.variant, m.sha256) for m in pool.loaded()],
                    health_check=model_health_check(state),  # delivered releases (agent/link/releases.py)
                )
            )

        # The audit log (DESIGN.md §6) needs the device id: the enrolled one, else the configured one.
        device = link.device if link is not None else config.device_id
        if link is None and config.link.enabled and _may_be_enrolled(config.state_dir):
            degraded["link"] = "enrolled but the link could not be opened (see the link.* error in the log)"
        audit: AuditLog | None = None
        if device:
            from agent.audit import AuditLog, AuditUploader, watch_clock

            try:
                audit = await asyncio.to_thread(
                    AuditLog.open,
                    registry,
                    device,
                    max_records=config.audit.max_records,
                    max_bytes=config.audit.max_bytes,
                )
            except (AgentError, OSError, sqlite3.Error, ValueError) as exc:
                # ValueError: a device id the chain refuses (protocols.audit; agent.toml's is checked on loading).
                # Serving without the audit log beats not serving: nothing is hash-chained until a restart with
                # a working log (whose new epoch shows the gap). Said loudly, in the log and the status.
                log.critical("audit.unavailable", error=str(exc), consequence="changes are NOT audit-logged")
                degraded["audit"] = f"audit log unavailable, changes are not audit-logged: {exc}"
        if audit is not None:
            state.audit = audit.record
            if link is not None:
                link.state.audit_head = audit.head  # the state message carries the head (worker thread)
                link.dispatcher.audit = audit.record  # assignments applied / refused (agent/link/dispatch.py)
            await audit.record("agent.started", "agent", await asyncio.to_thread(_start_facts, config))

        if freeze_gc:
            # Everything allocated so far (modules, the registry, the API's routes) lives as long as the process:
            # out of the collector's sight, a collection scans only what requests allocate. Unfrozen, the start-up
            # objects made collections pauses of up to tens of milliseconds (measured: 94 ms for a full one, 10 ms
            # for a young one on a busy 2-core box; 28 and 0.8 ms frozen), holding the GIL that every model's
            # decode loop needs between two steps. Start-up garbage is collected first: frozen, a cycle is never freed.
            gc.collect()
            gc.freeze()
        summary = f"serving on {server.socket_path}"
        if degraded:
            summary += " (degraded: " + "; ".join(f"{k}: {v}" for k, v in sorted(degraded.items()))[:400] + ")"
        notifier.ready(status=summary)
        log.info("agent.ready", socket=str(server.socket_path), degraded=sorted(degraded) or None)
        async with asyncio.TaskGroup() as tasks:
            watchdog = tasks.create_task(watchdog_loop(notifier, inference_progress(pool)), name="watchdog")
            link_task = tasks.create_task(link.run(), name="mqtt-link") if link is not None else None
            audit_tasks = []
            if audit is not None:
                audit_tasks.append(tasks.create_task(watch_clock(audit), name="audit-clock"))
            if link is not None and audit is not None:
                audit_tasks.append(tasks.create_task(AuditUploader(audit, link).run(), name="audit-uploader"))
            await stop.wait()
            if audit is not None:
                await audit.record("agent.stopping", "agent", {"pid": os.getpid()})
            for task in audit_tasks:
                task.cancel()
            notifier.stopping()
            log.info("agent.stopping")
            watchdog.cancel()
            if link_task is not None:
                link_task.cancel()  # publishes the offline state on its way out
