"""The agent's MQTT link to the controller: :class:`AgentLink` (the only agent module importing aiomqtt).

One connection at a time, for as long as the agent runs (DESIGN.md §5, docs/protocol.md):

- MQTT v5 over mutual TLS with the enrolled device certificate, the fleet CA as the only trust anchor and the
  broker's name checked; there is no plaintext mode and no fallback.
- A persistent session (``clean_start=False`` and a session expiry) and a last will: the prebuilt, signed
  ``offline`` state, retained, so the broker marks the device offline when the connection dies — including a
  half-open one, which the keepalive detects on both sides.
- On every connect: subscribe (the retained assignment arrives and is reconciled), publish the retained
  ``online`` state, make every unacked outbox message due again. Then three loops until the connection
  drops: the reader (assignments, acks), the outbox sender (one message in flight at a time, so a message
  that breaks the connection is known), and the state publisher (on change, and every
  ``state_interval_s`` as the heartbeat).
- Reconnect with jittered exponential backoff. Nothing else in the agent waits for the link: assignments
  are reconciled from the persisted desired state, and reports wait in the outbox.
- A clean stop publishes the ``offline`` state before disconnecting (a clean DISCONNECT discards the will).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig, LinkConfig
from agent.errors import EnrollmentError, LinkError
from agent.link.dispatch import AssignmentVerifier, Dispatcher, ModelRegistry
from agent.link.enrollment import Enrollment, link_dir, load_enrollment
from agent.link.keyring import KEYRING_FILE, ControllerKeyring
from agent.link.outbox import Outbox, OutboxItem
from agent.link.releases import HealthCheck, build_installer
from agent.link.state import StateBuilder, fingerprint
from agent.link.store import LinkStore
from protocols.audit import AuditHead
from protocols.backoff import Backoff, raise_if_cancelled, raise_if_cancelling
from protocols.errors import DecodeError, ProtocolError
from protocols.link import open_sealed, seal
from protocols.messages import Ack, DeviceState, Report
from protocols.releases import AssignmentKeyList
from protocols.topics import TopicKind, agent_subscriptions, device_topic, parse_device_topic, repo_topic

__all__ = ["AgentLink", "Backoff", "LinkStats", "open_agent_link"]

log = structlog.get_logger(__name__)

PACKET_TOO_LARGE = 0x95
"""MQTT v5 reason code a broker disconnects with after a packet over its maximum size."""

PUBLISH_OVERHEAD = 64
"""Bytes an MQTT PUBLISH adds around topic and payload (fixed header, length, packet id, properties), rounded up."""

MAX_HELD_ASSIGNMENTS = 64
"""Assignments held while the keys are refreshed after a connect, at most (past it the oldest are dropped; the
retained assignment comes again on every connect, and the controller re-publishes the newest one)."""
KEY_REFRESH_WAIT_S = 60.0
"""How long held assignments wait for the key refresh after a connect before they are verified anyway."""
MAX_INCOMING_QUEUE = 1000


@dataclass
class LinkStats:
    """Counters for status output and tests."""

    connects: int = 0
    failures: int = 0
    last_error: str = ""
    states_published: int = 0
    messages_sent: int = 0
    acks: int = 0
    errors: list[str] = field(default_factory=list)

    def failure(self, text: str) -> None:
        """Count a lost or refused connection."""
        self.failures += 1
        self.last_error = text
        self.errors = [*self.errors[-19:], text]


AckListener = Callable[[Ack], Awaitable[None]]


class AgentLink:
    """The device's link to the controller (see the module docstring). Build it with :func:`open_agent_link`."""

    def __init__(
        self,
        *,
        config: LinkConfig,
        enrollment: Enrollment,
        store: LinkStore,
        registry: ModelRegistry,
        state: StateBuilder,
        tls: ssl.SSLContext,
        loaded_models: Callable[[], Collection[tuple[str, str, str]]] | None = None,
        fault: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.loaded_models = loaded_models or (lambda: ())
        """``(name, variant, sha256)`` of the models in memory; called on the event loop."""
        self.enrollment = enrollment
        self.device = enrollment.device
        self.store = store
        self.state = state
        self.clock = clock
        self.host = config.host or enrollment.broker.host
        self.port = config.port or enrollment.broker.port
        self.keyring = ControllerKeyring(enrollment.controller_keys, enrollment.controller_threshold)
        """Keys for assignments and acks: the enrollment's until TUF publishes a list (agent/link/keyring.py)."""
        self.outbox = Outbox(
            store,
            max_messages=config.max_outbox_messages,
            resend_after=config.resend_after_s,
            resend_max=config.resend_max_s,
            clock=clock,
        )
        self.dispatcher = Dispatcher(
            store=store,
            outbox=self.outbox,
            verifier=AssignmentVerifier(
                self.device, enrollment.controller_keys, enrollment.controller_threshold, keyring=self.keyring
            ),
            registry=registry,
            signing_key=enrollment.signing_key,
            on_change=self.state_changed,
            fault=fault,
            clock=clock,
        )
        self.stats = LinkStats()
        self.keys_lookup: Callable[[], Awaitable[AssignmentKeyList | None]] | None = None
        """The TUF lookup of the assignment key list (set with the release installer; None: enrollment keys)."""
        self.connected = asyncio.Event()
        self.ack_listeners: list[AckListener] = []
        """Called with every verified ack (e.g. audit acks, by the audit log)."""
        self._tls = tls
        self._state_topic = device_topic(self.device, TopicKind.STATE)
        self._state_changed = asyncio.Event()
        self._heartbeat = 0
        self._last_fingerprint = b""
        self._last_state_at = 0.0
        self._progress_pending = False
        self._max_packet = enrollment.broker.max_packet_size
        self._connack: dict[str, Any] = {}
        self._notices: set[str] = set()
        self._in_flight: OutboxItem | None = None
        # Release delivery (agent/link/updater.py, agent/link/fetch.py): repository metadata and chunks.
        self.chunk_sink: Callable[[bytes], None] | None = None
        """Called on the event loop with every frame from the ``chunk`` topic (the active download's)."""
        self._client_now: aiomqtt.Client | None = None
        self._repo_cache: dict[str, bytes] = {}
        self._repo_waiters: dict[str, list[asyncio.Future[bytes]]] = {}

    # --- the rest of the agent --------------------------------------------------------------------------

    def state_changed(self) -> None:
        """Tell the link that the device's state changed (models, status): it is re-published soon."""
        self._state_changed.set()

    def progress_changed(self) -> None:
        """Tell the link that a download made progress: re-published at most every ``progress_interval_s``.

        A transfer reports progress after every batch of chunks; rebuilding and publishing the retained state
        that often would cost the device CPU and the controller a signature check per batch.
        """
        self._progress_pending = True
        if self.clock() - self._last_state_at >= self.config.progress_interval_s:
            self._state_changed.set()

    async def send_report(self, report: Report) -> None:
        """Sign ``report`` with the device key and keep it in the outbox until the controller acks it.

        Raises:
            OutboxFullError: too many messages wait for acks.
            ValueError: the report is invalid or not this device's.
        """
        if report.device != self.device:
            raise ValueError(f"a report of device {report.device!r} cannot be sent by {self.device!r}")
        await self.outbox.put(
            TopicKind.REPORT, report.report_id, seal(report, TopicKind.REPORT, [self.enrollment.signing_key])
        )

    async def send(self, kind: TopicKind, msg_id: str, payload: bytes) -> bool:
        """Keep an already encoded message (e.g. an audit batch) in the outbox until acked under ``msg_id``."""
        if kind not in (TopicKind.REPORT, TopicKind.AUDIT):
            raise ValueError(f"{kind} messages do not go through the outbox")
        return await self.outbox.put(kind, msg_id, payload)

    def max_payload_bytes(self, kind: TopicKind) -> int:
        """The largest payload of a ``kind`` message the broker takes (its maximum packet size, as learnt at
        the last CONNACK, less the topic and the PUBLISH header): a larger one is set aside as undeliverable."""
        return self._max_packet - len(device_topic(self.device, kind)) - PUBLISH_OVERHEAD

    async def publish_fetch(self, payload: bytes) -> None:
        """Publish a fetch request on this device's ``fetch`` topic (QoS 1; not kept: the fetcher re-asks).

        Raises:
            LinkError: not connected, or the connection dropped while publishing.
        """
        client = self._client_now
        if client is None:
            raise LinkError("not connected to the broker")
        try:
            await client.publish(device_topic(self.device, TopicKind.FETCH), payload, qos=1)
        except aiomqtt.MqttError as exc:
            raise LinkError(f"fetch request not sent: {exc}") from exc

    async def repo_document(self, topic: str, *, absent_after: float, within: float) -> bytes | None:
        """The retained repository document on ``topic``, or None if the broker has none.

        Versioned documents never change, so they are cached; ``repo/timestamp`` (always subscribed) is the
        last one received. Other topics are subscribed for the lookup only: a retained message arrives right
        after the SUBACK, so one that has not come ``absent_after`` seconds later does not exist.

        Raises:
            LinkError: not connected within ``within`` seconds, or the connection dropped.
        """
        cached = self._repo_cache.get(topic)
        if cached is not None:
            return cached
        try:
            async with asyncio.timeout(within):
                await self.connected.wait()
        except TimeoutError as exc:
            raise LinkError("not connected to the broker: repository metadata unavailable") from exc
        client = self._client_now
        if client is None:
            raise LinkError("not connected to the broker")
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._repo_waiters.setdefault(topic, []).append(waiter)
        standing = topic in agent_subscriptions(self.device)
        try:
            if not standing:
                await client.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within if standing else absent_after):
                    return await waiter
            return None
        except aiomqtt.MqttError as exc:
            raise LinkError(f"repository metadata unavailable: {exc}") from exc
        finally:
            waiters = self._repo_waiters.get(topic, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not standing:
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.unsubscribe(topic)

    def forget_repo_document(self, topic: str) -> None:
        """Drop the cached copy of ``topic``'s document: TUF refused a refresh that used it (it may be a bogus
        retained message); the next lookup asks the broker again."""
        self._repo_cache.pop(topic, None)

    def _on_repo_message(self, topic: str, payload: bytes) -> None:
        if not payload or len(self._repo_cache) > 256:
            self._repo_cache.clear()  # bounded: documents are fetched again if needed
        if payload:
            self._repo_cache[topic] = payload
        for waiter in self._repo_waiters.pop(topic, []):
            if not waiter.done() and payload:
                waiter.set_result(payload)

    # --- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> NoReturn:
        """Reconcile and stay connected until cancelled (a clean stop publishes the offline state).

        Never ends otherwise: an unexpected error in one of the link's loops (a full disk, an SQLite error) is
        logged and that loop started again after a backoff. The agent's local API must keep serving whatever
        happens to the link.
        """
        try:  # re-enrolled under the same id: nothing queued may carry the old key's signature
            dropped, resealed = await self.outbox.reseal(self.enrollment.signing_key)
        except Exception:  # the link must not end the daemon: messages signed by an old key are only refused
            log.exception("link.outbox_reseal_failed", device_id=self.device)
        else:
            if dropped or resealed:
                log.warning("link.outbox_resealed", device_id=self.device, audit_dropped=dropped, reports=resealed)
        keys_lookup = self.keys_lookup
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_supervised("link-dispatch", self.dispatcher.run), name="link-dispatch")
            tasks.create_task(_supervised("link-mqtt", self._connection_loop), name="link-mqtt")
            if keys_lookup is not None:
                tasks.create_task(
                    _supervised(
                        "link-keyring",
                        lambda: self.keyring.run(keys_lookup, self.dispatcher.on_assign, connected=self.connected),
                    ),
                    name="link-keyring",
                )
        raise AssertionError("unreachable: both loops run forever")

    async def _connection_loop(self) -> NoReturn:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self.config.reconnect_min_s, self.config.reconnect_max_s)
        while True:
            raise_if_cancelled()
            started = loop.time()
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                raise_if_cancelling(exc)  # a stop, not a lost connection: never reconnect after it
                await self._connection_lost([exc])
            if loop.time() - started >= max(10.0, 4 * self.config.keepalive_s):
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _connection_lost(self, errors: list[BaseException]) -> None:
        text = "; ".join(_describe(exc) for exc in errors) or "connection lost"
        self.stats.failure(text)
        log.warning("link.disconnected", device_id=self.device, broker=f"{self.host}:{self.port}", error=text)
        item, self._in_flight = self._in_flight, None
        if item is not None and any(_reason_code(exc) == PACKET_TOO_LARGE for exc in errors):
            await self._undeliverable(item, f"the broker refused it as too large ({len(item.payload)} bytes)")

    def _client(self, will_payload: bytes) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.MaximumPacketSize = self.enrollment.broker.max_packet_size
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.device,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=self.config.keepalive_s,
            tls_context=self._tls,
            timeout=self.config.connect_timeout_s,
            will=aiomqtt.Will(self._state_topic, will_payload, qos=1, retain=True),
            max_queued_incoming_messages=MAX_INCOMING_QUEUE,
        )
        # The broker's Maximum Packet Size arrives in CONNACK's properties, which aiomqtt does not expose:
        # wrap paho's callback (the one seam into paho, kept in this module).
        paho = client._client
        original = paho.on_connect
        connack: dict[str, Any] = {}

        def on_connect(*args: Any) -> None:
            properties = args[4] if len(args) > 4 else None
            connack["max_packet"] = getattr(properties, "MaximumPacketSize", None)
            assert original is not None
            original(*args)

        paho.on_connect = on_connect
        self._connack = connack
        return client

    async def _build_state(self, status: str) -> DeviceState:
        loaded = frozenset(self.loaded_models())  # on the loop: the model pool is not thread-safe
        return await asyncio.to_thread(self.state.build, status, self._heartbeat + 1, loaded)

    async def _session(self) -> None:
        will = await self._build_state("offline")
        client = self._client(seal(will, TopicKind.STATE, [self.enrollment.signing_key]))
        async with client:
            self.stats.connects += 1
            broker_max = self._connack.get("max_packet")
            self._max_packet = min(self.enrollment.broker.max_packet_size, broker_max or 2**28)
            log.info(
                "link.connected", device_id=self.device, broker=f"{self.host}:{self.port}", max_packet=self._max_packet
            )
            # the timestamp of an earlier connection may be stale or bogus: the broker sends its retained one after
            # the SUBACK below, and lookups wait for it (versioned documents are immutable and stay cached)
            self._repo_cache.pop(repo_topic("timestamp"), None)
            try:
                for topic in agent_subscriptions(self.device):
                    await client.subscribe(topic, qos=1)
                await self._publish_state(client, await self._build_state("online"))
                await self.outbox.resend_all()
                self._client_now = client
                if self.keys_lookup is not None:
                    self.keyring.settled.clear()  # the reader holds assignments until the keys are refreshed
                self.connected.set()
                self.keyring.stale.set()  # the assignment keys may have rotated meanwhile
                held = _HeldAssignments()
                await _run_until_first_failure(
                    self._reader(client, held),
                    self._held_assignments(held),
                    self._sender(client),
                    self._state_loop(client),
                    names=("reader", "held-assignments", "sender", "state"),
                )
            except asyncio.CancelledError:
                await self._say_goodbye(client)
                raise
            finally:
                self.connected.clear()
                self._client_now = None
                _retrieve_disconnect_error(client)

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                offline = await self._build_state("offline")
                await self._publish_state(client, offline)
                log.info("link.offline_published", device_id=self.device)

    # --- loops --------------------------------------------------------------------------------------------

    async def _reader(self, client: aiomqtt.Client, held: _HeldAssignments) -> None:
        async for message in client.messages:
            raise_if_cancelled()  # here and in every loop of the link: see protocols/backoff.py
            topic = str(message.topic)
            payload = bytes(message.payload)
            try:
                kind = parse_device_topic(topic).kind
            except DecodeError:
                self._on_repo_message(topic, payload)  # repository metadata: the release updater's business
                continue
            if not payload:
                continue  # a cleared retained message
            if kind is TopicKind.CHUNK:
                if self.chunk_sink is not None:
                    self.chunk_sink(payload)
            elif kind is TopicKind.ASSIGN:
                if self.keyring.settled.is_set() and not held.messages:
                    await self.dispatcher.on_assign(payload)
                else:
                    held.messages.append(payload)
                    held.wake.set()
            elif kind is TopicKind.ACK:
                await self._on_ack(topic, payload)

    async def _held_assignments(self, held: _HeldAssignments) -> NoReturn:
        """Handle, in order, the assignments that arrived before the key refresh asked for at connect ended.

        Verified with keys rotated away meanwhile, one of them (the retained one, or one queued while offline)
        could be accepted and applied (docs/protocol.md §4.2). The reader itself must not wait: the refresh's
        TUF documents arrive through it. The wait is bounded: a refresh that cannot finish keeps the keys in force.
        """
        while True:
            raise_if_cancelled()
            await held.wake.wait()
            held.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KEY_REFRESH_WAIT_S):
                    await self.keyring.settled.wait()
            while held.messages:
                await self.dispatcher.on_assign(held.messages[0])
                held.messages.popleft()

    async def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = open_sealed(topic, payload, self.keyring.keys).message
        except ProtocolError as exc:
            log.warning("link.ack_refused", device_id=self.device, error=str(exc))
            await self.store.run(self.store.add_event, "ack_refused", {"error": str(exc)[:500]})
            return
        assert isinstance(ack, Ack)
        self.stats.acks += 1
        removed = await self.outbox.acked(ack.report_ids)
        log.debug("link.acked", device_id=self.device, reports=len(ack.report_ids), removed=removed)
        for listener in self.ack_listeners:
            await listener(ack)

    async def _sender(self, client: aiomqtt.Client) -> NoReturn:
        while True:
            raise_if_cancelled()
            self.outbox.wake.clear()
            items = await self.outbox.due()
            for item in items:
                await self._send_one(client, item)
            if items:
                continue
            delay = await self.outbox.next_due_in()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.outbox.wake.wait()

    async def _send_one(self, client: aiomqtt.Client, item: OutboxItem) -> None:
        topic = device_topic(self.device, item.kind)
        size = len(item.payload) + len(topic) + PUBLISH_OVERHEAD
        if size > self._max_packet:
            await self._undeliverable(
                item, f"{size} bytes exceed the broker's maximum packet size of {self._max_packet} bytes"
            )
            return
        strikes = await self.outbox.begin_send(item)
        if strikes > self.config.max_send_attempts:
            await self._undeliverable(item, f"the connection died each of the {strikes - 1} times it was sent")
            return
        self._in_flight = item
        await client.publish(topic, item.payload, qos=1)
        self._in_flight = None
        self.stats.messages_sent += 1
        await self.outbox.sent(item)

    async def _undeliverable(self, item: OutboxItem, reason: str) -> None:
        """Set ``item`` aside (an event is recorded) and tell the controller with a small error report."""
        text = f"outbox message {item.msg_id} ({item.kind}) is undeliverable: {reason}"
        log.error("link.undeliverable", device_id=self.device, msg_id=item.msg_id, reason=reason)
        await self.outbox.set_undeliverable(item, reason)
        if item.msg_id in self._notices:
            return  # never a notice about an undeliverable notice (no chain of them)
        report = Report(
            report_id=_report_id(),
            device=self.device,
            ts_ms=int(self.clock() * 1000),
            kind="error",
            outcome="failed",
            reason=text[:4000],
        )
        self._notices.add(report.report_id)
        await self.outbox.put_own(
            TopicKind.REPORT,
            report.report_id,
            seal(report, TopicKind.REPORT, [self.enrollment.signing_key]),
        )

    async def _state_loop(self, client: aiomqtt.Client) -> NoReturn:
        while True:
            raise_if_cancelled()
            wait = self.config.state_check_interval_s
            if self._progress_pending:  # progress held back by progress_changed(): publish it when it is due
                wait = min(wait, max(0.0, self._last_state_at + self.config.progress_interval_s - self.clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._state_changed.wait()
            self._state_changed.clear()
            state = await self._build_state("online")
            due = self.clock() - self._last_state_at >= self.config.state_interval_s
            if due or fingerprint(state) != self._last_fingerprint:
                await self._publish_state(client, state)

    async def _publish_state(self, client: aiomqtt.Client, state: DeviceState) -> None:
        payload = seal(state, TopicKind.STATE, [self.enrollment.signing_key])
        await client.publish(self._state_topic, payload, qos=1, retain=True)
        self._heartbeat = state.heartbeat
        self._last_fingerprint = fingerprint(state)
        self._last_state_at = self.clock()
        self._progress_pending = False
        self.stats.states_published += 1


LOOP_RESTART_MIN_S = 1.0
LOOP_RESTART_MAX_S = 300.0
"""Backoff bounds before a link loop that failed unexpectedly is started again."""


async def _supervised(name: str, loop: Callable[[], Coroutine[Any, Any, NoReturn]]) -> NoReturn:
    """Run ``loop`` forever: an unexpected error is logged and the loop started again after a jittered backoff
    (reset after a run that lasted). Only a cancellation ends it."""
    backoff = Backoff(LOOP_RESTART_MIN_S, LOOP_RESTART_MAX_S)
    clock = asyncio.get_running_loop().time
    while True:
        raise_if_cancelled()
        started = clock()
        try:
            await loop()
        except Exception as exc:
            raise_if_cancelling(exc)  # a stop that surfaced as another error: never restart after it
            if clock() - started >= LOOP_RESTART_MAX_S:
                backoff.reset()
            delay = backoff.next()
            log.exception("link.loop_failed", loop=name, error=str(exc) or type(exc).__name__, retry_in_s=delay)
            await asyncio.sleep(delay)


@dataclass
class _HeldAssignments:
    """Assignments of one connection waiting for its key refresh (:meth:`AgentLink._held_assignments`)."""

    messages: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_HELD_ASSIGNMENTS))
    wake: asyncio.Event = field(default_factory=asyncio.Event)


async def _run_until_first_failure(*coroutines: Coroutine[Any, Any, Any], names: Sequence[str]) -> None:
    """Run the loops of one connection until one of them fails (re-raised as is) or we are cancelled.

    Not a TaskGroup on purpose: in Python 3.11 a TaskGroup whose child fails while the parent waits in its
    ``__aexit__`` leaves the parent task marked as being cancelled (its ``uncancel`` runs too early; 3.12
    reworked this), and a cancellation that arrives together with a child's error surfaces as an error group
    instead of ``CancelledError``; this connection loop must tell the two apart exactly.
    """
    tasks = [asyncio.create_task(coro, name=f"link-{name}") for coro, name in zip(coroutines, names, strict=True)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()  # the failure that ended the connection (loops do not return normally)
    raise AssertionError("a connection loop returned")


def _report_id() -> str:
    return secrets.token_hex(16)


def _reason_code(exc: BaseException | None) -> int | None:
    """The MQTT reason code behind ``exc`` (following ``__cause__``), if any."""
    seen = 0
    while exc is not None and seen < 8:
        rc = getattr(exc, "rc", None)
        value = getattr(rc, "value", rc)
        if isinstance(value, int) and value > 0:
            return value
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text


def _retrieve_disconnect_error(client: aiomqtt.Client) -> None:
    """Read aiomqtt's disconnect future so an error nobody awaited is not logged as "never retrieved"."""
    future = client._disconnected
    if future.done() and not future.cancelled():
        future.exception()


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho-mqtt 2.2 drops such a socket without closing it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(enrollment: Enrollment) -> ssl.SSLContext:
    """The device's TLS context: the fleet CA only, its certificate, TLS >= 1.2, the broker's name checked.

    Raises:
        LinkError: a TLS file is missing or unusable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(enrollment.ca_file))
        context.load_cert_chain(str(enrollment.cert_file), str(enrollment.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise LinkError(f"cannot load the device's TLS files: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket  # documented hook (Python >= 3.7)
    return context


@contextlib.asynccontextmanager
async def open_agent_link(
    config: AgentConfig,
    registry: ModelRegistry,
    *,
    agent_version: str,
    loaded_models: Callable[[], Collection[tuple[str, str, str]]] | None = None,
    audit_head: Callable[[], AuditHead | None] | None = None,
    fault: Callable[[str], None] | None = None,
    health_check: HealthCheck | None = None,
) -> AsyncIterator[AgentLink | None]:
    """The link if the device is enrolled (and the link enabled), else None; closes its database on exit.

    An invalid installed enrollment, or a ``link.db`` that cannot be opened (garbage, locked), is logged and
    yields None: the agent serves without a link rather than not at all. Run :meth:`AgentLink.run` as a task
    while inside.
    """
    enrollment: Enrollment | None = None
    tls: ssl.SSLContext | None = None
    if config.link.enabled:
        try:
            enrollment = await asyncio.to_thread(load_enrollment, config.state_dir, device_id=config.device_id)
            if enrollment is None:
                log.info("link.not_enrolled", state_dir=str(config.state_dir))
            else:
                tls = await asyncio.to_thread(tls_context, enrollment)
        except (EnrollmentError, LinkError) as exc:
            log.error("link.unusable", error=str(exc))
            enrollment = None
    if enrollment is None or tls is None:
        yield None
        return
    store_path = link_dir(config.state_dir) / "link.db"
    try:
        store = await asyncio.to_thread(LinkStore.open, store_path)
    except (LinkError, OSError) as exc:  # garbage, locked by another process, or link/ unusable
        log.error("link.store_unusable", path=str(store_path), error=str(exc))
        yield None
        return
    try:
        state = StateBuilder(
            device=enrollment.device,
            registry=registry,
            state_dir=config.state_dir,
            memory_budget_bytes=config.inference.memory_budget_bytes,
            agent_version=agent_version,
            audit_head=audit_head,
        )
        link = AgentLink(
            config=config.link,
            enrollment=enrollment,
            store=store,
            registry=registry,
            state=state,
            tls=tls,
            loaded_models=loaded_models,
            fault=fault,
        )
        # Release delivery: TUF metadata and chunks over this link (agent/link/releases.py).
        tuf_root = enrollment.bundle.tuf_root.encode() if enrollment.bundle.tuf_root else None
        link.dispatcher.installer = build_installer(
            link,
            registry,
            metadata_dir=link_dir(config.state_dir) / "tuf",
            bootstrap=tuf_root,
            hardware=state.hardware,
            store=store,
            health_check=health_check,
            max_check_attempts=config.registry.crash_quarantine_after,  # the registry's crash-loop breaker's
            artifact_url=config.link.artifact_url,
        )
        if link.dispatcher.installer is not None:  # transfers in progress go into the device state
            state.transfers = link.dispatcher.installer.transfers
            link.dispatcher.installer.on_change = link.state_changed
            link.dispatcher.installer.on_progress_change = link.progress_changed
            # the assignment keys, as the TUF target keys/assignments.json (agent/link/keyring.py)
            link.keyring = link.dispatcher.verifier.keyring = ControllerKeyring(
                enrollment.controller_keys,
                enrollment.controller_threshold,
                link_dir(config.state_dir) / KEYRING_FILE,
            )
            link.keys_lookup = link.dispatcher.installer.updater.assignment_keys
        yield link
    finally:
        await asyncio.to_thread(store.close)
