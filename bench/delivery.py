"""Release delivery benchmark: the 98 MB SmolLM2 file delivered end to end, over MQTT and over HTTP, on loopback.

In one run, on this machine, with a private Mosquitto running the configuration ``edge-fleet init`` generated
(TLS, client certificates, ACL) and the real ``serve`` in its own process (``python -m controller serve``, as
systemd runs it: the controller and the device never share a process or its GIL), the agents in this one:

1. publishes the SmolLM2 GGUF as signed releases (256 KiB chunks), one version per delivery, each with its own
   content (one byte of the last quantized tensor differs), as a new release has: re-delivering bytes the
   device's registry already holds would also time dropping the duplicate;
2. **signed MQTT delivery**: the agent's ``ReleaseInstaller.install`` — TUF refresh over retained topics, windowed
   chunk transfer with per-chunk sha256 against the signed chunk list, length, fsync, GGUF header validation, the
   registry's install pipeline (move, fsync, rename, activate) — timed from the call to its return;
3. **raw MQTT pipe**: a bare aiomqtt QoS 1 publish loop of the same bytes in the same chunk size, controller
   identity → device identity through the same broker, timed until the subscriber has every byte;
4. **signed HTTP delivery**: the same install with the metadata and the blob from ``serve``'s artifact server;
5. **raw HTTP GET** of the same blob from the same server into a file;
6. prints throughputs and ratios (target: each signed delivery >= 50 % of its raw pipe) and writes
   ``.cache/bench/delivery.json``.

Usage: ``python bench/delivery.py [--rounds N] [--only mqtt|http]`` (best of N for each; ``--only``: one path
and its raw pipe, for quick iterations). Exit status 0 whether or not the target is met (this is a benchmark,
not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402
import aiomqtt  # noqa: E402
import structlog  # noqa: E402
from broker import free_port  # noqa: E402
from fleet_harness import FAST_LINK, Fleet, running_fleet, spawn_serve, wait_for  # noqa: E402

from agent.link.enrollment import link_dir  # noqa: E402
from controller.config import dump_config  # noqa: E402
from controller.home import atomic_write  # noqa: E402
from controller.pki import controller_common_name  # noqa: E402
from controller.releases import ReleaseRepository  # noqa: E402
from protocols.gguf import parse_gguf  # noqa: E402
from protocols.messages import DesiredModel  # noqa: E402
from protocols.topics import TopicKind, device_topic  # noqa: E402

MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME, VARIANT = "smollm2-135m-instruct", "q4_1"
CHUNK = 256 * 1024
RAW_TIMEOUT_S = 60.0


def _tls(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def last_quantized_byte() -> int:
    """The offset in :data:`MODEL` of the last byte of its last quantized tensor (two 4-bit weights)."""
    with MODEL.open("rb") as f:
        info = parse_gguf(f)
    last = max((t for t in info.tensors if t.ggml_type.name.startswith("Q")), key=lambda t: t.offset)
    return info.data_offset + last.offset + last.n_bytes - 1


def release_file(directory: Path, version: int, model: bytes, position: int) -> Path:
    """``model`` (SmolLM2's bytes) with the byte at ``position`` (:func:`last_quantized_byte`) changed for
    ``version`` (1-255): two 4-bit weights differ, the header does not (a valid GGUF of the same length)."""
    if not 1 <= version <= 255:
        raise ValueError(f"version {version}: 1-255 distinct releases only")
    data = bytearray(model)
    data[position] ^= version
    path = directory / f"release-{version}.gguf"
    path.write_bytes(data)
    return path


async def signed_delivery(fleet: Fleet, device: str, version: int, sha256: str, length: int) -> float:
    """Seconds for one full install of ``version`` on ``device`` (refresh, transfer, verify, fsync, install)."""
    agent = fleet.agents[device]
    assert agent.link is not None
    installer: Any = agent.link.dispatcher.installer
    model = DesiredModel(NAME, version, VARIANT, f"models/{NAME}/{version}/{VARIANT}.gguf", sha256, length)
    started = time.perf_counter()
    outcome = await installer.install(model)
    elapsed = time.perf_counter() - started
    if outcome.outcome != "ok":
        raise RuntimeError(f"delivery failed: {outcome.reason}")
    return elapsed


async def raw_mqtt(fleet: Fleet, device: str, data: bytes) -> float | None:
    """Seconds for a bare QoS 1 publish loop of ``data`` (in CHUNK pieces) from the controller to ``device``;
    None if the broker dropped some of it (a round that is not a measurement)."""
    files = fleet.home.controller_tls()
    device_tls = link_dir(fleet.agents[device].state_dir) / "tls"
    topic = device_topic(device, TopicKind.CHUNK)
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    received = 0
    done = asyncio.Event()
    # the agent's own link is stopped for this, so that the device identity's session is ours
    async with aiomqtt.Client(
        "127.0.0.1",
        fleet.port,
        identifier=device,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=_tls(device_tls / "ca.crt", device_tls / "device.crt", device_tls / "device.key"),
    ) as subscriber:
        await subscriber.subscribe(topic, qos=1)

        async def read() -> None:
            nonlocal received
            async for message in subscriber.messages:
                received += len(bytes(message.payload))  # type: ignore[arg-type]
                if received >= len(data):
                    done.set()
                    return

        reader = asyncio.create_task(read())
        async with aiomqtt.Client(
            "127.0.0.1",
            fleet.port,
            identifier=controller_common_name(fleet.home.config.controller.name),
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=_tls(files.ca, files.cert, files.key),
        ) as publisher:
            started = time.perf_counter()
            for piece in pieces:
                await publisher.publish(topic, piece, qos=1)
            try:  # the broker may drop QoS 1 messages to a slow subscriber (queue limits): never wait forever
                async with asyncio.timeout(RAW_TIMEOUT_S):
                    await done.wait()
            except TimeoutError:
                print(f"raw MQTT round lost messages ({received} of {len(data)} bytes arrived); ignored")
                return None
            finally:
                reader.cancel()
            elapsed = time.perf_counter() - started
    return elapsed


def _connected(process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"serve exited with {process.returncode}: see {log}")
    return b"serve.connected" in log.read_bytes()


async def start_serve(fleet: Fleet, log: Path, artifact_port: int) -> subprocess.Popen[bytes]:
    """:func:`spawn_serve`, returning once it is connected to the broker and its artifact server answers."""
    process = spawn_serve(fleet.home.root, log)

    async def ready() -> bool:
        if not _connected(process, log):
            return False
        try:
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{artifact_port}/") as reply:
                return reply.status < 500
        except aiohttp.ClientError:
            return False

    await wait_for(ready, within=60, what="serve (child process) to connect and serve")
    return process


def stop_serve(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def raw_http(url: str, dest: Path) -> float:
    """Seconds for a bare HTTP GET of ``url`` into ``dest``."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        with dest.open("wb") as f:
            async for block in response.content.iter_chunked(1 << 16):
                f.write(block)
    elapsed = time.perf_counter() - started
    dest.unlink()  # noqa: ASYNC240 (after the clock stopped)
    return elapsed


async def run(rounds: int, only: str | None = None) -> dict[str, Any]:
    data = MODEL.read_bytes()
    length = len(data)
    (ROOT / ".cache" / "bench").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        async with running_fleet(Path(tmp)) as fleet:
            repo = ReleaseRepository(fleet.home.repo_dir)
            versions = range(1, 2 * rounds + 1)
            position = last_quantized_byte()
            for version in versions:
                release = release_file(Path(tmp), version, data, position)
                fleet.cli(
                    "model", "add", str(release), "--name", NAME, "--variant", VARIANT,
                    "--version", str(version), "--chunk-size", str(CHUNK),
                )  # fmt: skip
                release.unlink()
            fleet.cli("model", "publish")
            os.sync()  # the releases just written must not be flushed to disk while the deliveries are timed
            sha256 = {v: repo.target(f"models/{NAME}/{v}/{VARIANT}.gguf").hashes["sha256"] for v in versions}
            assert len(set(sha256.values())) == len(versions)
            port = free_port()
            controller = dataclasses.replace(fleet.home.config.controller, artifact_port=port)
            fleet.home.config = dataclasses.replace(fleet.home.config, controller=controller)
            atomic_write(fleet.home.config_path, dump_config(fleet.home.config).encode())
            serve = await start_serve(fleet, Path(tmp) / "serve.log", port)
            mqtt_agent = fleet.enroll("bench-mqtt", models=())
            http_agent = fleet.enroll(
                "bench-http", models=(), link=dataclasses.replace(FAST_LINK, artifact_url=f"http://127.0.0.1:{port}")
            )
            await mqtt_agent.start()
            await http_agent.start()
            assert mqtt_agent.link is not None
            assert http_agent.link is not None
            await wait_for(mqtt_agent.link.connected.is_set, what="the MQTT agent")
            await wait_for(http_agent.link.connected.is_set, what="the HTTP agent")
            signed_mqtt, signed_http, raw_m, raw_h = [], [], [], []
            for r in range(rounds):
                if only != "http":
                    signed_mqtt.append(await signed_delivery(fleet, "bench-mqtt", 1 + 2 * r, sha256[1 + 2 * r], length))
                if only != "mqtt":
                    signed_http.append(await signed_delivery(fleet, "bench-http", 2 + 2 * r, sha256[2 + 2 * r], length))
                    # the blob just delivered: as warm in the server's page cache as it was for the signed delivery
                    url = f"http://127.0.0.1:{port}/targets/models/{NAME}/{2 + 2 * r}/{VARIANT}.gguf"
                    raw_h.append(await raw_http(url, Path(tmp) / "raw"))
            # the raw pipe uses the same two identities (client id = certificate CN): stop their owners first
            await mqtt_agent.stop()
            stop_serve(serve)
            for _ in range(rounds if only != "http" else 0):
                seconds = await raw_mqtt(fleet, "bench-mqtt", data)
                if seconds is not None:
                    raw_m.append(seconds)
            if not raw_m and only != "http":
                raise RuntimeError("every raw MQTT round lost messages: no baseline to compare with")
    mb = length / 1e6

    def rate(times: list[float]) -> float:
        return mb / min(times) if times else float("nan")

    result = {
        "benchmark": "release_delivery",
        "bytes": length,
        "chunk_size": CHUNK,
        "rounds": rounds,
        "signed_mqtt_MBps": round(rate(signed_mqtt), 1),
        "raw_mqtt_MBps": round(rate(raw_m), 1),
        "mqtt_ratio": round(rate(signed_mqtt) / rate(raw_m), 3),
        "signed_http_MBps": round(rate(signed_http), 1),
        "raw_http_MBps": round(rate(raw_h), 1),
        "http_ratio": round(rate(signed_http) / rate(raw_h), 3),
        "seconds": {"signed_mqtt": signed_mqtt, "raw_mqtt": raw_m, "signed_http": signed_http, "raw_http": raw_h},
        "target_ratio": 0.5,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    result["met"] = result["mqtt_ratio"] >= 0.5 and result["http_ratio"] >= 0.5  # NaN (skipped) is not met
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, choices=range(1, 101), default=2, metavar="1-100", help="best of N for each measurement"
    )
    parser.add_argument("--only", choices=("mqtt", "http"), help="measure one path (and its raw pipe) only")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = asyncio.run(run(args.rounds, args.only))
    out = ROOT / ".cache" / "bench" / "delivery.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"release delivery of {result['bytes'] / 1e6:.1f} MB on loopback (best of {args.rounds}):\n"
        f"  signed MQTT delivery: {result['signed_mqtt_MBps']} MB/s, "
        f"raw MQTT QoS 1 pipe: {result['raw_mqtt_MBps']} MB/s"
        f" -> {result['mqtt_ratio']:.0%}\n"
        f"  signed HTTP delivery: {result['signed_http_MBps']} MB/s, raw HTTP GET: {result['raw_http_MBps']} MB/s"
        f" -> {result['http_ratio']:.0%}\n"
        f"  target >= 50 % each: {'met' if result['met'] else 'MISSED'}; written to {out.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
