"""The served ``/openapi.json`` and the served router describe exactly the same API."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from agent.api import ApiServer, ApiState, TokenStore
from agent.api.app import PUBLIC_ROUTES
from agent.config import AgentConfig, ApiConfig
from agent.inference import ModelPool
from agent.registry import Registry

pytestmark = pytest.mark.component


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ApiServer, dict[str, Any]]]:
    """A real server (empty registry) and the OpenAPI document it serves over its unix socket."""
    config = AgentConfig(state_dir=tmp_path / "state", api=ApiConfig(socket_path=tmp_path / "api.sock"))
    with Registry.open(config.state_dir, config.registry) as registry, TokenStore.open(config.state_dir) as tokens:
        pool = ModelPool(1 << 30)
        try:
            async with ApiServer(ApiState(config=config, registry=registry, pool=pool, tokens=tokens)) as server:
                transport = httpx.AsyncHTTPTransport(uds=str(config.api.socket_path))
                async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
                    response = await client.get("/openapi.json")
                assert response.status_code == 200
                yield server, response.json()
        finally:
            await pool.aclose()


def _router_operations(server: ApiServer) -> dict[tuple[str, str], str]:
    """``(path, method) -> route name`` for every route the server's router serves."""
    operations = {}
    for route in server.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path is not None, route
        assert route.name is not None, f"route {route.method} {path} has no name"
        operations[(path, route.method.lower())] = route.name
    return operations


def _document_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "post", "put", "patch", "delete", "head", "options"}
    return {(path, method) for path, item in document["paths"].items() for method in item if method in methods}


async def test_every_route_is_documented_and_every_documented_route_exists(
    served: tuple[ApiServer, dict[str, Any]],
) -> None:
    """Each (path, method) of the router is in /openapi.json, and the document lists nothing else."""
    server, document = served
    routes = set(_router_operations(server))
    documented = _document_operations(document)
    assert routes - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routes == set(), "documented operations that no route serves"


async def test_document_is_openapi_3_1_with_resolvable_references(served: tuple[ApiServer, dict[str, Any]]) -> None:
    """The document declares OpenAPI 3.1, every $ref resolves, and every path parameter is declared."""
    _, document = served
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"]
    refs: list[str] = []

    def walk(node: object) -> Iterator[None]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    list(walk(document))
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        target: Any = document
        for part in ref[2:].split("/"):
            assert part in target, f"unresolvable $ref {ref}"
            target = target[part]
    for path, item in document["paths"].items():
        templated = set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == templated, f"{method.upper()} {path}: path parameters {declared} != {templated}"
            assert operation["summary"]
            assert "200" in operation["responses"]


async def test_public_and_admin_routes_are_marked_in_the_document(served: tuple[ApiServer, dict[str, Any]]) -> None:
    """Exactly the public routes declare no security, and exactly the admin_* routes live under /v1/admin/."""
    server, document = served
    for (path, method), name in _router_operations(server).items():
        operation = document["paths"][path][method]
        assert (operation.get("security") == []) == (name in PUBLIC_ROUTES), f"{method.upper()} {path}"
        assert name.startswith("admin_") == path.startswith("/v1/admin/"), f"{method.upper()} {path}"
        assert ("admin" in operation["tags"]) == name.startswith("admin_"), f"{method.upper()} {path}"
