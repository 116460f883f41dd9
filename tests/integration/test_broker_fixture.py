"""The private-broker fixture is a real Mosquitto: pub/sub, persistence across kill -9, mutual TLS and ACLs."""

from __future__ import annotations

import asyncio
import ssl

import aiomqtt
import pytest
from broker import Mosquitto
from pki import TestPki

pytestmark = pytest.mark.integration


def _client(broker: Mosquitto, identifier: str, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )


def _tls(pki: TestPki, name: str) -> aiomqtt.TLSParameters:
    files = pki.issue(name)
    return aiomqtt.TLSParameters(
        ca_certs=str(pki.ca_file),
        certfile=str(files.cert),
        keyfile=str(files.key),
        tls_version=ssl.PROTOCOL_TLS_CLIENT,
    )


async def _receive_one(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(5):
        async for message in client.messages:
            return message
    raise AssertionError("no message")


async def test_publish_subscribe_roundtrip(mosquitto: Mosquitto) -> None:
    """A message published at QoS 1 reaches a subscriber on the private broker."""
    async with _client(mosquitto, "sub") as sub, _client(mosquitto, "pub") as pub:
        await sub.subscribe("t/roundtrip", qos=1)
        await pub.publish("t/roundtrip", b"hello", qos=1)
        message = await _receive_one(sub)
    assert message.payload == b"hello"


async def test_retained_message_survives_kill_and_restart(mosquitto: Mosquitto) -> None:
    """With persistence on, a retained message saved before SIGKILL is there after a restart."""
    async with _client(mosquitto, "pub") as pub:
        await pub.publish("t/retained", b"kept", qos=1, retain=True)
    await asyncio.sleep(2.2)  # autosave_interval is 1 s: let one save happen before the hard kill
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    async with _client(mosquitto, "sub") as sub:
        await sub.subscribe("t/retained", qos=1)
        message = await _receive_one(sub)
    assert message.payload == b"kept"


async def test_tls_client_certificate_and_acl(mosquitto_tls: Mosquitto, test_pki: TestPki) -> None:
    """With mTLS, a device may use only its own topic tree; another device's topic is not delivered."""
    async with (
        _client(mosquitto_tls, "controller", tls_params=_tls(test_pki, "controller")) as controller,
        _client(mosquitto_tls, "dev-a", tls_params=_tls(test_pki, "dev-a")) as dev_a,
    ):
        await controller.subscribe("edgefleet/v1/devices/+/state", qos=1)
        await dev_a.publish("edgefleet/v1/devices/dev-b/state", b"forged", qos=1)
        await dev_a.publish("edgefleet/v1/devices/dev-a/state", b"mine", qos=1)
        message = await _receive_one(controller)
    assert message.topic.value == "edgefleet/v1/devices/dev-a/state"
    assert message.payload == b"mine"


async def test_plaintext_refused_by_tls_listener(mosquitto_tls: Mosquitto) -> None:
    """A plaintext client cannot connect to the TLS listener (no silent fallback)."""
    with pytest.raises(aiomqtt.MqttError):
        async with _client(mosquitto_tls, "plain"):
            pass


async def test_certificate_from_another_ca_refused(
    mosquitto_tls: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A client certificate issued by a different CA is refused."""
    rogue = TestPki(tmp_path_factory.mktemp("rogue"), ca_name="rogue CA")
    files = rogue.issue("dev-a")
    params = aiomqtt.TLSParameters(
        ca_certs=str(mosquitto_tls_ca(mosquitto_tls)), certfile=str(files.cert), keyfile=str(files.key)
    )
    with pytest.raises(aiomqtt.MqttError):
        async with _client(mosquitto_tls, "dev-a", tls_params=params):
            pass


def mosquitto_tls_ca(broker: Mosquitto) -> str:
    for line in broker.config_file.read_text().splitlines():
        if line.startswith("cafile "):
            return line.split(" ", 1)[1]
    raise AssertionError("broker has no cafile")
