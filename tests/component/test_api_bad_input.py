"""Hostile and broken requests against the real API: each gets its clear error, and nothing changes.

"Nothing changes" is checked after every request: the registry's records (removed ones included), the token
store and the files under the state directory are exactly as before.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from loop_thread import LoopThread

from agent.api import ApiServer, ApiState, TokenStore
from agent.config import AgentConfig, ApiConfig, InferenceConfig
from agent.errors import ConfigError
from agent.inference import ModelPool
from agent.registry import Registry

pytestmark = pytest.mark.component

LLM = "smollm2-135m-instruct"
VAD = "silero-vad"
MAX_BODY = 64 * 1024
MAX_TOKENS = 512
MAX_MESSAGES = 8
_T = TypeVar("_T")


@dataclass
class Agent:
    """The agent of this module: one registry and pool behind three listeners' policies."""

    loop: LoopThread
    root: Path
    registry: Registry
    tokens: TokenStore
    pool: ModelPool
    main: ApiServer
    restricted: ApiServer
    strict: ApiServer
    infer_token: str
    admin_token: str
    vad_token: str
    revoked_token: str

    def client(self, server: ApiServer | None = None, token: str | None = None) -> httpx.Client:
        server = server or self.main
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(server.socket_path)),
            base_url="http://localhost",
            timeout=60,
            headers=headers,
        )

    def tcp(self, token: str | None = None) -> httpx.Client:
        assert self.main.tcp_address is not None
        host, port = self.main.tcp_address
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"http://{host}:{port}", timeout=60, headers=headers)

    def snapshot(self) -> tuple[object, ...]:
        """Registry records, tokens and state-directory files (names and sizes, databases excluded)."""
        files = sorted(
            (str(p.relative_to(self.root)), p.stat().st_size)
            for p in (self.root / "state").rglob("*")
            if p.is_file() and ".db" not in p.name and p.name != "registry.lock"
        )
        return (
            [r.to_dict() for r in self.registry.list_models(include_removed=True)],
            [t.as_json() for t in self.tokens.list()],
            files,
        )


async def _start(state: ApiState) -> ApiServer:
    server = ApiServer(state)
    await server.__aenter__()
    return server


async def _stop(server: ApiServer) -> None:
    await server.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, silero_vad_path: Path) -> Iterator[Agent]:
    """Both real models in a real registry; servers with the default, a restrictive and a token-only policy."""
    root = tmp_path_factory.mktemp("bad")
    state_dir = root / "state"
    api = ApiConfig(
        socket_path=root / "main.sock",
        tcp_port=0,
        max_body_bytes=MAX_BODY,
        max_tokens_limit=MAX_TOKENS,
        max_messages=MAX_MESSAGES,
    )
    base = AgentConfig(state_dir=state_dir, api=api, inference=InferenceConfig(n_ctx=512, n_parallel=1))
    restricted = AgentConfig(
        state_dir=state_dir,
        api=ApiConfig(socket_path=root / "restricted.sock", allowed_uids=(12345,), admin_uids=(12345,)),
    )
    strict = AgentConfig(state_dir=state_dir, api=ApiConfig(socket_path=root / "strict.sock", require_token=True))
    registry = Registry.open(state_dir, base.registry)
    registry.recover()
    registry.import_file(smollm2_path, name=LLM, variant="q4_1")
    registry.import_file(silero_vad_path, name=VAD, variant="onnx-fp32")
    tokens = TokenStore.open(state_dir)
    _, infer_token = tokens.create("infer", ["infer"])
    _, admin_token = tokens.create("admin", ["admin"])
    _, vad_token = tokens.create("vad-only", [f"infer:{VAD}"])
    revoked, revoked_token = tokens.create("old", ["infer", "admin"])
    tokens.revoke(revoked.id)
    loop = LoopThread("api-bad-input-loop")

    async def make_pool() -> ModelPool:
        return ModelPool(base.inference.memory_budget_bytes)

    pool = loop.run(make_pool())
    servers = [
        loop.run(_start(ApiState(config=config, registry=registry, pool=pool, tokens=tokens)))
        for config in (base, restricted, strict)
    ]
    try:
        yield Agent(loop, root, registry, tokens, pool, *servers, infer_token, admin_token, vad_token, revoked_token)
    finally:
        for server in servers:
            loop.run(_stop(server))
        loop.run(pool.aclose())
        loop.close()
        tokens.close()
        registry.close()


@pytest.fixture
def unchanged(agent: Agent) -> Iterator[None]:
    """Asserts, after the test, that the registry, the tokens and the state files are as before it."""
    before = agent.snapshot()
    yield
    assert agent.snapshot() == before


def _raw(path: Path, request: bytes) -> tuple[int, bytes]:
    """Send exact bytes over the unix socket (no client-side URL normalisation) and return status and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _raw_request(method: str, target: str, body: bytes = b"") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


def _error(response: httpx.Response, status: int, error_type: str, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    if code is not None:
        assert error["code"] == code
    assert error["message"]
    return dict(error)


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b'{"model": "x",}',
        b"\xff\xfe{}",
        b"[1, 2]",
        b'"text"',
        b"",
        b"[" * 30000,
        b'{"max_tokens": ' + b"9" * 5000 + b"}",
    ],
    ids=["truncated", "text", "trailing-comma", "not-utf8", "array", "string", "empty", "deep-nesting", "huge-int"],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/admin/models", "/v1/admin/tokens"])
@pytest.mark.usefixtures("unchanged")
def test_malformed_json_is_400(agent: Agent, route: str, body: bytes) -> None:
    """A body that is not a UTF-8 JSON object is refused with 400 invalid_request_error."""
    with agent.client(token=agent.admin_token) as client:
        response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    _error(response, 400, "invalid_request_error", "invalid_request")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/admin/tokens", f"/v1/infer/{VAD}"])
@pytest.mark.usefixtures("unchanged")
def test_oversized_body_is_413(agent: Agent, route: str, chunked: bool) -> None:
    """A body over ``max_body_bytes`` is refused with 413, whether its length is declared or not."""
    body = json.dumps(_chat(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}])).encode()
    content: Any = iter([body[i : i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    with agent.client(token=agent.admin_token) as client:
        response = client.post(route, content=content, headers={"Content-Type": "application/json"})
    _error(response, 413, "invalid_request_error", "payload_too_large")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("max_tokens", MAX_TOKENS + 1),
        ("max_tokens", 10**12),
        ("max_tokens", "16"),
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("max_completion_tokens", -5),
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.usefixtures("unchanged")
def test_max_tokens_out_of_range_is_400(agent: Agent, route: str, key: str, value: object) -> None:
    """``max_tokens`` must be an integer in 1..max_tokens_limit; anything else is 400 naming the field."""
    body = _chat() if route.endswith("chat/completions") else {"model": LLM, "prompt": "Hi"}
    body.pop("max_tokens", None)
    body[key] = value
    with agent.client() as client:
        response = client.post(route, json=body)
    assert _error(response, 400, "invalid_request_error")["param"] == key


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": -1},
        {"temperature": 3},
        {"temperature": "hot"},
        {"top_p": 0},
        {"top_k": -1},
        {"seed": "x"},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [1]},
        {"n": 2},
        {"stream": "yes"},
        {"stream_options": []},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"logprobs": True},
    ],
    ids=lambda extra: "-".join(f"{k}={v}" for k, v in extra.items())[:40],
)
@pytest.mark.usefixtures("unchanged")
def test_bad_sampling_parameters_are_400(agent: Agent, extra: dict[str, Any]) -> None:
    """Out-of-range, mistyped or unsupported sampling fields are refused with 400."""
    with agent.client() as client:
        response = client.post("/v1/chat/completions", json=_chat(**extra))
    _error(response, 400, "invalid_request_error")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "Hi",
        [{"role": "wizard", "content": "Hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user"}],
        ["Hi"],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        [{"role": "user", "content": "Hi"}] * (MAX_MESSAGES + 1),
    ],
    ids=["empty", "string", "role", "content-type", "no-content", "not-object", "image-part", "too-many"],
)
@pytest.mark.usefixtures("unchanged")
def test_bad_messages_are_400(agent: Agent, messages: object) -> None:
    """Messages must be 1..max_messages objects with a known role and text content."""
    with agent.client() as client:
        response = client.post("/v1/chat/completions", json=_chat(messages=messages))
    assert _error(response, 400, "invalid_request_error")["param"] == "messages"


@pytest.mark.usefixtures("unchanged")
def test_unknown_model_is_404(agent: Agent) -> None:
    """A well-formed name of a model that does not exist is 404 model_not_found on every route."""
    with agent.client(token=agent.admin_token) as client:
        for response in (
            client.post("/v1/chat/completions", json=_chat(model="no-such-model")),
            client.post("/v1/chat/completions", json=_chat(model=f"{LLM}:q8_0")),
            client.post("/v1/completions", json={"model": "no-such-model", "prompt": "Hi", "max_tokens": 4}),
            client.post("/v1/embeddings", json={"model": "no-such-model", "input": "Hi"}),
            client.post("/v1/infer/no-such-model", json={"inputs": {"x": {"data": [1]}}}),
            client.get("/v1/models/no-such-model"),
            client.post("/v1/admin/models/no-such-model/activate", json={}),
            client.delete("/v1/admin/models/no-such-model"),
        ):
            _error(response, 404, "invalid_request_error", "model_not_found")


@pytest.mark.parametrize(
    "name",
    ["../x", "..", "%2e%2e", "..%2F..%2Fetc", "a\x00b", "a" * 10_000, "UPPER", "x/y", "", " vad", "a:b:c", "vad\n"],
    ids=[
        "dotdot-x",
        "dotdot",
        "pct-dotdot",
        "pct-slash",
        "nul",
        "10kB",
        "upper",
        "slash",
        "empty",
        "space",
        "colons",
        "nl",
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_odd_model_names_in_bodies_are_400(agent: Agent, name: str) -> None:
    """Path traversal, escapes, NUL, 10 kB and other malformed model names are 400 before any lookup."""
    with agent.client(token=agent.admin_token) as client:
        responses = [
            client.post("/v1/chat/completions", json=_chat(model=name)),
            client.post("/v1/embeddings", json={"model": name, "input": "Hi"}),
            client.post(
                "/v1/admin/models", json={"path": str(agent.root / "main.sock"), "name": name, "variant": "q4_0"}
            ),
            client.post("/v1/admin/models/silero-vad/activate", json={"variant": name}),
        ]
    for response in responses:
        _error(response, 400, "invalid_request_error", "invalid_request")


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("POST", "/v1/infer/..%2Fx"),
        ("POST", "/v1/infer/%2e%2e"),
        ("POST", "/v1/infer/%2e%2e%2f%2e%2e%2fstate"),
        ("POST", "/v1/infer/a%00b"),
        ("POST", "/v1/infer/" + "a" * 5000),
        ("POST", "/v1/infer/" + "a" * 10_000),
        ("GET", "/v1/models/..%2F..%2Fregistry.db"),
        ("POST", "/v1/admin/models/%2e%2e/rollback"),
        ("POST", "/v1/admin/models/..%2Fsilero-vad/activate"),
        ("DELETE", "/v1/admin/models/%2e%2e%2fsilero-vad"),
        ("DELETE", f"/v1/admin/models/{VAD}?variant=..%2F..&force=true"),
        ("DELETE", "/v1/admin/tokens/..%2F..%2Ftokens.db"),
        ("DELETE", "/v1/admin/tokens/%00"),
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_odd_names_in_paths_are_refused(agent: Agent, method: str, target: str) -> None:
    """Traversal, escapes, NUL and huge names in URL paths get 400 or 404, never a lookup or a change."""
    body = b'{"inputs": {"x": {"data": [1]}}}' if "infer" in target else b"{}"
    status, payload = _raw(agent.main.socket_path, _raw_request(method, target, body))
    assert status in {400, 404}, payload[:300]
    if status == 404 and payload.startswith(b"{"):
        assert json.loads(payload)["error"]["code"] in {"not_found", "token_not_found", "model_not_found"}


@pytest.mark.parametrize(
    "body",
    [
        {"path": "relative/model.gguf", "name": "x", "variant": "q4_0"},
        {"path": "/nonexistent/model.gguf", "name": "x", "variant": "q4_0"},
        {"path": "/etc/passwd\x00.gguf", "name": "x", "variant": "q4_0"},
        {"path": "/", "name": "x", "variant": "q4_0"},
        {"path": "/etc/passwd", "name": "x", "variant": "q4_0", "version": -1},
        {"path": "/etc/passwd", "name": "x", "variant": "q4_0", "activate": "yes"},
        {"path": "/etc/passwd", "name": "x", "variant": "../q4_0"},
        {"path": ["/etc/passwd"], "name": "x", "variant": "q4_0"},
    ],
    ids=["relative", "missing", "nul", "directory", "version", "activate", "variant", "path-type"],
)
@pytest.mark.usefixtures("unchanged")
def test_bad_admin_imports_are_400(agent: Agent, body: dict[str, Any]) -> None:
    """An import needs an absolute path to an existing regular file and valid names and fields."""
    with agent.client(token=agent.admin_token) as client:
        response = client.post("/v1/admin/models", json=body)
    _error(response, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged")
def test_importing_a_non_model_file_is_400(agent: Agent, tmp_path: Path) -> None:
    """A regular file that is not a valid GGUF or ONNX model is refused and leaves nothing behind."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\xff" * 60)
    with agent.client(token=agent.admin_token) as client:
        response = client.post("/v1/admin/models", json={"path": str(fake), "name": "fake", "variant": "q4_0"})
    _error(response, 400, "invalid_request_error", "invalid_model")


@pytest.mark.usefixtures("unchanged")
def test_admin_state_conflicts_are_409(agent: Agent) -> None:
    """Removing the active model without force, or rolling back with no previous model, is 409."""
    with agent.client(token=agent.admin_token) as client:
        _error(client.delete(f"/v1/admin/models/{VAD}"), 409, "invalid_request_error", "conflict")
        _error(client.post(f"/v1/admin/models/{VAD}/rollback"), 409, "invalid_request_error", "conflict")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "../x", "scopes": ["infer"]},
        {"name": "a" * 10_000, "scopes": ["infer"]},
        {"name": "ok", "scopes": ["root"]},
        {"name": "ok", "scopes": "admin"},
        {"name": "ok", "scopes": []},
        {"name": "ok", "scopes": ["infer:../x"]},
        {"name": "ok", "scopes": ["infer:a\x00b"]},
        {"name": 5, "scopes": ["infer"]},
        {"name": "ok\n", "scopes": ["infer"]},
    ],
    ids=[
        "traversal",
        "10kB",
        "unknown-scope",
        "scopes-string",
        "no-scopes",
        "scope-traversal",
        "scope-nul",
        "name-int",
        "newline",
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_bad_token_requests_are_400(agent: Agent, body: dict[str, Any]) -> None:
    """Token names and scopes are validated; nothing is created on a bad request."""
    with agent.client(token=agent.admin_token) as client:
        response = client.post("/v1/admin/tokens", json=body)
    _error(response, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged")
def test_revoking_an_unknown_token_is_404(agent: Agent) -> None:
    """Revoking a token id that does not exist is 404 token_not_found."""
    with agent.client(token=agent.admin_token) as client:
        _error(client.delete("/v1/admin/tokens/0000abcd"), 404, "invalid_request_error", "token_not_found")
        _error(client.delete("/v1/admin/tokens/not-an-id"), 404, "invalid_request_error", "token_not_found")


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer efa_deadbeef_" + "0" * 64,
        "Bearer garbage",
        "Bearer " + "x" * 5000,
        "Basic dXNlcjpwYXNz",
        "efa_deadbeef_" + "0" * 64,
    ],
    ids=["unknown-token", "garbage", "huge", "basic", "no-scheme"],
)
@pytest.mark.parametrize("route", ["/v1/models", "/v1/admin/status", "/metrics"])
@pytest.mark.usefixtures("unchanged")
def test_wrong_token_is_401(agent: Agent, route: str, authorization: str) -> None:
    """A wrong or malformed credential is 401 even where the peer's uid alone would be allowed."""
    with agent.client() as client:
        response = client.get(route, headers={"Authorization": authorization})
    _error(response, 401, "authentication_error", "invalid_api_key")


@pytest.mark.usefixtures("unchanged")
def test_revoked_token_is_401(agent: Agent) -> None:
    """A revoked token no longer authenticates (and says so)."""
    with agent.client(token=agent.revoked_token) as client:
        error = _error(client.get("/v1/models"), 401, "authentication_error")
    assert "revoked" in error["message"]


@pytest.mark.usefixtures("unchanged")
def test_token_without_scope_is_403(agent: Agent) -> None:
    """A token limited to silero-vad cannot use SmolLM2 (nor learn whether a model exists) nor admin routes."""
    with agent.client(token=agent.vad_token) as client:
        _error(client.post("/v1/chat/completions", json=_chat()), 403, "permission_error", "forbidden")
        _error(client.post("/v1/chat/completions", json=_chat(model="no-such-model")), 403, "permission_error")
        _error(client.post("/v1/embeddings", json={"model": LLM, "input": "Hi"}), 403, "permission_error")
        _error(client.get(f"/v1/models/{LLM}"), 403, "permission_error")
        _error(client.get("/v1/admin/models"), 403, "permission_error")
        _error(client.post("/v1/admin/tokens", json={"name": "escalate", "scopes": ["admin"]}), 403, "permission_error")
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [VAD]
    with agent.client(token=agent.infer_token) as client:
        _error(client.get("/v1/admin/status"), 403, "permission_error")
        _error(client.delete(f"/v1/admin/models/{VAD}?force=true"), 403, "permission_error")


@pytest.mark.usefixtures("unchanged")
def test_non_allowed_uid_is_403(agent: Agent) -> None:
    """With allowed_uids and admin_uids excluding this process's uid, its requests are refused with 403."""
    with agent.client(agent.restricted) as client:
        _error(client.post("/v1/chat/completions", json=_chat()), 403, "permission_error", "forbidden")
        _error(client.get("/v1/models"), 403, "permission_error")
        _error(client.get("/metrics"), 403, "permission_error")
        _error(client.get("/v1/admin/status"), 403, "permission_error")
        _error(client.post("/v1/admin/models/silero-vad/rollback"), 403, "permission_error")
        assert client.get("/healthz").status_code == 200
    with agent.client(agent.restricted, token=agent.infer_token) as client:
        assert client.get("/v1/models").status_code == 200


@pytest.mark.usefixtures("unchanged")
def test_require_token_on_the_unix_socket(agent: Agent) -> None:
    """With ``require_token`` the peer's uid is not enough: no token is 401, a token works."""
    with agent.client(agent.strict) as client:
        _error(client.get("/v1/models"), 401, "authentication_error")
        _error(client.get("/v1/admin/status"), 401, "authentication_error")
    with agent.client(agent.strict, token=agent.admin_token) as client:
        assert client.get("/v1/admin/status").status_code == 200


@pytest.mark.usefixtures("unchanged")
def test_tcp_always_requires_a_token(agent: Agent) -> None:
    """The loopback TCP listener refuses requests without a valid token (401) and checks scopes (403)."""
    assert agent.main.tcp_address is not None
    assert agent.main.tcp_address[0] == "127.0.0.1"
    with agent.tcp() as client:
        _error(client.get("/v1/models"), 401, "authentication_error")
        _error(client.post("/v1/chat/completions", json=_chat()), 401, "authentication_error")
        _error(client.get("/v1/models", headers={"Authorization": "Bearer"}), 401, "authentication_error")
    with agent.tcp(agent.revoked_token) as client:
        _error(client.get("/v1/models"), 401, "authentication_error")
    with agent.tcp(agent.infer_token) as client:
        assert client.get("/v1/models").status_code == 200
        _error(client.get("/v1/admin/status"), 403, "permission_error")
    with agent.tcp(agent.admin_token) as client:
        assert client.get("/v1/admin/status").status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_non_loopback_tcp_is_refused(agent: Agent, tmp_path: Path, host: str) -> None:
    """The server refuses to listen on anything but loopback, before creating any socket."""
    config = AgentConfig(
        state_dir=agent.root / "state",
        api=ApiConfig(socket_path=tmp_path / "api.sock", tcp_port=0, tcp_host=host),
    )
    state = ApiState(config=config, registry=agent.registry, pool=agent.pool, tokens=agent.tokens)
    with pytest.raises(ConfigError, match="loopback"):
        agent.loop.run(_start(state))
    assert not (tmp_path / "api.sock").exists()


@pytest.mark.usefixtures("unchanged")
def test_unknown_route_and_wrong_method_are_json_errors(agent: Agent) -> None:
    """An unknown path is 404 and a wrong method 405, both in OpenAI's error shape."""
    with agent.client() as client:
        _error(client.get("/v2/everything"), 404, "invalid_request_error", "not_found")
        response = client.get("/v1/chat/completions")
        _error(response, 405, "invalid_request_error", "method_not_allowed")
        assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    "inputs",
    [
        {"input": {"data": [[0.0] * 512, [0.0] * 3]}, "state": {"data": [0.0] * 256, "shape": [2, 1, 128]}},
        {"input": {"data": [0.0] * 512, "shape": [1, 500]}},
        {"input": {"data": [[0.0] * 512], "dtype": "complex128"}},
        {"input": {"data": [["a"] * 512]}},
        {"input": {"data": [[0.0] * 512], "shape": [1, -512]}},
        {"input": [0.0] * 512},
        {"nonexistent": {"data": [1.0]}},
        {"input": {"data": [[0.0] * 512]}},
        {
            "input": {"data": [[0.0] * 512]},
            "state": {"data": [0.0] * 256, "shape": [2, 1, 128]},
            "sr": {"data": [16000], "dtype": "float32"},
        },
    ],
    ids=["ragged", "shape-mismatch", "dtype", "strings", "negative-dim", "not-object", "unknown", "missing", "sr"],
)
@pytest.mark.usefixtures("unchanged")
def test_bad_tensors_are_400(agent: Agent, inputs: dict[str, Any]) -> None:
    """Ragged, mis-shaped, mistyped, unknown or missing input tensors are 400 with the reason."""
    with agent.client() as client:
        response = client.post(f"/v1/infer/{VAD}", json={"inputs": inputs})
    _error(response, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged")
def test_wrong_kind_of_model_is_400(agent: Agent) -> None:
    """Chat on an ONNX model, or named tensors on a GGUF model, is a clear 400."""
    with agent.client() as client:
        chat = client.post("/v1/chat/completions", json=_chat(model=VAD))
        tensors = client.post(f"/v1/infer/{LLM}", json={"inputs": {"x": {"data": [1.0]}}})
        embeddings = client.post("/v1/embeddings", json={"model": VAD, "input": "Hi"})
    assert "infer" in _error(chat, 400, "invalid_request_error")["message"]
    _error(tensors, 400, "invalid_request_error")
    _error(embeddings, 400, "invalid_request_error")


@pytest.mark.usefixtures("unchanged")
def test_bad_embedding_inputs_are_400(agent: Agent) -> None:
    """Embedding inputs must be one string or a list of non-empty strings (no token arrays)."""
    with agent.client() as client:
        for value in ([], [1, 2, 3], [[1, 2]], "", [""], {"text": "Hi"}, ["Hi"] * 300):
            response = client.post("/v1/embeddings", json={"model": LLM, "input": value})
            assert _error(response, 400, "invalid_request_error")["param"] == "input"
        bad_format = client.post("/v1/embeddings", json={"model": LLM, "input": "Hi", "encoding_format": "hex"})
        _error(bad_format, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
        ("/v1/completions", b'{"model": "%s", "prompt": "\\udfff"}'),
        ("/v1/embeddings", b'{"model": "%s", "input": ["fine", "\\uD83D"]}'),
    ],
    ids=["chat", "completion", "embeddings"],
)
@pytest.mark.usefixtures("unchanged")
def test_a_lone_surrogate_escape_is_400(agent: Agent, route: str, body: bytes) -> None:
    """JSON can escape half a UTF-16 pair; such a string is no text, and is refused with 400, not a 500."""
    with agent.client() as client:
        response = client.post(route, content=body % LLM.encode(), headers={"Content-Type": "application/json"})
        assert "surrogate" in _error(response, 400, "invalid_request_error", "invalid_request")["message"]
        paired = client.post(  # a pair is one character: accepted
            "/v1/embeddings",
            content=b'{"model": "%s", "input": "smile \\ud83d\\ude00"}' % LLM.encode(),
            headers={"Content-Type": "application/json"},
        )
        assert paired.status_code == 200, paired.text


@pytest.mark.parametrize(
    "request_bytes",
    [
        _raw_request(
            "POST", "/v1/completions", b'{"model": "%s", "prompt": "hi", "max_tokens": 1}' % LLM.encode()
        ).replace(b"\r\n\r\n", b"\r\nX-Request-Deadline-Ms: " + header + b"\r\n\r\n", 1)
        for header in ("\u00b2".encode(), b"9" * 5000, "\u0661\u0662".encode(), b"+5", b"1_000")
    ]
    + [
        _raw_request("DELETE", f"/v1/admin/models/{VAD}?version={version}")
        for version in ("%C2%B2", "9" * 5000, "%D9%A1", "+1", "1_0")
    ],
    ids=[
        "deadline-superscript",
        "deadline-5000-digits",
        "deadline-arabic",
        "deadline-plus",
        "deadline-underscore",
        "version-superscript",
        "version-5000-digits",
        "version-arabic",
        "version-plus",
        "version-underscore",
    ],
)
@pytest.mark.usefixtures("unchanged")
def test_odd_numbers_in_headers_and_queries_are_400(agent: Agent, request_bytes: bytes) -> None:
    """A deadline header or ?version= that is not a short run of ASCII digits is a 400, never a 500."""
    status, body = _raw(agent.main.socket_path, request_bytes)
    assert status == 400, body
    assert json.loads(body)["error"]["param"] in {"timeout", "version"}


@pytest.mark.parametrize(
    ("input_tensor", "state_tensor"),
    [
        ({"data": [], "shape": [1, 0]}, {"data": [0.0] * 256, "shape": [2, 1, 128]}),
        ({"data": [], "shape": [0, 2**31 - 1]}, {"data": [], "shape": [2, 0, 128]}),
        ({"data": [], "shape": [2**31 - 1, 0]}, {"data": [], "shape": [2, 0, 128]}),
        ({"data": []}, {"data": [0.0] * 256, "shape": [2, 1, 128]}),
        ({"data": [[]]}, {"data": [0.0] * 256, "shape": [2, 1, 128]}),
    ],
    ids=["no-samples", "empty-huge", "huge-empty", "empty-list", "empty-row"],
)
@pytest.mark.usefixtures("unchanged")
def test_empty_tensors_are_400(agent: Agent, input_tensor: dict[str, Any], state_tensor: dict[str, Any]) -> None:
    """A tensor with no element (a zero dimension, however large the others) is a 400 before the model runs."""
    inputs = {
        "input": input_tensor | {"dtype": "float32"},
        "state": state_tensor | {"dtype": "float32"},
        "sr": {"data": 16000, "shape": [], "dtype": "int64"},
    }
    with agent.client() as client:
        response = client.post(f"/v1/infer/{VAD}", json={"inputs": inputs})
    assert "empty" in _error(response, 400, "invalid_request_error")["message"]


@pytest.mark.usefixtures("unchanged")
def test_an_overlong_embedding_input_is_refused_before_tokenizing(agent: Agent) -> None:
    """An embedding text longer than any 512-token input can be is a 400 on its length in characters, before the
    engine tokenizes it on the event loop."""
    with agent.client() as client:
        response = client.post("/v1/embeddings", json={"model": LLM, "input": ["fine", "word " * 4000]})
    error = _error(response, 400, "invalid_request_error")
    assert error["param"] == "input"
    assert "characters" in error["message"]
