"""The docs stay true: every CLI command and option, and every API route, appears in them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from agent.api.openapi import openapi_document
from agent.cli import main as agent_main
from controller.cli import main as fleet_main

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs"
README = DOCS.parent / "README.md"


def _all_docs() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [README, *sorted(DOCS.rglob("*.md"))])


def _commands(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
    ctx = click.Context(group)
    for name in sorted(group.list_commands(ctx)):  # imports lazily registered subcommands too
        command = group.get_command(ctx, name)
        assert command is not None, name
        path = f"{prefix} {name}"
        yield path, command
        if isinstance(command, click.Group):
            yield from _commands(command, path)


def _options(command: click.Command) -> list[tuple[str, ...]]:
    """Each option's spellings (a boolean flag's ``--x/--no-x`` counts as documented by either)."""
    found = []
    for param in command.params:
        if isinstance(param, click.Option) and "--help" not in param.opts:
            found.append(tuple(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")))
    return found


@pytest.mark.parametrize(("program", "group"), [("edge-agent", agent_main), ("edge-fleet", fleet_main)])
def test_every_cli_command_and_option_is_documented(program: str, group: click.Group) -> None:
    """Each subcommand appears in the docs as `program sub ...`, and each of its options appears next to it."""
    docs = _all_docs()
    missing = [f"{program} (global) {opts[0]}" for opts in _options(group) if not any(o in docs for o in opts)]
    for path, command in _commands(group, program):
        if path not in docs:
            missing.append(path)
            continue
        mentions = "\n".join(line for line in docs.splitlines() if path in line or path.split(" ", 1)[1] in line)
        missing += [
            f"{path} {opts[0]}" for opts in _options(command) if not any(o in mentions or o in docs for o in opts)
        ]
    assert missing == [], f"undocumented: {missing}"


def test_every_api_route_is_in_the_agent_reference() -> None:
    """docs/agent.md lists every route of /openapi.json, and nothing that isn't one."""
    text = (DOCS / "agent.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \|", text, flags=re.MULTILINE))
    served = {(method.upper(), path) for path, ops in openapi_document()["paths"].items() for method in ops}
    assert documented == served
