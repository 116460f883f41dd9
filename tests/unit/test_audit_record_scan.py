"""The text scanner behind the audit fast path (``scan_canonical_records``) reads records exactly as JSON does.

The scanner cuts an upload's ``records`` array into records with a pattern instead of parsing it, so its hazards
are its own: a ``data`` piece cut at the wrong ``}``, pieces that are not JSON alone but are when joined, the
first ``"records":[`` not being the top-level one, hashes matched as any 64 characters. Every upload here is
built as raw text, with each record's hash computed over its raw bytes and a valid checkpoint signature, so that
nothing stops the scanner before the check under test. For every input, ``AuditBatch.decode_canonical`` must give
None or exactly what ``decode`` gives, and ``decode_upload`` must accept or refuse exactly as ``decode`` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.audit import ZERO_HASH, Checkpoint, scan_canonical_records, sign_checkpoint
from protocols.canonical import canonical_json
from protocols.errors import ProtocolError
from protocols.keys import generate_private_key
from protocols.limits import DEFAULT_LIMITS
from protocols.messages import AuditBatch, decode, decode_upload

pytestmark = pytest.mark.unit

KEY = generate_private_key()
DEVICE = "edge-01"
EPOCH = 3
FIRST_DATA = '{"device":"edge-01","previous":null,"reason":"r"}'


def record_text(seq: int, data: str, prev_hash: str, *, kind: str = "model.activated", hash_: str | None = None) -> str:
    """One record's text, written by hand around ``data`` (any text); its hash over exactly those bytes."""
    before = f'{{"actor":"agent","data":{data},"epoch":{EPOCH},'
    behind = f'"kind":"{kind}","prev_hash":"{prev_hash}","seq":{seq},"ts_ms":{seq + 1}}}'
    digest = hashlib.sha256((before + behind).encode("utf-8", "surrogatepass")).hexdigest()
    return f'{before}"hash":"{hash_ or digest}",{behind}'


def hash_of(text: str) -> str:
    return text.split('"hash":"', 1)[1][:64]


def upload_text(datas: list[str], *, checkpoint_extra: str = "", records_override: str | None = None) -> bytes:
    """An upload whose records after the first carry the raw ``datas``, chained and signed over the last one."""
    texts = [record_text(0, FIRST_DATA, ZERO_HASH, kind="epoch_start")]
    for seq, data in enumerate(datas, start=1):
        texts.append(record_text(seq, data, hash_of(texts[-1])))
    last = hash_of(texts[-1])
    signed = sign_checkpoint(Checkpoint(DEVICE, EPOCH, len(texts) - 1, last, 99), KEY).to_dict()
    checkpoint = canonical_json(signed).decode()
    if checkpoint_extra:  # a member inserted in key order ("records" sorts between "keyid" and "sig")
        checkpoint = checkpoint.replace(',"sig":', f',{checkpoint_extra},"sig":', 1)
    records = ",".join(texts) if records_override is None else records_override
    text = (
        f'{{"checkpoint":{checkpoint},"device":"{DEVICE}","epoch":{EPOCH},'
        f'"records":[{records}],"type":"audit_batch","v":1}}'
    )
    return text.encode("utf-8", "surrogatepass")


def outcome(fn: Any, payload: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(payload)
    except ProtocolError as exc:
        return "error", type(exc)


def assert_read_as_json_reads_it(payload: bytes) -> AuditBatch | None:
    """The invariant; returns the fast path's result."""
    expected = outcome(decode, payload)
    fast = AuditBatch.decode_canonical(payload)  # never raises
    if fast is not None:
        assert expected == ("ok", fast)
        for record in fast.records:
            assert record.canonical_data() == canonical_json(record.data)
    assert outcome(decode_upload, payload) == expected
    return fast


def test_a_hand_written_upload_is_taken_by_the_fast_path() -> None:
    """The builder writes what the agent writes: the fast path reads it, and equals decode."""
    payload = upload_text(['{"a":1,"b":"x"}', "{}", '{"n":{"m":[1,2]}}'])
    fast = assert_read_as_json_reads_it(payload)
    assert fast is not None
    assert [r.data for r in fast.records[1:]] == [{"a": 1, "b": "x"}, {}, {"n": {"m": [1, 2]}}]


def test_data_pieces_that_are_json_only_when_joined_are_refused() -> None:
    """``{"a":"}`` and ``{","b":1}`` are not JSON alone, but joined by a comma they are one object.

    With a third piece holding two objects, the joined pieces parse to as many values as there are records and
    re-encode to themselves: a check of the joined text alone would have accepted records whose data text is
    not JSON, each given another record's data.
    """
    payload = upload_text(['{"a":"}', '{","b":1}', '{"c":1},{"d":2}'])
    assert AuditBatch.decode_canonical(payload) is None
    assert outcome(decode, payload)[0] == "error"
    assert_read_as_json_reads_it(payload)


def test_records_inside_the_checkpoint_are_not_taken_for_the_upload_s_records() -> None:
    """A ``records`` member inside the checkpoint (unknown fields are tolerated) comes first in the text."""
    inner = ",".join([record_text(0, FIRST_DATA, ZERO_HASH, kind="epoch_start")])
    payload = upload_text([], checkpoint_extra=f'"records":[{inner}]', records_override="")
    strict = outcome(decode, payload)
    fast = assert_read_as_json_reads_it(payload)
    assert fast is None or fast.records == ()
    if strict[0] == "ok":
        assert strict[1].records == ()


@pytest.mark.parametrize(
    "data",
    [
        '{"a":{"b":1},"epoch":3,"hash":"'
        + "0" * 64
        + '","kind":"k","prev_hash":"'
        + "0" * 64
        + '","seq":1,"ts_ms":2}',  # the rest of a record, inside data: the pattern's first cut is too short
        '{"x":"},\\"epoch\\":3"}',  # an escaped quote: no cut there
        '{"x":"}","y":{"z":"}"}}',
        '{"s":"1234567890123456789012"}',  # a long digit run in a string of flat data: still fast
        '{"n":-9223372036854775808,"m":9223372036854775807}',
    ],
    ids=["record-inside-data", "escaped-quote", "braces-in-strings", "digits-in-string", "int64-bounds"],
)
def test_data_shaped_to_mislead_the_pattern_is_read_as_json_reads_it(data: str) -> None:
    assert_read_as_json_reads_it(upload_text([data]))


def test_long_digit_strings_in_flat_data_stay_on_the_fast_path() -> None:
    assert AuditBatch.decode_canonical(upload_text(['{"s":"1234567890123456789012"}'])) is not None


@pytest.mark.parametrize(
    "data", ['{"n":9223372036854775808}', '{"n":-9223372036854775809}', '{"n":[99999999999999999999]}']
)
def test_integers_outside_64_bits_are_refused(data: str) -> None:
    payload = upload_text([data])
    assert AuditBatch.decode_canonical(payload) is None
    assert outcome(decode, payload)[0] == "error"


@pytest.mark.parametrize(
    "prev_hash", ["A" * 64, "g" * 64, '"' * 64, "0" * 63 + "\\"], ids=["upper", "non-hex", "quotes", "backslash"]
)
def test_a_prev_hash_that_is_not_lower_case_hex_is_refused(prev_hash: str) -> None:
    """The pattern matches any 64 characters there: the scan must check them (first record and later ones)."""
    first = record_text(0, FIRST_DATA, ZERO_HASH, kind="epoch_start")
    for records in (
        [record_text(0, FIRST_DATA, prev_hash, kind="epoch_start")],
        [first, record_text(1, "{}", prev_hash)],
    ):
        payload = upload_text([], records_override=",".join(records))
        assert AuditBatch.decode_canonical(payload) is None
        assert_read_as_json_reads_it(payload)


def test_an_upper_case_hash_is_refused() -> None:
    first = record_text(0, FIRST_DATA, ZERO_HASH, kind="epoch_start")
    upper = first.replace(hash_of(first), hash_of(first).upper())
    payload = upload_text([], records_override=upper)
    assert AuditBatch.decode_canonical(payload) is None
    assert_read_as_json_reads_it(payload)


def test_scan_stops_at_the_batch_limit() -> None:
    texts = [record_text(0, FIRST_DATA, ZERO_HASH, kind="epoch_start")]
    for seq in range(1, 5):
        texts.append(record_text(seq, "{}", hash_of(texts[-1])))
    text = "[" + ",".join(texts) + "]"
    scanned = scan_canonical_records(text, 1, limits=dataclasses.replace(DEFAULT_LIMITS, max_audit_batch=5))
    assert scanned is not None
    assert len(scanned[0]) == 5
    assert scanned[1] == len(text)
    assert scan_canonical_records(text, 1, limits=dataclasses.replace(DEFAULT_LIMITS, max_audit_batch=4)) is None


# Pieces of JSON syntax, so that random data texts are often nearly JSON and cross the scanner's edge cases.
_PIECES = st.sampled_from(
    ["{", "}", "[", "]", '"', ",", ":", "\\", '\\"', "1", "0", "-", "a", "é", " ", '"k":', '"epoch":', "null"]
)
raw_data = st.lists(_PIECES, max_size=14).map(lambda parts: "{" + "".join(parts) + "}")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_data, min_size=1, max_size=4))
def test_random_near_json_data_texts_are_read_as_json_reads_them(datas: list[str]) -> None:
    """Records around random pieces of JSON syntax, each hashed over its raw bytes and signed."""
    assert_read_as_json_reads_it(upload_text(datas))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_flip_any_byte_of_a_hand_written_upload(data: Any) -> None:
    payload = bytearray(upload_text(['{"a":1,"b":"x"}', '{"n":{"m":[1,"}"]}}', "{}"]))
    index = data.draw(st.integers(0, len(payload) - 1))
    payload[index] ^= data.draw(st.integers(1, 255))
    fast = assert_read_as_json_reads_it(bytes(payload))
    original = AuditBatch.decode_canonical(upload_text(['{"a":1,"b":"x"}', '{"n":{"m":[1,"}"]}}', "{}"]))
    assert fast is None or fast != original
