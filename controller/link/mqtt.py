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
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn, Self

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.errors import LinkError
from controller.home import TlsFiles
from protocols.backoff import Backoff, raise_if_cancelled, raise_if_cancelling

__all__ = ["Backoff", "ControllerLink", "DeviceSession", "InboundMessage", "NotConnectedError", "tls_context"]

log = structlog.get_logger(__name__)


class NotConnectedError(LinkError):
    """Publishing while the link is down; the caller retries after the next connect."""


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A received message: its topic name, payload, and whether the broker delivered it as retained."""

    topic: str
    payload: bytes
    retain: bool


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
        clock: Callable[[], float] = time.time,
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
        self.clock = clock
        self.up_since: float | None = None
        """When (``clock`` time) the current connection was made and subscribed; None while the link is down."""
        self._tls = tls
        self._client: aiomqtt.Client | None = None

    def _make_client(self) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.session_expiry
        client = aiomqtt.Client(
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
        # serve publishes acks and assignments concurrently (thousands when a fleet reconnects); aiomqtt's
        # warning past 10 pending publishes would log one line per publish exactly when the CPU is scarce.
        client.pending_calls_threshold = 100_000
        return client

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
            raise_if_cancelled()  # here and in the message loop: see protocols/backoff.py
            started = loop.time()
            try:
                await self._session(on_connect, on_message)
            except (aiomqtt.MqttError, NotConnectedError) as exc:
                raise_if_cancelling(exc)  # a stop, not a lost connection: never reconnect after it
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
                self.up_since = self.clock()
                self.connected.set()
                await on_connect(self)
                async for message in client.messages:
                    raise_if_cancelled()
                    await on_message(
                        self, InboundMessage(str(message.topic), bytes(message.payload), bool(message.retain))
                    )
            finally:
                self._client = None
                self.up_since = None
                self.connected.clear()


class DeviceSession:
    """One *simulated device's* MQTT connection (``edge-fleet simulate``), with the agent's connection settings.

    The agent's link (``agent/link/mqtt.py``) cannot be imported here (agent and controller never import each
    other), so this mirrors what it does on the wire: MQTT v5, its own client certificate (the broker makes the
    certificate's CN the username and the client id, so the real per-device ACL applies), ``clean_start=False``
    with a session expiry, the announced maximum packet size, and a retained last will (the sealed ``offline``
    state). Use it as an async context manager; every aiomqtt error is a :class:`LinkError`.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        device: str,
        will_topic: str,
        will_payload: bytes,
        keepalive: int = 60,
        session_expiry: int = 3600,
        max_packet_size: int = 2 * 1024 * 1024,
        timeout: float = 30.0,
    ) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry
        properties.MaximumPacketSize = max_packet_size
        self._client = aiomqtt.Client(
            host,
            port,
            identifier=device,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=keepalive,
            tls_context=tls,
            timeout=timeout,
            will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
            max_queued_incoming_messages=1000,
        )

    async def __aenter__(self) -> Self:
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise LinkError(f"connect failed: {exc}") from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # aiomqtt waits for the broker to see the DISCONNECT without a time limit; a simulator stopping thousands
        # of connections at once must not hang on one of them (the socket closes when the process ends).
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):  # the connection is gone either way
            async with asyncio.timeout(5.0):
                await self._client.__aexit__(exc_type, exc, tb)

    async def subscribe(self, topic_filter: str) -> None:
        """Subscribe at QoS 1.

        Raises:
            LinkError: the connection failed.
        """
        try:
            await self._client.subscribe(topic_filter, qos=1)
        except aiomqtt.MqttError as exc:
            raise LinkError(f"subscribe to {topic_filter} failed: {exc}") from exc

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK.

        Raises:
            LinkError: the connection failed.
        """
        try:
            await self._client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            raise LinkError(f"publish to {topic} failed: {exc}") from exc

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Every message received, until the connection fails (then :class:`LinkError`)."""
        try:
            async for message in self._client.messages:
                yield InboundMessage(str(message.topic), bytes(message.payload), bool(message.retain))
        except aiomqtt.MqttError as exc:
            raise LinkError(f"connection lost: {exc}") from exc
