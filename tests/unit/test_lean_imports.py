"""The daemon of a device that is not enrolled does not import the link's stack (memory, start-up time).

Each check runs in a fresh interpreter: this test process has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LINK_STACK = ("aiomqtt", "paho", "tuf", "cryptography", "agent.link.mqtt", "agent.audit")


def _imported_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_daemon_and_its_engine_do_not_import_the_link_stack() -> None:
    modules = _imported_after("import agent.cli, agent.daemon, agent.inference.llama")
    assert not [name for name in LINK_STACK if name in modules]


@pytest.mark.parametrize("command", ["models", "token", "link", "audit"])
def test_a_subcommand_is_imported_when_named(command: str) -> None:
    code = (
        "from click.testing import CliRunner\n"
        "from agent.cli import main\n"
        f"assert CliRunner().invoke(main, [{command!r}, '--help']).exit_code == 0"
    )
    modules = _imported_after(code)
    assert f"agent.cli_{'tokens' if command == 'token' else command}" in modules
    assert "agent.cli_bench" not in modules


def test_an_unreadable_link_directory_is_left_to_the_link_to_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deciding whether to import the link must not crash the daemon (a `link/` owned by another user: the link
    then logs why it cannot be used and the agent serves without it, as before)."""
    from agent import daemon

    assert not daemon._may_be_enrolled(tmp_path)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "bundle").write_bytes(b"x")
    assert daemon._may_be_enrolled(tmp_path)

    def denied(self: Path, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", denied)
    assert daemon._may_be_enrolled(tmp_path)
