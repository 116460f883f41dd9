"""The local API end to end: a real ApiServer on a unix socket, a real registry, the real models.

The server runs in an event loop on a background thread (module-scoped: SmolLM2 loads once), so the clients
under test can be the ordinary synchronous ones: httpx over the unix socket, the official ``openai`` package,
and ``curl --unix-socket``.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from loop_thread import LoopThread
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from agent.api import ApiServer, ApiState, TokenStore
from agent.api.server import SocketInUseError
from agent.cli import AgentContext
from agent.cli_tokens import token as token_cli
from agent.config import AgentConfig, ApiConfig, InferenceConfig
from agent.inference import ModelPool
from agent.registry import Registry

pytestmark = pytest.mark.component

LLM = "smollm2-135m-instruct"
VAD = "silero-vad"
_T = TypeVar("_T")


@dataclass
class Agent:
    """The running agent of this module."""

    loop: LoopThread
    config: AgentConfig
    registry: Registry
    tokens: TokenStore
    pool: ModelPool
    server: ApiServer
    infer_token: str
    admin_token: str

    @property
    def socket(self) -> str:
        return str(self.config.api.socket_path)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=self.socket), base_url="http://localhost", timeout=120, headers=headers
        )

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url="http://localhost/v1",
            api_key=self.infer_token,
            http_client=httpx.Client(transport=httpx.HTTPTransport(uds=self.socket), timeout=120),
            max_retries=0,
        )


async def _start(state: ApiState) -> ApiServer:
    server = ApiServer(state)
    await server.__aenter__()
    return server


async def _stop(server: ApiServer) -> None:
    await server.__aexit__(None, None, None)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, silero_vad_path: Path) -> Iterator[Agent]:
    """The agent: both real models imported through the registry, served on a unix socket."""
    root = tmp_path_factory.mktemp("api")
    config = AgentConfig(
        state_dir=root / "state",
        api=ApiConfig(socket_path=root / "run" / "api.sock"),
        inference=InferenceConfig(n_ctx=512, n_parallel=1, n_threads=2),
    )
    registry = Registry.open(config.state_dir, config.registry)
    registry.recover()
    registry.import_file(smollm2_path, name=LLM, variant="q4_1")
    registry.import_file(silero_vad_path, name=VAD, variant="onnx-fp32")
    tokens = TokenStore.open(config.state_dir)
    _, infer_token = tokens.create("tests", ["infer"])
    _, admin_token = tokens.create("admin", ["admin"])
    loop = LoopThread("api-test-loop")

    async def make_pool() -> ModelPool:
        return ModelPool(config.inference.memory_budget_bytes)

    pool = loop.run(make_pool())
    server = loop.run(_start(ApiState(config=config, registry=registry, pool=pool, tokens=tokens)))
    try:
        yield Agent(loop, config, registry, tokens, pool, server, infer_token, admin_token)
    finally:
        loop.run(_stop(server))
        loop.run(pool.aclose())
        loop.close()
        tokens.close()
        registry.close()


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": LLM,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "max_tokens": 16,
        "temperature": 0,
        **extra,
    }


def _sse_events(text: str) -> list[str]:
    events = [block for block in text.split("\n\n") if block.strip()]
    assert all(block.startswith("data: ") for block in events), events
    return [block[len("data: ") :] for block in events]


def test_chat_completion_returns_sensible_text(agent: Agent) -> None:
    """A chat completion with the real SmolLM2 answers a simple question correctly, in OpenAI's shape."""
    with agent.client() as client:
        response = client.post("/v1/chat/completions", json=_chat("What is the capital of France?"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == LLM
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert "paris" in choice["message"]["content"].lower()
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.headers["X-Request-Id"]


def test_streaming_chat_yields_sse_chunks_ending_in_done(agent: Agent) -> None:
    """``stream: true`` answers text/event-stream chunks in OpenAI's chunk shape, ending with ``data: [DONE]``."""
    with agent.client() as client:
        response = client.post("/v1/chat/completions", json=_chat("What is the capital of France?", stream=True))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "paris" in text.lower()
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}


def test_streaming_text_completion_with_usage(agent: Agent) -> None:
    """``/v1/completions`` streams text chunks, and ``include_usage`` adds a final usage-only chunk."""
    request = {
        "model": LLM,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with agent.client() as client:
        response = client.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    assert "paris" in "".join(c["choices"][0]["text"] for c in chunks[:-1]).lower()


def test_curl_over_the_unix_socket(agent: Agent) -> None:
    """``curl --unix-socket`` gets a chat completion; the caller is identified by its uid, no token needed."""
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail-with-body",
            "--unix-socket",
            agent.socket,
            "http://localhost/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(_chat("What is the capital of France?")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "paris" in json.loads(result.stdout)["choices"][0]["message"]["content"].lower()


def test_openai_client_lists_models(agent: Agent) -> None:
    """The official openai client lists both active models through the unix socket."""
    with agent.openai() as client:
        ids = {model.id for model in client.models.list()}
        assert ids == {LLM, VAD}
        assert client.models.retrieve(LLM).id == LLM


def test_openai_client_chat(agent: Agent) -> None:
    """The official openai client gets a chat completion."""
    with agent.openai() as client:
        completion = client.chat.completions.create(
            model=LLM,
            messages=[
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            max_tokens=16,
            temperature=0,
        )
    assert "paris" in (completion.choices[0].message.content or "").lower()
    assert completion.usage is not None
    assert completion.usage.completion_tokens >= 1


def test_openai_client_streaming_chat(agent: Agent) -> None:
    """The official openai client streams a chat completion to its end."""
    with agent.openai() as client:
        stream = client.chat.completions.create(
            model=f"{LLM}:q4_1",
            messages=[{"role": "user", "content": "What is 2 + 2?"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces).strip()
    assert len(pieces) >= 2


def test_openai_client_embeddings(agent: Agent) -> None:
    """The official openai client gets one unit-norm embedding per input, similar texts closer than others."""
    with agent.openai() as client:
        result = client.embeddings.create(model=LLM, input=["a cat sat on the mat", "a kitten sat on a rug", "taxes"])
    vectors = [np.asarray(item.embedding) for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2]
    assert len({v.shape for v in vectors}) == 1
    assert vectors[0].shape[0] > 0
    assert all(math.isclose(float(np.linalg.norm(v)), 1.0, rel_tol=1e-3) for v in vectors)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])


def _vad_request(samples: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": {
            "input": {"data": samples.astype(np.float32).reshape(1, -1).tolist()},
            "state": {"data": [0.0] * 256, "shape": [2, 1, 128]},
            "sr": {"data": 16000, "shape": []},
        }
    }


def test_silero_vad_answers_with_a_speech_probability(agent: Agent) -> None:
    """``/v1/infer/silero-vad`` returns a speech probability in [0, 1] and the next state, for generated audio."""
    t = np.arange(512) / 16000
    rng = np.random.default_rng(7)
    voiced = 0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t)) + 0.02 * rng.standard_normal(512)
    with agent.client() as client:
        loud = client.post(f"/v1/infer/{VAD}", json=_vad_request(voiced))
        silent = client.post(f"/v1/infer/{VAD}", json=_vad_request(np.zeros(512)))
    assert loud.status_code == 200, loud.text
    outputs = loud.json()["outputs"]
    assert outputs["output"]["shape"] == [1, 1]
    assert outputs["output"]["dtype"] == "float32"
    assert outputs["stateN"]["shape"] == [2, 1, 128]
    p_voiced = outputs["output"]["data"][0][0]
    p_silent = silent.json()["outputs"]["output"]["data"][0][0]
    assert 0.0 <= p_silent <= 1.0
    assert 0.0 <= p_voiced <= 1.0
    assert p_silent < 0.1


def test_metrics_count_requests_tokens_and_models(agent: Agent) -> None:
    """``/metrics`` exposes request counts by route and status, generated tokens, TTFT and loaded models."""
    with agent.client() as client:
        assert client.post("/v1/chat/completions", json=_chat("Hi")).status_code == 200
        text = client.get("/metrics").text
    lines = text.splitlines()

    def value(prefix: str) -> float:
        matching = [line for line in lines if line.startswith(prefix)]
        assert matching, prefix
        return float(matching[0].rsplit(" ", 1)[1])

    assert value('edge_agent_api_requests_total{method="POST",route="chat_completions",status="200"}') >= 1
    assert value(f'edge_agent_tokens_generated_total{{model="{LLM}"}}') >= 1
    assert value(f'edge_agent_time_to_first_token_seconds_count{{model="{LLM}"}}') >= 1
    assert value("edge_agent_loaded_models ") >= 1
    assert value("edge_agent_process_memory_rss_bytes ") > 0
    assert value("edge_agent_queue_depth ") == 0


def test_client_disconnect_cancels_the_generation(agent: Agent) -> None:
    """A client that leaves mid-stream stops its generation: the next request does not wait for the rest of it."""
    # Greedy decoding of this prompt runs to all 400 tokens; we read 10 and hang up.
    request = _chat("Write a long story about a dragon.", max_tokens=400, stream=True)
    arrivals: list[float] = []
    with capture_logs(processors=[merge_contextvars]) as events:
        with agent.client() as client, client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
                if len(arrivals) == 12:
                    break
        hung_up = time.monotonic()
        with agent.client() as client:
            assert client.post("/v1/chat/completions", json=_chat("Hi", max_tokens=4)).status_code == 200
        next_request_s = time.monotonic() - hung_up
    per_token_s = (arrivals[-1] - arrivals[2]) / 9
    remaining_s = (400 - 11) * per_token_s
    assert next_request_s < remaining_s / 2, (next_request_s, remaining_s)
    assert any(e.get("cancelled") or e["event"] == "api.client_disconnected" for e in events)
    assert [e["completion_tokens"] for e in events if e["event"] == "api.generation"] == [4]


def test_client_disconnect_cancels_a_non_streaming_generation(agent: Agent) -> None:
    """A client that times out on a non-streaming request cancels its handler; the generation never finishes."""
    request = _chat("Write a long story about a dragon.", max_tokens=400, temperature=0.7)
    with capture_logs(processors=[merge_contextvars]) as events:
        with agent.client() as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=request, timeout=httpx.Timeout(60, read=0.5))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.get("cancelled") for e in events):
            time.sleep(0.05)
    cancelled = [e for e in events if e["event"] == "api.request" and e.get("cancelled")]
    assert [(e["route"], e["status"]) for e in cancelled] == [("chat_completions", 499)]
    assert not [e for e in events if e["event"] == "api.generation"]


def test_socket_mode_and_a_second_server_is_refused(agent: Agent, tmp_path: Path) -> None:
    """The socket has the configured mode; a live socket is never stolen; a stale one is replaced."""
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o660
    state = ApiState(config=agent.config, registry=agent.registry, pool=agent.pool, tokens=agent.tokens)
    with pytest.raises(SocketInUseError):
        agent.loop.run(_start(state))
    stale_path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(stale_path))
    stale.close()
    config = AgentConfig(state_dir=agent.config.state_dir, api=ApiConfig(socket_path=stale_path, socket_mode=0o600))
    server = agent.loop.run(
        _start(ApiState(config=config, registry=agent.registry, pool=agent.pool, tokens=agent.tokens))
    )
    try:
        assert stat.S_IMODE(os.stat(stale_path).st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(stale_path)), base_url="http://localhost") as client:
            assert client.get("/healthz").json() == {"status": "ok"}
    finally:
        agent.loop.run(_stop(server))
    assert not stale_path.exists()


def _refuses_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


def test_drain_finishes_in_flight_streams(agent: Agent, tmp_path: Path) -> None:
    """On exit the server refuses new connections at once but lets a stream in flight finish with ``[DONE]``."""
    path = tmp_path / "drain.sock"
    config = AgentConfig(state_dir=agent.config.state_dir, api=ApiConfig(socket_path=path, drain_timeout_s=60))
    state = ApiState(config=config, registry=agent.registry, pool=agent.pool, tokens=agent.tokens)
    server = agent.loop.run(_start(state))
    stopper = threading.Thread(target=agent.loop.run, args=(_stop(server),))
    request = _chat("Count from one to fifty.", max_tokens=128, stream=True)
    with (
        httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost", timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        stopper.start()
        deadline = time.monotonic() + 5
        while not state.draining and time.monotonic() < deadline:
            time.sleep(0.01)
        # The listener closes in the same loop step that sets ``draining``; probing only after that step (not
        # racing it) keeps a probe from being accepted by a listener that is going away.
        time.sleep(0.1)
        assert _refuses_connections(path)
        assert stopper.is_alive(), "the server stopped before its in-flight stream finished"
        rest = [line for line in lines if line]
    stopper.join(60)
    assert not stopper.is_alive()
    assert rest[-1] == "data: [DONE]"
    assert len(rest) > 2
    assert not path.exists()


def test_tokens_created_with_the_cli_authenticate_and_revoke(agent: Agent) -> None:
    """``edge-agent token create`` makes a token the running API accepts; ``token revoke`` stops it at once."""
    ctx = AgentContext(config_path=None, state_dir=agent.config.state_dir, socket_path=agent.config.api.socket_path)
    runner = CliRunner()
    created = runner.invoke(token_cli, ["create", "cli-app", "--scope", f"infer:{VAD}"], obj=ctx)
    assert created.exit_code == 0, created.output
    plaintext = created.stdout.strip().splitlines()[-1]
    assert plaintext.startswith("efa_")
    with agent.client(plaintext) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [VAD]
        listed = runner.invoke(token_cli, ["list"], obj=ctx)
        assert "cli-app" in listed.stdout
        assert plaintext not in listed.stdout
        token_id = plaintext.split("_")[1]
        revoked = runner.invoke(token_cli, ["revoke", token_id], obj=ctx)
        assert revoked.exit_code == 0, revoked.output
        refused = client.get("/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"


def test_admin_tokens_and_status_over_the_api(agent: Agent) -> None:
    """An admin creates, lists and revokes tokens over the API; status lists active and loaded models."""
    with agent.client(agent.admin_token) as admin:
        created = admin.post("/v1/admin/tokens", json={"name": "api-made", "scopes": ["infer"]})
        assert created.status_code == 200, created.text
        plaintext = created.json()["token"]
        token_id = created.json()["id"]
        assert token_id in {t["id"] for t in admin.get("/v1/admin/tokens").json()["data"]}
        with agent.client(plaintext) as user:
            assert user.get("/v1/models").status_code == 200
            assert admin.delete(f"/v1/admin/tokens/{token_id}").json()["revoked"] is not None
            assert user.get("/v1/models").status_code == 401
        status = admin.get("/v1/admin/status").json()
    assert {m["name"] for m in status["active_models"]} == {LLM, VAD}
    assert status["draining"] is False
    assert status["pid"] == os.getpid()


def test_healthz_readyz_need_no_credentials(agent: Agent) -> None:
    """``/healthz`` and ``/readyz`` are public: they answer even to a caller presenting a wrong token."""
    with agent.client("efa_00000000_" + "0" * 64) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["status"] == "ready"


def test_prompt_text_is_never_logged_by_default(agent: Agent) -> None:
    """With ``log.log_prompts`` off, neither prompt nor completion text appears in any log event."""
    marker = "zebra-umbrella-4711"
    with capture_logs(processors=[merge_contextvars]) as events, agent.client() as client:
        response = client.post("/v1/chat/completions", json=_chat(f"Repeat after me: {marker}", max_tokens=8))
    assert response.status_code == 200
    completion = response.json()["choices"][0]["message"]["content"]
    generation = [e for e in events if e["event"] == "api.generation"]
    assert len(generation) == 1
    assert generation[0]["completion_tokens"] >= 1
    assert generation[0]["request_id"] == response.headers["X-Request-Id"]
    logged = repr(events)
    assert marker not in logged
    assert completion.strip() not in logged


def test_request_ids_are_echoed_or_generated(agent: Agent) -> None:
    """A plain client ``X-Request-Id`` is echoed back; a missing or junk one is replaced by a generated id."""
    with agent.client() as client:
        echoed = client.get("/v1/models", headers={"X-Request-Id": "app-42.7"})
        junk = client.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces " + "x" * 200})
        missing = client.get("/v1/models")
    assert echoed.headers["X-Request-Id"] == "app-42.7"
    assert junk.headers["X-Request-Id"] != missing.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", junk.headers["X-Request-Id"])
    assert re.fullmatch(r"[0-9a-f]{32}", missing.headers["X-Request-Id"])


def test_models_cli_goes_through_the_socket_while_the_daemon_runs(agent: Agent, silero_vad_path: Path) -> None:
    """While the daemon holds the registry, `edge-agent models` commands act through its admin API."""
    from click.testing import CliRunner

    from agent.cli import main

    runner = CliRunner()
    base = ["--state-dir", str(agent.config.state_dir), "--socket", agent.socket, "models"]
    env = {"EDGE_AGENT_TOKEN": agent.admin_token}
    listed = runner.invoke(main, [*base, "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "b179c9523d0e" in listed.output  # the SmolLM2 blob (names are cut to the terminal width)
    imported = runner.invoke(
        main,
        [*base, "import", str(silero_vad_path), "--name", VAD, "--variant", "cli-socket", "--no-activate"],
        env=env,
    )
    assert imported.exit_code == 0, imported.output
    assert "staged" in imported.output
    assert any(r.variant == "cli-socket" for r in agent.registry.list_models(VAD))
    bad = runner.invoke(main, [*base, "activate", VAD, "--variant", "no-such-variant"], env=env)
    assert bad.exit_code == 1
    assert "Traceback" not in bad.output
    removed = runner.invoke(main, [*base, "rm", VAD, "--variant", "cli-socket"], env=env)
    assert removed.exit_code == 0, removed.output
    assert agent.registry.active(VAD) is not None
    assert agent.registry.active(VAD).variant == "onnx-fp32"  # type: ignore[union-attr]
