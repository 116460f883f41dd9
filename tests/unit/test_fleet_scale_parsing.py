"""Parsers and encoders added for fleet scale: ``--broker HOST:PORT``, the audit record fast paths."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.simulate import parse_broker
from protocols.audit import ACTOR_RE, KIND_RE, AuditRecord, canonical_record, make_record, start_epoch
from protocols.canonical import ObjectReader, canonical_json
from protocols.errors import DecodeError

pytestmark = pytest.mark.unit

hosts = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
)


@given(hosts, st.integers(1, 65535))
def test_broker_address_round_trips(host: str, port: int) -> None:
    """Any HOST:PORT parses back to the same host and port."""
    assert parse_broker(f"{host}:{port}") == (host, port)


@given(st.ip_addresses(v=6).map(str), st.integers(1, 65535))
def test_bracketed_ipv6_broker_address(host: str, port: int) -> None:
    """[IPv6]:PORT parses to the bare address."""
    assert parse_broker(f"[{host}]:{port}") == (host, port)


@given(st.text(max_size=30))
def test_broker_address_rejects_or_parses_cleanly(text: str) -> None:
    """Arbitrary text either is rejected with ValueError or yields a host without spaces and a valid port."""
    try:
        host, port = parse_broker(text)
    except ValueError:
        return
    assert host
    assert not any(c.isspace() for c in host)
    assert 1 <= port <= 65535


@pytest.mark.parametrize("text", ["", "host", "host:", ":1883", "host:0", "host:65536", "host:-1", "a b:1883", "h:x"])
def test_broker_address_rejects(text: str) -> None:
    """Malformed addresses are refused."""
    with pytest.raises(ValueError, match=r"HOST:PORT|outside"):
        parse_broker(text)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FFFF, exclude_categories=("Cs",)), max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=10,
)
datas = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
kinds = st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True).filter(lambda k: k not in ("epoch_start", "gap"))
actors = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True)


def chain(data: dict[str, Any], kind: str, actor: str, ts_ms: int) -> AuditRecord:
    first = start_epoch("dev-1", 3, previous=None, reason="test", actor="agent", ts_ms=ts_ms)
    return make_record(first, kind, actor, data, ts_ms + 1)


@given(datas, kinds, actors, st.integers(0, 2**53))
@settings(max_examples=200)
def test_canonical_record_fast_path_is_the_full_encoding(
    data: dict[str, Any], kind: str, actor: str, ts_ms: int
) -> None:
    """The record bytes built from the cached data encoding equal canonical_json of every hashed field."""
    record = chain(data, kind, actor, ts_ms)
    assert canonical_record(record) == canonical_json(record.hashed_fields())
    parsed = AuditRecord.from_dict(record.to_dict())
    assert parsed == record
    assert canonical_record(parsed) == canonical_json(record.hashed_fields())
    assert parsed.canonical_data() == canonical_json(data)


@given(datas, st.data())
@settings(max_examples=200)
def test_replaced_record_never_reuses_the_cached_encoding(data: dict[str, Any], draw: st.DataObject) -> None:
    """A record changed with dataclasses.replace is hashed from its new data, not its parsed bytes."""
    parsed = AuditRecord.from_dict(chain({"a": 1}, "k.x", "agent", 5).to_dict())
    changed = dataclasses.replace(parsed, data=data)
    assert canonical_record(changed) == canonical_json(changed.hashed_fields())


field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**64),
    st.text(max_size=70),
    st.sampled_from(["a" * 64, "0" * 64, "A" * 64, "uid:1000", "model.activated", "x" * 129]),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
    st.floats(allow_nan=False),
)


@given(st.dictionaries(st.sampled_from(list(chain({}, "k.x", "agent", 1).to_dict())), field_values, max_size=8))
@settings(max_examples=400)
def test_record_reader_fast_path_agrees_with_field_checks(changes: dict[str, Any]) -> None:
    """Whatever the fields hold, AuditRecord.read accepts exactly what the field-by-field checks accept."""
    raw = {**chain({"k": "v"}, "k.x", "agent", 1).to_dict(), **changes}
    reader = ObjectReader(raw)
    try:
        record = AuditRecord.read(reader)
    except DecodeError:
        record = None
    # The field-by-field reference: the same checks, one at a time (what read() did before the fast path).
    try:
        reference = AuditRecord(
            epoch=reader.integer("epoch"),
            seq=reader.integer("seq"),
            ts_ms=reader.integer("ts_ms"),
            kind=reader.string("kind", pattern=KIND_RE, max_len=64),
            actor=reader.string("actor", pattern=ACTOR_RE, max_len=128),
            data=reader.mapping("data"),
            prev_hash=reader.sha256("prev_hash"),
            hash=reader.sha256("hash"),
        )
        canonical_json(reference.data)
    except (DecodeError, ValueError, TypeError):
        reference = None
    if reference is not None and len(canonical_json(reference.data)) > reader.limits.max_audit_data_bytes:
        reference = None
    assert record == reference
