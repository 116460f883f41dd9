"""Coalescing of failed-authentication audit records (agent.api.auth_audit), on a fake clock."""

from __future__ import annotations

from agent.api.auth_audit import OVERFLOW_ACTOR, AuthFailureAudit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_record_per_caller_and_window_then_one_summary() -> None:
    """The first failure of a caller is audited, the rest of its window are counted into one summary record."""
    clock = Clock()
    audit = AuthFailureAudit(10.0, clock=clock)
    assert audit.failed(("tcp", "127.0.0.1"), "tcp", "models_list", "no token") == [
        ("api.auth_failed", "tcp", {"route": "models_list", "reason": "no token"})
    ]
    for _ in range(999):
        assert audit.failed(("tcp", "127.0.0.1"), "tcp", "admin_gc", "bad token") == []
    clock.now = 10.0
    records = audit.failed(("unix", "1000"), "uid:1000", "models_list", "bad token")
    assert records == [
        (
            "api.auth_failed_repeated",
            "tcp",
            {"count": 999, "window_s": 10.0, "routes": ["admin_gc"], "reason": "bad token"},
        ),
        ("api.auth_failed", "uid:1000", {"route": "models_list", "reason": "bad token"}),
    ]
    assert audit.flush() == []
    assert len(audit) == 0


def test_the_table_of_callers_is_bounded() -> None:
    """Failures from more callers than max_peers share one overflow entry: memory stays bounded, none is lost."""
    audit = AuthFailureAudit(60.0, max_peers=4, clock=Clock())
    records = [r for i in range(1000) for r in audit.failed(("tcp", f"127.0.{i // 256}.{i % 256}"), "tcp", "r", "x")]
    assert len(audit) == 5
    assert [r[1] for r in records] == ["tcp"] * 4 + [OVERFLOW_ACTOR]
    [summary] = audit.flush()
    assert summary[1] == OVERFLOW_ACTOR
    assert summary[2]["count"] == 995
