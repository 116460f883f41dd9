"""Unit tests for protocols/messages.py: round trips, strict field validation, versioning and chunk framing."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.audit import (
    KIND_EPOCH_START,
    KIND_GAP,
    KIND_RE,
    AuditHead,
    AuditRecord,
    Checkpoint,
    make_record,
    sign_checkpoint,
    start_epoch,
)
from protocols.canonical import MAX_INT, MIN_INT, canonical_json
from protocols.errors import DecodeError, UnknownTypeError, UnsupportedVersionError
from protocols.keys import generate_private_key
from protocols.limits import DEFAULT_LIMITS, DEVICE_ID_RE, MODEL_NAME_RE, VARIANT_RE, Limits
from protocols.messages import (
    CHUNK_HEADER,
    MESSAGE_TYPES,
    METRIC_RE,
    MODEL_FORMATS,
    PROTOCOL_VERSION,
    TOKEN_RE,
    Ack,
    Assignment,
    AuditBatch,
    BenchResult,
    DesiredModel,
    DeviceState,
    FetchRequest,
    HardwareProfile,
    Message,
    ModelInfo,
    ModelRef,
    Report,
    TransferProgress,
    decode,
    decode_chunk,
    encode_chunk,
    target_path,
)

pytestmark = pytest.mark.unit

QUICK = settings(max_examples=40, deadline=None)
"""Most properties here are cheap to state; 40 examples each keep the file at a few seconds."""

KEY = generate_private_key()

# --- strategies -----------------------------------------------------------------------------------------

devices = st.from_regex(DEVICE_ID_RE, fullmatch=True)
names = st.from_regex(MODEL_NAME_RE, fullmatch=True)
variants = st.from_regex(VARIANT_RE, fullmatch=True)
tokens = st.from_regex(TOKEN_RE, fullmatch=True)
sha256s = st.binary(min_size=32, max_size=32).map(bytes.hex)
hex_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
u63 = st.integers(0, MAX_INT)
versions = st.integers(1, MAX_INT)
timestamps = st.integers(0, 2**50) | u63
measurements = st.floats(min_value=0.0, max_value=1e12, allow_nan=False)
model_refs = st.builds(ModelRef, names, versions, variants)


@st.composite
def hardware_profiles(draw: st.DrawFn) -> HardwareProfile:
    """Valid hardware profiles (budget never above RAM, unique feature lists)."""
    ram = draw(u63)
    return HardwareProfile(
        arch=draw(tokens),
        cpu_features=tuple(draw(st.lists(tokens, max_size=6, unique=True))),
        cores=draw(st.integers(1, 512)),
        ram_bytes=ram,
        ram_budget_bytes=draw(st.integers(0, ram)),
        disk_free_bytes=draw(u63),
        accelerators=tuple(draw(st.lists(tokens, max_size=3, unique=True))),
    )


model_infos = st.builds(
    ModelInfo,
    name=names,
    variant=variants,
    version=versions,
    sha256=sha256s,
    size=u63,
    state=st.sampled_from(["staged", "active", "previous", "quarantined", "removed"]),
    loaded=st.booleans(),
)


@st.composite
def transfers(draw: st.DrawFn) -> TransferProgress:
    """Valid transfer progress entries (received never above total)."""
    total = draw(u63)
    return TransferProgress(draw(hex_ids), draw(model_refs), draw(st.integers(0, total)), total)


@st.composite
def device_states(draw: st.DrawFn) -> DeviceState:
    """Valid device states, with and without every optional part."""
    models = draw(st.lists(model_infos, max_size=4, unique_by=lambda m: m.ref))
    bench_refs = draw(st.lists(model_refs, max_size=3, unique_by=lambda r: r.key))
    return DeviceState(
        device=draw(devices),
        status=draw(st.sampled_from(["online", "offline", "draining"])),
        ts_ms=draw(timestamps),
        agent_version=draw(tokens),
        hardware=draw(hardware_profiles()),
        models=tuple(models),
        heartbeat=draw(u63),
        audit_head=draw(st.none() | st.builds(AuditHead, u63, u63, sha256s)),
        transfers=tuple(draw(st.lists(transfers(), max_size=2, unique_by=lambda t: t.transfer_id))),
        bench={ref.key: BenchResult(draw(measurements), draw(measurements)) for ref in bench_refs},
    )


@st.composite
def desired_models(draw: st.DrawFn) -> DesiredModel:
    """Valid desired models whose target path names the same model."""
    name, version, variant = draw(names), draw(versions), draw(variants)
    path = target_path(name, version, variant, draw(st.sampled_from(MODEL_FORMATS)))
    return DesiredModel(name, version, variant, path, draw(sha256s), draw(st.integers(1, MAX_INT)))


assignments = st.builds(
    Assignment,
    device=devices,
    generation=versions,
    issued_ts_ms=timestamps,
    models=st.lists(desired_models(), max_size=4, unique_by=lambda m: m.target_path).map(tuple),
    rollout_id=st.none() | devices,
)

metric_values = st.integers(-MAX_INT, MAX_INT) | st.floats(allow_nan=False, allow_infinity=False)
reports = st.builds(
    Report,
    report_id=hex_ids,
    device=devices,
    ts_ms=timestamps,
    kind=st.sampled_from(["install", "health", "rollback", "refusal", "error"]),
    outcome=st.sampled_from(["ok", "failed", "refused"]),
    reason=st.text(max_size=40),
    generation=st.none() | versions,
    model=st.none() | model_refs,
    metrics=st.dictionaries(st.from_regex(METRIC_RE, fullmatch=True), metric_values, max_size=5),
)

audit_scalars = st.none() | st.booleans() | st.integers(MIN_INT, MAX_INT) | st.text(max_size=10)
audit_data = st.dictionaries(
    st.text(max_size=8),
    st.recursive(audit_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    max_size=4,
)
record_kinds = st.from_regex(KIND_RE, fullmatch=True).filter(lambda k: k not in (KIND_GAP, KIND_EPOCH_START))
actors = st.sampled_from(["agent", "controller", "uid:1000", "token:3f2a9c"])


@st.composite
def audit_batches(draw: st.DrawFn) -> AuditBatch:
    """Valid audit batches: a real chain (from seq 0 or from a later head) and its signed checkpoint."""
    device, epoch = draw(devices), draw(st.integers(0, 2**40))
    count = draw(st.integers(0, 4))
    records: list[AuditRecord] = []
    prev: AuditRecord | AuditHead
    if draw(st.booleans()):
        prev = start_epoch(device, epoch, previous=None, reason="first start", actor="agent", ts_ms=draw(timestamps))
        records.append(prev)
    else:
        prev = AuditHead(epoch, draw(st.integers(0, 2**40)), draw(sha256s))
    for _ in range(count):
        record = make_record(prev, draw(record_kinds), draw(actors), draw(audit_data), draw(timestamps))
        records.append(record)
        prev = record
    head = prev if isinstance(prev, AuditHead) else prev.head
    checkpoint = sign_checkpoint(Checkpoint(device, epoch, head.seq, head.hash, draw(timestamps)), KEY)
    return AuditBatch(device, epoch, tuple(records), checkpoint)


acks = st.builds(
    Ack,
    device=devices,
    ts_ms=timestamps,
    report_ids=st.lists(hex_ids, max_size=4, unique=True).map(tuple),
    audit=st.none() | st.builds(AuditHead, u63, u63, sha256s),
    duplicate=st.none() | u63,
)

fetch_requests = st.builds(
    FetchRequest,
    device=devices,
    transfer_id=hex_ids,
    target_path=st.builds(target_path, names, versions, variants, st.sampled_from(MODEL_FORMATS)),
    sha256=sha256s,
    chunk_size=st.integers(1, DEFAULT_LIMITS.max_chunk_bytes),
    indices=st.lists(st.integers(0, DEFAULT_LIMITS.max_chunks - 1), min_size=1, max_size=8, unique=True).map(tuple),
)

messages: st.SearchStrategy[Message] = st.one_of(
    device_states(), assignments, reports, audit_batches(), acks, fetch_requests
)

# --- helpers --------------------------------------------------------------------------------------------

MAPS = {"metrics", "bench"}  # objects used as maps: their keys are data, not schema fields
FREE = {"data"}  # free-form JSON (audit record data): replaced as a whole, never descended into
OPTIONAL = {
    "audit_head",
    "transfers",
    "bench",
    "rollout_id",
    "reason",
    "generation",
    "model",
    "metrics",
    "report_ids",
    "audit",
    "duplicate",
}


def nodes(obj: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every schema node below the top level (fields, list items, map values) with its path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not path and key in ("type", "v"):
                continue
            yield (*path, key), value
            if key not in FREE:
                yield from nodes(value, (*path, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield (*path, index), value
            yield from nodes(value, (*path, index))


def bad_values(path: tuple[str | int, ...], value: Any) -> list[Any]:
    """Replacements for ``value`` that no field of its kind accepts: another type, or out of range."""
    in_metrics = len(path) >= 2 and path[-2] == "metrics"
    long_string = "x" * (DEFAULT_LIMITS.max_string + 1)
    if isinstance(value, bool):
        return [1, "true"]
    if isinstance(value, int):
        return ["1", True, MAX_INT + 1] + ([] if in_metrics else [1.5, -1])
    if isinstance(value, float):
        return ["1.5", True] + ([] if in_metrics else [-1.0])
    if isinstance(value, str):
        return [7, True, long_string]
    if isinstance(value, list):
        return ["x", 7]
    return ["x", [1], 7]


def replace(obj: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """A deep copy of ``obj`` with the node at ``path`` replaced."""
    out = copy.deepcopy(obj)
    target = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


def dumps(obj: Any) -> bytes:
    """Plain JSON bytes (floats allowed), as a peer could send."""
    return json.dumps(obj).encode("utf-8")


def path_text(path: tuple[str | int, ...]) -> str:
    """The dotted path the decoder names in its errors."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def add_extras(obj: Any, path: tuple[str | int, ...] = ()) -> Any:
    """A copy of ``obj`` with an unknown field added to every schema object."""
    if isinstance(obj, dict):
        out = {
            key: value if key in FREE else add_extras(value, (*path, key)) if key not in MAPS else value
            for key, value in obj.items()
        }
        if path and path[-1] in MAPS:
            return out
        out["x_future_field"] = {"nested": [1, 2.5, "three"]}
        return out
    if isinstance(obj, list):
        return [add_extras(value, (*path, index)) for index, value in enumerate(obj)]
    return obj


# --- control messages -----------------------------------------------------------------------------------


@QUICK
@given(messages)
def test_round_trip(message: Message) -> None:
    """Every message decodes from its encoding to an equal value, via decode() and its own class."""
    data = message.encode()
    assert decode(data) == message
    assert type(message).from_bytes(data) == message
    assert type(message).from_dict(message.to_dict()) == message


@QUICK
@given(messages)
def test_encoding_is_canonical(message: Message) -> None:
    """The encoding carries type and v and is canonical JSON (re-encoding the parsed bytes is identical)."""
    data = message.encode()
    parsed = json.loads(data)
    assert parsed["type"] == message.TYPE
    assert parsed["v"] == PROTOCOL_VERSION
    assert canonical_json(parsed, allow_floats=True) == data


@settings(max_examples=150, deadline=None)
@given(messages, st.data())
def test_any_field_wrong_type_or_out_of_range_rejected(message: Message, data: st.DataObject) -> None:
    """Replacing any single field (or list item) with a wrong type or out-of-range value fails, naming it."""
    obj = message.to_dict()
    path, value = data.draw(st.sampled_from(list(nodes(obj))), label="field")
    bad = data.draw(st.sampled_from(bad_values(path, value)), label="bad value")
    with pytest.raises(DecodeError) as caught:
        decode(dumps(replace(obj, path, bad)))
    assert caught.type is DecodeError
    assert path_text(path)[:60] in str(caught.value)


@QUICK
@given(messages, st.data())
def test_missing_required_field_rejected(message: Message, data: st.DataObject) -> None:
    """Removing any required top-level field (type and v included) fails with DecodeError."""
    obj = message.to_dict()
    key = data.draw(st.sampled_from(sorted(set(obj) - OPTIONAL)))
    del obj[key]
    with pytest.raises(DecodeError, match=key):
        decode(dumps(obj))


@QUICK
@given(messages, st.text(max_size=30).filter(lambda t: t not in MESSAGE_TYPES))
def test_unknown_type_rejected(message: Message, kind: str) -> None:
    """A message whose type no class has is rejected with UnknownTypeError."""
    obj = {**message.to_dict(), "type": kind}
    with pytest.raises(UnknownTypeError):
        decode(dumps(obj))
    with pytest.raises(UnknownTypeError):
        type(message).from_dict(obj)


@QUICK
@given(messages, st.integers(0, MAX_INT).filter(lambda v: v != PROTOCOL_VERSION), st.text(max_size=10))
def test_other_major_version_rejected(message: Message, version: int, kind: str) -> None:
    """Another protocol major version is rejected with UnsupportedVersionError, whatever its type."""
    with pytest.raises(UnsupportedVersionError):
        decode(dumps({**message.to_dict(), "v": version}))
    with pytest.raises(UnsupportedVersionError):
        decode(dumps({**message.to_dict(), "v": version, "type": kind}))


@pytest.mark.parametrize("version", [True, "1", 1.0, None, [1]])
def test_version_must_be_an_integer(version: object) -> None:
    """A v that is not an integer (true, "1", 1.0, null) is a DecodeError, not a version mismatch."""
    obj = {**Ack(device="d1", ts_ms=1).to_dict(), "v": version}
    with pytest.raises(DecodeError) as caught:
        decode(dumps(obj))
    assert caught.type is DecodeError


@QUICK
@given(messages)
def test_known_but_other_type_rejected_by_class(message: Message) -> None:
    """A class refuses a message of another known type (an Assignment decoder never returns a Report)."""
    other = next(cls for cls in MESSAGE_TYPES.values() if cls is not type(message))
    with pytest.raises(DecodeError, match="expected"):
        other.from_bytes(message.encode())


@QUICK
@given(messages)
def test_unknown_fields_tolerated(message: Message) -> None:
    """Unknown extra fields in every object of a message are ignored."""
    assert decode(dumps(add_extras(message.to_dict()))) == message


@QUICK
@given(messages)
def test_oversized_input_rejected(message: Message) -> None:
    """Input larger than max_message_bytes is rejected before parsing, even if valid."""
    data = message.encode()
    assert decode(data, limits=Limits(max_message_bytes=len(data))) == message
    with pytest.raises(DecodeError, match="limit"):
        decode(data, limits=Limits(max_message_bytes=len(data) - 1))
    padded = dumps({**message.to_dict(), "pad": "x" * DEFAULT_LIMITS.max_message_bytes})
    with pytest.raises(DecodeError, match="limit"):
        decode(padded)


@QUICK
@given(messages, st.data())
def test_duplicate_keys_rejected(message: Message, data: st.DataObject) -> None:
    """A message with any top-level key repeated is rejected."""
    encoded = message.encode()
    key = data.draw(st.sampled_from(sorted(message.to_dict())))
    tampered = b"{" + canonical_json({key: None})[1:-1] + b"," + encoded[1:]
    with pytest.raises(DecodeError, match="duplicate"):
        decode(tampered)


def valid_state() -> DeviceState:
    """A small valid device state used by the cross-field tests."""
    return DeviceState(
        device="edge-01",
        status="online",
        ts_ms=1_700_000_000_000,
        agent_version="0.1.0",
        hardware=HardwareProfile("x86_64", ("avx2",), 4, 8 << 30, 6 << 30, 100 << 30),
        models=(ModelInfo("smollm2-135m", "q4_0", 3, "a" * 64, 100, "active", True),),
        heartbeat=7,
        bench={"smollm2-135m/3/q4_0": BenchResult(41.5, 120.0)},
    )


def edited(message: Message, path: tuple[str | int, ...], value: Any) -> bytes:
    """The message's encoding with one node replaced."""
    return dumps(replace(message.to_dict(), path, value))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("hardware", "ram_budget_bytes"), 9 << 30),
        (("hardware", "cpu_features"), ["avx2", "avx2"]),
        (("hardware", "cores"), 0),
        (("device",), "Edge-01"),
        (("device",), "edge/01"),
        (("device",), "+"),
        (("status",), "busy"),
        (("models", 0, "sha256"), "A" * 64),
        (("models", 0, "sha256"), "a" * 63),
        (("models", 0, "version"), 0),
        (("models", 0, "state"), "ACTIVE"),
        (("bench",), {"smollm2-135m/03/q4_0": {"tokens_per_s": 1.0, "ttft_ms": 1.0}}),
        (("bench",), {"smollm2-135m": {"tokens_per_s": 1.0, "ttft_ms": 1.0}}),
        (
            ("transfers",),
            [
                {
                    "transfer_id": "0" * 32,
                    "model": {"name": "m", "version": 1, "variant": "q"},
                    "received_bytes": 2,
                    "total_bytes": 1,
                }
            ],
        ),
    ],
)
def test_device_state_cross_field_rules(path: tuple[str | int, ...], value: Any) -> None:
    """Device state rules beyond types: budget <= RAM, unique features, id syntax, enums, bench keys."""
    state = valid_state()
    assert decode(state.encode()) == state
    with pytest.raises(DecodeError):
        decode(edited(state, path, value))


def test_assignment_target_path_must_name_the_model() -> None:
    """An assignment whose target path names another model, version or variant is rejected."""
    model = DesiredModel("m1", 2, "q4_0", "models/m1/2/q4_0.gguf", "b" * 64, 10)
    assignment = Assignment("edge-01", 5, 1, (model,), rollout_id="r1")
    assert decode(assignment.encode()) == assignment
    for bad in (
        "models/m1/3/q4_0.gguf",
        "models/m2/2/q4_0.gguf",
        "models/m1/2/q8_0.gguf",
        "models/m1/2/q4_0.bin",
        "models/m1/02/q4_0.gguf",
        "models/m1/2/../q4_0.gguf",
        "/models/m1/2/q4_0.gguf",
    ):
        with pytest.raises(DecodeError, match="target_path"):
            decode(edited(assignment, ("models", 0, "target_path"), bad))
    with pytest.raises(DecodeError, match="unique"):
        decode(edited(assignment, ("models",), [model.to_dict(), model.to_dict()]))
    with pytest.raises(DecodeError, match="generation"):
        decode(edited(assignment, ("generation",), 0))


def test_fetch_request_window_rules() -> None:
    """A fetch window must be non-empty, unique, within max_chunks, with a chunk size within limits."""
    request = FetchRequest("edge-01", "1" * 32, "models/m1/2/q4_0.gguf", "c" * 64, 65536, (0, 1, 2))
    assert decode(request.encode()) == request
    for path, value in [
        (("indices",), []),
        (("indices",), [1, 1]),
        (("indices",), [DEFAULT_LIMITS.max_chunks]),
        (("chunk_size",), 0),
        (("chunk_size",), DEFAULT_LIMITS.max_chunk_bytes + 1),
        (("transfer_id",), "1" * 31),
        (("transfer_id",), "G" * 32),
    ]:
        with pytest.raises(DecodeError, match=path[0]):
            decode(edited(request, path, value))


def test_report_metrics_bounded() -> None:
    """Report metrics need metric-syntax names, finite numbers, and at most MAX_METRICS entries."""
    report = Report("f" * 32, "edge-01", 1, "health", "ok", metrics={"ttft_ms": 12, "tokens_per_s": 40.5})
    assert decode(report.encode()) == report
    for metrics in ({"TTFT": 1}, {"": 1}, {"x": "1"}, {"x": None, "y": True}, {f"m{i}": i for i in range(65)}):
        with pytest.raises(DecodeError, match="metrics"):
            decode(edited(report, ("metrics",), metrics))


def test_audit_batch_records_share_its_epoch() -> None:
    """An audit batch whose record is of another epoch, or that has too many records, is rejected."""
    first = start_epoch("edge-01", 3, previous=None, reason="r", actor="agent", ts_ms=1)
    second = make_record(first, "model.activated", "agent", {"model": "m1"}, 2)
    checkpoint = sign_checkpoint(Checkpoint("edge-01", 3, 1, second.hash, 3), KEY)
    batch = AuditBatch("edge-01", 3, (first, second), checkpoint)
    assert decode(batch.encode()) == batch
    with pytest.raises(DecodeError, match="epoch"):
        decode(edited(batch, ("epoch",), 4))
    with pytest.raises(DecodeError, match="records"):
        decode(edited(batch, ("records",), [first.to_dict()] * 3), limits=Limits(max_audit_batch=2))


@pytest.mark.parametrize(
    "message",
    [
        Ack(device="BAD", ts_ms=1),
        Ack(device="d", ts_ms=-1),
        Report("f" * 32, "d", 1, "health", "ok", metrics={"x": float("nan")}),
        Assignment("d", 0, 1, ()),
        FetchRequest("d", "1" * 32, "models/m/1/q.gguf", "c" * 64, 10, ()),
    ],
)
def test_encode_refuses_invalid_messages(message: Message) -> None:
    """encode() raises ValueError for a message that decode() would reject."""
    with pytest.raises(ValueError, match="invalid"):
        message.encode()


def test_encode_refuses_oversized_messages() -> None:
    """encode() raises ValueError for a message larger than max_message_bytes."""
    report = Report("f" * 32, "d", 1, "error", "failed", reason="x" * 4000)
    with pytest.raises(ValueError, match="limit"):
        report.encode(limits=Limits(max_message_bytes=1000))


# --- chunk framing --------------------------------------------------------------------------------------

chunk_data = st.binary(max_size=300)


@QUICK
@given(hex_ids, st.integers(0, DEFAULT_LIMITS.max_chunks - 1), chunk_data)
def test_chunk_round_trip(transfer_id: str, index: int, data: bytes) -> None:
    """A framed chunk decodes to the same transfer id, index and data; the frame is header + data."""
    frame = encode_chunk(transfer_id, index, data)
    assert len(frame) == CHUNK_HEADER.size + len(data)
    chunk = decode_chunk(frame)
    assert (chunk.transfer_id, chunk.index, chunk.data) == (transfer_id, index, data)


@QUICK
@given(hex_ids, st.integers(0, DEFAULT_LIMITS.max_chunks - 1), chunk_data, st.data())
def test_chunk_header_flip_detected(transfer_id: str, index: int, data: bytes, draw: st.DataObject) -> None:
    """Flipping any header byte is rejected, or decodes to another transfer id or index (never silently equal)."""
    frame = bytearray(encode_chunk(transfer_id, index, data))
    position = draw.draw(st.integers(0, CHUNK_HEADER.size - 1), label="position")
    frame[position] ^= draw.draw(st.integers(1, 255), label="mask")
    try:
        chunk = decode_chunk(bytes(frame))
    except DecodeError:
        assert position < 4 or position >= 20  # magic, index beyond max_chunks, or length
        return
    assert 4 <= position < 24  # only the transfer id or the index can change and still parse
    assert (chunk.transfer_id, chunk.index) != (transfer_id, index)
    assert chunk.data == data


@QUICK
@given(hex_ids, st.integers(0, 1000), chunk_data, st.data())
def test_chunk_truncated_or_extended_rejected(transfer_id: str, index: int, data: bytes, draw: st.DataObject) -> None:
    """A frame cut short anywhere, or with bytes appended, is rejected."""
    frame = encode_chunk(transfer_id, index, data)
    cut = draw.draw(st.integers(0, len(frame) - 1), label="cut")
    with pytest.raises(DecodeError):
        decode_chunk(frame[:cut])
    extra = draw.draw(st.binary(min_size=1, max_size=16), label="extra")
    with pytest.raises(DecodeError):
        decode_chunk(frame + extra)


@QUICK
@given(hex_ids, chunk_data.filter(bool), st.data())
def test_chunk_data_flip_changes_data(transfer_id: str, data: bytes, draw: st.DataObject) -> None:
    """Flipping a data byte still frames correctly but yields different data (the chunk sha256 catches it)."""
    frame = bytearray(encode_chunk(transfer_id, 0, data))
    position = draw.draw(st.integers(CHUNK_HEADER.size, len(frame) - 1))
    frame[position] ^= draw.draw(st.integers(1, 255))
    assert decode_chunk(bytes(frame)).data != data


def test_chunk_limits_enforced() -> None:
    """Chunks above max_chunk_bytes or with an index at max_chunks are refused on both sides."""
    limits = Limits(max_chunk_bytes=8, max_chunks=4)
    tid = "ab" * 16
    assert decode_chunk(encode_chunk(tid, 3, b"12345678", limits=limits), limits=limits).index == 3
    with pytest.raises(DecodeError, match="length"):
        decode_chunk(encode_chunk(tid, 0, b"123456789"), limits=limits)
    with pytest.raises(DecodeError, match="index"):
        decode_chunk(encode_chunk(tid, 4, b"1"), limits=limits)
    for bad in [("AB" * 16, 0, b""), ("ab" * 15, 0, b""), (tid, -1, b""), (tid, 4, b""), (tid, 0, b"123456789")]:
        with pytest.raises(ValueError, match=r"transfer_id|index|chunk of"):
            encode_chunk(*bad, limits=limits)


@QUICK
@given(st.binary(max_size=64))
def test_chunk_garbage_rejected_or_well_formed(frame: bytes) -> None:
    """Arbitrary bytes either fail to decode or carry the magic and a matching length."""
    try:
        chunk = decode_chunk(frame)
    except DecodeError:
        return
    assert frame[:4] == b"EFC1"
    assert len(chunk.data) == len(frame) - CHUNK_HEADER.size
