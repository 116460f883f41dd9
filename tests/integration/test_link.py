"""The MQTT link end to end: enrollment, identities, inventory, assignments, reports and acks.

Each test runs a private Mosquitto with the configuration ``edge-fleet init`` generated, the real ``serve`` and
real agents (see ``tests/fleet_harness.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from fleet_harness import MODEL_NAME, MODEL_VARIANT, Fleet, running_fleet, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pki import TestPki

from agent.link.mqtt import AgentLink
from controller import pki
from protocols.enrollment import decode_bundle
from protocols.keys import generate_private_key
from protocols.link import seal
from protocols.messages import DeviceState, HardwareProfile, Report
from protocols.topics import TopicKind, device_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


# --- helpers ----------------------------------------------------------------------------------------------


def tls_files_from_bundle(bundle: Path, directory: Path) -> tuple[Path, Path, Path]:
    """The CA, certificate and key PEM files inside a bundle (validity not checked: may be expired)."""
    decoded = decode_bundle(bundle.read_bytes(), check_time=False)
    directory.mkdir(parents=True, exist_ok=True)
    files = (directory / "ca.crt", directory / "cert.crt", directory / "key.pem")
    for path, pem in zip(files, (decoded.ca_pem, decoded.cert_pem, decoded.tls_key_pem), strict=True):
        path.write_text(pem)
    files[2].chmod(0o600)
    return files


def tls(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


@contextlib.asynccontextmanager
async def mqtt_client(
    fleet: Fleet, context: ssl.SSLContext | None, *, identifier: str | None = None, persistent: bool = False
) -> AsyncIterator[aiomqtt.Client]:
    properties = None
    if persistent:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
    client = aiomqtt.Client(
        "127.0.0.1",
        fleet.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
        clean_start=not persistent,
        properties=properties,
        timeout=3,
    )
    async with client:
        yield client


async def received(client: aiomqtt.Client, seconds: float) -> list[aiomqtt.Message]:
    """Every message ``client`` receives within ``seconds``."""
    out: list[aiomqtt.Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                out.append(message)
    return out


async def outbox_empty(link: AgentLink) -> bool:
    return (await link.outbox.counts())["pending"] == 0


def report(device: str, reason: str = "test") -> Report:
    return Report(
        report_id=secrets.token_hex(16),
        device=device,
        ts_ms=int(dt.datetime.now(dt.UTC).timestamp() * 1000),
        kind="health",
        outcome="ok",
        reason=reason,
    )


# --- enrollment and inventory -----------------------------------------------------------------------------


async def test_enrollment_end_to_end(tmp_path: Path) -> None:
    """An enrolled agent connects over mTLS, shows up online with hardware and models, and applies an assignment."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-1")
        link = await agent.start()
        await wait_for(lambda: fleet.devices()["dev-1"]["online"], what="dev-1 online")
        shown = fleet.devices()["dev-1"]
        assert shown["agent_version"] == "0.1.0-test"
        assert shown["hardware"]["cores"] >= 1
        assert shown["hardware"]["ram_bytes"] > 0
        assert shown["models"] == [f"{MODEL_NAME}@1:{MODEL_VARIANT}"]
        assert "as dev-1 (p5, c0" in fleet.broker.log(), "persistent MQTT v5 session under the certificate's CN"

        generation = fleet.assign("dev-1", 2)
        await wait_for(lambda: agent.registry.active(MODEL_NAME).version == 2, what="version 2 active")
        await wait_for(lambda: any(r["generation"] == generation for r in fleet.reports("dev-1")), what="report")
        stored = next(r for r in fleet.reports("dev-1") if r["generation"] == generation)
        assert (stored["kind"], stored["outcome"]) == ("install", "ok")
        await wait_for(lambda: outbox_empty(link), what="the report acked and removed from the outbox")
        await wait_for(lambda: fleet.devices()["dev-1"]["models"] == [f"{MODEL_NAME}@2:{MODEL_VARIANT}"], what="state")
        assert "online" in fleet.cli("device", "show", "dev-1")


async def test_assignment_for_a_model_not_installed_is_refused_with_a_signed_report(tmp_path: Path) -> None:
    """An assignment naming a model the registry lacks changes nothing and yields a signed refusal report."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-1", models=(1,))
        await agent.start()
        await wait_for(lambda: fleet.devices()["dev-1"]["online"], what="online")
        fleet.cli(
            "device", "assign", "dev-1", "--model", f"{MODEL_NAME}@7:{MODEL_VARIANT}",
            "--sha256", "ab" * 32, "--length", "1000", "--format", "onnx",
        )  # fmt: skip
        await wait_for(lambda: fleet.reports("dev-1"), what="refusal report")
        (stored,) = fleet.reports("dev-1")
        assert (stored["kind"], stored["outcome"]) == ("refusal", "refused")
        assert "not installed" in stored["reason"]
        assert agent.registry.active(MODEL_NAME).version == 1


# --- identities -------------------------------------------------------------------------------------------


async def test_another_devices_client_id_gives_no_access_to_its_topics(tmp_path: Path) -> None:
    """Device B connecting with A's client id (B's own certificate) can neither read nor write A's topics."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        a, b = fleet.enroll("dev-a"), fleet.enroll("dev-b")
        link_a = await a.start()
        await wait_for(lambda: fleet.devices()["dev-a"]["online"], what="dev-a online")
        b_tls = tls(*(b.state_dir / "link" / "tls" / n for n in ("ca.crt", "device.crt", "device.key")))
        b_signing = decode_bundle((b.state_dir / "link" / "bundle").read_bytes()).signing_key()

        async with mqtt_client(fleet, b_tls, identifier="dev-a", persistent=True) as spy:
            for topic_filter in ("edgefleet/v1/devices/dev-a/#", "edgefleet/v1/devices/+/assign"):
                await spy.subscribe(topic_filter, qos=1)
            # While B listens, A gets an assignment, reports, and is acked: all on A's topics.
            generation = fleet.assign("dev-a", 2)
            await wait_for(lambda: any(r["generation"] == generation for r in fleet.reports("dev-a")), what="report")
            await wait_for(lambda: outbox_empty(link_a), what="A's report acked")
            # B tries to write A's topics: a report in A's name, a desired state, an ack.
            forged = report("dev-a", "forged by dev-b")
            await spy.publish(
                device_topic("dev-a", TopicKind.REPORT), seal(forged, TopicKind.REPORT, [b_signing]), qos=1
            )
            await spy.publish(device_topic("dev-a", TopicKind.ASSIGN), b"forged desired state", qos=1, retain=True)
            await spy.publish(device_topic("dev-a", TopicKind.ACK), b"forged ack", qos=1)
            seen = await received(spy, 1.5)

        assert [str(m.topic) for m in seen] == [], "B received messages of A's topics"
        assert forged.report_id not in {r["report_id"] for r in fleet.reports()}
        assert link_a.stats.connects == 1, "A was disconnected by a client using its client id"
        assert await link_a.dispatcher.accepted_generation() == (generation, generation)
        assert "as dev-b (p5" in fleet.broker.log(), "the broker replaced the chosen client id by the CN"
        assert fleet.devices()["dev-a"]["online"]


async def test_forged_messages_on_a_devices_topics_are_rejected_by_the_controller(tmp_path: Path) -> None:
    """Messages for device A from any other identity are refused by `serve`, even where the broker let them through."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        a, b = fleet.enroll("dev-a"), fleet.enroll("dev-b")
        await a.start()
        await wait_for(lambda: fleet.devices()["dev-a"]["online"], what="dev-a online")
        before = fleet.devices()["dev-a"]

        # 1. B, on its own topic, speaks for A (signed with B's own key).
        b_tls = tls(*(b.state_dir / "link" / "tls" / n for n in ("ca.crt", "device.crt", "device.key")))
        b_signing = decode_bundle((b.state_dir / "link" / "bundle").read_bytes()).signing_key()
        in_a_name = report("dev-a", "dev-b speaking for dev-a")
        async with mqtt_client(fleet, b_tls) as client:
            await client.publish(
                device_topic("dev-b", TopicKind.REPORT), seal(in_a_name, TopicKind.REPORT, [b_signing]), qos=1
            )

        # 2. An identity the broker's ACL wrongly lets write everything (a misconfigured or compromised
        #    broker): it signs with its own key, on A's topics.
        ca = pki.Issued(
            pki.load_cert(fleet.home.ca_cert_path.read_bytes()), pki.load_key(fleet.home.ca_key_path.read_bytes())
        )
        rogue = pki.issue_client_cert(ca, "rogue")
        (tmp_path / "rogue.crt").write_bytes(pki.cert_pem(rogue.cert))
        (tmp_path / "rogue.key").write_bytes(pki.key_pem(rogue.key))
        with fleet.home.acl_path.open("a") as acl:
            acl.write("\nuser rogue\ntopic readwrite edgefleet/#\n")
        fleet.broker.reload()
        await asyncio.sleep(0.5)
        rogue_key = generate_private_key()
        forged_report = report("dev-a", "forged by rogue")
        forged_state = DeviceState(
            device="dev-a",
            status="online",
            ts_ms=int(dt.datetime.now(dt.UTC).timestamp() * 1000),
            agent_version="6.6.6",
            hardware=HardwareProfile("x86_64", (), 1, 1, 1, 1),
            models=(),
            heartbeat=999,
        )
        async with mqtt_client(
            fleet, tls(fleet.home.ca_cert_path, tmp_path / "rogue.crt", tmp_path / "rogue.key")
        ) as c:
            await c.publish(
                device_topic("dev-a", TopicKind.REPORT), seal(forged_report, TopicKind.REPORT, [rogue_key]), qos=1
            )
            await c.publish(
                device_topic("dev-a", TopicKind.STATE), seal(forged_state, TopicKind.STATE, [rogue_key]), qos=1
            )
            await c.publish(device_topic("dev-a", TopicKind.REPORT), b"not even an envelope", qos=1)

        await wait_for(lambda: len(fleet.rejections()) >= 4, what="four rejections")
        reasons = [r["reason"] for r in fleet.rejections()]
        assert any("arrived on the topic of device 'dev-b'" in r for r in reasons), reasons
        assert sum("UnknownKeyError" in r for r in reasons) == 2, reasons
        assert any("DecodeError" in r for r in reasons), reasons
        stored = {r["report_id"] for r in fleet.reports()}
        assert not stored & {in_a_name.report_id, forged_report.report_id}
        after = fleet.devices()["dev-a"]
        assert after["agent_version"] == before["agent_version"] == "0.1.0-test"
        assert after["heartbeat"] != 999


async def test_plaintext_wrong_ca_expired_and_revoked_certificates_are_refused(tmp_path: Path) -> None:
    """The broker accepts only TLS with a valid, unrevoked fleet certificate; the agent checks the broker's name."""
    async with running_fleet(tmp_path) as fleet:
        config = fleet.home.mosquitto_conf_path.read_text()
        assert config.count("listener ") == 1
        assert "require_certificate true" in config
        assert "allow_anonymous false" in config
        await fleet.start_server()
        ok = fleet.enroll("dev-ok")
        ok_files = tuple(ok.state_dir / "link" / "tls" / n for n in ("ca.crt", "device.crt", "device.key"))

        async def refused(context: ssl.SSLContext | None) -> None:
            with pytest.raises(aiomqtt.MqttError):
                async with mqtt_client(fleet, context):
                    pass

        async with mqtt_client(fleet, tls(*ok_files)):
            pass  # the control: a valid certificate connects

        await refused(None)  # plaintext on the TLS port

        other = TestPki(tmp_path / "other-ca")  # a certificate for the same CN from another CA
        impostor = other.issue("dev-ok")
        await refused(tls(ok_files[0], impostor.cert, impostor.key))

        now = dt.datetime.now(dt.UTC)
        expired_bundle = tmp_path / "old.bundle"
        fleet.home.enroll_device(
            "dev-old", expired_bundle, not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1)
        )
        await refused(tls(*tls_files_from_bundle(expired_bundle, tmp_path / "old")))

        revoked_bundle = tmp_path / "gone.bundle"
        fleet.cli("device", "enroll", "dev-gone", "--out", str(revoked_bundle))
        gone_files = tls_files_from_bundle(revoked_bundle, tmp_path / "gone")
        async with mqtt_client(fleet, tls(*gone_files)):
            pass
        fleet.cli("device", "revoke", "dev-gone")
        fleet.broker.restart()  # Mosquitto 2.0 reads the CRL at start (docs/operations.md)
        await refused(tls(*gone_files))

        # The agent verifies the broker's certificate against the name it dials: no silent fallback.
        wrong_name = fleet.enroll("dev-name")
        wrong_name.config = dataclasses.replace(
            wrong_name.config, link=dataclasses.replace(wrong_name.config.link, host="localhost")
        )
        link = await wrong_name.start()
        await wait_for(lambda: link.stats.failures >= 2, what="refused connections")
        assert link.stats.connects == 0
        assert "certificate" in link.stats.last_error or "hostname" in link.stats.last_error, link.stats.last_error


async def test_agent_daemon_runs_the_link_when_enrolled(tmp_path: Path) -> None:
    """`edge-agent run` on an enrolled device brings the link up (online) and publishes offline when stopped."""
    from agent import daemon

    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-d", models=(1,))
        agent.registry.close()  # the daemon opens the registry itself
        config = dataclasses.replace(
            agent.config, api=dataclasses.replace(agent.config.api, socket_path=tmp_path / "api.sock")
        )
        stop = asyncio.Event()
        assert gc.get_freeze_count() == 0
        task = asyncio.create_task(daemon.run(config, stop=stop, freeze_gc=True))
        try:
            await wait_for(lambda: fleet.devices()["dev-d"]["online"], within=30, what="online via the daemon")
            assert fleet.devices()["dev-d"]["models"] == [f"{MODEL_NAME}@1:{MODEL_VARIANT}"]
            assert gc.get_freeze_count() > 0  # as `edge-agent run` does once ready
        finally:
            stop.set()
            try:
                assert await asyncio.wait_for(task, 30) == 0
            finally:
                gc.unfreeze()  # this test process goes on (after the daemon ended: it cannot freeze again)
        await wait_for(lambda: fleet.devices()["dev-d"]["status"] == "offline", what="offline after a clean stop")
