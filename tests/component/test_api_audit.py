"""Admin changes, imports by path and refused callers, as the audit log sees them.

A real ApiServer (unix socket and loopback TCP) in the test's event loop over a real registry, with an audit hook
that keeps every record it is given; clients are aiohttp's, raw sockets where a client must vanish mid-request,
and a subprocess running as another uid where the caller's uid matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.api import ApiServer, ApiState, TokenStore
from agent.config import AgentConfig, ApiConfig
from agent.inference import ModelPool
from agent.registry import Registry

pytestmark = pytest.mark.component

NOBODY = 65534
WINDOW_S = 1.0


@dataclass
class Audited:
    """The running agent and the audit records it wrote, in order."""

    root: Path
    state: ApiState
    server: ApiServer
    admin_token: str
    records: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def kinds(self, kind: str) -> list[tuple[str, str, dict[str, Any]]]:
        return [r for r in self.records if r[0] == kind]

    def unix(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.server.socket_path)))

    def tcp_url(self, path: str) -> str:
        assert self.server.tcp_address is not None
        host, port = self.server.tcp_address
        return f"http://{host}:{port}{path}"


@pytest.fixture
async def audited(smollm2_path: Path) -> AsyncIterator[Audited]:
    """An agent with no model, a 0666 socket any uid can reach, a TCP port, root and nobody as admin uids, and a
    recording audit hook."""
    # Not under tmp_path: its parents are 0700, and one test connects as another uid.
    root = Path(tempfile.mkdtemp(prefix="api-audit-"))
    os.chmod(root, 0o755)
    try:
        config = AgentConfig(
            state_dir=root / "state",
            api=ApiConfig(socket_path=root / "run" / "api.sock", socket_mode=0o666, tcp_port=0, admin_uids=(0, NOBODY)),
        )
        registry = Registry.open(config.state_dir, config.registry)
        registry.recover()
        tokens = TokenStore.open(config.state_dir)
        _, admin_token = tokens.create("admin", ["admin"])
        pool = ModelPool(config.inference.memory_budget_bytes)
        records: list[tuple[str, str, dict[str, Any]]] = []

        async def hook(kind: str, actor: str, data: Mapping[str, Any]) -> None:
            records.append((kind, actor, dict(data)))

        state = ApiState(
            config=config,
            registry=registry,
            pool=pool,
            tokens=tokens,
            audit=hook,
            auth_failure_window_s=WINDOW_S,
        )
        try:
            async with ApiServer(state) as server:
                yield Audited(root, state, server, admin_token, records)
        finally:
            await pool.aclose()
            tokens.close()
            registry.close()
    finally:
        shutil.rmtree(root)


async def _eventually(condition: Any, within_s: float = 30.0) -> None:
    for _ in range(int(within_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never came true")


async def test_an_admin_change_is_audited_even_when_its_client_disconnects(
    audited: Audited, smollm2_path: Path
) -> None:
    """A client that disconnects while its import runs does not stop the import's audit record (nor free the lock)."""
    body = json.dumps({"path": str(smollm2_path), "name": "sneaky", "variant": "q4_1"}).encode()
    _reader, writer = await asyncio.open_unix_connection(str(audited.server.socket_path))
    writer.write(
        b"POST /v1/admin/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    await writer.drain()
    await _eventually(audited.state.registry_lock.locked, within_s=10)
    writer.close()  # the admin client goes away while the import runs
    await writer.wait_closed()
    await asyncio.sleep(0.05)  # the handler is cancelled by now
    lock_held = audited.state.registry_lock.locked()
    active = audited.state.registry.active("sneaky")
    assert lock_held or active is not None, "the lock was released while the import still ran"
    await _eventually(lambda: audited.kinds("model_imported"))
    [(_, actor, data)] = audited.kinds("model_imported")
    assert actor == f"uid:{os.getuid()}"
    assert data["name"] == "sneaky"
    active = await asyncio.to_thread(audited.state.registry.active, "sneaky")
    assert active is not None
    assert active.sha256 == data["sha256"]
    assert not audited.state.registry_lock.locked()


def _curl_as(uid: int, audited: Audited, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to ``path`` over the unix socket from a curl process running as ``uid``."""
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            str(audited.server.socket_path),
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps(body),
            f"http://localhost{path}",
        ],
        user=uid,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    payload, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(payload)


SECRET = b"root:$6$saltsalt$hash...:19000:0:99999:7:::\n"


@pytest.fixture
def secret(audited: Audited) -> Path:
    """A 0600 file of root's, standing in for /etc/shadow or another user's model."""
    path = audited.root / "secret.txt"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def _leaks(message: str) -> bool:
    digest = hashlib.sha256(SECRET).hexdigest()
    return "root" in message or "$6$" in message or digest in message or digest[:12] in message


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("curl") is None, reason="needs root (to run curl as nobody)")
async def test_another_admin_uid_imports_only_files_it_owns_or_everyone_may_read(
    audited: Audited, secret: Path, silero_vad_path: Path
) -> None:
    """An admin uid that is not the agent's imports a world-readable or own file; not root's 0600 file, and the
    refusal is the same for a missing file and says nothing of the file's content."""
    refusals = []
    for body in (
        {"path": str(secret), "name": "x", "variant": "q4_0"},
        {"path": str(secret), "name": "x", "variant": "q4_0", "sha256": "0" * 64},
        {"path": str(audited.root / "missing"), "name": "x", "variant": "q4_0"},
        {"path": str(audited.root), "name": "x", "variant": "q4_0"},
    ):
        status, reply = await asyncio.to_thread(_curl_as, NOBODY, audited, "/v1/admin/models", body)
        assert status == 403, reply
        refusals.append(reply["error"]["message"])
    assert len(set(refusals)) == 1, refusals
    assert not _leaks(refusals[0]), refusals
    own = audited.root / "own.txt"
    own.write_bytes(b"not a model at all")
    own.chmod(0o600)
    os.chown(own, NOBODY, -1)
    status, reply = await asyncio.to_thread(
        _curl_as, NOBODY, audited, "/v1/admin/models", {"path": str(own), "name": "own", "variant": "q4_0"}
    )
    assert status == 400, reply
    assert reply["error"]["code"] == "invalid_model", reply  # checked, read, then refused
    assert "not a model" not in reply["error"]["message"]
    public = audited.root / "silero_vad.onnx"
    shutil.copyfile(silero_vad_path, public)
    public.chmod(0o644)
    body = {"path": str(public), "name": "vad", "variant": "onnx-fp32"}
    status, reply = await asyncio.to_thread(_curl_as, NOBODY, audited, "/v1/admin/models", body)
    assert status == 200, reply
    assert reply["sha256"] == hashlib.sha256(public.read_bytes()).hexdigest()
    assert [(actor, data["name"]) for _, actor, data in audited.kinds("model_imported")] == [(f"uid:{NOBODY}", "vad")]
    assert [r.name for r in audited.state.registry.list_models()] == ["vad"]


async def test_import_by_path_over_tcp_is_refused(audited: Audited, secret: Path) -> None:
    """An admin token over TCP cannot make the agent read a file: 403 naming the socket, whatever the file."""
    headers = {"Authorization": f"Bearer {audited.admin_token}"}
    async with aiohttp.ClientSession() as session:
        for path in (secret, audited.root / "missing"):
            body = {"path": str(path), "name": "x", "variant": "q4_0"}
            async with session.post(audited.tcp_url("/v1/admin/models"), json=body, headers=headers) as reply:
                assert reply.status == 403
                message = (await reply.json())["error"]["message"]
                assert "unix socket" in message
                assert not _leaks(message)
        async with session.get(audited.tcp_url("/v1/admin/models"), headers=headers) as reply:
            assert reply.status == 200  # the token is an admin's: only the import by path is refused
    assert audited.state.registry.list_models() == []


async def test_import_errors_never_carry_the_file_content_or_hash(audited: Audited, secret: Path) -> None:
    """Even for the agent's own uid, a refused import names what is wrong, not the file's first bytes or sha256."""
    async with audited.unix() as session:
        for body in (
            {"path": str(secret), "name": "x", "variant": "q4_0"},
            {"path": str(secret.with_suffix(".gguf")), "name": "x", "variant": "q4_0", "sha256": "0" * 64},
        ):
            if "sha256" in body:
                secret.with_suffix(".gguf").write_bytes(SECRET)
            async with session.post("http://agent/v1/admin/models", json=body) as reply:
                assert reply.status == 400
                message = (await reply.json())["error"]["message"]
                assert not _leaks(message), message
                assert "GGUF nor ONNX" in message or "sha256" in message
    assert audited.state.registry.list_models() == []


async def test_a_flood_of_failed_authentications_is_audited_coalesced(audited: Audited) -> None:
    """Hundreds of refused requests from one caller make one audit record per window, then one summary with the
    count; a summary's window closes with the next failure, whoever it comes from."""
    bad = {"Authorization": "Bearer efa_00000000_" + "0" * 64}
    async with aiohttp.ClientSession() as tcp, audited.unix() as unix:

        async def refused(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
            async with session.get(url, headers=headers) as reply:
                return reply.status

        statuses = await asyncio.gather(
            *(refused(tcp, audited.tcp_url("/v1/models"), bad if i % 2 else {}) for i in range(200)),
            *(refused(unix, "http://agent/v1/admin/models", bad) for _ in range(50)),
        )
        assert set(statuses) == {401}
        assert sorted((r[0], r[1]) for r in audited.records) == [
            ("api.auth_failed", "tcp"),
            ("api.auth_failed", "uid:0"),
        ]
        await asyncio.sleep(WINDOW_S + 0.1)
        assert await refused(tcp, audited.tcp_url("/v1/admin/models"), {}) == 401
    summaries = {actor: data for kind, actor, data in audited.records if kind == "api.auth_failed_repeated"}
    assert summaries["tcp"]["count"] == 199
    assert summaries["tcp"]["routes"] == ["models_list"]
    assert summaries["uid:0"]["count"] == 49
    assert summaries["uid:0"]["routes"] == ["admin_models_list"]
    assert [r[0] for r in audited.records].count("api.auth_failed") == 3
