"""Sealed control messages of the MQTT link: which topic carries which message, signed by whom.

Every control message on a device topic except audit batches (which carry their own signed checkpoint, see
:mod:`protocols.audit`) and blob traffic travels *sealed*: the message's canonical JSON is the payload of a
DSSE envelope (:mod:`protocols.envelope`) whose payload type names the message kind::

    topic kind   message                              payload type                                    signed by
    state        DeviceState (also the last will)     application/vnd.edgefleet.device-state.v1+json   device key
    report       Report                               application/vnd.edgefleet.report.v1+json         device key
    assign       Assignment                           application/vnd.edgefleet.assignment.v1+json     controller key(s)
    ack          Ack                                  application/vnd.edgefleet.ack.v1+json            controller key(s)

Invariants (docs/protocol.md, "Sealed messages"):

1. Verify first, parse later: :func:`open_sealed` verifies the envelope against the keys the caller trusts for
   that topic's sender, and only then decodes the payload it got back.
2. The payload type is bound to the topic kind, so a report can never be replayed as a state or an assignment
   (the type is covered by every signature).
3. The message names the device of the topic it arrived on (``message.device == topic device``). A message a
   device signed for itself cannot be moved to another device's topic, and a device cannot speak for
   another one even where a broker ACL would let it.

Sealing refuses, with ``ValueError``, a message whose class does not belong to the kind. Opening raises
:class:`~protocols.errors.DecodeError` (bad topic, envelope or payload), :class:`~protocols.errors.VerificationError`
and subclasses (signature, payload type, device mismatch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from protocols.envelope import sign_envelope, verify_envelope
from protocols.errors import DecodeError, VerificationError
from protocols.keys import Ed25519PrivateKey, Ed25519PublicKey
from protocols.limits import DEFAULT_LIMITS, Limits
from protocols.messages import Ack, Assignment, DeviceState, Message, Report
from protocols.topics import DeviceTopic, TopicKind, parse_device_topic

__all__ = [
    "ACK_PAYLOAD_TYPE",
    "SEALED_KINDS",
    "STATE_PAYLOAD_TYPE",
    "SealedMessage",
    "open_sealed",
    "payload_type_for",
    "seal",
]

STATE_PAYLOAD_TYPE: Final = "application/vnd.edgefleet.device-state.v1+json"
"""Payload type of a sealed :class:`~protocols.messages.DeviceState`."""

ACK_PAYLOAD_TYPE: Final = "application/vnd.edgefleet.ack.v1+json"
"""Payload type of a sealed :class:`~protocols.messages.Ack`."""

_KINDS: Final[Mapping[TopicKind, tuple[type[Message], str]]] = {
    TopicKind.STATE: (DeviceState, STATE_PAYLOAD_TYPE),
    TopicKind.REPORT: (Report, Report.PAYLOAD_TYPE),
    TopicKind.ASSIGN: (Assignment, Assignment.PAYLOAD_TYPE),
    TopicKind.ACK: (Ack, ACK_PAYLOAD_TYPE),
}

SEALED_KINDS: Final = frozenset(_KINDS)
"""Topic kinds whose messages are sealed envelopes."""


class SealedMessage:
    """A verified message and the topic it arrived on."""

    __slots__ = ("message", "topic")

    def __init__(self, topic: DeviceTopic, message: Message) -> None:
        self.topic = topic
        self.message = message

    def __repr__(self) -> str:
        return f"SealedMessage({self.topic!r}, {type(self.message).__name__})"


def payload_type_for(kind: TopicKind) -> str:
    """The envelope payload type of messages on ``kind`` topics.

    Raises:
        ValueError: ``kind`` does not carry sealed messages.
    """
    try:
        return _KINDS[kind][1]
    except KeyError:
        raise ValueError(f"{kind} topics do not carry sealed messages") from None


def seal(
    message: Message, kind: TopicKind, keys: Sequence[Ed25519PrivateKey], *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Sign ``message`` for a ``kind`` topic: an envelope of its canonical JSON.

    Args:
        message: A :class:`DeviceState`, :class:`Report`, :class:`Assignment` or :class:`Ack`.
        kind: The topic kind it will be published on.
        keys: The signing keys (the device key; or the controller's key(s)).
        limits: The receiver's limits; the envelope must fit them.

    Returns:
        The envelope bytes, ready to publish.

    Raises:
        ValueError: ``message`` does not belong on ``kind`` topics, it is invalid, or too large.
    """
    cls, payload_type = _KINDS.get(kind, (None, ""))
    if cls is None or type(message) is not cls:
        raise ValueError(f"a {type(message).__name__} cannot be sealed for {kind} topics")
    return sign_envelope(message.encode(limits=limits), payload_type, keys, limits=limits)


def open_sealed(
    topic: str,
    data: bytes,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    threshold: int = 1,
    limits: Limits = DEFAULT_LIMITS,
) -> SealedMessage:
    """Verify and decode a sealed message received on ``topic`` (steps 1–3 of the module docstring).

    Args:
        topic: The topic name the message arrived on (never a subscription filter).
        data: The payload as received.
        trusted: The keys the receiver trusts *for this sender* by key id: the enrolled device's key for
            ``state``/``report``, the controller's keys for ``assign``/``ack``.
        threshold: Distinct trusted signatures required.
        limits: Size bounds.

    Returns:
        The parsed topic and the verified message.

    Raises:
        DecodeError: the topic is not a device topic, its kind carries no sealed message, or the envelope or
            payload is malformed.
        VerificationError: wrong payload type, no (or too few) valid trusted signatures, or the message
            names another device than the topic.
    """
    parsed = parse_device_topic(topic)
    entry = _KINDS.get(parsed.kind)
    if entry is None:
        raise DecodeError(f"{parsed.kind} topics do not carry sealed messages")
    cls, payload_type = entry
    payload = verify_envelope(data, trusted, threshold=threshold, payload_type=payload_type, limits=limits)
    message = cls.from_bytes(payload, limits=limits)
    device = getattr(message, "device", None)
    if device != parsed.device_id:
        raise VerificationError(
            f"a {cls.TYPE} for device {device!r} arrived on the topic of device {parsed.device_id!r}"
        )
    return SealedMessage(parsed, message)
