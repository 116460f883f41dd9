"""The assignment key list (``keys/assignments.json``): parsing, and its binding to the signed TUF target."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import DecodeError, ProtocolError
from protocols.keys import Ed25519PrivateKey, keyid
from protocols.releases import (
    ASSIGNMENT_KEYS_CUSTOM,
    AssignmentKeyList,
    assignment_keys_from_target,
    decode_assignment_keys,
)

pytestmark = pytest.mark.unit

KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32).public_key() for i in range(1, 4)]
ONE = AssignmentKeyList.of(KEYS[:1]).encode()
THREE = AssignmentKeyList.of(KEYS, threshold=2)
THREE_BYTES = THREE.encode()


def _target(listing: AssignmentKeyList) -> tuple[dict[str, object], int, str]:
    data = listing.encode()
    return {ASSIGNMENT_KEYS_CUSTOM: listing.to_dict()}, len(data), hashlib.sha256(data).hexdigest()


@given(count=st.integers(1, 16), data=st.data())
def test_round_trip_of_any_valid_list(count: int, data: st.DataObject) -> None:
    """Any list of 1–16 keys with a threshold in range encodes and decodes to itself, key ids intact."""
    seeds = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=count, max_size=count, unique=True))
    keys = [Ed25519PrivateKey.from_private_bytes(seed).public_key() for seed in seeds]
    threshold = data.draw(st.integers(1, len(keys)))
    listing = AssignmentKeyList.of(keys, threshold)
    again = decode_assignment_keys(listing.encode())
    assert again == listing
    assert set(again.public_keys()) == {keyid(k) for k in keys}


@given(data=st.data())
def test_flipping_any_byte_of_a_one_key_list_is_rejected(data: st.DataObject) -> None:
    """Flipping any bits of any byte of a one-key list makes decoding raise, never return another list."""
    corrupted = bytearray(ONE)
    position = data.draw(st.integers(0, len(corrupted) - 1), label="position")
    corrupted[position] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(ProtocolError):
        decode_assignment_keys(bytes(corrupted))


@given(data=st.data())
def test_flipping_any_byte_of_a_signed_list_is_rejected(data: st.DataObject) -> None:
    """Against its signed target (length + sha256), any flipped byte of any list is refused (threshold too)."""
    custom, length, sha256 = _target(THREE)
    corrupted = bytearray(THREE_BYTES)
    position = data.draw(st.integers(0, len(corrupted) - 1), label="position")
    corrupted[position] ^= data.draw(st.integers(1, 255), label="mask")
    try:
        document = json.loads(bytes(corrupted))
    except ValueError:
        return  # not even JSON: python-tuf would not have parsed the metadata holding it
    if not isinstance(document, dict):
        return
    with pytest.raises(DecodeError):
        assignment_keys_from_target({ASSIGNMENT_KEYS_CUSTOM: document}, length, sha256)
    assert assignment_keys_from_target(custom, length, sha256) == THREE


@given(data=st.binary(max_size=1024))
def test_arbitrary_bytes_are_rejected(data: bytes) -> None:
    """Arbitrary bytes are never a key list, and only ever raise a ProtocolError."""
    with pytest.raises(ProtocolError):
        decode_assignment_keys(data)


def test_a_key_id_that_is_not_its_keys_id_is_rejected() -> None:
    """A list naming a key under another key's id is refused (no key can pose as another)."""
    document = THREE.to_dict()
    ids = list(document["keys"])
    document["keys"] = {ids[0]: document["keys"][ids[1]], ids[1]: document["keys"][ids[0]]}
    with pytest.raises(DecodeError, match="not the id of its key"):
        decode_assignment_keys(json.dumps(document).encode())


@pytest.mark.parametrize("threshold", [0, 4, True, "1"])
def test_a_threshold_out_of_range_is_rejected(threshold: object) -> None:
    """The threshold is an integer from 1 to the number of keys."""
    document = THREE.to_dict() | {"threshold": threshold}
    with pytest.raises(DecodeError):
        decode_assignment_keys(json.dumps(document).encode())


def test_the_target_binding_refuses_a_missing_or_mismatched_list() -> None:
    """No list in custom, or a list whose bytes are not the signed length/sha256, is refused."""
    custom, length, sha256 = _target(THREE)
    with pytest.raises(DecodeError):
        assignment_keys_from_target({}, length, sha256)
    with pytest.raises(DecodeError):
        assignment_keys_from_target(custom, length + 1, sha256)
    other = AssignmentKeyList.of(KEYS[:2])
    with pytest.raises(DecodeError):
        assignment_keys_from_target({ASSIGNMENT_KEYS_CUSTOM: other.to_dict()}, length, sha256)
