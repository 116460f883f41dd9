"""Unit tests for protocols/link.py: sealed messages bound to their topic kind and device."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import DecodeError, ProtocolError, UnknownKeyError, VerificationError
from protocols.keys import generate_private_key, keyid
from protocols.link import SEALED_KINDS, open_sealed, payload_type_for, seal
from protocols.messages import Ack, Assignment, DesiredModel, DeviceState, HardwareProfile, Report
from protocols.topics import TopicKind, device_topic

pytestmark = pytest.mark.unit

DEVICE_KEY, OTHER_KEY, CONTROLLER_KEY = (generate_private_key() for _ in range(3))
TRUST_DEVICE = {keyid(DEVICE_KEY): DEVICE_KEY.public_key()}
TRUST_CONTROLLER = {keyid(CONTROLLER_KEY): CONTROLLER_KEY.public_key()}

STATE = DeviceState(
    device="dev-1",
    status="online",
    ts_ms=1,
    agent_version="0.1.0",
    hardware=HardwareProfile("x86_64", ("avx2",), 4, 8 << 30, 2 << 30, 10 << 30),
    models=(),
    heartbeat=3,
)
REPORT = Report(report_id="ab" * 16, device="dev-1", ts_ms=2, kind="install", outcome="ok", reason="done")
ASSIGNMENT = Assignment(
    device="dev-1",
    generation=7,
    issued_ts_ms=3,
    models=(DesiredModel("m", 1, "q4_0", "models/m/1/q4_0.gguf", "cd" * 32, 10),),
)
ACK = Ack(device="dev-1", ts_ms=4, report_ids=("ab" * 16,))

CASES = [
    (TopicKind.STATE, STATE, DEVICE_KEY, TRUST_DEVICE),
    (TopicKind.REPORT, REPORT, DEVICE_KEY, TRUST_DEVICE),
    (TopicKind.ASSIGN, ASSIGNMENT, CONTROLLER_KEY, TRUST_CONTROLLER),
    (TopicKind.ACK, ACK, CONTROLLER_KEY, TRUST_CONTROLLER),
]


@pytest.mark.parametrize(("kind", "message", "key", "trusted"), CASES, ids=[c[0].value for c in CASES])
def test_round_trip(kind: TopicKind, message: object, key: object, trusted: dict) -> None:  # type: ignore[type-arg]
    """A sealed message opens on its topic with the sender's key and equals what was sealed."""
    data = seal(message, kind, [key])  # type: ignore[arg-type]
    opened = open_sealed(device_topic("dev-1", kind), data, trusted)
    assert opened.message == message
    assert opened.topic.device_id == "dev-1"


@pytest.mark.parametrize(("kind", "message", "key", "trusted"), CASES, ids=[c[0].value for c in CASES])
@given(data=st.data())
def test_flipping_any_byte_is_rejected(
    kind: TopicKind, message: object, key: object, trusted: dict, data: st.DataObject
) -> None:  # type: ignore[type-arg]
    """Flipping any bits of any byte of a sealed message makes opening it raise, never return."""
    sealed = bytearray(seal(message, kind, [key]))  # type: ignore[arg-type]
    position = data.draw(st.integers(0, len(sealed) - 1), label="position")
    sealed[position] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises(ProtocolError):
        open_sealed(device_topic("dev-1", kind), bytes(sealed), trusted)


def test_message_for_another_device_is_refused() -> None:
    """A message signed for device A cannot be moved to device B's topic, even with B's key trusted."""
    data = seal(REPORT, TopicKind.REPORT, [DEVICE_KEY])
    with pytest.raises(VerificationError, match="arrived on the topic of device 'dev-2'"):
        open_sealed(device_topic("dev-2", TopicKind.REPORT), data, TRUST_DEVICE)


def test_message_of_one_kind_is_refused_on_another_kinds_topic() -> None:
    """The payload type binds a message to its kind: a report is not a state, an ack is not an assignment."""
    with pytest.raises(VerificationError, match="payload type"):
        open_sealed(device_topic("dev-1", TopicKind.STATE), seal(REPORT, TopicKind.REPORT, [DEVICE_KEY]), TRUST_DEVICE)
    with pytest.raises(VerificationError, match="payload type"):
        open_sealed(
            device_topic("dev-1", TopicKind.ASSIGN), seal(ACK, TopicKind.ACK, [CONTROLLER_KEY]), TRUST_CONTROLLER
        )


def test_signature_by_another_key_is_refused() -> None:
    """Only the trusted sender's key counts: another device's (or the controller's) signature is refused."""
    with pytest.raises(UnknownKeyError):
        open_sealed(device_topic("dev-1", TopicKind.REPORT), seal(REPORT, TopicKind.REPORT, [OTHER_KEY]), TRUST_DEVICE)


def test_sealing_checks_the_kind() -> None:
    """Sealing refuses a message that does not belong on the topic kind, and unsealed kinds."""
    with pytest.raises(ValueError, match="cannot be sealed"):
        seal(REPORT, TopicKind.STATE, [DEVICE_KEY])
    with pytest.raises(ValueError, match="do not carry sealed"):
        payload_type_for(TopicKind.AUDIT)
    assert {TopicKind.STATE, TopicKind.REPORT, TopicKind.ASSIGN, TopicKind.ACK} == SEALED_KINDS
    with pytest.raises(DecodeError):
        open_sealed(device_topic("dev-1", TopicKind.AUDIT), b"{}", TRUST_DEVICE)
