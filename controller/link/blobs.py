"""Release delivery over MQTT: retained repository metadata, and blob chunks answering fetch requests.

Two parts, both run by ``edge-fleet serve`` (controller.daemon):

- :class:`RepositoryPublisher` publishes every metadata document of the TUF repository as a retained message on
  its :func:`~protocols.topics.repo_topic` (``repo/root/<N>``, ``repo/targets/<N>``, ``repo/snapshot/<N>``,
  ``repo/timestamp``): all of them on every (re)connect, then new ones as ``model publish`` or ``keys rotate``
  write them. It also re-signs the snapshot and the timestamp before they expire (their keys are online), and
  warns (once a day) when the offline-signed targets or root expires soon (``edge-fleet keys renew``).
- :class:`ChunkServer` answers a device's :class:`~protocols.messages.FetchRequest` with binary chunk frames on
  that device's ``chunk`` topic. It serves only *published* targets whose sha256 and chunk size match the
  request, only to the device of the topic the request came on (the broker's ACL makes that the requester),
  and at most ``max_window`` chunks per request. Nothing here is trusted by devices: every chunk is checked
  against the signed chunk list on arrival.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from controller.releases import ReleaseError, ReleaseRepository
from protocols.errors import ProtocolError
from protocols.messages import FetchRequest, decode, encode_chunk
from protocols.releases import ModelTargetFields, chunk_span
from protocols.topics import TopicKind, device_topic, repo_topic

__all__ = ["ChunkServer", "Publisher", "RepositoryPublisher"]

log = structlog.get_logger(__name__)

PUBLISH_OVERHEAD = 64
"""Bytes an MQTT PUBLISH adds around topic and payload, rounded up (as on the agent)."""


class Publisher(Protocol):
    """What this module needs of the controller's link (:class:`controller.link.mqtt.ControllerLink`)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        ...


@dataclass
class RepositoryPublisher:
    """Keeps the broker's retained ``repo/...`` messages equal to the repository on disk."""

    repo: ReleaseRepository
    refresh_timestamp_within: dt.timedelta = dt.timedelta(hours=12)
    warn_expiry_within: dt.timedelta = dt.timedelta(days=30)
    """Warn when root or targets (signed offline, renewed by hand) expires within this."""
    warn_every: dt.timedelta = dt.timedelta(days=1)
    _published: dict[str, bytes] = field(default_factory=dict)
    _warned_at: dt.datetime | None = None

    def _documents(self) -> Iterable[tuple[str, bytes]]:
        for role, version, data in self.repo.documents():
            yield repo_topic(role, version), data

    async def publish_all(self, link: Publisher) -> int:
        """Publish every document (after a connect: the broker may have lost its retained store)."""
        self._published.clear()
        return await self.publish_new(link)

    async def publish_new(self, link: Publisher) -> int:
        """Re-sign an expiring snapshot/timestamp, then publish every document not published yet (or changed)."""
        try:
            if await asyncio.to_thread(self.repo.refresh_timestamp, if_expiring_within=self.refresh_timestamp_within):
                log.info("repo.timestamp_resigned")
        except ReleaseError as exc:
            log.error("repo.timestamp_not_resigned", error=str(exc))
        await asyncio.to_thread(self._warn_expiring)
        documents = await asyncio.to_thread(lambda: list(self._documents()))
        count = 0
        for topic, data in documents:
            if self._published.get(topic) == data:
                continue
            await link.publish(topic, data, retain=True)
            self._published[topic] = data
            count += 1
        if count:
            log.info("repo.published", documents=count)
        return count

    def _warn_expiring(self) -> None:
        """Log ``repo.expiring_soon`` for root/targets expiring within ``warn_expiry_within``, at most once a day."""
        now = self.repo.clock()
        if self._warned_at is not None and now - self._warned_at < self.warn_every:
            return
        try:
            expiring = self.repo.expiring(self.warn_expiry_within)
        except ReleaseError as exc:
            log.error("repo.expiry_unknown", error=str(exc))
            return
        for role, expires in sorted(expiring.items()):
            log.warning(
                "repo.expiring_soon",
                role=role,
                expires=expires.isoformat(),
                action=f"run `edge-fleet keys renew {role}` with the {role} key",
            )
        if expiring:
            self._warned_at = now


@dataclass(frozen=True, slots=True)
class _Served:
    sha256: str
    length: int
    fields: ModelTargetFields


class ChunkServer:
    """Answers fetch requests with chunks of published blobs (see the module docstring)."""

    def __init__(
        self,
        repo: ReleaseRepository,
        *,
        max_packet_size: int,
        max_window: int = 64,
        on_serve: Callable[[str, FetchRequest], None] | None = None,
    ) -> None:
        self.repo = repo
        self.max_packet_size = max_packet_size
        self.max_window = max_window
        self.on_serve = on_serve or (lambda device, request: None)
        self.chunks_sent = 0
        self._targets: dict[str, _Served] = {}

    def _lookup(self, path: str) -> _Served:
        served = self._targets.get(path)
        if served is None:
            target = self.repo.target(path)
            served = _Served(
                target.hashes["sha256"], target.length, ModelTargetFields.from_custom(target.custom, target.length)
            )
            self._targets[path] = served
        return served

    def _read(self, request: FetchRequest, served: _Served) -> list[tuple[int, bytes]]:
        out = []
        with self.repo.blob_path(served.sha256).open("rb") as f:
            for index in request.indices[: self.max_window]:
                offset, size = chunk_span(index, served.length, served.fields.chunk_size)
                if size <= 0:
                    continue
                f.seek(offset)
                out.append((index, f.read(size)))
        return out

    async def handle(self, link: Publisher, payload: bytes, device: str) -> None:
        """Answer one message from ``devices/<device>/fetch``; anything invalid is logged and dropped."""
        try:
            request = decode(payload)
        except ProtocolError as exc:
            log.warning("fetch.refused", device_id=device, reason=f"malformed: {exc}")
            return
        if not isinstance(request, FetchRequest) or request.device != device:
            log.warning("fetch.refused", device_id=device, reason="not a fetch request of this device")
            return
        try:
            served = await asyncio.to_thread(self._lookup, request.target_path)
        except (ReleaseError, ProtocolError) as exc:
            log.warning("fetch.refused", device_id=device, target=request.target_path, reason=str(exc))
            return
        if served.sha256 != request.sha256 or served.fields.chunk_size != request.chunk_size:
            log.warning("fetch.refused", device_id=device, target=request.target_path, reason="sha256 or chunk size")
            return
        topic = device_topic(device, TopicKind.CHUNK)
        if served.fields.chunk_size + 28 + len(topic) + PUBLISH_OVERHEAD > self.max_packet_size:
            log.error("fetch.chunk_too_large", target=request.target_path, max_packet=self.max_packet_size)
            return
        self.on_serve(device, request)
        chunks = await asyncio.to_thread(self._read, request, served)
        for index, data in chunks:
            await link.publish(topic, encode_chunk(request.transfer_id, index, data))
            self.chunks_sent += 1
        log.debug(
            "fetch.served",
            device_id=device,
            target=request.target_path,
            chunks=len(chunks),
            digest=hashlib.sha256(payload).hexdigest()[:12],
        )
