"""The aiohttp application of the local API: shared state, middlewares and the route table.

Every request goes through two middlewares, outermost first:

1. ``request_context``: takes the client's ``X-Request-Id`` if it is short and plain, otherwise makes one;
   binds it into structlog's contextvars; answers every exception with :func:`agent.api.errors.error_response`
   (the only place errors become responses); counts the request and its latency under its route *name*;
   logs one ``api.request`` event; refuses new work with 503 while the server drains.
2. ``authenticate``: identifies the caller (:class:`agent.api.auth.AccessPolicy`) for every route that is not
   public (``/healthz``, ``/readyz``, ``/openapi.json``) and checks the route's coarse access level: ``admin_*``
   routes need admin rights, every other route a caller with some right. Routes refine this (inference on a
   given model) with the identity stored under :data:`IDENTITY`. Refusals are audited coalesced per caller
   (:mod:`agent.api.auth_audit`): a flood of them cannot flood the audit log.

Invariants: handlers never see an unauthenticated request on a non-public route; no response to a client
carries a traceback; prompt and completion text are never logged unless ``log.log_prompts`` is set.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiohttp import web

from agent import __version__
from agent.api.auth import AccessPolicy, Identity, peer_credentials
from agent.api.auth_audit import AuthFailureAudit
from agent.api.errors import ShuttingDownError, error_response
from agent.api.metrics import CONTENT_TYPE_LATEST, ApiMetrics
from agent.api.tokens import TokenStore
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.inference import ModelPool
from agent.registry import Registry

__all__ = ["IDENTITY", "REQUEST_ID", "STATE", "ApiState", "AuditHook", "create_app"]

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

AuditHook = Callable[[str, str, Mapping[str, Any]], Awaitable[None]]
"""``await hook(kind, actor, data)``: records a security-relevant event (auth failure, token or model change)."""

PUBLIC_ROUTES = frozenset({"healthz", "readyz", "openapi"})
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class ApiState:
    """Everything the routes share. Built by the daemon (or a test) and handed to :func:`create_app`.

    Attributes:
        config: the agent's configuration.
        registry: the open model registry (synchronous; routes call it with :func:`asyncio.to_thread`).
        pool: the model pool that loads and runs models.
        tokens: the open token store.
        metrics: the Prometheus metrics (a registry of their own).
        draining: set by :class:`agent.api.server.ApiServer` on shutdown; new requests then get 503.
        audit: optional hook for security-relevant events (the daemon connects the audit log here).
        agent_uid: the uid the agent runs as (default: this process's); admin by default.
        stream_write_timeout_s: the longest one streamed write may wait for a client to read (see
            :mod:`agent.api.openai`); a client that reads nothing for this long is disconnected.
        auth_failure_window_s: failed authentications are audited once per caller per window of this length,
            the rest of the window as one summary record (:class:`agent.api.auth_audit.AuthFailureAudit`).
    """

    config: AgentConfig
    registry: Registry
    pool: ModelPool
    tokens: TokenStore
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    draining: bool = False
    audit: AuditHook | None = None
    agent_uid: int = field(default_factory=os.getuid)
    started: float = field(default_factory=time.time)
    stream_write_timeout_s: float = 30.0
    auth_failure_window_s: float = 60.0
    policy: AccessPolicy = field(init=False)
    registry_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _detached: set[asyncio.Task[Any]] = field(init=False, default_factory=set)
    auth_failures: AuthFailureAudit = field(init=False)

    def __post_init__(self) -> None:
        self.auth_failures = AuthFailureAudit(self.auth_failure_window_s)
        self.policy = AccessPolicy(self.config.api, self.tokens, agent_uid=self.agent_uid)
        self.metrics.watch_loaded_models(lambda: float(len(self.pool.loaded())))
        self.metrics.watch_schedulers(self.pool.queue_stats)

    async def in_thread(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run a blocking call (registry, token store, filesystem) on a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def detached(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Run ``work`` to its end whatever happens to the awaiting handler, and return its result.

        aiohttp cancels a handler when its client disconnects; a change and its audit record must not be split by
        that. ``work`` runs in a task of its own, shielded from the handler's cancellation and kept (and awaited
        by :meth:`settle` when the server closes) until it ends.
        """
        task = asyncio.ensure_future(work)
        self._detached.add(task)
        task.add_done_callback(self._forget)
        return await asyncio.shield(task)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._detached.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved here if its handler is gone
            log.info("api.detached_failed", error=str(task.exception())[:200])

    async def settle(self) -> None:
        """Wait for the work started with :meth:`detached` (changes whose clients went away) to end, then audit
        the failed authentications counted but not yet audited."""
        while self._detached:
            await asyncio.wait(list(self._detached))
        for kind, actor, data in self.auth_failures.flush():
            await self.record(kind, actor, data)

    async def record(self, kind: str, actor: str, data: Mapping[str, Any]) -> None:
        """Send a security-relevant event to the audit hook (if any) and the log."""
        log.info("api.audit", kind=kind, actor=actor, **data)
        if self.audit is not None:
            await self.audit(kind, actor, data)


STATE = web.AppKey("state", ApiState)
IDENTITY = web.RequestKey("identity", Identity)
REQUEST_ID = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    name = request.match_info.route.name
    return name if name is not None else "unmatched"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, structured logging context, error mapping, metrics and the draining gate."""
    state = request.app[STATE]
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    route = _route_name(request)
    started = time.perf_counter()
    status = 500
    state.metrics.in_flight.inc()
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            try:
                if state.draining and route not in PUBLIC_ROUTES:
                    raise ShuttingDownError("the agent is shutting down")
                response = await handler(request)
            except asyncio.CancelledError:
                status = 499  # client went away (handler cancellation) or drain timeout
                log.info("api.request", method=request.method, route=route, status=status, cancelled=True)
                raise
            except Exception as exc:
                response = error_response(exc, request_id)
                if isinstance(exc, AgentError | web.HTTPException):
                    log.info("api.error", route=route, status=response.status, error=str(exc)[:200])
                else:
                    log.exception("api.unexpected_error", route=route)
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            status = response.status
            log.info(
                "api.request",
                method=request.method,
                route=route,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return response
        finally:
            state.metrics.in_flight.dec()
            state.metrics.requests.labels(route=route, method=request.method, status=str(status)).inc()
            state.metrics.request_latency.labels(route=route).observe(time.perf_counter() - started)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the caller and enforce the route's coarse access level."""
    route = request.match_info.route.name
    if route is None or route in PUBLIC_ROUTES:
        return await handler(request)
    state = request.app[STATE]
    try:
        identity = await state.policy.identify(request)
        if route.startswith("admin_"):
            state.policy.require_admin(identity)
        else:
            state.policy.require_caller(identity)
    except AgentError as exc:
        key, actor = _peer_key(request)
        for kind, who, data in state.auth_failures.failed(key, actor, route, str(exc)[:200]):
            await state.record(kind, who, data)
        raise
    request[IDENTITY] = identity
    with structlog.contextvars.bound_contextvars(actor=identity.actor):
        return await handler(request)


def _peer_key(request: web.Request) -> tuple[tuple[str, str], str]:
    """The caller's key for coalescing failed authentications, and its actor name."""
    peer = peer_credentials(request)
    if peer is not None:
        return ("unix", str(peer.uid)), f"uid:{peer.uid}"
    return ("tcp", str(request.remote)), "tcp"


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the API accepts work (not draining)."""
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready", "version": __version__})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics in the text exposition format."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(state: ApiState) -> web.Application:
    """Build the API application for ``state``.

    The application's ``client_max_size`` is the configured body limit, as a second line behind the explicit
    check in :func:`agent.api.validation.read_json`.
    """
    from agent.api import admin, openai, openapi

    app = web.Application(
        middlewares=[request_context, authenticate],
        client_max_size=state.config.api.max_body_bytes,
    )
    app[STATE] = state
    router = app.router
    router.add_get("/healthz", healthz, name="healthz", allow_head=False)
    router.add_get("/readyz", readyz, name="readyz", allow_head=False)
    router.add_get("/metrics", metrics, name="metrics", allow_head=False)
    openapi.add_routes(router)
    openai.add_routes(router)
    admin.add_routes(router)
    return app
