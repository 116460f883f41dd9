"""Admin routes: the model registry, API tokens and the agent's status.

Routes (all need an ``admin`` token or an admin uid; the ``authenticate`` middleware enforces it for every route
named ``admin_*``):

- ``GET /v1/admin/models``; ``POST /v1/admin/models`` (import a file already on the device);
  ``POST /v1/admin/models/{name}/activate``; ``POST /v1/admin/models/{name}/rollback``;
  ``DELETE /v1/admin/models/{name}?variant=&version=``;
- ``GET /v1/admin/tokens``; ``POST /v1/admin/tokens`` (the plaintext is in this one response only);
  ``DELETE /v1/admin/tokens/{token_id}`` (revoke);
- ``GET /v1/admin/status``.

Invariants: every name is syntax-checked before the registry sees it; registry writes are serialised through
``ApiState.registry_lock`` and run off the event loop; every change is reported to the audit hook with the
caller as actor; an import path must be absolute and name an existing regular file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from agent import __version__
from agent.api.app import IDENTITY, STATE
from agent.api.validation import bad_request, check_model_name, check_variant, get_bool, get_int, get_str, read_json
from agent.inference import LoadedInfo
from agent.registry import ModelRecord

__all__ = ["add_routes", "record_json"]

MAX_PATH_LENGTH = 4096
MAX_VERSION = 2**31 - 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def record_json(record: ModelRecord) -> dict[str, Any]:
    """A registry record as JSON."""
    return {
        "id": record.id,
        "name": record.name,
        "variant": record.variant,
        "version": record.version,
        "format": record.format,
        "size": record.size,
        "sha256": record.sha256,
        "params": record.params,
        "context_length": record.context_length,
        "licence": record.licence,
        "origin": record.origin,
        "state": record.state,
        "created": record.created_ts,
        "updated": record.updated_ts,
        "metadata": dict(record.metadata),
    }


def _query_version(request: web.Request) -> int | None:
    raw = request.query.get("version")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 10 or not 1 <= int(raw) <= MAX_VERSION:
        raise bad_request("'version' must be a positive integer", "version")
    return int(raw)


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/admin/models``: every record, removed and quarantined included."""
    state = request.app[STATE]
    records = await state.in_thread(state.registry.list_models)
    return web.json_response({"object": "list", "data": [record_json(r) for r in records]})


async def import_model(request: web.Request) -> web.Response:
    """``POST /v1/admin/models``: import a model file already on this device."""
    state = request.app[STATE]
    body = await read_json(request, state.config.api.max_body_bytes)
    raw_path = get_str(body, "path", max_length=MAX_PATH_LENGTH)
    assert raw_path is not None
    name = check_model_name(body.get("name"), "name")
    variant = check_variant(body.get("variant"))
    version = get_int(body, "version", default=None, low=1, high=MAX_VERSION)
    activate = get_bool(body, "activate", default=True)
    expected = get_str(body, "sha256", max_length=64, required=False)
    if expected is not None and not _SHA256_RE.fullmatch(expected):
        raise bad_request("'sha256' must be 64 lower-case hex characters", "sha256")
    path = Path(raw_path)
    if not path.is_absolute():
        raise bad_request("'path' must be an absolute path on the device", "path")
    if not await state.in_thread(path.is_file):
        raise bad_request(f"'path' {raw_path!r} is not an existing regular file", "path")
    actor = request[IDENTITY].actor
    async with state.registry_lock:
        record = await state.in_thread(
            state.registry.import_file,
            path,
            name=name,
            variant=variant,
            version=version,
            activate=activate,
            expected_sha256=expected,
        )
    await state.record(
        "model_imported",
        actor,
        {"name": name, "variant": variant, "version": record.version, "sha256": record.sha256},
    )
    return web.json_response(record_json(record))


async def activate_model(request: web.Request) -> web.Response:
    """``POST /v1/admin/models/{name}/activate`` with ``{"variant", "version"}`` (both optional)."""
    state = request.app[STATE]
    name = check_model_name(request.match_info["name"], "name")
    body = await read_json(request, state.config.api.max_body_bytes) if request.body_exists else {}
    variant = check_variant(body["variant"]) if body.get("variant") is not None else None
    version = get_int(body, "version", default=None, low=1, high=MAX_VERSION)
    async with state.registry_lock:
        record = await state.in_thread(state.registry.activate, name, variant=variant, version=version)
    await state.record(
        "model_activated", request[IDENTITY].actor, {"name": name, "variant": record.variant, "version": record.version}
    )
    return web.json_response(record_json(record))


async def rollback_model(request: web.Request) -> web.Response:
    """``POST /v1/admin/models/{name}/rollback``."""
    state = request.app[STATE]
    name = check_model_name(request.match_info["name"], "name")
    async with state.registry_lock:
        record = await state.in_thread(state.registry.rollback, name)
    await state.record(
        "model_rolled_back",
        request[IDENTITY].actor,
        {"name": name, "variant": record.variant, "version": record.version},
    )
    return web.json_response(record_json(record))


async def collect_garbage(request: web.Request) -> web.Response:
    """``POST /v1/admin/gc``: garbage collection by the registry's policy."""
    state = request.app[STATE]
    async with state.registry_lock:
        result = await state.in_thread(state.registry.gc)
    await state.record(
        "models_gc", request[IDENTITY].actor, {"removed": list(result.removed_models), "freed": result.freed_bytes}
    )
    return web.json_response(dataclasses.asdict(result))


async def delete_model(request: web.Request) -> web.Response:
    """``DELETE /v1/admin/models/{name}?variant=&version=&force=``: ``force=true`` also removes the active one."""
    state = request.app[STATE]
    name = check_model_name(request.match_info["name"], "name")
    raw_variant = request.query.get("variant")
    variant = check_variant(raw_variant) if raw_variant is not None else None
    version = _query_version(request)
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise bad_request("'force' must be true or false", "force")
    async with state.registry_lock:
        removed = await state.in_thread(
            state.registry.remove, name, variant=variant, version=version, force=force == "true"
        )
    await state.record("model_removed", request[IDENTITY].actor, {"name": name, "removed": [r.ref for r in removed]})
    return web.json_response({"object": "list", "data": [record_json(r) for r in removed]})


async def list_tokens(request: web.Request) -> web.Response:
    """``GET /v1/admin/tokens``."""
    state = request.app[STATE]
    tokens = await state.in_thread(state.tokens.list)
    return web.json_response({"object": "list", "data": [t.as_json() for t in tokens]})


async def create_token(request: web.Request) -> web.Response:
    """``POST /v1/admin/tokens`` with ``{"name", "scopes"}``; the plaintext token is in this response only."""
    state = request.app[STATE]
    body = await read_json(request, state.config.api.max_body_bytes)
    name = get_str(body, "name", max_length=64)
    scopes = body.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise bad_request("'scopes' must be a non-empty list of strings", "scopes")
    assert name is not None
    record, plaintext = await state.in_thread(state.tokens.create, name, scopes)
    await state.record("token_created", request[IDENTITY].actor, {"token_id": record.id, "scopes": list(record.scopes)})
    return web.json_response(record.as_json() | {"token": plaintext})


async def revoke_token(request: web.Request) -> web.Response:
    """``DELETE /v1/admin/tokens/{token_id}``."""
    state = request.app[STATE]
    record = await state.in_thread(state.tokens.revoke, request.match_info["token_id"])
    await state.record("token_revoked", request[IDENTITY].actor, {"token_id": record.id})
    return web.json_response(record.as_json())


def _loaded_json(info: LoadedInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "variant": info.variant,
        "sha256": info.sha256,
        "memory_bytes": info.memory_bytes,
        "in_use": info.in_use,
        "pinned": info.pinned,
        "last_used": info.last_used,
        "retiring": info.retiring,
    }


async def status(request: web.Request) -> web.Response:
    """``GET /v1/admin/status``."""
    state = request.app[STATE]
    active = await state.in_thread(state.registry.active_models)
    return web.json_response(
        {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - state.started, 3),
            "draining": state.draining,
            "active_models": [record_json(r) for r in active],
            "loaded_models": [_loaded_json(m) for m in state.pool.loaded()],
            "memory_rss_bytes": psutil.Process().memory_info().rss,
            "requests_in_flight": state.metrics.in_flight_now(),
        }
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the admin routes (every name starts with ``admin_``: the middleware requires admin rights)."""
    router.add_get("/v1/admin/models", list_models, name="admin_models_list", allow_head=False)
    router.add_post("/v1/admin/models", import_model, name="admin_models_import")
    router.add_delete("/v1/admin/models/{name}", delete_model, name="admin_models_delete")
    router.add_post("/v1/admin/models/{name}/activate", activate_model, name="admin_models_activate")
    router.add_post("/v1/admin/models/{name}/rollback", rollback_model, name="admin_models_rollback")
    router.add_post("/v1/admin/gc", collect_garbage, name="admin_gc")
    router.add_get("/v1/admin/tokens", list_tokens, name="admin_tokens_list", allow_head=False)
    router.add_post("/v1/admin/tokens", create_token, name="admin_tokens_create")
    router.add_delete("/v1/admin/tokens/{token_id}", revoke_token, name="admin_tokens_revoke")
    router.add_get("/v1/admin/status", status, name="admin_status", allow_head=False)
