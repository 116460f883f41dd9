"""``edge-fleet serve``: keep the fleet DB in step with the devices, over MQTT.

What it does (DESIGN.md §5, docs/protocol.md):

- Subscribes to every device's ``state`` (unshared: it is retained, and every controller keeps the whole
  inventory) and, through the shared subscription ``$share/<group>/...``, to ``report``/``audit``/``fetch``,
  so several ``serve`` processes split that work (:func:`protocols.topics.controller_subscriptions`).
- Verifies every ``state`` and ``report`` against the *enrolled* device's Ed25519 key, and that the message
  names the device of its topic (:func:`protocols.link.open_sealed`); refuses unknown and revoked devices.
  Refused messages are recorded in ``rejections`` and never acted on.
- Stores a report once (its id is the primary key), and only *after that transaction committed* publishes
  the signed application-level :class:`~protocols.messages.Ack`; a re-delivered report is acked again
  (the device may have missed the first ack) and counted as a duplicate. Every handler is idempotent.
- Publishes each device's newest signed assignment as a retained message: the ones the CLI added since
  (polling the DB), and all of them again on every (re)connect, so a broker that lost its retained store
  gets the desired state back.

The DB is used from one writer thread (SQLite from asyncio); handlers run one message at a time in arrival
order. ``audit`` messages go to :class:`controller.audit_ingest.AuditIngest` (acked after its commit); ``fetch``
messages go to handlers registered by later features (``extra_handlers``); without one they are left unacked,
so devices keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import structlog

from controller.audit_ingest import AuditIngest
from controller.home import FleetHome
from controller.link.blobs import ChunkServer, RepositoryPublisher
from controller.link.http import ArtifactServer
from controller.link.mqtt import Backoff, ControllerLink, InboundMessage, NotConnectedError, tls_context
from controller.pki import controller_common_name
from controller.releases import ReleaseRepository
from controller.store import FleetStore
from protocols.errors import ProtocolError
from protocols.keys import public_key_from_pem
from protocols.link import open_sealed, seal
from protocols.messages import Ack, DeviceState, Report
from protocols.topics import TopicKind, controller_subscriptions, device_topic, parse_device_topic

__all__ = ["ExtraHandler", "FleetServer", "serve"]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

ExtraHandler = Callable[["FleetServer", InboundMessage, str], Awaitable[None]]
"""A handler for another topic kind: ``(server, message, device_id)``."""


class FleetServer:
    """The ``serve`` daemon's state: the fleet DB, the link, and the handlers."""

    def __init__(
        self,
        home: FleetHome,
        *,
        extra_handlers: Mapping[TopicKind, ExtraHandler] | None = None,
        clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
    ) -> None:
        self.home = home
        self.config = home.config
        self.clock = clock
        self.audit = AuditIngest()
        """The audit upload handler (DESIGN.md §6); an ``extra_handlers`` entry for ``audit`` replaces it."""
        self.extra_handlers: dict[TopicKind, ExtraHandler] = {TopicKind.AUDIT: self.audit, **(extra_handlers or {})}
        self._key = home.assignment_key()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-db")
        self._store: FleetStore | None = None
        ctl = self.config.controller
        self.link = ControllerLink(
            host=self.config.broker.host,
            port=self.config.broker.port,
            tls=tls_context(home.controller_tls()),
            client_id=controller_common_name(ctl.name),
            subscriptions=controller_subscriptions(ctl.share_group),
            keepalive=ctl.keepalive_s,
            session_expiry=ctl.session_expiry_s,
            backoff=backoff,
        )
        self.acks_sent = 0
        self.rejected = 0
        # Release delivery (controller.link.blobs): retained repository metadata, chunks for fetch requests.
        self.releases: RepositoryPublisher | None = None
        self.chunks: ChunkServer | None = None
        self.artifacts: ArtifactServer | None = None
        if home.repo_dir.exists():
            repo = ReleaseRepository(home.repo_dir)
            self.releases = RepositoryPublisher(repo)
            self.chunks = ChunkServer(repo, max_packet_size=self.config.broker.max_packet_size)
            self.extra_handlers.setdefault(TopicKind.FETCH, _serve_chunks)

    async def db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the one DB writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, lambda: fn(*args, **kwargs))

    @property
    def store(self) -> FleetStore:
        """The fleet DB (only valid inside :meth:`run`; use it through :meth:`db`)."""
        if self._store is None:
            raise RuntimeError("the fleet server is not running")
        return self._store

    async def run(self) -> None:
        """Serve until cancelled."""
        self._store = await self.db(FleetStore.open, self.home.db_path)
        try:
            async with contextlib.AsyncExitStack() as stack:
                ctl = self.config.controller
                if self.releases is not None and ctl.artifact_port:  # HTTP release delivery (controller.link.http)
                    self.artifacts = await stack.enter_async_context(
                        ArtifactServer(self.releases.repo, ctl.artifact_bind, ctl.artifact_port)
                    )
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self.link.run(self._on_connect, self._on_message), name="mqtt-link")
                    tasks.create_task(self._assignment_loop(), name="assignment-publisher")
        finally:
            store, self._store = self._store, None
            await self.db(store.close)
            self._writer.shutdown(wait=True)

    # --- handlers -----------------------------------------------------------------------------------------

    async def _on_connect(self, link: ControllerLink) -> None:
        if self.releases is not None:  # metadata first: an assignment may name a target devices then look up
            await self.releases.publish_all(link)
        rows = await self.db(self.store.latest_assignments)
        for row in rows:
            await link.publish(device_topic(row.device, TopicKind.ASSIGN), row.envelope, retain=True)
            if row.published_ts is None:
                await self.db(self.store.mark_published, row.device, row.generation, now=self.clock())
        log.info("serve.connected", republished_assignments=len(rows))

    async def _assignment_loop(self) -> None:
        interval = self.config.controller.assignment_poll_s
        while True:
            await asyncio.sleep(interval)
            if not self.link.connected.is_set():
                continue
            if self.releases is not None:  # new metadata before the assignments that may name it
                with contextlib.suppress(NotConnectedError):  # the next connect publishes everything
                    await self.releases.publish_new(self.link)
            for row in await self.db(self.store.latest_assignments, unpublished_only=True):
                try:
                    await self.link.publish(device_topic(row.device, TopicKind.ASSIGN), row.envelope, retain=True)
                except NotConnectedError:
                    break  # the next connect re-publishes every assignment
                await self.db(self.store.mark_published, row.device, row.generation, now=self.clock())
                log.info("assignment.published", device_id=row.device, generation=row.generation)

    async def _reject(self, message: InboundMessage, device: str | None, reason: str) -> None:
        self.rejected += 1
        log.warning("message.rejected", topic=message.topic[:256], device_id=device, reason=reason)
        await self.db(self.store.record_rejection, message.topic, device, reason, now=self.clock())

    async def _on_message(self, link: ControllerLink, message: InboundMessage) -> None:
        try:
            topic = parse_device_topic(message.topic)
        except ProtocolError as exc:
            await self._reject(message, None, f"bad topic: {exc}")
            return
        if topic.kind in (TopicKind.STATE, TopicKind.REPORT):
            await self._on_sealed(link, message, topic.device_id)
            return
        handler = self.extra_handlers.get(topic.kind)
        if handler is not None:
            await handler(self, message, topic.device_id)
        else:
            log.debug("message.unhandled", topic=message.topic, kind=str(topic.kind))

    async def _on_sealed(self, link: ControllerLink, message: InboundMessage, device: str) -> None:
        row = await self.db(self.store.get_device, device)
        if row is None:
            await self._reject(message, device, "unknown device: not enrolled")
            return
        if row.revoked:
            await self._reject(message, device, "device is revoked")
            return
        try:
            key = public_key_from_pem(row.signing_key_pem.encode())
            sealed = open_sealed(message.topic, message.payload, {row.signing_keyid: key})
        except ProtocolError as exc:
            await self._reject(message, device, f"{type(exc).__name__}: {exc}")
            return
        now = self.clock()
        if isinstance(sealed.message, DeviceState):
            await self._on_state(sealed.message, retained=message.retain, now=now)
        elif isinstance(sealed.message, Report):
            await self._on_report(link, sealed.message, now=now)

    async def _on_state(self, state: DeviceState, *, retained: bool, now: float) -> None:
        # A retained state may be old: it counts as "seen" only as of its own timestamp. A last will
        # (status offline) says nothing about when the device was last heard from.
        seen: float | None = min(now, state.ts_ms / 1000) if retained else now
        if state.status == "offline":
            seen = None
        await self.db(
            self.store.record_state,
            state.device,
            status=state.status,
            state=state.body(),
            state_ts_ms=state.ts_ms,
            heartbeat=state.heartbeat,
            agent_version=state.agent_version,
            seen=seen,
            now=now,
        )
        log.info("device.state", device_id=state.device, status=state.status, heartbeat=state.heartbeat)

    async def _on_report(self, link: ControllerLink, report: Report, *, now: float) -> None:
        new = await self.db(self.store.record_report, report.body(), received_ts=now)
        await self.db(self.store.touch, report.device, now)
        # Only now, after the commit: the device may delete the report once it has this ack.
        ack = Ack(
            device=report.device, ts_ms=int(now * 1000), report_ids=(report.report_id,), duplicate=0 if new else 1
        )
        await link.publish(device_topic(report.device, TopicKind.ACK), seal(ack, TopicKind.ACK, [self._key]))
        self.acks_sent += 1
        log.info("report.stored", device_id=report.device, report_id=report.report_id, duplicate=not new)

    async def send_ack(self, device: str, **fields: Any) -> None:
        """Publish a signed ack to ``device`` (for handlers of other kinds, after their own commit)."""
        ack = Ack(device=device, ts_ms=int(self.clock() * 1000), **fields)
        await self.link.publish(device_topic(device, TopicKind.ACK), seal(ack, TopicKind.ACK, [self._key]))
        self.acks_sent += 1


async def _serve_chunks(server: FleetServer, message: InboundMessage, device: str) -> None:
    """The ``fetch`` handler: chunks of published blobs (controller.link.blobs)."""
    if server.chunks is not None:
        with contextlib.suppress(NotConnectedError):  # the device asks again after the reconnect
            await server.chunks.handle(server.link, message.payload, device)


async def serve(home: FleetHome, *, stop: asyncio.Event | None = None) -> int:
    """Run ``edge-fleet serve`` until SIGTERM/SIGINT (or ``stop``); return the exit status."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    server = FleetServer(home)
    task = asyncio.create_task(server.run(), name="fleet-server")
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        stopper.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return 0
