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
  gets the desired state back. One task publishes them, reading the newest generation at publish time and
  again after the PUBACK, so a retained assignment is never left older than the fleet DB's newest (not by a
  reconnect, nor by another ``serve`` publishing concurrently).

The DB is used from one writer thread (SQLite from asyncio). ``state``, ``report`` and ``audit`` messages become
jobs of :class:`controller.ingest.WriteBatcher`: verified and stored on that thread in arrival order, whatever has
queued up committed in one transaction (each message in its own savepoint), and acked only after that commit, so
the loop keeps reading the broker while earlier messages are verified. ``audit`` messages go to
:class:`controller.audit_ingest.AuditIngest` (acked after its commit); with ``[controller] audit_workers`` > 0
(the default on more than one CPU) they are verified and stored by worker processes sharded by device
(:class:`controller.audit_shards.AuditShards`, started after the DB is opened, stopped before it is closed), and
acked by serve after the worker's commit; ``fetch``
messages go to handlers registered by later features (``extra_handlers``); without one they are left unacked,
so devices keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.audit_ingest import AuditIngest
from controller.audit_shards import AuditShards, default_workers
from controller.home import FleetHome
from controller.ingest import Job, WriteBatcher
from controller.link.blobs import ChunkServer, RepositoryPublisher
from controller.link.http import ArtifactServer
from controller.link.mqtt import Backoff, ControllerLink, InboundMessage, NotConnectedError, tls_context
from controller.pki import controller_common_name
from controller.releases import ReleaseRepository
from controller.rollout import RolloutDriver
from controller.store import AssignmentRow, FleetStore
from protocols.backoff import raise_if_cancelled
from protocols.errors import ProtocolError
from protocols.keys import keyid, public_key_from_pem
from protocols.link import open_sealed, seal
from protocols.messages import Ack, DeviceState, Report
from protocols.topics import TopicKind, controller_subscriptions, device_topic, parse_device_topic

__all__ = ["ExtraHandler", "FleetServer", "serve"]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
PUBLISH_WINDOW = 256
"""Assignments published concurrently by one poll of the assignment publisher."""
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
        self._key_stamp = _file_stamp(home.assignment_key_path)
        self.rollouts = RolloutDriver(
            self._key,
            heartbeat_timeout=self.config.controller.heartbeat_timeout_s,
            clock=clock,
            link_up_since=lambda: self.link.up_since,
        )
        """Advances rollouts (controller.rollout); its state is the fleet DB, so a restart resumes it. It judges a
        device offline only after this link has been up for a heartbeat window (docs/rollouts.md, Restarts)."""
        self._republish = asyncio.Event()
        """Set on every (re)connect: the assignment publisher re-publishes every device's newest assignment."""
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-db")
        self._store: FleetStore | None = None
        self.ingest = WriteBatcher(self.db, lambda: self.store)
        """Group commit of state, report and audit messages (controller.ingest): one fsync for many messages."""
        workers = self.config.controller.audit_workers
        self.audit_workers = default_workers() if workers < 0 else workers
        """Audit shards' worker processes (controller.audit_shards); 0 = audit uploads go through ``ingest``."""
        self.audit_shards: AuditShards | None = None
        """The running shards (set inside :meth:`run` when ``audit_workers`` > 0)."""
        self._followups: asyncio.TaskGroup | None = None
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
            clock=clock,
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
                if self.audit_workers > 0:  # after the store: serve created and migrated the DB they open
                    self.audit_shards = await stack.enter_async_context(
                        AuditShards(self.home.db_path, self.audit_workers, limits=self.audit.limits)
                    )
                async with asyncio.TaskGroup() as tasks:
                    self._followups = tasks
                    tasks.create_task(self.ingest.run(), name="ingest-writer")
                    if self.audit_shards is not None:
                        tasks.create_task(self.audit_shards.run(), name="audit-shards")
                    tasks.create_task(self.link.run(self._on_connect, self._on_message), name="mqtt-link")
                    tasks.create_task(self._assignment_loop(), name="assignment-publisher")
                    tasks.create_task(self._rollout_loop(), name="rollout-driver")
        finally:
            self.audit_shards = None
            store, self._store = self._store, None
            await self.db(store.close)
            self._writer.shutdown(wait=True)

    # --- handlers -----------------------------------------------------------------------------------------

    async def _on_connect(self, link: ControllerLink) -> None:
        # Only mark what must be re-published. The one publisher (_assignment_loop) reads each device's newest
        # generation when it publishes: a snapshot published from here, concurrently with it, could put an older
        # retained assignment over a newer one.
        self._republish.set()
        log.info("serve.connected", connects=link.connects)

    async def _assignment_loop(self) -> None:
        """The only publisher of assignments (and of release metadata): what the CLI and the rollout driver
        inserted since the last poll, and after every (re)connect everything, each device's newest generation
        as read at publish time. One process never publishes a device's generation N after its N+1."""
        interval = self.config.controller.assignment_poll_s
        while True:
            raise_if_cancelled()  # a publish's wait_for may have swallowed a stop (protocols/backoff.py)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._republish.wait()  # a (re)connect does not wait for the next poll
            if not self.link.connected.is_set():
                self._republish.clear()  # the next connect sets it again
                continue
            everything = self._republish.is_set()
            self._republish.clear()
            if self.releases is not None:  # metadata before the assignments that may name a target in it
                with contextlib.suppress(NotConnectedError):  # the next connect publishes everything
                    if everything:
                        await self.releases.publish_all(self.link)
                    else:
                        await self.releases.publish_new(self.link)
            rows = await self.db(self.store.latest_assignments, unpublished_only=not everything)
            published = await self._publish_assignments(rows)
            if everything:
                log.info("serve.republished", assignments=len(published))
            if published:  # one commit for all of them
                await (await self.ingest.submit(_mark_published_job(published, self.clock())))

    async def _publish_assignments(self, rows: list[AssignmentRow]) -> list[AssignmentRow]:
        """Publish ``rows`` (retained), then re-read each device's newest generation after its PUBACK and publish
        again any that is newer than what was published: if another ``serve`` (ADR 0012) published a newer one
        before this older one reached the broker, the broker ends with the newest all the same."""
        published: list[AssignmentRow] = []
        while rows:
            acked: list[AssignmentRow] = []
            # Concurrently, in windows: one PUBACK round trip per window, not per device (a deploy to a
            # thousand devices is one poll). Each device appears at most once in ``rows``.
            for start in range(0, len(rows), PUBLISH_WINDOW):
                window = rows[start : start + PUBLISH_WINDOW]
                outcomes = await asyncio.gather(
                    *(
                        self.link.publish(device_topic(row.device, TopicKind.ASSIGN), row.envelope, retain=True)
                        for row in window
                    ),
                    return_exceptions=True,
                )
                for row, outcome in zip(window, outcomes, strict=True):
                    if isinstance(outcome, NotConnectedError):
                        continue  # the next connect re-publishes every assignment
                    if isinstance(outcome, BaseException):
                        raise outcome
                    acked.append(row)
                    log.info("assignment.published", device_id=row.device, generation=row.generation)
            published.extend(acked)
            if not acked:
                break
            generation = {row.device: row.generation for row in acked}
            newest = await self.db(self.store.latest_assignments, devices=sorted(generation))
            rows = [row for row in newest if row.generation > generation[row.device]]
        return published

    async def _rollout_loop(self) -> None:
        """Advance rollouts (waves, gates, rollback, catch-up); new assignments go out with the publisher."""
        interval = self.config.controller.assignment_poll_s
        while True:
            await asyncio.sleep(interval)
            self.signing_key()  # the driver signs its assignments with the key in force
            try:
                await self.db(self.rollouts.tick, self.store)
            except Exception:  # a bad row or a locked DB must not stop serve; the state is in the DB
                log.exception("rollout.tick_failed")

    def signing_key(self) -> Ed25519PrivateKey:
        """The assignment key, reloaded when ``edge-fleet keys rotate assignments`` replaced its file.

        Devices that took the rotated key list through TUF refuse what the old key signs, so serve must not go on
        signing acks and rollout assignments with it until someone restarts it.
        """
        stamp = _file_stamp(self.home.assignment_key_path)
        if stamp is not None and stamp != self._key_stamp:
            try:
                key = self.home.assignment_key()
            except Exception as exc:  # a half-written file: keep the key in force, try again next time
                log.warning("assignment_key.reload_failed", error=str(exc) or type(exc).__name__)
                return self._key
            self._key, self._key_stamp = key, stamp
            self.rollouts.key = key
            log.info("assignment_key.reloaded", keyid=keyid(key))
        return self._key

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
            future = await self.ingest.submit(self._sealed_job(message, topic.device_id, self.clock()))
            self._follow(self._after_sealed(link, message, topic.device_id, future))
            return
        handler = self.extra_handlers.get(topic.kind)
        if handler is self.audit:
            if self.audit_shards is not None:  # verified and stored by the device's shard (controller.audit_shards)
                future = await self.audit_shards.submit(
                    message.topic, topic.device_id, message.payload, now=self.clock()
                )
            else:
                job = self.audit.job(message.topic, topic.device_id, message.payload, now=self.clock())
                future = await self.ingest.submit(job)
            self._follow(self._after_audit(topic.device_id, future))
        elif handler is not None:
            await handler(self, message, topic.device_id)
        else:
            log.debug("message.unhandled", topic=message.topic, kind=str(topic.kind))

    # Group-committed path (controller.ingest): the job verifies and stores on the writer thread; the follow-up
    # task acks after the commit. Jobs are submitted in arrival order, so they run in arrival order; the link
    # goes on reading while earlier messages are verified and committed.

    def _follow(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._followups is not None
        self._followups.create_task(coro)

    def _sealed_job(self, message: InboundMessage, device: str, now: float) -> Job:
        def run(store: FleetStore) -> _SealedOutcome:
            row = store.get_device(device)
            reason = None
            if row is None:
                reason = "unknown device: not enrolled"
            elif row.revoked:
                reason = "device is revoked"
            else:
                try:
                    key = public_key_from_pem(row.signing_key_pem.encode())
                    sealed = open_sealed(message.topic, message.payload, {row.signing_keyid: key}).message
                except ProtocolError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
            if reason is not None:
                store.record_rejection(message.topic, device, reason, now=now)
                return _SealedOutcome(rejected=reason)
            if isinstance(sealed, DeviceState):
                # A retained state may be old: it counts as "seen" only as of its own timestamp. A last will
                # (status offline) says nothing about when the device was last heard from.
                seen: float | None = min(now, sealed.ts_ms / 1000) if message.retain else now
                if sealed.status == "offline":
                    seen = None
                store.record_state(
                    sealed.device,
                    status=sealed.status,
                    state=sealed.body(),
                    state_ts_ms=sealed.ts_ms,
                    heartbeat=sealed.heartbeat,
                    agent_version=sealed.agent_version,
                    seen=seen,
                    now=now,
                )
                return _SealedOutcome(state=sealed)
            assert isinstance(sealed, Report)
            new = store.record_report(sealed.body(), received_ts=now)
            store.touch(sealed.device, now)
            return _SealedOutcome(report=sealed, new=new)

        return run

    async def _after_sealed(
        self, link: ControllerLink, message: InboundMessage, device: str, future: asyncio.Future[Any]
    ) -> None:
        try:
            outcome: _SealedOutcome = await future
        except Exception as exc:  # the job or its group commit failed: no ack, the device re-sends
            log.warning("ingest.job_failed", device_id=device, error=str(exc) or type(exc).__name__)
            return
        if outcome.rejected is not None:
            self.rejected += 1
            log.warning("message.rejected", topic=message.topic[:256], device_id=device, reason=outcome.rejected)
        elif outcome.state is not None:
            state = outcome.state
            log.debug("device.state", device_id=state.device, status=state.status, heartbeat=state.heartbeat)
        elif outcome.report is not None:
            with contextlib.suppress(NotConnectedError):  # unacked: the device re-sends it, stored once
                await self._ack_report(link, outcome.report, new=outcome.new, now=self.clock())

    async def _after_audit(self, device: str, future: asyncio.Future[Any]) -> None:
        try:
            result = await future
        except Exception as exc:  # the job or its group commit failed: no ack, the device re-sends
            log.warning("ingest.job_failed", device_id=device, error=str(exc) or type(exc).__name__)
            return
        with contextlib.suppress(NotConnectedError):  # unacked: the device re-sends the batch, stored once
            await self.audit.finish(self, device, result)

    async def _ack_report(self, link: ControllerLink, report: Report, *, new: bool, now: float) -> None:
        # Only now, after the commit: the device may delete the report once it has this ack.
        ack = Ack(
            device=report.device, ts_ms=int(now * 1000), report_ids=(report.report_id,), duplicate=0 if new else 1
        )
        await link.publish(device_topic(report.device, TopicKind.ACK), seal(ack, TopicKind.ACK, [self.signing_key()]))
        self.acks_sent += 1
        log.info("report.stored", device_id=report.device, report_id=report.report_id, duplicate=not new)

    async def send_ack(self, device: str, **fields: Any) -> None:
        """Publish a signed ack to ``device`` (for handlers of other kinds, after their own commit)."""
        ack = Ack(device=device, ts_ms=int(self.clock() * 1000), **fields)
        await self.link.publish(device_topic(device, TopicKind.ACK), seal(ack, TopicKind.ACK, [self.signing_key()]))
        self.acks_sent += 1


def _file_stamp(path: os.PathLike[str] | str) -> tuple[int, int] | None:
    """Inode and mtime: a file replaced atomically (a new inode) is noticed even within one clock tick."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _mark_published_job(rows: list[AssignmentRow], now: float) -> Job:
    def run(store: FleetStore) -> None:
        for row in rows:
            store.mark_published(row.device, row.generation, now=now)

    return run


@dataclass(frozen=True, slots=True)
class _SealedOutcome:
    """What a state/report job did: rejected (why), a stored state, or a stored report (new or a duplicate)."""

    rejected: str | None = None
    state: DeviceState | None = None
    report: Report | None = None
    new: bool = False


async def _serve_chunks(server: FleetServer, message: InboundMessage, device: str) -> None:
    """The ``fetch`` handler: chunks of published blobs (controller.link.blobs), only to enrolled devices.

    A fetch request is not signed, but the broker's ACL makes the device of the topic its sender; a device that is
    unknown or revoked (its certificate may still be accepted until the broker reloads the CRL) gets nothing, and
    the request is recorded as a rejection like any other message from it.
    """
    row = await server.db(server.store.get_device, device)
    reason = "unknown device: not enrolled" if row is None else "device is revoked" if row.revoked else None
    if reason is not None:
        await server._reject(message, device, reason)
        return
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
    ready = asyncio.create_task(_notify_ready(server), name="sd-notify-ready")
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sd_notify("STOPPING=1")
        ready.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        stopper.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return 0


async def _notify_ready(server: FleetServer) -> None:
    """``READY=1`` once ``serve`` is connected to the broker (so ``systemctl start`` returns when it works)."""
    await server.link.connected.wait()
    sd_notify("READY=1", f"STATUS=connected to {server.config.broker.host}:{server.config.broker.port}")
    log.info("serve.ready")


def sd_notify(*lines: str) -> bool:
    """Send a systemd notification over ``$NOTIFY_SOCKET`` (no-op without it); False if it was not sent.

    The same datagram protocol as :mod:`agent.systemd` (the controller does not import the agent).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("serve.notify_failed", error=str(exc))
        return False
    return True
