"""The agent's local HTTP API (aiohttp): OpenAI-compatible inference, ONNX tensors, admin, health, metrics.

Public surface::

    ApiState(config, registry, pool, tokens, ...)   shared state of the routes (agent.api.app)
    create_app(state) -> aiohttp.web.Application    the application (agent.api.app)
    ApiServer(state)                                async context manager: unix socket (+ loopback TCP), drain
    TokenStore.open(state_dir)                      hashed bearer tokens in state_dir/tokens.db

Modules: ``app`` (state, middlewares, routes table), ``server`` (listeners, drain), ``auth`` (SO_PEERCRED,
tokens, policy), ``tokens`` (token store), ``errors`` (the one exception → response mapping), ``validation``
(body and field checks), ``openai`` (inference routes), ``admin`` (admin routes), ``metrics`` (Prometheus),
``openapi`` (the document served at ``/openapi.json``).

Only this package imports ``aiohttp.web`` on the agent side. Names are imported lazily so that
``edge-agent token ...`` can use :mod:`agent.api.tokens` without loading the HTTP server or the engines.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.api.app import ApiState, create_app
    from agent.api.server import ApiServer
    from agent.api.tokens import TokenStore

__all__ = ["ApiServer", "ApiState", "TokenStore", "create_app"]

_HOMES = {
    "ApiState": "agent.api.app",
    "create_app": "agent.api.app",
    "ApiServer": "agent.api.server",
    "TokenStore": "agent.api.tokens",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'agent.api' has no attribute {name!r}")
