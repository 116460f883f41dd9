"""Unit tests for the link's pure rules: assignment generations, broker ACL and config, reconnect backoff."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.link.dispatch import AssignmentVerifier
from agent.link.mqtt import Backoff
from controller.brokerconf import BrokerFiles, render_acl, render_mosquitto_conf
from controller.config import BrokerConfig
from protocols.errors import RollbackError
from protocols.messages import Assignment

pytestmark = pytest.mark.unit


def assignment(generation: int) -> Assignment:
    return Assignment(device="dev-1", generation=generation, issued_ts_ms=0, models=())


@given(st.lists(st.integers(1, 30), max_size=40))
def test_accepted_generations_strictly_increase(deliveries: list[int]) -> None:
    """Whatever order and duplication assignments arrive in, only strictly newer generations are accepted."""
    accepted: tuple[int, bytes] | None = None
    history = []
    for generation in deliveries:
        data = f"envelope {generation}".encode()
        try:
            if AssignmentVerifier.check_generation(assignment(generation), data, accepted):
                accepted = (generation, data)
                history.append(generation)
            else:
                assert accepted == (generation, data)  # a duplicate of the accepted one
        except RollbackError:
            assert accepted is not None
            assert generation < accepted[0]
    assert history == sorted(set(history))
    assert history == [g for i, g in enumerate(deliveries) if g > max(deliveries[:i], default=0)]


def test_same_generation_with_other_content_is_refused() -> None:
    """Two different assignments may never share a generation: the second is refused."""
    with pytest.raises(RollbackError, match="different assignment"):
        AssignmentVerifier.check_generation(assignment(3), b"other", (3, b"original"))


def test_acl_gives_devices_only_their_own_topics_by_direction() -> None:
    """Devices write only state/report/audit/fetch and read only assign/ack/chunk of %u; never %c."""
    acl = render_acl(["edge-fleet-controller:main"], ["dev-gone"])
    patterns = [line for line in acl.splitlines() if line.startswith("pattern ")]
    assert "%c" not in acl
    writes = {line.split()[2] for line in patterns if line.split()[1] == "write"}
    reads = {line.split()[2] for line in patterns if line.split()[1] == "read"}
    assert writes == {f"edgefleet/v1/devices/%u/{k}" for k in ("state", "report", "audit", "fetch")}
    assert reads == {f"edgefleet/v1/devices/%u/{k}" for k in ("assign", "ack", "chunk")} | {"edgefleet/v1/repo/#"}
    assert not [line for line in patterns if line.split()[1] == "readwrite"]
    assert re.search(r"user dev-gone\ntopic deny #", acl)
    controller = acl.split("user edge-fleet-controller:main\n")[1].split("\n\n")[0].splitlines()
    assert "topic write edgefleet/v1/devices/+/assign" in controller
    assert "topic read edgefleet/v1/devices/+/report" in controller


def test_mosquitto_conf_has_one_tls_listener_with_certificate_identity() -> None:
    """One listener, TLS 1.2+, client certificate required, CN as username and client id, CRL, persistence."""
    files = BrokerFiles(*(Path(f"/h/{n}") for n in ("ca", "crt", "key", "crl", "acl", "data")))
    conf = render_mosquitto_conf(BrokerConfig(port=8883, max_packet_size=65536, max_queued_messages=7), files)
    lines = conf.splitlines()
    assert [line for line in lines if line.startswith("listener")] == ["listener 8883 0.0.0.0"]
    after = lines[lines.index("listener 8883 0.0.0.0") :]
    for setting in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "crlfile /h/crl",
        "tls_version tlsv1.2",
    ):
        assert setting in after
    for setting in ("allow_anonymous false", "persistence true", "max_packet_size 65536", "max_queued_messages 7"):
        assert setting in lines


@given(seed=st.integers(0, 2**32), minimum=st.floats(0.01, 5), maximum=st.floats(5, 120))
def test_backoff_is_jittered_exponential_and_capped(seed: int, minimum: float, maximum: float) -> None:
    """Each delay lies in [step/2, step] for step = min(max, min * 2^n), and reset starts over."""
    backoff = Backoff(minimum, maximum, random.Random(seed))
    for attempt in range(12):
        step = min(maximum, minimum * 2**attempt)
        assert step / 2 <= backoff.next() <= step
    backoff.reset()
    assert backoff.next() <= minimum
