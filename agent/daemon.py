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

Readiness: ``READY=1`` is sent only once the registry is open and recovered and the API socket listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import importlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from agent import __version__
from agent.api.app import ApiState
from agent.api.server import ApiServer
from agent.api.tokens import TokenStore
from agent.config import AgentConfig
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
        registry.begin_load(spec.name, spec.sha256)
        try:
            return load(spec)
        finally:  # loaded, or cleanly refused (an exception): either way the agent survived this load
            registry.end_load(spec.name, spec.sha256)

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
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    async with contextlib.AsyncExitStack() as stack:
        registry = await asyncio.to_thread(Registry.open, config.state_dir, config.registry)
        stack.callback(registry.close)
        recovery = await asyncio.to_thread(registry.recover)
        log.info("registry.recovered", report=str(recovery))

        tokens = await asyncio.to_thread(TokenStore.open, config.state_dir)
        stack.callback(tokens.close)

        pool = ModelPool(
            config.inference.memory_budget_bytes,
            marked_loader(registry),
            load_timeout_s=config.inference.load_timeout_s,
        )
        stack.push_async_callback(pool.aclose)

        state = ApiState(config=config, registry=registry, pool=pool, tokens=tokens)
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
        audit: AuditLog | None = None
        if device:
            from agent.audit import AuditLog, AuditUploader, watch_clock

            audit = await asyncio.to_thread(
                AuditLog.open,
                registry,
                device,
                max_records=config.audit.max_records,
                max_bytes=config.audit.max_bytes,
            )
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
        notifier.ready(status=f"serving on {server.socket_path}")
        log.info("agent.ready", socket=str(server.socket_path))
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
