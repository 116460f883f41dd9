"""MQTT topic names and subscription filters of the edgefleet link (DESIGN.md §5).

Topic tree (``v1`` is the protocol major version)::

    edgefleet/v1/devices/{device_id}/{kind}     kind: state report audit fetch   (device -> controller)
                                                      assign ack chunk           (controller -> device)
    edgefleet/v1/repo/timestamp                 latest timestamp metadata, retained
    edgefleet/v1/repo/root/{N}                  root metadata version N (N >= 1), retained, all versions kept
    edgefleet/v1/repo/{role}                    latest metadata of ``snapshot``, ``targets`` or a delegated
                                                targets role, retained
    edgefleet/v1/repo/{role}/{N}                version N of that metadata (consistent snapshots), retained

Repository topic names mirror the TUF metadata file names the python-tuf ``Updater`` asks its fetcher for:
``timestamp.json`` -> ``repo/timestamp``, ``{N}.root.json`` -> ``repo/root/{N}``, ``{N}.snapshot.json``
-> ``repo/snapshot/{N}``, ``snapshot.json`` -> ``repo/snapshot``. Root is always versioned (clients walk
the root chain version by version) and timestamp never is (TUF never versions it).

Invariants:

- Every topic built here is a valid MQTT topic name: no wildcard (``+``, ``#``), no empty level, no NUL,
  and device ids are exactly :data:`~protocols.limits.DEVICE_ID_RE`, so one id is one topic level.
- Parsing is strict and canonical: a topic parses only if building it back gives the same string.
  Subscription filters (``$share/...``, ``+``, ``#``) are never accepted as message topics; a message
  received through a shared subscription carries the plain topic, which parses normally.
- A device's broker ACL allows it ``edgefleet/v1/devices/%u/#`` and read-only ``edgefleet/v1/repo/#``;
  every topic a device publishes or subscribes to here lies inside that.
- Wrong input from a peer raises :class:`~protocols.errors.DecodeError` (or its subclass
  :class:`~protocols.errors.UnsupportedVersionError` for another ``edgefleet/vN``); a bad share group
  name or version number from our own code or config raises :class:`ValueError`.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

from protocols.errors import DecodeError, UnsupportedVersionError
from protocols.limits import DEVICE_ID_RE

__all__ = [
    "CONTROLLER_PUBLISHES",
    "DEVICE_PUBLISHES",
    "PREFIX",
    "REPO_ROLE_RE",
    "DeviceTopic",
    "RepoTopic",
    "TopicKind",
    "agent_subscriptions",
    "controller_subscriptions",
    "device_topic",
    "parse_device_topic",
    "parse_repo_topic",
    "repo_topic",
    "validate_device_id",
]

ROOT = "edgefleet"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

#: Names of repository metadata roles as topic levels: ``root``, ``timestamp``, ``snapshot``, ``targets`` or
#: a delegated targets role (same syntax as device ids, so one name is exactly one topic level).
REPO_ROLE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

_DEVICE_ID_MAX = 64
_VERSION_RE = re.compile(r"[1-9][0-9]{0,18}")  # decimal, no sign, no leading zero: one spelling per number
_SHARE_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_TOPIC = 256  # longer than any topic built here; bounds work on hostile input


class TopicKind(enum.StrEnum):
    """The last level of a device topic: what the message on it is."""

    STATE = "state"
    """Device status, hardware profile, loaded models, audit head (retained; LWT sets ``offline``)."""
    ASSIGN = "assign"
    """Signed assignment: the device's desired state (retained)."""
    REPORT = "report"
    """Install, health-check and rollback reports, signed by the device."""
    AUDIT = "audit"
    """Audit batch plus signed checkpoint."""
    ACK = "ack"
    """The controller's application-level acks (audit seq, report id)."""
    FETCH = "fetch"
    """Blob chunk requests from the device (windowed)."""
    CHUNK = "chunk"
    """Blob chunks for the device."""


#: Kinds a device publishes on its own topics (the controller subscribes to them).
DEVICE_PUBLISHES = frozenset({TopicKind.STATE, TopicKind.REPORT, TopicKind.AUDIT, TopicKind.FETCH})

#: Kinds the controller publishes on a device's topics (the device subscribes to them).
CONTROLLER_PUBLISHES = frozenset({TopicKind.ASSIGN, TopicKind.ACK, TopicKind.CHUNK})

# Fixed orders, so that subscription lists are deterministic.
_DEVICE_PUBLISHES_ORDER = (TopicKind.STATE, TopicKind.REPORT, TopicKind.AUDIT, TopicKind.FETCH)
_CONTROLLER_PUBLISHES_ORDER = (TopicKind.ASSIGN, TopicKind.ACK, TopicKind.CHUNK)


class DeviceTopic(NamedTuple):
    """A parsed device topic."""

    device_id: str
    kind: TopicKind


class RepoTopic(NamedTuple):
    """A parsed repository topic: a metadata role and, if versioned, its version."""

    role: str
    version: int | None


def validate_device_id(device_id: str) -> str:
    """Check that ``device_id`` is a valid device id (:data:`~protocols.limits.DEVICE_ID_RE`).

    Args:
        device_id: A candidate device id, e.g. from a topic or a certificate's CN.

    Returns:
        ``device_id`` unchanged.

    Raises:
        DecodeError: The id does not match; the message says why.
    """
    if DEVICE_ID_RE.fullmatch(device_id):
        return device_id
    raise DecodeError(f"invalid device id {_shorten(device_id)!r}: {_device_id_defect(device_id)}")


def device_topic(device_id: str, kind: TopicKind) -> str:
    """The topic of one kind of message for one device.

    Args:
        device_id: The device id.
        kind: The message kind.

    Returns:
        ``edgefleet/v1/devices/{device_id}/{kind}``.

    Raises:
        DecodeError: ``device_id`` is invalid.
    """
    return f"{PREFIX}/devices/{validate_device_id(device_id)}/{TopicKind(kind).value}"


def parse_device_topic(topic: str) -> DeviceTopic:
    """Split a received device topic into its device id and kind.

    Args:
        topic: The topic name of a received message (never a subscription filter).

    Returns:
        The device id and kind.

    Raises:
        UnsupportedVersionError: The topic is ``edgefleet/{other version}/...``.
        DecodeError: Anything else that :func:`device_topic` would not have built.
    """
    levels = _split(topic)
    if len(levels) != 5 or levels[2] != "devices":
        raise DecodeError(f"not a device topic: {_shorten(topic)!r}")
    device_id, kind = levels[3], levels[4]
    validate_device_id(device_id)
    try:
        return DeviceTopic(device_id, TopicKind(kind))
    except ValueError as exc:
        raise DecodeError(f"unknown device topic kind {_shorten(kind)!r}") from exc


def repo_topic(role: str, version: int | None = None) -> str:
    """The topic of one repository metadata document.

    Args:
        role: ``root``, ``timestamp``, ``snapshot``, ``targets`` or a delegated targets role name.
        version: The metadata version for versioned topics, else ``None`` for the latest.

    Returns:
        ``edgefleet/v1/repo/{role}`` or ``edgefleet/v1/repo/{role}/{version}``.

    Raises:
        ValueError: Invalid role name or version, ``root`` without a version, or ``timestamp`` with one.
    """
    if not REPO_ROLE_RE.fullmatch(role):
        raise ValueError(f"invalid repository role name {role!r}: must match {REPO_ROLE_RE.pattern}")
    if version is None:
        if role == "root":
            raise ValueError("root metadata topics are always versioned: edgefleet/v1/repo/root/{N}")
        return f"{PREFIX}/repo/{role}"
    if isinstance(version, bool) or not _VERSION_RE.fullmatch(str(version)):
        raise ValueError(f"invalid metadata version {version!r}: must be a positive integer")
    if role == "timestamp":
        raise ValueError("timestamp metadata is never versioned: edgefleet/v1/repo/timestamp")
    return f"{PREFIX}/repo/{role}/{version}"


def parse_repo_topic(topic: str) -> RepoTopic:
    """Split a received repository topic into its role and version.

    Args:
        topic: The topic name of a received message.

    Returns:
        The role and its version (``None`` for a latest-version topic).

    Raises:
        UnsupportedVersionError: The topic is ``edgefleet/{other version}/...``.
        DecodeError: Anything else that :func:`repo_topic` would not have built.
    """
    levels = _split(topic)
    if len(levels) not in (4, 5) or levels[2] != "repo":
        raise DecodeError(f"not a repository topic: {_shorten(topic)!r}")
    role = levels[3]
    version = None
    if len(levels) == 5:
        if not _VERSION_RE.fullmatch(levels[4]):
            raise DecodeError(f"invalid metadata version in repository topic {_shorten(topic)!r}")
        version = int(levels[4])
    try:
        canonical = repo_topic(role, version)
    except ValueError as exc:
        raise DecodeError(f"invalid repository topic {_shorten(topic)!r}: {exc}") from exc
    if canonical != topic:  # cannot happen today; keeps "parses only if it rebuilds identically" explicit
        raise DecodeError(f"repository topic {_shorten(topic)!r} is not in canonical form")
    return RepoTopic(role, version)


def controller_subscriptions(share_group: str | None = None) -> list[str]:
    """The topic filters ``edge-fleet serve`` subscribes to.

    ``report``, ``audit`` and ``fetch`` are subscribed through the MQTT v5 shared subscription
    ``$share/{share_group}/...`` when a group is given, so several controllers split the work (their
    handlers are idempotent). ``state`` is always subscribed *unshared*: it is retained, and MQTT v5 (§4.8.2)
    does not send retained messages to a new shared subscription, so a restarted controller would
    otherwise never learn the state of devices that stay quiet. Every controller keeps the inventory.

    Args:
        share_group: The shared subscription group name, or ``None`` for a single controller.

    Returns:
        Topic filters, one per device-to-controller kind, in a fixed order.

    Raises:
        ValueError: ``share_group`` is not a valid share name.
    """
    if share_group is not None and not _SHARE_GROUP_RE.fullmatch(share_group):
        raise ValueError(f"invalid share group {share_group!r}: must match {_SHARE_GROUP_RE.pattern}")
    filters = []
    for kind in _DEVICE_PUBLISHES_ORDER:
        topic_filter = f"{PREFIX}/devices/+/{kind.value}"
        if share_group is not None and kind is not TopicKind.STATE:
            topic_filter = f"$share/{share_group}/{topic_filter}"
        filters.append(topic_filter)
    return filters


def agent_subscriptions(device_id: str) -> list[str]:
    """The topic filters an ``edge-agent`` subscribes to for as long as it is connected.

    Its own ``assign``, ``ack`` and ``chunk`` topics, and ``repo/timestamp`` (retained: a new timestamp
    means a new release may be available). Other repository metadata is fetched on demand by subscribing
    to its :func:`repo_topic` only when the TUF updater asks for it; a standing ``repo/#`` would replay
    every retained root and targets version on each reconnect of every device.

    Args:
        device_id: This device's id (its certificate CN, i.e. its broker username).

    Returns:
        Topic names (no wildcards), all inside the device's ACL.

    Raises:
        DecodeError: ``device_id`` is invalid.
    """
    own = [device_topic(device_id, kind) for kind in _CONTROLLER_PUBLISHES_ORDER]
    return [*own, repo_topic("timestamp")]


def _split(topic: str) -> list[str]:
    """Levels of an ``edgefleet/v1/...`` topic name; raises DecodeError for anything else."""
    if len(topic) > _MAX_TOPIC:
        raise DecodeError(f"topic of {len(topic)} characters exceeds {_MAX_TOPIC}")
    if topic.startswith("$share/"):
        raise DecodeError(f"{_shorten(topic)!r} is a shared subscription filter, not a message topic")
    if "+" in topic or "#" in topic:
        raise DecodeError(f"{_shorten(topic)!r} contains a wildcard: a filter, not a message topic")
    levels = topic.split("/")
    if len(levels) < 2 or levels[0] != ROOT:
        raise DecodeError(f"not an edgefleet topic: {_shorten(topic)!r}")
    if levels[1] != VERSION:
        raise UnsupportedVersionError(f"topic {_shorten(topic)!r} is not protocol {VERSION}")
    return levels


def _device_id_defect(device_id: str) -> str:
    """Why a string that does not match DEVICE_ID_RE is not a device id, in words."""
    if not device_id:
        return "empty"
    if len(device_id) > _DEVICE_ID_MAX:
        return f"{len(device_id)} characters, at most {_DEVICE_ID_MAX} allowed"
    for char, why in (
        ("+", "'+' is an MQTT wildcard"),
        ("#", "'#' is an MQTT wildcard"),
        ("/", "'/' separates MQTT topic levels"),
        ("\x00", "NUL is not allowed in MQTT topics"),
    ):
        if char in device_id:
            return why
    if device_id != device_id.lower():
        return "upper-case letters are not allowed (ids are lower-case)"
    if not DEVICE_ID_RE.fullmatch(device_id[0]):
        return "must start with a lower-case letter or a digit (so never '.', '..' or '-')"
    return "only lower-case letters, digits, '.', '_' and '-' are allowed"


def _shorten(text: str, limit: int = 80) -> str:
    """Bound hostile strings before they go into error messages."""
    return text if len(text) <= limit else text[:limit] + "..."
