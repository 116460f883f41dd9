"""The MQTT control messages of DESIGN.md §5, and the binary framing of blob chunks.

Every control message is a frozen dataclass that maps to one JSON object carrying ``"type"`` (which message)
and ``"v"`` (the protocol major version, :data:`PROTOCOL_VERSION`). Invariants:

* :func:`decode` bounds the input (``limits.max_message_bytes``) before parsing, parses strictly
  (:func:`~protocols.canonical.loads_object`: duplicate keys, NaN, deep nesting rejected), then checks ``v``
  (another major → ``UnsupportedVersionError``), then ``type`` (unknown → ``UnknownTypeError``), then every
  field: types (``bool`` is never an ``int``), ranges, id syntax (:mod:`protocols.limits`), string lengths
  ``<= limits.max_string``, list lengths ``<= limits.max_list``. Failures are ``DecodeError`` naming the
  field path. Unknown extra fields are ignored, so a newer minor revision can add optional fields.
* Integers: timestamps ``*_ts_ms``/``ts_ms`` are milliseconds since the Unix epoch; sizes, sequence numbers,
  generations and epochs are in ``[0, 2**63)``. Digests are sha256 as 64 lower-case hex characters; random ids
  (report, transfer) are 32 lower-case hex characters.
* Optional fields are left out when None and accepted as absent or null; optional lists and maps default to
  empty. List fields are tuples.
* :meth:`Message.encode` emits canonical JSON (floats allowed: messages are signed as raw bytes, never
  re-encoded) and refuses, with ``ValueError``, a message that :func:`decode` would reject, so a peer never
  receives from us what we would not accept ourselves.
* Messages that travel sealed in a DSSE envelope (``protocols/link.py``; :attr:`Assignment.PAYLOAD_TYPE`,
  :attr:`Report.PAYLOAD_TYPE`) are decoded only from the payload that envelope verification returns.
  ``AuditBatch`` carries its own signed checkpoint (:mod:`protocols.audit`).

Blob chunks are not JSON (base64 would add a third): :func:`encode_chunk` / :func:`decode_chunk` frame them as

    magic b"EFC1" | transfer id, 16 raw bytes | index, u32 big-endian | length, u32 big-endian | data

``length`` must equal the number of bytes that follow and be ``<= limits.max_chunk_bytes``, and ``index <
limits.max_chunks``. The framing detects truncation and extension; the *content* is checked by the
receiver against the per-chunk sha256 list of the signed release metadata.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self

from protocols.audit import AuditHead, AuditRecord, SignedCheckpoint, scan_canonical_records
from protocols.canonical import (
    HEX32_RE,
    MAX_DEPTH,
    MAX_INT,
    JSONStruct,
    ObjectReader,
    canonical_json,
    canonical_text,
    check_int,
    check_number,
    check_str,
    loads_object,
    parse_plain,
)
from protocols.errors import DecodeError, UnknownTypeError, UnsupportedVersionError
from protocols.limits import DEFAULT_LIMITS, DEVICE_ID_RE, MODEL_NAME_RE, VARIANT_RE, Limits

__all__ = [
    "CHUNK_HEADER",
    "CHUNK_MAGIC",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "TARGET_PATH_RE",
    "TOKEN_RE",
    "Ack",
    "Assignment",
    "AuditBatch",
    "BenchResult",
    "Chunk",
    "DesiredModel",
    "DeviceState",
    "FetchRequest",
    "HardwareProfile",
    "Message",
    "ModelInfo",
    "ModelRef",
    "Report",
    "TransferProgress",
    "decode",
    "decode_chunk",
    "decode_upload",
    "encode_chunk",
    "target_path",
]

PROTOCOL_VERSION: Final = 1
"""Protocol major version, the ``v`` of every message and the ``v1`` of every topic."""

TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
"""Short machine words: architecture, CPU features, accelerators, agent version (``x86_64``, ``avx2``,
``cuda:0``, ``0.1.0+g1a2b3c``)."""

METRIC_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""Metric names in reports, e.g. ``ttft_ms``, ``tokens_per_s``."""

ROLLOUT_ID_RE = DEVICE_ID_RE
"""Rollout ids use the device id syntax."""

MODEL_FORMATS: Final = ("gguf", "onnx")
"""File extensions (and formats) of model targets."""

TARGET_PATH_RE = re.compile(
    r"models/[a-z0-9][a-z0-9._-]{0,127}/[1-9][0-9]{0,18}/[a-z0-9][a-z0-9._-]{0,31}\.(?:gguf|onnx)"
)
"""A model's TUF target path ``models/<name>/<version>/<variant>.<gguf|onnx>``."""

MAX_METRICS = 64
"""Most entries in a report's ``metrics``."""

MAX_VERSION = 2**63 - 1
"""Largest model version or assignment generation."""

MAX_CORES = 65535
"""Largest core count a hardware profile may report."""

DEVICE_STATUSES: Final = frozenset({"online", "offline", "draining"})
MODEL_STATES: Final = frozenset({"staged", "active", "previous", "quarantined", "removed"})
REPORT_KINDS: Final = frozenset({"install", "health", "rollback", "refusal", "error"})
REPORT_OUTCOMES: Final = frozenset({"ok", "failed", "refused"})


def target_path(name: str, version: int, variant: str, fmt: str = "gguf") -> str:
    """The TUF target path of a model variant: ``models/<name>/<version>/<variant>.<fmt>``."""
    return f"models/{name}/{version}/{variant}.{fmt}"


def _device(reader: ObjectReader, key: str = "device") -> str:
    return reader.string(key, pattern=DEVICE_ID_RE, max_len=64)


def _name(reader: ObjectReader) -> str:
    return reader.string("name", pattern=MODEL_NAME_RE, max_len=128)


def _variant(reader: ObjectReader) -> str:
    return reader.string("variant", pattern=VARIANT_RE, max_len=32)


def _token(value: object, path: str) -> str:
    return check_str(value, path, max_len=64, pattern=TOKEN_RE)


def _hex_id(value: object, path: str) -> str:
    return check_str(value, path, max_len=32, pattern=HEX32_RE)


def _unique(items: tuple[Any, ...], reader: ObjectReader, key: str) -> None:
    if len(set(items)) != len(items):
        raise DecodeError(f"{reader.path(key)}: items must be unique")


# --- shared parts ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelRef(JSONStruct):
    """A model variant: ``name``, ``version`` (>= 1) and ``variant``."""

    name: str
    version: int
    variant: str

    @property
    def key(self) -> str:
        """``<name>/<version>/<variant>``, the key of :attr:`DeviceState.bench`."""
        return f"{self.name}/{self.version}/{self.variant}"

    @classmethod
    def from_key(cls, key: str, path: str = "key") -> ModelRef:
        """Parse :attr:`key`.

        Raises:
            DecodeError: ``key`` is not ``<name>/<version>/<variant>``.
        """
        parts = check_str(key, path, max_len=200).split("/")
        if len(parts) != 3 or not parts[1].isdigit() or parts[1].startswith("0") or not parts[1].isascii():
            raise DecodeError(f"{path}: {key[:80]!r} is not <name>/<version>/<variant>")
        fields = {"name": parts[0], "version": int(parts[1]), "variant": parts[2]}
        return ModelRef.read(ObjectReader(fields, path=path))

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "version", "variant"}``."""
        return {"name": self.name, "version": self.version, "variant": self.variant}

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse the three fields."""
        return cls(_name(reader), reader.integer("version", lo=1, hi=MAX_VERSION), _variant(reader))


@dataclass(frozen=True, slots=True)
class HardwareProfile(JSONStruct):
    """What a device can run (DESIGN.md §7, hardware-aware variant choice).

    Attributes:
        arch: Machine architecture (``x86_64``, ``aarch64``, ``arm64``).
        cpu_features: CPU flags relevant to inference (``avx2``, ``avx512f``, ``neon``, ``f16c``), unique.
        cores: Logical CPU count, >= 1.
        ram_bytes: Total RAM.
        ram_budget_bytes: RAM the agent may use for models, ``<= ram_bytes``.
        disk_free_bytes: Free space in the state directory.
        accelerators: Usable accelerators (``metal``, ``cuda:0``), unique.
    """

    arch: str
    cpu_features: tuple[str, ...]
    cores: int
    ram_bytes: int
    ram_budget_bytes: int
    disk_free_bytes: int
    accelerators: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field; lists as JSON arrays."""
        return {
            "arch": self.arch,
            "cpu_features": list(self.cpu_features),
            "cores": self.cores,
            "ram_bytes": self.ram_bytes,
            "ram_budget_bytes": self.ram_budget_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "accelerators": list(self.accelerators),
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field; the RAM budget may not exceed the RAM."""
        profile = cls(
            arch=reader.string("arch", pattern=TOKEN_RE, max_len=64),
            cpu_features=reader.array("cpu_features", _token),
            cores=reader.integer("cores", lo=1, hi=MAX_CORES),
            ram_bytes=reader.integer("ram_bytes"),
            ram_budget_bytes=reader.integer("ram_budget_bytes"),
            disk_free_bytes=reader.integer("disk_free_bytes"),
            accelerators=reader.array("accelerators", _token) if reader.present("accelerators") else (),
        )
        _unique(profile.cpu_features, reader, "cpu_features")
        _unique(profile.accelerators, reader, "accelerators")
        if profile.ram_budget_bytes > profile.ram_bytes:
            raise DecodeError(f"{reader.path('ram_budget_bytes')}: larger than ram_bytes")
        return profile


@dataclass(frozen=True, slots=True)
class ModelInfo(JSONStruct):
    """One model variant in a device's registry.

    Attributes:
        name: Model family (:data:`~protocols.limits.MODEL_NAME_RE`).
        variant: Variant (:data:`~protocols.limits.VARIANT_RE`).
        version: Release version, >= 1.
        sha256: Digest of the blob.
        size: Blob size in bytes.
        state: ``staged``, ``active``, ``previous``, ``quarantined`` or ``removed``.
        loaded: Whether it is resident in memory right now.
    """

    name: str
    variant: str
    version: int
    sha256: str
    size: int
    state: str
    loaded: bool

    @property
    def ref(self) -> ModelRef:
        """Name, version and variant."""
        return ModelRef(self.name, self.version, self.variant)

    def to_dict(self) -> dict[str, Any]:
        """Every field."""
        return {
            "name": self.name,
            "variant": self.variant,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "state": self.state,
            "loaded": self.loaded,
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field."""
        return cls(
            name=_name(reader),
            variant=_variant(reader),
            version=reader.integer("version", lo=1, hi=MAX_VERSION),
            sha256=reader.sha256("sha256"),
            size=reader.integer("size"),
            state=reader.choice("state", MODEL_STATES),
            loaded=reader.boolean("loaded"),
        )


@dataclass(frozen=True, slots=True)
class TransferProgress(JSONStruct):
    """A blob download in progress.

    Attributes:
        transfer_id: The transfer (32 hex), as in :class:`FetchRequest`.
        model: The model variant being fetched.
        received_bytes: Bytes received and verified so far, ``<= total_bytes``.
        total_bytes: Length of the blob.
    """

    transfer_id: str
    model: ModelRef
    received_bytes: int
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Every field; ``model`` as an object."""
        return {
            "transfer_id": self.transfer_id,
            "model": self.model.to_dict(),
            "received_bytes": self.received_bytes,
            "total_bytes": self.total_bytes,
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field; received may not exceed total."""
        progress = cls(
            transfer_id=reader.hex_id("transfer_id"),
            model=reader.struct("model", ModelRef),
            received_bytes=reader.integer("received_bytes"),
            total_bytes=reader.integer("total_bytes"),
        )
        if progress.received_bytes > progress.total_bytes:
            raise DecodeError(f"{reader.path('received_bytes')}: larger than total_bytes")
        return progress


@dataclass(frozen=True, slots=True)
class BenchResult(JSONStruct):
    """A measured benchmark of one model variant on the device: ``tokens_per_s`` and ``ttft_ms`` (>= 0)."""

    tokens_per_s: float
    ttft_ms: float

    def to_dict(self) -> dict[str, Any]:
        """``{"tokens_per_s", "ttft_ms"}``."""
        return {"tokens_per_s": self.tokens_per_s, "ttft_ms": self.ttft_ms}

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse both numbers (finite, >= 0; integers become floats)."""
        return cls(tokens_per_s=reader.number("tokens_per_s"), ttft_ms=reader.number("ttft_ms"))


@dataclass(frozen=True, slots=True)
class DesiredModel(JSONStruct):
    """One model variant an assignment wants on the device.

    Attributes:
        name: Model family.
        version: Release version, >= 1.
        variant: Variant.
        target_path: The TUF target, exactly ``models/<name>/<version>/<variant>.<gguf|onnx>``.
        sha256: Digest of the blob (the TUF target must agree).
        length: Blob size in bytes, >= 1 (the TUF target must agree).
    """

    name: str
    version: int
    variant: str
    target_path: str
    sha256: str
    length: int

    @property
    def ref(self) -> ModelRef:
        """Name, version and variant."""
        return ModelRef(self.name, self.version, self.variant)

    def to_dict(self) -> dict[str, Any]:
        """Every field."""
        return {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "target_path": self.target_path,
            "sha256": self.sha256,
            "length": self.length,
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field; the target path must name the same model."""
        model = cls(
            name=_name(reader),
            version=reader.integer("version", lo=1, hi=MAX_VERSION),
            variant=_variant(reader),
            target_path=reader.string("target_path", pattern=TARGET_PATH_RE, max_len=256),
            sha256=reader.sha256("sha256"),
            length=reader.integer("length", lo=1),
        )
        if model.target_path not in {target_path(model.name, model.version, model.variant, f) for f in MODEL_FORMATS}:
            raise DecodeError(f"{reader.path('target_path')}: does not name {model.ref.key}")
        return model


# --- messages -------------------------------------------------------------------------------------------


class Message(JSONStruct):
    """Base of the control messages: adds ``type``/``v`` to the object and checks them on the way in."""

    __slots__ = ()
    TYPE: ClassVar[str]

    def body(self) -> dict[str, Any]:
        """The message's own fields (without ``type`` and ``v``)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """``{"type": TYPE, "v": 1, **fields}``."""
        return {"type": self.TYPE, "v": PROTOCOL_VERSION, **self.body()}

    @classmethod
    def from_dict(cls, data: object, *, limits: Limits = DEFAULT_LIMITS) -> Self:
        """Check ``v`` and ``type`` (which must be this class's), then parse every field.

        Raises:
            UnsupportedVersionError: another protocol major version.
            UnknownTypeError: a type no message has.
            DecodeError: another known message type, or an invalid field.
        """
        reader = ObjectReader(data, limits=limits)
        kind = _check_header(reader)
        if kind != cls.TYPE:
            raise DecodeError(f"type: expected {cls.TYPE!r}, got {kind!r}")
        return cls.read(reader)

    @classmethod
    def from_bytes(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Self:
        """Decode bytes that must hold this message type (e.g. a verified envelope's payload).

        Raises:
            DecodeError: as :func:`decode`, or another message type.
        """
        return cls.from_dict(loads_object(data, max_bytes=limits.max_message_bytes), limits=limits)

    def encode(self, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
        """Canonical JSON bytes of the message.

        Raises:
            ValueError: the message is invalid or larger than ``limits.max_message_bytes``: the receiver
                would reject it.
        """
        data = self.to_dict()
        try:
            type(self).from_dict(data, limits=limits)
        except DecodeError as exc:
            raise ValueError(f"refusing to encode an invalid {self.TYPE} message: {exc}") from exc
        encoded = canonical_json(data, allow_floats=True)
        if len(encoded) > limits.max_message_bytes:
            raise ValueError(f"{self.TYPE} message is {len(encoded)} bytes, limit {limits.max_message_bytes}")
        return encoded


def _check_header(reader: ObjectReader) -> str:
    version = reader.integer("v")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersionError(f"v: protocol major version {version}, this side speaks {PROTOCOL_VERSION}")
    kind = reader.string("type", max_len=64)
    if kind not in MESSAGE_TYPES:
        raise UnknownTypeError(f"type: unknown message type {kind[:64]!r}")
    return kind


@dataclass(frozen=True, slots=True)
class DeviceState(Message):
    """Device → retained ``.../state``. The MQTT last will is a prebuilt one with ``status="offline"``.

    Attributes:
        device: Device id.
        status: ``online``, ``offline`` (the last will, or a clean shutdown) or ``draining``.
        ts_ms: When the state was built.
        agent_version: The agent's version (:data:`TOKEN_RE`).
        hardware: The hardware profile.
        models: The registry's model variants (unique by name, version and variant).
        heartbeat: Counter bumped at every publish since the agent started; with ``ts_ms`` it shows liveness.
        audit_head: The device's audit log head, so the controller can show the audit lag (optional).
        transfers: Downloads in progress (optional, default none).
        bench: Measured performance per :attr:`ModelRef.key` (optional, default none).
    """

    TYPE: ClassVar[str] = "device_state"

    device: str
    status: str
    ts_ms: int
    agent_version: str
    hardware: HardwareProfile
    models: tuple[ModelInfo, ...]
    heartbeat: int
    audit_head: AuditHead | None = None
    transfers: tuple[TransferProgress, ...] = ()
    bench: Mapping[str, BenchResult] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """Every field; ``audit_head`` left out when None."""
        out: dict[str, Any] = {
            "device": self.device,
            "status": self.status,
            "ts_ms": self.ts_ms,
            "agent_version": self.agent_version,
            "hardware": self.hardware.to_dict(),
            "models": [m.to_dict() for m in self.models],
            "heartbeat": self.heartbeat,
            "transfers": [t.to_dict() for t in self.transfers],
            "bench": {key: result.to_dict() for key, result in self.bench.items()},
        }
        if self.audit_head is not None:
            out["audit_head"] = self.audit_head.to_dict()
        return out

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field."""
        models = reader.structs("models", ModelInfo)
        _unique(tuple(m.ref for m in models), reader, "models")
        bench: dict[str, BenchResult] = {}
        if reader.present("bench"):
            raw = reader.mapping("bench")
            for key, value in raw.items():
                path = f"{reader.path('bench')}.{key[:80]}"
                ModelRef.from_key(key, path)
                bench[key] = BenchResult.read(ObjectReader(value, path=path, limits=reader.limits))
        transfers = reader.structs("transfers", TransferProgress) if reader.present("transfers") else ()
        _unique(tuple(t.transfer_id for t in transfers), reader, "transfers")
        return cls(
            device=_device(reader),
            status=reader.choice("status", DEVICE_STATUSES),
            ts_ms=reader.integer("ts_ms"),
            agent_version=reader.string("agent_version", pattern=TOKEN_RE, max_len=64),
            hardware=reader.struct("hardware", HardwareProfile),
            models=models,
            heartbeat=reader.integer("heartbeat"),
            audit_head=reader.struct("audit_head", AuditHead) if reader.present("audit_head") else None,
            transfers=transfers,
            bench=bench,
        )


@dataclass(frozen=True, slots=True)
class Assignment(Message):
    """Controller → retained ``.../assign``: the device's desired models (DESIGN.md §4).

    The payload of a DSSE envelope signed by the assignment key. A device applies an assignment only if its
    ``generation`` is higher than the last one it applied (else ``RollbackError``, checked by the caller).

    Attributes:
        device: The device it is for (must be the receiving device).
        generation: Monotonic per device, >= 1.
        issued_ts_ms: When the controller issued it.
        models: The desired model variants (unique target paths); empty means "no models".
        rollout_id: The rollout that produced it, if any (device id syntax).
    """

    TYPE: ClassVar[str] = "assignment"
    PAYLOAD_TYPE: ClassVar[str] = "application/vnd.edgefleet.assignment.v1+json"

    device: str
    generation: int
    issued_ts_ms: int
    models: tuple[DesiredModel, ...]
    rollout_id: str | None = None

    def body(self) -> dict[str, Any]:
        """Every field; ``rollout_id`` left out when None."""
        out: dict[str, Any] = {
            "device": self.device,
            "generation": self.generation,
            "issued_ts_ms": self.issued_ts_ms,
            "models": [m.to_dict() for m in self.models],
        }
        if self.rollout_id is not None:
            out["rollout_id"] = self.rollout_id
        return out

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field."""
        models = reader.structs("models", DesiredModel)
        _unique(tuple(m.target_path for m in models), reader, "models")
        return cls(
            device=_device(reader),
            generation=reader.integer("generation", lo=1, hi=MAX_VERSION),
            issued_ts_ms=reader.integer("issued_ts_ms"),
            models=models,
            rollout_id=(
                reader.string("rollout_id", pattern=ROLLOUT_ID_RE, max_len=64) if reader.present("rollout_id") else None
            ),
        )


@dataclass(frozen=True, slots=True)
class Report(Message):
    """Device → ``.../report``: an install, health-check, rollback, refusal or error report.

    The payload of a DSSE envelope signed by the device key. Sits in the device's outbox until acked
    (:class:`Ack`), so it may arrive more than once: ``report_id`` makes handling idempotent.

    Attributes:
        report_id: Random 128-bit id (32 hex) chosen by the device.
        device: The reporting device.
        ts_ms: When it happened.
        kind: ``install``, ``health``, ``rollback``, ``refusal`` or ``error``.
        outcome: ``ok``, ``failed`` or ``refused``.
        reason: Human-readable explanation (may be empty), ``<= limits.max_string`` characters.
        generation: The assignment generation it concerns, if any (>= 1).
        model: The model variant it concerns, if any.
        metrics: Measurements (``ttft_ms``, ``tokens_per_s``, ...): at most :data:`MAX_METRICS` names
            (:data:`METRIC_RE`) to finite numbers.
    """

    TYPE: ClassVar[str] = "report"
    PAYLOAD_TYPE: ClassVar[str] = "application/vnd.edgefleet.report.v1+json"

    report_id: str
    device: str
    ts_ms: int
    kind: str
    outcome: str
    reason: str = ""
    generation: int | None = None
    model: ModelRef | None = None
    metrics: Mapping[str, float | int] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """Every field; ``generation`` and ``model`` left out when None."""
        out: dict[str, Any] = {
            "report_id": self.report_id,
            "device": self.device,
            "ts_ms": self.ts_ms,
            "kind": self.kind,
            "outcome": self.outcome,
            "reason": self.reason,
            "metrics": dict(self.metrics),
        }
        if self.generation is not None:
            out["generation"] = self.generation
        if self.model is not None:
            out["model"] = self.model.to_dict()
        return out

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field; metric values keep their JSON type (int or float)."""
        metrics: dict[str, float | int] = {}
        if reader.present("metrics"):
            for key, value in reader.mapping("metrics", max_items=MAX_METRICS).items():
                path = f"{reader.path('metrics')}.{key[:80]}"
                check_str(key, path, max_len=64, pattern=METRIC_RE)
                if isinstance(value, int) and not isinstance(value, bool):
                    metrics[key] = check_int(value, path, lo=-MAX_INT, hi=MAX_INT)
                else:
                    metrics[key] = check_number(value, path, lo=None)
        return cls(
            report_id=reader.hex_id("report_id"),
            device=_device(reader),
            ts_ms=reader.integer("ts_ms"),
            kind=reader.choice("kind", REPORT_KINDS),
            outcome=reader.choice("outcome", REPORT_OUTCOMES),
            reason=reader.string("reason") if reader.present("reason") else "",
            generation=reader.integer("generation", lo=1, hi=MAX_VERSION) if reader.present("generation") else None,
            model=reader.struct("model", ModelRef) if reader.present("model") else None,
            metrics=metrics,
        )


@dataclass(frozen=True, slots=True)
class AuditBatch(Message):
    """Device → ``.../audit``: consecutive audit records of one epoch and a signed checkpoint.

    Decoding checks syntax and that every record is of ``epoch``; the chain itself, the checkpoint signature
    and the link to what was accepted before are checked by :class:`protocols.audit.ChainVerifier`.
    ``records`` may be empty: a checkpoint alone re-confirms the head.

    Attributes:
        device: The uploading device.
        epoch: The records' epoch.
        records: At most ``limits.max_audit_batch`` records, in seq order.
        checkpoint: The device's signed checkpoint of the last record.
    """

    TYPE: ClassVar[str] = "audit_batch"

    device: str
    epoch: int
    records: tuple[AuditRecord, ...]
    checkpoint: SignedCheckpoint

    def body(self) -> dict[str, Any]:
        """Every field."""
        return {
            "device": self.device,
            "epoch": self.epoch,
            "records": [r.to_dict() for r in self.records],
            "checkpoint": self.checkpoint.to_dict(),
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field; every record must be of ``epoch``."""
        batch = cls(
            device=_device(reader),
            epoch=reader.integer("epoch"),
            records=reader.structs("records", AuditRecord, max_items=reader.limits.max_audit_batch),
            checkpoint=reader.struct("checkpoint", SignedCheckpoint),
        )
        for index, record in enumerate(batch.records):
            if record.epoch != batch.epoch:
                raise DecodeError(f"{reader.path('records')}[{index}].epoch: not the batch's epoch {batch.epoch}")
        return batch

    @classmethod
    def decode_canonical(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Self | None:
        """The batch in ``data`` when ``data`` is its canonical JSON and :func:`decode` accepts it, else None.

        The controller's fast path for uploads (the agent encodes every message with
        :func:`~protocols.canonical.canonical_json`). The records, nearly all of an upload, are read from the text
        by :func:`~protocols.audit.scan_canonical_records`, which checks every one and hashes its received bytes;
        the rest (the upload with an empty ``records`` array) is parsed by
        :func:`~protocols.canonical.parse_plain`, goes through the same reader as :meth:`read`, and must
        re-encode to exactly its text. Every piece is then valid canonical JSON and together they are exactly the
        received text, which JSON parses one way only: duplicate keys, key order, whitespace and escapes are
        ruled out, and the hashed bytes are the received ones. The result equals what :func:`decode` returns; on
        None, call :func:`decode`, which accepts a valid non-canonical encoding or names what is wrong.
        """
        if len(data) > limits.max_message_bytes:
            return None
        try:
            text = bytes(data).decode("utf-8")
        except ValueError:
            return None
        # The top-level "records" member: keys sort "checkpoint", "device", "epoch", "records", so the first
        # occurrence is it, unless the checkpoint holds that text, which the reader below then refuses.
        opening = text.find('"records":[')
        if opening < 0:
            return None
        start = opening + len('"records":[')
        scanned = scan_canonical_records(text, start, limits=limits)
        if scanned is None:
            return None
        records, end = scanned
        rest = text[:start] + text[end - 1 :]  # the upload with "records":[]
        obj = parse_plain(rest)
        if type(obj) is not dict or obj.get("records") != []:
            return None
        reader = ObjectReader(obj, limits=limits)
        try:
            if _check_header(reader) != cls.TYPE:
                return None
            device, epoch = _device(reader), reader.integer("epoch")
            checkpoint = reader.struct("checkpoint", SignedCheckpoint)
            # Each member encoded once: its nesting bounded without a walk (a value with n containers nests at most
            # n deep below the top level), the whole re-encoded as the canonical encoder would (keys sorted).
            before: list[str] = []  # the members that sort before "records", and those after it
            after: list[str] = []
            for key in sorted(obj):
                if key == "records":
                    continue
                value = canonical_text(obj[key])
                if value.count("{") + value.count("[") > MAX_DEPTH - 1:
                    return None
                (before if key < "records" else after).append(f"{canonical_text(key)}:{value}")
            # The array read above is the top-level one only if the members before it are all that precede it
            # (a "records" member inside the checkpoint, which the reader tolerates, could come first).
            head = "{" + "".join(member + "," for member in before) + '"records":['
            if head != text[:start] or rest != head + "]" + "".join("," + member for member in after) + "}":
                return None
        except (DecodeError, ValueError, TypeError, RecursionError):  # the encoder's recursion can run out
            return None
        if records and records[0].epoch != epoch:
            return None
        return cls(device=device, epoch=epoch, records=tuple(records), checkpoint=checkpoint)


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Controller → ``.../ack``: what the controller has durably stored, so the device may drop it.

    Attributes:
        device: The device it is for.
        ts_ms: When the controller sent it.
        report_ids: Reports stored (or already stored: acks are idempotent), unique.
        audit: The audit head stored, if this acks an audit batch: the device deletes records up to
            ``seq`` only when its own record there has this ``hash``.
        duplicate: How many of the acked items the controller had already (optional, informational).
    """

    TYPE: ClassVar[str] = "ack"

    device: str
    ts_ms: int
    report_ids: tuple[str, ...] = ()
    audit: AuditHead | None = None
    duplicate: int | None = None

    def body(self) -> dict[str, Any]:
        """Every field; ``audit`` and ``duplicate`` left out when None."""
        out: dict[str, Any] = {"device": self.device, "ts_ms": self.ts_ms, "report_ids": list(self.report_ids)}
        if self.audit is not None:
            out["audit"] = self.audit.to_dict()
        if self.duplicate is not None:
            out["duplicate"] = self.duplicate
        return out

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field."""
        report_ids = reader.array("report_ids", _hex_id) if reader.present("report_ids") else ()
        _unique(report_ids, reader, "report_ids")
        return cls(
            device=_device(reader),
            ts_ms=reader.integer("ts_ms"),
            report_ids=report_ids,
            audit=reader.struct("audit", AuditHead) if reader.present("audit") else None,
            duplicate=reader.integer("duplicate") if reader.present("duplicate") else None,
        )


@dataclass(frozen=True, slots=True)
class FetchRequest(Message):
    """Device → ``.../fetch``: a window of chunks of one blob, answered on ``.../chunk`` (:func:`encode_chunk`).

    Attributes:
        device: The requesting device.
        transfer_id: Random 128-bit id (32 hex) naming this download; echoed in every chunk frame.
        target_path: The TUF target (``models/<name>/<version>/<variant>.<gguf|onnx>``).
        sha256: The blob's digest from verified TUF metadata (the server checks it names the same blob).
        chunk_size: Chunk size in bytes, ``1..limits.max_chunk_bytes`` (from the target's metadata).
        indices: The requested window: unique chunk indices below ``limits.max_chunks``, at least one.
    """

    TYPE: ClassVar[str] = "fetch_request"

    device: str
    transfer_id: str
    target_path: str
    sha256: str
    chunk_size: int
    indices: tuple[int, ...]

    def body(self) -> dict[str, Any]:
        """Every field."""
        return {
            "device": self.device,
            "transfer_id": self.transfer_id,
            "target_path": self.target_path,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "indices": list(self.indices),
        }

    @classmethod
    def read(cls, reader: ObjectReader) -> Self:
        """Parse every field."""
        max_index = reader.limits.max_chunks - 1
        indices = reader.array("indices", lambda value, path: check_int(value, path, lo=0, hi=max_index))
        if not indices:
            raise DecodeError(f"{reader.path('indices')}: at least one index")
        _unique(indices, reader, "indices")
        return cls(
            device=_device(reader),
            transfer_id=reader.hex_id("transfer_id"),
            target_path=reader.string("target_path", pattern=TARGET_PATH_RE, max_len=256),
            sha256=reader.sha256("sha256"),
            chunk_size=reader.integer("chunk_size", lo=1, hi=reader.limits.max_chunk_bytes),
            indices=indices,
        )


MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = {
    cls.TYPE: cls for cls in (DeviceState, Assignment, Report, AuditBatch, Ack, FetchRequest)
}
"""Every control message class by its ``type``."""


def decode(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode any control message, dispatching on ``type``.

    Args:
        data: The encoded message (an MQTT payload, or a verified envelope's payload).
        limits: Bounds to enforce.

    Returns:
        The message, fully validated.

    Raises:
        UnsupportedVersionError: another protocol major version.
        UnknownTypeError: an unknown ``type``.
        DecodeError: oversized, not strict JSON, or an invalid field (named in the message).
    """
    reader = ObjectReader(loads_object(data, max_bytes=limits.max_message_bytes), limits=limits)
    return MESSAGE_TYPES[_check_header(reader)].read(reader)


def decode_upload(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """:func:`decode` for an audit topic: the same result, faster for a canonical :class:`AuditBatch`.

    Tries :meth:`AuditBatch.decode_canonical` first and falls back to :func:`decode` (so any other message, a
    non-canonical encoding or an invalid one is handled, and its error named, exactly as there).

    Raises:
        UnsupportedVersionError, UnknownTypeError, DecodeError: as :func:`decode`.
    """
    batch = AuditBatch.decode_canonical(data, limits=limits)
    return batch if batch is not None else decode(data, limits=limits)


# --- blob chunks ----------------------------------------------------------------------------------------

CHUNK_MAGIC: Final = b"EFC1"
"""First four bytes of every chunk frame (edgefleet chunk, framing version 1)."""

CHUNK_HEADER: Final = struct.Struct(">4s16sII")
"""Magic, transfer id (16 raw bytes), index (u32), length (u32); big-endian; 28 bytes."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One decoded chunk frame: ``data`` is chunk ``index`` of transfer ``transfer_id`` (32 hex)."""

    transfer_id: str
    index: int
    data: bytes


def encode_chunk(transfer_id: str, index: int, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Frame one chunk.

    Raises:
        ValueError: a transfer id that is not 32 hex, an index outside ``[0, limits.max_chunks)`` or data
            larger than ``limits.max_chunk_bytes``.
    """
    if HEX32_RE.fullmatch(transfer_id) is None:
        raise ValueError("transfer_id must be 32 lower-case hex characters")
    if not 0 <= index < limits.max_chunks:
        raise ValueError(f"chunk index {index} outside [0, {limits.max_chunks})")
    if len(data) > limits.max_chunk_bytes:
        raise ValueError(f"chunk of {len(data)} bytes, limit {limits.max_chunk_bytes}")
    return CHUNK_HEADER.pack(CHUNK_MAGIC, bytes.fromhex(transfer_id), index, len(data)) + data


def decode_chunk(frame: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Chunk:
    """Parse one chunk frame.

    The framing guarantees structure only: a changed transfer id or index decodes to another chunk, which
    the receiver does not expect or whose sha256 does not match; changed data is caught by the per-chunk
    sha256. Truncation, extension or a changed length always fail here.

    Raises:
        DecodeError: bad magic, short header, length not equal to the bytes that follow, too much data,
            or an index outside ``[0, limits.max_chunks)``.
    """
    if len(frame) < CHUNK_HEADER.size:
        raise DecodeError(f"chunk frame of {len(frame)} bytes is shorter than its {CHUNK_HEADER.size}-byte header")
    magic, raw_id, index, length = CHUNK_HEADER.unpack_from(frame)
    if magic != CHUNK_MAGIC:
        raise DecodeError(f"chunk frame magic {magic!r}, expected {CHUNK_MAGIC!r}")
    if length > limits.max_chunk_bytes:
        raise DecodeError(f"chunk length {length}, limit {limits.max_chunk_bytes}")
    if length != len(frame) - CHUNK_HEADER.size:
        raise DecodeError(f"chunk length field {length}, but {len(frame) - CHUNK_HEADER.size} bytes follow")
    if index >= limits.max_chunks:
        raise DecodeError(f"chunk index {index} outside [0, {limits.max_chunks})")
    return Chunk(transfer_id=raw_id.hex(), index=index, data=bytes(frame[CHUNK_HEADER.size :]))
