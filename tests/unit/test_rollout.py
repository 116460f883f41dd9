"""Unit tests for controller/rollout.py: selectors, sizes, waves, variant choice and gates (pure, no I/O)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.releases import TargetEntry
from controller.rollout import (
    HARDWARE_KEYS,
    Candidate,
    DeviceFacts,
    FitPolicy,
    Gates,
    RolloutError,
    Selector,
    Term,
    choose_variant,
    evaluate_gates,
    format_size,
    parse_selector,
    parse_size,
    parse_waves,
    wave_counts,
)
from protocols.gguf import build_gguf, parse_gguf_bytes
from protocols.messages import HardwareProfile
from protocols.releases import ModelTargetFields

pytestmark = pytest.mark.unit

GiB = 1 << 30
MiB = 1 << 20

# --- selectors --------------------------------------------------------------------------------------------

_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True).filter(lambda s: s != "all")
_keys = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True)
_values = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,20}", fullmatch=True)
_terms = st.one_of(
    st.just(Term("all")),
    _ids.map(lambda v: Term("device", value=v)),
    _ids.map(lambda v: Term("group", value=v)),
    st.builds(lambda k, op, v: Term("label", k, op, v), _keys, st.sampled_from(["=", "!="]), _values),
    st.builds(
        lambda k, op, n: Term("hw", k, op, str(n)),
        st.sampled_from(["ram", "disk", "cores"]),
        st.sampled_from([">=", "<=", ">", "<", "=", "!="]),
        st.integers(0, 1 << 42),
    ),
    st.builds(
        lambda k, op, v: Term("hw", k, op, v),
        st.sampled_from(["arch", "accel", "cpu"]),
        st.sampled_from(["=", "!="]),
        _values,
    ),
)


@given(st.lists(_terms, min_size=1, max_size=6))
def test_selector_round_trips(terms: list[Term]) -> None:
    """Any selector prints to a string that parses back to the same selector."""
    selector = Selector(tuple(terms))
    assert parse_selector(str(selector)) == selector


@given(st.text(max_size=60))
def test_selector_parser_raises_only_rollout_errors(text: str) -> None:
    """Arbitrary input either parses or raises RolloutError, never anything else."""
    try:
        selector = parse_selector(text)
    except RolloutError:
        return
    assert parse_selector(str(selector)) == selector


def test_selector_examples() -> None:
    """The documented spellings parse to the expected terms."""
    assert parse_selector("ram>=2G,arch=aarch64").terms == (
        Term("hw", "ram", ">=", str(2 * GiB)),
        Term("hw", "arch", "=", "aarch64"),
    )
    assert parse_selector("group:lab,dev1,site=berlin").terms == (
        Term("group", value="lab"),
        Term("device", value="dev1"),
        Term("label", "site", "=", "berlin"),
    )
    assert parse_selector("label:ram=lots").terms == (Term("label", "ram", "=", "lots"),)
    for bad in ("", "a,,b", "ram>=lots", "site>=x", "group:", "Dev!", "arch>=x"):
        with pytest.raises(RolloutError):
            parse_selector(bad)


def _device(name: str, ram: int, *, arch: str = "x86_64", disk: int = 100 * GiB, **extra: object) -> DeviceFacts:
    hw = HardwareProfile(arch, ("avx2",), 4, max(ram, 1), ram, disk)
    return DeviceFacts(name, True, hw, **extra)  # type: ignore[arg-type]


def test_selector_matching() -> None:
    """Ids and groups are a union; labels and hardware predicates must all hold."""
    a = _device("a", 4 * GiB, groups=frozenset({"lab"}), labels={"site": "berlin"})
    b = _device("b", 1 * GiB, arch="aarch64", labels={"site": "paris"})
    c = DeviceFacts("c", False, None)
    pick = lambda text: [d.id for d in (a, b, c) if parse_selector(text).matches(d)]  # noqa: E731
    assert pick("all") == ["a", "b", "c"]
    assert pick("group:lab,b") == ["a", "b"]
    assert pick("ram>=2G") == ["a"]
    assert pick("arch=aarch64") == ["b"]
    assert pick("site!=berlin") == ["b"]
    assert pick("group:lab,b,site=paris") == ["b"]
    assert pick("c") == ["c"]
    assert pick("c,ram>=1") == []  # no hardware reported: no predicate holds
    assert pick("cpu=avx2") == ["a", "b"]


@given(st.integers(0, 1 << 50))
def test_sizes_round_trip(n: int) -> None:
    """format_size is exact: parse_size reads back the same number of bytes."""
    assert parse_size(format_size(n)) == n


def test_size_spellings() -> None:
    """Binary units, optional B/iB suffix, case-insensitive."""
    assert parse_size("2G") == parse_size("2GiB") == parse_size("2gb") == 2 * GiB
    assert parse_size("1.5G") == 3 * GiB // 2
    assert parse_size("512") == 512
    with pytest.raises(ValueError, match="not a size"):
        parse_size("two gigs")


# --- waves ------------------------------------------------------------------------------------------------


def test_waves() -> None:
    """Cumulative percentages; each wave adds at least one device until all are in."""
    assert parse_waves("5%,25%,100%") == (5.0, 25.0, 100.0)
    assert wave_counts(3, (5, 25, 100)) == [1, 2, 3]
    assert wave_counts(100, (5, 25, 100)) == [5, 25, 100]
    assert wave_counts(1, (5, 25, 100)) == [1, 1, 1]
    for bad in ("5%,5%,100%", "50%", "0%,100%", "x,100%", "50%,120%"):
        with pytest.raises(RolloutError):
            parse_waves(bad)


# --- variant choice ---------------------------------------------------------------------------------------

SMOLLM2_META = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.vocab_size": 49152,
}
HEADER = parse_gguf_bytes(build_gguf(SMOLLM2_META))


def _candidate(variant: str, length: int, *, min_ram: int = 0, arch: tuple[str, ...] = ()) -> Candidate:
    fields = ModelTargetFields("gguf", variant, 0, 0, min_ram, arch, (), "apache-2.0", length, ("0" * 64,))
    entry = TargetEntry(f"models/m/1/{variant}.gguf", length, "0" * 64, fields, True)
    return Candidate(entry, "m", 1, variant, HEADER)


FAMILY = [
    _candidate("q8_0", 145 * MiB, min_ram=8 * GiB),
    _candidate("q5_1", 105 * MiB, min_ram=2 * GiB),
    _candidate("q4_0", 92 * MiB, min_ram=512 * MiB),
]


def test_highest_precision_that_fits() -> None:
    """1 / 4 / 16 GiB budgets get q4_0 / q5_1 / q8_0 under the publisher's signed minimums; reasons say why."""
    picks = {}
    for ram in (1, 4, 16):
        choice = choose_variant(_device(f"d{ram}", ram * GiB), FAMILY, FitPolicy())
        assert choice.candidate is not None
        picks[ram] = choice.candidate.variant
    assert picks == {1: "q4_0", 4: "q5_1", 16: "q8_0"}
    reasons = choose_variant(_device("d1", GiB), FAMILY, FitPolicy()).reasons
    assert any(r.startswith("q8_0: needs 8.0 GiB of RAM") for r in reasons), reasons
    assert any(r.startswith("q4_0: fits") for r in reasons), reasons


def test_prefer_speed_takes_the_smallest_that_fits() -> None:
    """--prefer speed picks the smallest fitting variant."""
    choice = choose_variant(_device("d", 16 * GiB), FAMILY, FitPolicy(prefer="speed"))
    assert choice.candidate is not None
    assert choice.candidate.variant == "q4_0"


def test_the_estimate_counts_the_kv_cache() -> None:
    """A long context with many slots makes a variant too big for a budget its file alone fits."""
    small = [_candidate("q4_0", 92 * MiB)]
    assert choose_variant(_device("d", 600 * MiB), small, FitPolicy(n_ctx=2048)).candidate is not None
    choice = choose_variant(_device("d", 600 * MiB), small, FitPolicy(n_ctx=8192, n_slots=4))
    assert choice.candidate is None
    assert "KV" in choice.reasons[0]
    assert "RAM budget" in choice.reasons[0]


def test_nothing_fits_arch_disk_or_unknown_hardware() -> None:
    """Signed arch constraints, free disk and missing hardware each refuse, with their reason."""
    arm_only = [_candidate("q4_0", 92 * MiB, arch=("aarch64",))]
    assert "built for aarch64" in choose_variant(_device("d", 4 * GiB), arm_only, FitPolicy()).summary
    no_disk = choose_variant(_device("d", 4 * GiB, disk=100 * MiB), [_candidate("q4_0", 92 * MiB)], FitPolicy())
    assert no_disk.candidate is None
    assert "of disk" in no_disk.summary
    unknown = choose_variant(DeviceFacts("d", True, None), FAMILY, FitPolicy())
    assert unknown.candidate is None
    assert "not reported" in unknown.summary
    tiny = choose_variant(_device("d", 256 * MiB), FAMILY, FitPolicy())
    assert tiny.candidate is None
    assert tiny.summary.startswith("nothing fits")


# --- gates ------------------------------------------------------------------------------------------------


def _row(status: str, reason: str = "", metrics: dict[str, float] | None = None, base: dict[str, float] | None = None):  # type: ignore[no-untyped-def]
    return {
        "status": status,
        "reason": reason,
        "metrics_json": json.dumps(metrics or {}),
        "baseline_json": json.dumps(base or {}),
    }


def test_gates() -> None:
    """Install and health rates, tokens/s and TTFT ratios against the previous model; offline not counted."""
    base = {"tokens_per_s": 100.0, "ttft_ms": 50.0}
    good = [_row("ok", metrics={"tokens_per_s": 90.0, "ttft_ms": 60.0}, base=base), _row("offline")]
    result = evaluate_gates(good, Gates())
    assert result.passed
    assert result.counted == 1
    assert result.values["tps_ratio"] == pytest.approx(0.9)
    slow = [_row("ok", metrics={"tokens_per_s": 30.0, "ttft_ms": 50.0}, base=base)]
    assert evaluate_gates(slow, Gates()).failures == ("tps_ratio 0.30 < 0.50",)
    laggy = [_row("ok", metrics={"tokens_per_s": 100.0, "ttft_ms": 150.0}, base=base)]
    assert not evaluate_gates(laggy, Gates()).passed
    unhealthy = evaluate_gates([_row("failed", "health: model failed to load")], Gates())
    assert unhealthy.values["install_rate"] == 1.0
    assert unhealthy.values["health_rate"] == 0.0
    assert not unhealthy.passed
    refused = evaluate_gates([_row("failed", "refusal: does not fit"), _row("ok")], Gates(min_install_rate=0.5))
    assert refused.passed
    assert evaluate_gates([_row("timeout"), _row("ok")], Gates()).values["install_rate"] == 0.5
    assert evaluate_gates([_row("offline")], Gates()).passed


def test_hardware_keys_are_documented_in_the_parser() -> None:
    """Every hardware key is a predicate, not a label."""
    for key in HARDWARE_KEYS:
        value = "1G" if key in ("ram", "disk") else "1" if key == "cores" else "x"
        assert parse_selector(f"{key}={value}").terms[0].kind == "hw"
