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
caller as actor, in the same detached task as the change (a client that disconnects cannot split them).

Imports by path (the agent reads a file on the caller's behalf, so it must not read one the caller could not):
the path must be absolute; only a unix-socket caller may import (its uid comes from ``SO_PEERCRED``; over TCP a
token says nothing about which files its holder may read: 403); the agent's own uid and root may import any
regular file; any other admin uid only a regular file it owns or that is world-readable, checked on the open
file, whose sha256 then binds the install (:func:`_digest_for_uid`). Error messages name what is wrong, never
the file's bytes or hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil
from aiohttp import web

from agent import __version__
from agent.api.app import IDENTITY, STATE, ApiState
from agent.api.auth import Identity
from agent.api.validation import bad_request, check_model_name, check_variant, get_bool, get_int, get_str, read_json
from agent.errors import PermissionDeniedError
from agent.inference import LoadedInfo
from agent.registry import ModelRecord

__all__ = ["add_routes", "record_json"]

MAX_PATH_LENGTH = 4096
MAX_VERSION = 2**31 - 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_RE = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses
_T = TypeVar("_T")


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


async def _commit(
    state: ApiState,
    request: web.Request,
    kind: str,
    change: Callable[[], _T],
    describe: Callable[[_T], Mapping[str, Any]],
    *,
    registry: bool = True,
) -> _T:
    """Make ``change`` (blocking, on a worker thread) and write its audit record, as one unit.

    Both run in a task detached from the handler (:meth:`ApiState.detached`): a client that disconnects while
    the change runs cancels its handler, but not the change, nor the audit record naming its actor. A registry
    change holds ``registry_lock`` until its record is written; a failed change writes no record.
    """
    actor = request[IDENTITY].actor

    async def run() -> _T:
        async with state.registry_lock if registry else contextlib.nullcontext():
            result = await state.in_thread(change)
            await state.record(kind, actor, describe(result))
        return result

    return await state.detached(run())


def _import_uid(state: ApiState, identity: Identity) -> int | None:
    """The uid an import by path must be checked against, or ``None`` when the caller may import any file.

    Raises:
        PermissionDeniedError: the caller's uid is unknown (TCP, or no ``SO_PEERCRED``): with a token alone the
            agent would read files on the caller's behalf that the caller may not be able to read.
    """
    peer = identity.peer
    if identity.transport != "unix" or peer is None:
        raise PermissionDeniedError(
            "importing a file by path needs a caller whose uid the agent can check against the file: use the "
            "unix socket (or `edge-agent models import` on the device), not TCP"
        )
    return None if peer.uid in (0, state.agent_uid) else peer.uid


def _digest_for_uid(path: Path, uid: int) -> str:
    """The sha256 of ``path`` if ``uid`` may import it: a regular file that ``uid`` owns or every user may read.

    The file is opened once, its owner and mode checked on the open descriptor, and hashed from it, so what is
    checked is what the caller's import is bound to (see :func:`import_model`). Group permissions and the parent
    directories are not evaluated: a group-readable file is refused, and a world-readable file is accepted even in
    a directory the caller cannot enter. The one error says neither whether the file exists nor what is in it.

    Raises:
        PermissionDeniedError: missing, unreadable by the agent, not a regular file, or neither owned by ``uid``
            nor world-readable.
    """
    refused = PermissionDeniedError(
        f"uid {uid} may import only an existing regular file that it owns or that every user may read"
    )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        raise refused from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or not (info.st_uid == uid or info.st_mode & stat.S_IROTH):
        os.close(fd)
        raise refused
    with open(fd, "rb") as f:
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _query_version(request: web.Request) -> int | None:
    raw = request.query.get("version")
    if raw is None:
        return None
    if not _VERSION_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_VERSION:
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
    uid = _import_uid(state, request[IDENTITY])
    if uid is None:  # the agent's own uid or root: may import any file the agent can read
        if not await state.in_thread(path.is_file):
            raise bad_request(f"'path' {raw_path!r} is not an existing regular file", "path")
    else:
        digest = await state.in_thread(_digest_for_uid, path, uid)
        if expected is not None and expected != digest:
            raise bad_request("the file's sha256 is not the expected 'sha256'", "sha256")
        expected = digest  # binds the install to the content checked here, whatever the path names later
    record = await _commit(
        state,
        request,
        "model_imported",
        lambda: state.registry.import_file(
            path, name=name, variant=variant, version=version, activate=activate, expected_sha256=expected
        ),
        lambda r: {"name": name, "variant": variant, "version": r.version, "sha256": r.sha256},
    )
    return web.json_response(record_json(record))


async def activate_model(request: web.Request) -> web.Response:
    """``POST /v1/admin/models/{name}/activate`` with ``{"variant", "version"}`` (both optional)."""
    state = request.app[STATE]
    name = check_model_name(request.match_info["name"], "name")
    body = await read_json(request, state.config.api.max_body_bytes) if request.body_exists else {}
    variant = check_variant(body["variant"]) if body.get("variant") is not None else None
    version = get_int(body, "version", default=None, low=1, high=MAX_VERSION)
    record = await _commit(
        state,
        request,
        "model_activated",
        lambda: state.registry.activate(name, variant=variant, version=version),
        lambda r: {"name": name, "variant": r.variant, "version": r.version},
    )
    return web.json_response(record_json(record))


async def rollback_model(request: web.Request) -> web.Response:
    """``POST /v1/admin/models/{name}/rollback``."""
    state = request.app[STATE]
    name = check_model_name(request.match_info["name"], "name")
    record = await _commit(
        state,
        request,
        "model_rolled_back",
        lambda: state.registry.rollback(name),
        lambda r: {"name": name, "variant": r.variant, "version": r.version},
    )
    return web.json_response(record_json(record))


async def collect_garbage(request: web.Request) -> web.Response:
    """``POST /v1/admin/gc``: garbage collection by the registry's policy."""
    state = request.app[STATE]
    result = await _commit(
        state,
        request,
        "models_gc",
        state.registry.gc,
        lambda r: {"removed": list(r.removed_models), "freed": r.freed_bytes},
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
    removed = await _commit(
        state,
        request,
        "model_removed",
        lambda: state.registry.remove(name, variant=variant, version=version, force=force == "true"),
        lambda rs: {"name": name, "removed": [r.ref for r in rs]},
    )
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
    record, plaintext = await _commit(
        state,
        request,
        "token_created",
        lambda: state.tokens.create(name, scopes),
        lambda created: {"token_id": created[0].id, "scopes": list(created[0].scopes)},
        registry=False,
    )
    return web.json_response(record.as_json() | {"token": plaintext})


async def revoke_token(request: web.Request) -> web.Response:
    """``DELETE /v1/admin/tokens/{token_id}``."""
    state = request.app[STATE]
    token_id = request.match_info["token_id"]
    record = await _commit(
        state,
        request,
        "token_revoked",
        lambda: state.tokens.revoke(token_id),
        lambda r: {"token_id": r.id},
        registry=False,
    )
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
            # what runs degraded and why (agent.daemon.DaemonApiState; a bare ApiState has none)
            "degraded": dict(getattr(state, "degraded", None) or {}),
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
