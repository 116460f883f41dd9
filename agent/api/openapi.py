"""The OpenAPI 3.1 document of the local API, written by hand and served at ``/openapi.json``.

The document is the API's reference (``docs/agent.md`` is checked against it). It is hand-written rather than
generated so that it says what the API promises, not what the code happens to accept; a component test
compares its paths and methods with the router's, so a route cannot be added or removed without the document
following.

Invariant: every ``(path, method)`` served by :func:`agent.api.app.create_app` appears under ``paths`` and
nothing else does.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent import __version__

__all__ = ["add_routes", "openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{s}"} for s in statuses}


_INFER_ERRORS = (400, 401, 403, 404, 413, 429, 503)
_GENERATION_ERRORS = (*_INFER_ERRORS, 504)
_ADMISSION_HEADERS = [
    {
        "name": "X-Priority",
        "in": "header",
        "required": False,
        "description": "Admission class when the body has no `priority`: `interactive` (default) leaves the "
        "model's queue before `batch`.",
        "schema": {"enum": ["interactive", "batch"]},
    },
    {
        "name": "X-Request-Deadline-Ms",
        "in": "header",
        "required": False,
        "description": "Deadline in milliseconds from arrival when the body has no `timeout`; capped at "
        "`inference.request_timeout_s`. Past it the request fails with 504 (or a stream ends with an error event).",
        "schema": {"type": "integer", "minimum": 1},
    },
]
_ADMISSION_FIELDS: dict[str, Any] = {
    "priority": {
        "enum": ["interactive", "batch"],
        "default": "interactive",
        "description": "Admission class: interactive requests leave the model's queue before batch ones.",
    },
    "timeout": {
        "type": "number",
        "exclusiveMinimum": 0,
        "description": "Deadline in seconds from arrival (capped at `inference.request_timeout_s`, the "
        "default); past it the request fails with 504.",
    },
}
_ADMIN_ERRORS = (400, 401, 403, 404, 409)

_MODEL_PARAM = {
    "name": "model",
    "in": "path",
    "required": True,
    "description": "Model name (its active variant) or `name:variant`.",
    "schema": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,127}(:[a-z0-9][a-z0-9._-]{0,31})?$"},
}
_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "Model name.",
    "schema": {"$ref": "#/components/schemas/Name"},
}

_SCHEMAS: dict[str, Any] = {
    "Name": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,127}$"},
    "Variant": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9._-]{0,31}$"},
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Usage": {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    },
    "Sampling": {
        "type": "object",
        "properties": {
            "max_tokens": {"type": "integer", "minimum": 1, "description": "At most `api.max_tokens_limit`."},
            "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "Alias of `max_tokens`."},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "top_k": {"type": "integer", "minimum": 0},
            "min_p": {"type": "number", "minimum": 0, "maximum": 1},
            "repeat_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
            "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
            "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
            "seed": {"type": "integer", "minimum": -9223372036854775808, "maximum": 9223372036854775807},
            "stop": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                    {"type": "null"},
                ]
            },
            "n": {"type": "integer", "const": 1},
            "stream": {"type": "boolean", "default": False},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            "user": {"type": "string"},
            **_ADMISSION_FIELDS,
        },
    },
    "ChatMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        },
                    },
                ]
            },
            "name": {"type": "string"},
        },
    },
    "ChatCompletionRequest": {
        "allOf": [
            _ref("Sampling"),
            {
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    "model": {"type": "string", "description": "`name` or `name:variant`."},
                    "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
                },
            },
        ]
    },
    "ChatCompletion": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {
                            "type": "object",
                            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
                        },
                        "finish_reason": {"enum": ["stop", "length"]},
                    },
                },
            },
            "usage": _ref("Usage"),
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "description": "One SSE `data:` line of a streamed chat completion; the stream ends with `data: [DONE]`.",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "delta": {
                            "type": "object",
                            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
                        },
                        "finish_reason": {"enum": ["stop", "length", None]},
                    },
                },
            },
            "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
        },
    },
    "CompletionRequest": {
        "allOf": [
            _ref("Sampling"),
            {
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {
                    "model": {"type": "string"},
                    "prompt": {
                        "oneOf": [
                            {"type": "string"},
                            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                        ]
                    },
                },
            },
        ]
    },
    "Completion": {
        "type": "object",
        "description": "A text completion; streamed, each SSE chunk has this shape with partial `text`.",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "finish_reason": {"enum": ["stop", "length", None]},
                    },
                },
            },
            "usage": {"oneOf": [_ref("Usage"), {"type": "null"}]},
        },
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string"},
            "input": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 256},
                ]
            },
            "encoding_format": {"enum": ["float", "base64"], "default": "float"},
            "user": {"type": "string"},
            **_ADMISSION_FIELDS,
        },
    },
    "EmbeddingResponse": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "model": {"type": "string"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "description": "base64 of little-endian float32"},
                            ]
                        },
                    },
                },
            },
            "usage": _ref("Usage"),
        },
    },
    "Model": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "variant": {"type": "string"},
            "version": {"type": "integer"},
            "format": {"enum": ["gguf", "onnx"]},
            "context_length": {"type": ["integer", "null"]},
        },
    },
    "ModelList": {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
    },
    "Tensor": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"description": "A number, or a nested or flat list of numbers (row-major)."},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "dtype": {
                "enum": ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"],
                "default": "float32",
            },
        },
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {"type": "object", "additionalProperties": _ref("Tensor")},
            **_ADMISSION_FIELDS,
        },
    },
    "InferResponse": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "outputs": {"type": "object", "additionalProperties": _ref("Tensor")},
        },
    },
    "GcResult": {
        "type": "object",
        "properties": {
            "removed_models": {"type": "array", "items": {"type": "string"}},
            "deleted_blobs": {"type": "integer"},
            "deleted_partials": {"type": "integer"},
            "freed_bytes": {"type": "integer"},
            "blob_bytes": {"type": "integer"},
            "over_quota": {"type": "boolean"},
        },
        "required": ["removed_models", "deleted_blobs", "deleted_partials", "freed_bytes", "blob_bytes", "over_quota"],
    },
    "AdminModel": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "variant": {"type": "string"},
            "version": {"type": "integer"},
            "format": {"enum": ["gguf", "onnx"]},
            "size": {"type": "integer"},
            "sha256": {"type": "string"},
            "params": {"type": ["integer", "null"]},
            "context_length": {"type": ["integer", "null"]},
            "licence": {"type": ["string", "null"]},
            "origin": {"type": "string"},
            "state": {"enum": ["staged", "active", "previous", "removed", "quarantined"]},
            "created": {"type": "number"},
            "updated": {"type": "number"},
            "metadata": {"type": "object"},
        },
    },
    "AdminModelList": {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("AdminModel")}},
    },
    "ImportRequest": {
        "type": "object",
        "required": ["path", "name", "variant"],
        "properties": {
            "path": {"type": "string", "description": "Absolute path of a file readable by the agent."},
            "name": _ref("Name"),
            "variant": _ref("Variant"),
            "version": {"type": "integer", "minimum": 1},
            "activate": {"type": "boolean", "default": True},
            "sha256": {
                "type": "string",
                "pattern": "^[0-9a-f]{64}$",
                "description": "Expected sha256 of the file; a mismatch is refused and nothing changes.",
            },
        },
    },
    "ActivateRequest": {
        "type": "object",
        "properties": {"variant": _ref("Variant"), "version": {"type": "integer", "minimum": 1}},
    },
    "Token": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "created": {"type": "integer"},
            "revoked": {"type": ["integer", "null"]},
        },
    },
    "TokenCreateRequest": {
        "type": "object",
        "required": ["name", "scopes"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            "scopes": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "string", "description": "`admin`, `infer` or `infer:MODEL[,MODEL...]`."},
            },
        },
    },
    "TokenCreated": {
        "allOf": [
            _ref("Token"),
            {
                "type": "object",
                "properties": {"token": {"type": "string", "description": "The plaintext token, shown once."}},
            },
        ]
    },
    "TokenList": {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Token")}},
    },
    "Status": {
        "type": "object",
        "properties": {
            "version": {"type": "string"},
            "pid": {"type": "integer"},
            "uptime_s": {"type": "number"},
            "draining": {"type": "boolean"},
            "active_models": {"type": "array", "items": _ref("AdminModel")},
            "loaded_models": {"type": "array", "items": {"type": "object"}},
            "memory_rss_bytes": {"type": "integer"},
            "requests_in_flight": {"type": "number"},
            "degraded": {
                "type": "object",
                "description": "Components running degraded (tokens, registry, link, audit) and why.",
                "additionalProperties": {"type": "string"},
            },
        },
    },
}


def _responses() -> dict[str, Any]:
    descriptions = {
        400: "Malformed or out-of-range input.",
        401: "Missing, wrong or revoked token, or a token is required on this listener.",
        403: "The caller is not allowed to do this.",
        404: "No such model, token or route.",
        409: "The operation does not fit the model's state.",
        413: "Request body over the configured limit.",
        429: "The model's queue is full; retry after the `Retry-After` header's seconds.",
        503: "The model cannot be loaded now, or the agent is shutting down.",
        504: "The request's deadline passed while it waited for its model or while it ran.",
        507: "Not enough free disk space.",
    }
    return {str(status): _json(_ref("Error"), text) for status, text in descriptions.items()}


def _op(
    summary: str,
    response: dict[str, Any],
    *,
    errors: tuple[int, ...],
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    security: list[dict[str, list[str]]] | None = None,
    tag: str,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": response} | _errors(*errors),
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if parameters:
        op["parameters"] = parameters
    if security is not None:
        op["security"] = security
    return op


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict each call)."""
    public: list[dict[str, list[str]]] = []
    sse = {
        "description": "Without `stream`: one JSON object. With `stream: true`: `text/event-stream` of chunks.",
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-agent local API",
            "version": __version__,
            "description": (
                "OpenAI-compatible inference and the agent's administration, served on a unix socket (callers "
                "identified by SO_PEERCRED) and optionally on a loopback TCP port (token always required). "
                'Errors have OpenAI\'s shape `{"error": {"message", "type", "param", "code"}}`.'
            ),
        },
        "servers": [{"url": "http://localhost", "description": "unix socket (e.g. curl --unix-socket PATH)"}],
        "security": [{"bearer": []}, {"peer": []}],
        "tags": [
            {"name": "health"},
            {"name": "openai", "description": "OpenAI-compatible inference."},
            {"name": "onnx", "description": "Named-tensor inference on ONNX models."},
            {"name": "admin", "description": "Needs an admin token or an admin uid."},
        ],
        "paths": {
            "/healthz": {
                "get": _op(
                    "Liveness",
                    _json({"type": "object"}, "The event loop answers."),
                    errors=(),
                    security=public,
                    tag="health",
                )
            },
            "/readyz": {
                "get": _op(
                    "Readiness (503 while draining)",
                    _json({"type": "object"}, "Ready."),
                    errors=(503,),
                    security=public,
                    tag="health",
                )
            },
            "/metrics": {
                "get": _op(
                    "Prometheus metrics",
                    {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    errors=(401, 403),
                    tag="health",
                )
            },
            "/openapi.json": {
                "get": _op(
                    "This document",
                    _json({"type": "object"}, "OpenAPI 3.1."),
                    errors=(),
                    security=public,
                    tag="health",
                )
            },
            "/v1/models": {
                "get": _op(
                    "Active models the caller may use",
                    _json(_ref("ModelList"), "Models."),
                    errors=(401, 403),
                    tag="openai",
                )
            },
            "/v1/models/{model}": {
                "get": _op(
                    "One model",
                    _json(_ref("Model"), "The model."),
                    errors=(400, 401, 403, 404),
                    parameters=[_MODEL_PARAM],
                    tag="openai",
                )
            },
            "/v1/chat/completions": {
                "post": _op(
                    "Chat completion (SSE with `stream: true`)",
                    {
                        **sse,
                        "content": {
                            "application/json": {"schema": _ref("ChatCompletion")},
                            "text/event-stream": {"schema": _ref("ChatCompletionChunk")},
                        },
                    },
                    errors=_GENERATION_ERRORS,
                    body=_ref("ChatCompletionRequest"),
                    parameters=_ADMISSION_HEADERS,
                    tag="openai",
                )
            },
            "/v1/completions": {
                "post": _op(
                    "Text completion (SSE with `stream: true`)",
                    {
                        **sse,
                        "content": {
                            "application/json": {"schema": _ref("Completion")},
                            "text/event-stream": {"schema": _ref("Completion")},
                        },
                    },
                    errors=_GENERATION_ERRORS,
                    body=_ref("CompletionRequest"),
                    parameters=_ADMISSION_HEADERS,
                    tag="openai",
                )
            },
            "/v1/embeddings": {
                "post": _op(
                    "Embeddings",
                    _json(_ref("EmbeddingResponse"), "One embedding per input."),
                    errors=_GENERATION_ERRORS,
                    body=_ref("EmbeddingRequest"),
                    parameters=_ADMISSION_HEADERS,
                    tag="openai",
                )
            },
            "/v1/infer/{model}": {
                "post": _op(
                    "Run an ONNX model on named tensors",
                    _json(_ref("InferResponse"), "Named output tensors."),
                    errors=_GENERATION_ERRORS,
                    body=_ref("InferRequest"),
                    parameters=[_MODEL_PARAM, *_ADMISSION_HEADERS],
                    tag="onnx",
                )
            },
            "/v1/admin/models": {
                "get": _op(
                    "Every model record in the registry",
                    _json(_ref("AdminModelList"), "Records."),
                    errors=(401, 403),
                    tag="admin",
                ),
                "post": _op(
                    "Import a model from a file on this device",
                    _json(_ref("AdminModel"), "The imported record."),
                    errors=(*_ADMIN_ERRORS, 413, 507),
                    body=_ref("ImportRequest"),
                    tag="admin",
                ),
            },
            "/v1/admin/models/{name}": {
                "delete": _op(
                    "Remove a model's variant or version (query `variant`, `version`)",
                    _json(_ref("AdminModelList"), "The removed records."),
                    errors=_ADMIN_ERRORS,
                    parameters=[
                        _NAME_PARAM,
                        {"name": "variant", "in": "query", "schema": _ref("Variant")},
                        {"name": "force", "in": "query", "schema": {"type": "boolean", "default": False}},
                        {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    ],
                    tag="admin",
                )
            },
            "/v1/admin/models/{name}/activate": {
                "post": _op(
                    "Activate a variant or version",
                    _json(_ref("AdminModel"), "The now active record."),
                    errors=_ADMIN_ERRORS,
                    body=_ref("ActivateRequest"),
                    parameters=[_NAME_PARAM],
                    tag="admin",
                )
            },
            "/v1/admin/models/{name}/rollback": {
                "post": _op(
                    "Roll back to the previous model",
                    _json(_ref("AdminModel"), "The now active record."),
                    errors=_ADMIN_ERRORS,
                    parameters=[_NAME_PARAM],
                    tag="admin",
                )
            },
            "/v1/admin/gc": {
                "post": _op(
                    "Garbage-collect models and blobs by policy (keep active + previous, disk quota)",
                    _json(_ref("GcResult"), "What was removed."),
                    errors=_ADMIN_ERRORS,
                    tag="admin",
                )
            },
            "/v1/admin/tokens": {
                "get": _op("List tokens", _json(_ref("TokenList"), "Tokens."), errors=(401, 403), tag="admin"),
                "post": _op(
                    "Create a token (its plaintext is shown once)",
                    _json(_ref("TokenCreated"), "The token."),
                    errors=(400, 401, 403, 413),
                    body=_ref("TokenCreateRequest"),
                    tag="admin",
                ),
            },
            "/v1/admin/tokens/{token_id}": {
                "delete": _op(
                    "Revoke a token",
                    _json(_ref("Token"), "The revoked token."),
                    errors=(401, 403, 404),
                    parameters=[
                        {
                            "name": "token_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{8}$"},
                        }
                    ],
                    tag="admin",
                )
            },
            "/v1/admin/status": {
                "get": _op("Agent status", _json(_ref("Status"), "Status."), errors=(401, 403), tag="admin")
            },
        },
        "components": {
            "schemas": _SCHEMAS,
            "responses": _responses(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "`efa_<id>_<secret>` token."},
                "peer": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Peer-Credentials",
                    "description": (
                        "Not a header: on the unix socket the caller's uid/gid come from the kernel "
                        "(SO_PEERCRED) and are checked against api.allowed_uids/allowed_gids/admin_uids."
                    ),
                },
            },
        },
    }


async def serve_openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.json_response(openapi_document())


def add_routes(router: web.UrlDispatcher) -> None:
    """Register ``/openapi.json``."""
    router.add_get("/openapi.json", serve_openapi, name="openapi", allow_head=False)
