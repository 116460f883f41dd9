"""Unit tests for protocols/topics.py: building, parsing and subscribing to edgefleet MQTT topics."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from protocols.errors import DecodeError, UnsupportedVersionError
from protocols.limits import DEVICE_ID_RE
from protocols.topics import (
    CONTROLLER_PUBLISHES,
    DEVICE_PUBLISHES,
    REPO_ROLE_RE,
    DeviceTopic,
    RepoTopic,
    TopicKind,
    agent_subscriptions,
    controller_subscriptions,
    device_topic,
    parse_device_topic,
    parse_repo_topic,
    repo_topic,
    validate_device_id,
)

pytestmark = pytest.mark.unit

device_ids = st.from_regex(DEVICE_ID_RE, fullmatch=True)
kinds = st.sampled_from(TopicKind)


def mqtt_matches(topic_filter: str, topic: str) -> bool:
    """MQTT v5 §4.7 topic filter matching; a ``$share/{group}/`` prefix is stripped as the broker does."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


@given(device_id=device_ids, kind=kinds)
def test_device_topic_round_trip(device_id: str, kind: TopicKind) -> None:
    """Every valid device id and kind builds the documented topic, which parses back to the same pair."""
    topic = device_topic(device_id, kind)
    assert topic == f"edgefleet/v1/devices/{device_id}/{kind.value}"
    assert parse_device_topic(topic) == DeviceTopic(device_id, kind)
    assert validate_device_id(device_id) == device_id


@given(before=st.text(max_size=10), forbidden=st.sampled_from("+#/\x00"), after=st.text(max_size=10))
def test_forbidden_characters_rejected(before: str, forbidden: str, after: str) -> None:
    """A device id containing '+', '#', '/' or NUL is rejected by validate, build and parse."""
    bad = before + forbidden + after
    with pytest.raises(DecodeError):
        validate_device_id(bad)
    with pytest.raises(DecodeError):
        device_topic(bad, TopicKind.STATE)
    with pytest.raises(DecodeError):
        parse_device_topic(f"edgefleet/v1/devices/{bad}/state")


@given(bad=st.text(max_size=80).filter(lambda s: not DEVICE_ID_RE.fullmatch(s)))
def test_non_matching_ids_rejected(bad: str) -> None:
    """Any string that does not fully match DEVICE_ID_RE is rejected with DecodeError."""
    with pytest.raises(DecodeError, match="invalid device id"):
        validate_device_id(bad)
    with pytest.raises(DecodeError):
        device_topic(bad, TopicKind.ASSIGN)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "empty"),
        ("a" * 65, "at most 64"),
        ("Device1", "upper-case"),
        ("..", "must start"),
        (".hidden", "must start"),
        ("-a", "must start"),
        ("a+b", "wildcard"),
        ("a#b", "wildcard"),
        ("a/b", "separates"),
        ("a\x00b", "NUL"),
        ("a b", "only lower-case"),
        ("a\nb", "only lower-case"),
    ],
)
def test_device_id_errors_say_why(bad: str, reason: str) -> None:
    """Each kind of invalid device id gets a DecodeError whose message names the defect."""
    with pytest.raises(DecodeError, match=reason):
        validate_device_id(bad)


def test_longest_device_id_accepted() -> None:
    """A 64-character id is the longest accepted."""
    assert validate_device_id("a" * 64) == "a" * 64


level_parts = st.sampled_from(
    [
        "edgefleet",
        "v1",
        "v2",
        "devices",
        "repo",
        "d1",
        "",
        "+",
        "#",
        "$share",
        "g",
        "STATE",
        "..",
        "root",
        "1",
    ]
    + [kind.value for kind in TopicKind]
)
topic_like = st.one_of(
    st.text(max_size=60),
    st.lists(level_parts | st.text(max_size=4), max_size=7).map("/".join),
)


@given(topic=topic_like)
def test_parse_device_topic_is_strict_and_canonical(topic: str) -> None:
    """A topic either raises DecodeError or parses to a pair that rebuilds exactly the same topic."""
    try:
        parsed = parse_device_topic(topic)
    except DecodeError:
        return
    assert device_topic(*parsed) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "$share/edge-fleet/edgefleet/v1/devices/d1/state",
        "edgefleet/v1/devices/+/state",
        "edgefleet/v1/devices/d1/#",
        "edgefleet/v1/devices/d1/STATE",
        "edgefleet/v1/devices/d1/unknown",
        "edgefleet/v1/devices/d1/state/",
        "edgefleet/v1/devices/d1/state/extra",
        "edgefleet/v1/devices/d1",
        "edgefleet/v1/devices//state",
        "/edgefleet/v1/devices/d1/state",
        "edgefleet/v1/repo/timestamp",
        "other/v1/devices/d1/state",
        "edgefleet",
        "",
        "edgefleet/v1/devices/" + "a" * 300 + "/state",
    ],
)
def test_parse_device_topic_rejects(topic: str) -> None:
    """Filters, shared-subscription names, unknown kinds and malformed topics are DecodeErrors."""
    with pytest.raises(DecodeError):
        parse_device_topic(topic)


def test_other_protocol_version_is_unsupported() -> None:
    """A topic of another protocol major version raises UnsupportedVersionError."""
    with pytest.raises(UnsupportedVersionError):
        parse_device_topic("edgefleet/v2/devices/d1/state")
    with pytest.raises(UnsupportedVersionError):
        parse_repo_topic("edgefleet/v2/repo/timestamp")


def test_direction_sets_partition_kinds() -> None:
    """Every kind is published by exactly one side."""
    assert set(TopicKind) == DEVICE_PUBLISHES | CONTROLLER_PUBLISHES
    assert not DEVICE_PUBLISHES & CONTROLLER_PUBLISHES


def test_controller_subscriptions_single() -> None:
    """Without a share group the controller subscribes plainly to every device-to-controller kind."""
    assert controller_subscriptions(None) == [
        "edgefleet/v1/devices/+/state",
        "edgefleet/v1/devices/+/report",
        "edgefleet/v1/devices/+/audit",
        "edgefleet/v1/devices/+/fetch",
    ]


def test_controller_subscriptions_shared() -> None:
    """With a share group, report/audit/fetch are shared; retained state stays unshared (MQTT v5 §4.8.2)."""
    assert controller_subscriptions("edge-fleet") == [
        "edgefleet/v1/devices/+/state",
        "$share/edge-fleet/edgefleet/v1/devices/+/report",
        "$share/edge-fleet/edgefleet/v1/devices/+/audit",
        "$share/edge-fleet/edgefleet/v1/devices/+/fetch",
    ]


@given(device_id=device_ids, kind=kinds, group=st.sampled_from([None, "edge-fleet"]))
def test_controller_receives_exactly_device_kinds(device_id: str, kind: TopicKind, group: str | None) -> None:
    """A device topic matches exactly one controller filter if the device publishes that kind, else none."""
    topic = device_topic(device_id, kind)
    matching = [f for f in controller_subscriptions(group) if mqtt_matches(f, topic)]
    assert len(matching) == (1 if kind in DEVICE_PUBLISHES else 0)
    if matching:  # the broker delivers the plain topic, even through a shared subscription
        assert parse_device_topic(topic) == DeviceTopic(device_id, kind)


@pytest.mark.parametrize("group", ["", "a/b", "a+b", "a#b", "$share", "a\x00", "x" * 65])
def test_invalid_share_group_rejected(group: str) -> None:
    """Share group names that MQTT forbids (or that are empty or too long) raise ValueError."""
    with pytest.raises(ValueError, match="share group"):
        controller_subscriptions(group)


@given(device_id=device_ids)
def test_agent_subscriptions(device_id: str) -> None:
    """The agent subscribes to its own assign/ack/chunk topics and repo/timestamp, all inside its ACL."""
    subscriptions = agent_subscriptions(device_id)
    assert subscriptions == [
        f"edgefleet/v1/devices/{device_id}/assign",
        f"edgefleet/v1/devices/{device_id}/ack",
        f"edgefleet/v1/devices/{device_id}/chunk",
        "edgefleet/v1/repo/timestamp",
    ]
    acl = [f"edgefleet/v1/devices/{device_id}/#", "edgefleet/v1/repo/#"]
    for topic in subscriptions:
        assert any(mqtt_matches(rule, topic) for rule in acl)
    for kind in CONTROLLER_PUBLISHES:
        assert device_topic(device_id, kind) in subscriptions


@given(other=device_ids, device_id=device_ids, kind=kinds)
def test_agent_never_subscribes_to_other_devices(other: str, device_id: str, kind: TopicKind) -> None:
    """No agent subscription matches another device's topics."""
    assume(other != device_id)
    topic = device_topic(other, kind)
    assert not any(mqtt_matches(f, topic) for f in agent_subscriptions(device_id))


repo_roles = st.from_regex(REPO_ROLE_RE, fullmatch=True)
versions = st.none() | st.integers(1, 10**18)


@given(role=repo_roles, version=versions)
def test_repo_topic_round_trip(role: str, version: int | None) -> None:
    """Valid repository topics parse back to the same role and version; root/timestamp rules hold."""
    if (role == "root" and version is None) or (role == "timestamp" and version is not None):
        with pytest.raises(ValueError, match="versioned"):
            repo_topic(role, version)
        return
    topic = repo_topic(role, version)
    assert topic == f"edgefleet/v1/repo/{role}" + ("" if version is None else f"/{version}")
    assert parse_repo_topic(topic) == RepoTopic(role, version)


def test_repo_topic_names() -> None:
    """The TUF metadata topics are the documented ones."""
    assert repo_topic("timestamp") == "edgefleet/v1/repo/timestamp"
    assert repo_topic("root", 3) == "edgefleet/v1/repo/root/3"
    assert repo_topic("snapshot") == "edgefleet/v1/repo/snapshot"
    assert repo_topic("snapshot", 12) == "edgefleet/v1/repo/snapshot/12"
    assert repo_topic("targets") == "edgefleet/v1/repo/targets"


@pytest.mark.parametrize(("role", "version"), [("root", 0), ("root", -1), ("Targets", None), ("a/b", None)])
def test_repo_topic_invalid_arguments(role: str, version: int | None) -> None:
    """Invalid roles and non-positive versions are programming errors (ValueError)."""
    with pytest.raises(ValueError, match="invalid"):
        repo_topic(role, version)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefleet/v1/repo/root",
        "edgefleet/v1/repo/root/0",
        "edgefleet/v1/repo/root/01",
        "edgefleet/v1/repo/root/-1",
        "edgefleet/v1/repo/root/+",
        "edgefleet/v1/repo/timestamp/4",
        "edgefleet/v1/repo/#",
        "edgefleet/v1/repo/",
        "edgefleet/v1/repo",
        "edgefleet/v1/repo/snapshot/1/2",
        "edgefleet/v1/repo/Snapshot",
        "$share/g/edgefleet/v1/repo/timestamp",
        "edgefleet/v1/devices/d1/state",
    ],
)
def test_parse_repo_topic_rejects(topic: str) -> None:
    """Malformed repository topics and filters raise DecodeError."""
    with pytest.raises(DecodeError):
        parse_repo_topic(topic)


@given(topic=topic_like)
def test_parse_repo_topic_is_strict_and_canonical(topic: str) -> None:
    """A topic either raises DecodeError or parses to a role/version that rebuilds exactly the same topic."""
    try:
        parsed = parse_repo_topic(topic)
    except DecodeError:
        return
    assert repo_topic(*parsed) == topic
