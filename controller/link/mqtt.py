"""The controller's MQTT connection: mutual TLS, a persistent session, reconnect with jittered backoff.

The only controller module that imports aiomqtt. :class:`ControllerLink` owns the connection's whole life:
:meth:`ControllerLink.run` connects, subscribes, calls ``on_connect`` (e.g. re-publish retained desired state),
then hands every message to ``on_message`` in arrival order, and reconnects with jittered exponential
backoff whenever the connection is lost. Handlers see only :class:`InboundMessage` and
:meth:`ControllerLink.publish`, never aiomqtt types.

Session: MQTT v5, ``clean_start=False`` with a session expiry, so messages for this controller are queued by
the broker while it is briefly away — an optimisation only: devices keep what matters in their outbox until
this controller acks it, so nothing depends on the broker's queue.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.errors import LinkError
from controller.home import TlsFiles

__all__ = ["Backoff", "ControllerLink", "InboundMessage", "NotConnectedError", "tls_context"]

log = structlog.get_logger(__name__)


class NotConnectedError(LinkError):
    """Publishing while the link is down; the caller retries after the next connect."""


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A received message: its topic name, payload, and whether the broker delivered it as retained."""

    topic: str
    payload: bytes
    retain: bool


class Backoff:
    """Jittered exponential backoff ("equal jitter"): half the step is fixed, half random."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.attempt = 0
        self._rng = rng or random.SystemRandom()

    def next(self) -> float:
        """The next delay in seconds."""
        step = min(self.maximum, self.minimum * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        """Start again from the minimum (after a connection that lasted)."""
        self.attempt = 0


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho-mqtt 2.2 drops such a socket without closing it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(files: TlsFiles) -> ssl.SSLContext:
    """A client TLS context: the fleet CA only, our certificate, TLS >= 1.2, hostname checked.

    Raises:
        LinkError: a file is missing or unusable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
        context.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise LinkError(f"cannot load TLS files ({files.cert}): {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket  # documented hook (Python >= 3.7)
    return context


OnConnect = Callable[["ControllerLink"], Awaitable[None]]
OnMessage = Callable[["ControllerLink", InboundMessage], Awaitable[None]]


class ControllerLink:
    """One controller's connection to the broker (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        client_id: str,
        subscriptions: Sequence[str],
        keepalive: int = 30,
        session_expiry: int = 7 * 24 * 3600,
        backoff: Backoff | None = None,
        stable_after: float = 10.0,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.keepalive = keepalive
        self.session_expiry = session_expiry
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.stable_after = stable_after
        self.timeout = timeout
        self.connected = asyncio.Event()
        self.connects = 0
        self._tls = tls
        self._client: aiomqtt.Client | None = None

    def _make_client(self) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.session_expiry
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=self.keepalive,
            tls_context=self._tls,
            timeout=self.timeout,
        )

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK.

        Raises:
            NotConnectedError: the link is down (or went down while publishing).
        """
        client = self._client
        if client is None:
            raise NotConnectedError("the MQTT link is down")
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            raise NotConnectedError(f"publish to {topic} failed: {exc}") from exc

    async def run(self, on_connect: OnConnect, on_message: OnMessage) -> NoReturn:
        """Stay connected forever; cancel the task to stop (the connection is closed cleanly)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._session(on_connect, on_message)
            except aiomqtt.MqttError as exc:
                log.warning("link.disconnected", broker=f"{self.host}:{self.port}", error=str(exc))
            except NotConnectedError as exc:
                log.warning("link.disconnected", broker=f"{self.host}:{self.port}", error=str(exc))
            if loop.time() - started >= self.stable_after:
                self.backoff.reset()
            await asyncio.sleep(self.backoff.next())

    async def _session(self, on_connect: OnConnect, on_message: OnMessage) -> None:
        client = self._make_client()
        async with client:
            self.connects += 1
            log.info("link.connected", broker=f"{self.host}:{self.port}", client_id=self.client_id)
            try:
                for topic_filter in self.subscriptions:
                    await client.subscribe(topic_filter, qos=1)
                self._client = client
                self.connected.set()
                await on_connect(self)
                async for message in client.messages:
                    await on_message(
                        self, InboundMessage(str(message.topic), bytes(message.payload), bool(message.retain))
                    )
            finally:
                self._client = None
                self.connected.clear()
