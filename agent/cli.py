"""``edge-agent``: the device agent's command line.

Every subcommand takes the global options ``--config``, ``--state-dir`` and ``--socket`` (or
``EDGE_AGENT_CONFIG``, ``EDGE_AGENT_STATE_DIR``, ``EDGE_AGENT_SOCKET``), so a throwaway agent runs with no
config file at all: ``edge-agent --state-dir ./scratch --socket ./scratch/api.sock run``.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from agent import __version__
from agent.config import AgentConfig, load_config
from agent.errors import AgentError

__all__ = ["AgentContext", "main", "pass_context"]


@dataclass
class AgentContext:
    """What every subcommand gets: the options, and the configuration built from them on first use."""

    config_path: Path | None
    state_dir: Path | None
    socket_path: Path | None
    _config: AgentConfig | None = field(default=None, repr=False)

    @property
    def config(self) -> AgentConfig:
        """The agent's configuration (raises a click error on a bad config)."""
        if self._config is None:
            try:
                self._config = load_config(
                    self.config_path, env=os.environ, state_dir=self.state_dir, socket_path=self.socket_path
                )
            except AgentError as exc:
                raise click.ClickException(str(exc)) from exc
        return self._config


pass_context = click.make_pass_decorator(AgentContext)


class _LazyGroup(click.Group):
    """A group whose subcommands in :data:`_LAZY` are imported only when named (or listed, for ``--help``).

    ``edge-agent run`` is what systemd starts on every boot and after every restart: importing every
    subcommand's module (the link, its TLS and TUF stack, the token store, the audit tools) cost the daemon
    ~2 s of start-up on a 2-core box and their memory for the life of the process.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _LAZY:
            module, _, attribute = _LAZY[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):  # pragma: no cover - a wrong entry in _LAZY
                raise TypeError(f"{_LAZY[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


_LAZY: dict[str, str] = {
    "audit": "agent.cli_audit:audit",
    "bench": "agent.cli_bench:bench",
    "enroll": "agent.cli_link:enroll",
    "link": "agent.cli_link:link",
    "models": "agent.cli_models:models",
    "token": "agent.cli_tokens:token",
}
"""Subcommands defined in their own modules: name -> ``module:attribute``."""


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="edge-agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="EDGE_AGENT_CONFIG",
    help="TOML configuration file [default: /etc/edge-agent/agent.toml if it exists].",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="EDGE_AGENT_STATE_DIR",
    help="State directory (registry, blobs, keys) [default: /var/lib/edge-agent].",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="EDGE_AGENT_SOCKET",
    help="Unix socket of the local API [default: /run/edge-agent/api.sock].",
)
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, state_dir: Path | None, socket_path: Path | None) -> None:
    """edge-agent: serve small language models on this device, online or offline."""
    ctx.obj = AgentContext(config_path=config_path, state_dir=state_dir, socket_path=socket_path)


# --- daemon, status, chat ---------------------------------------------------------------------------------


@main.command()
@pass_context
def run(ctx: AgentContext) -> None:
    """Run the agent daemon in the foreground (systemd runs exactly this)."""
    import asyncio

    from agent.errors import EXIT_BAD_LOCAL_STATE, LocalStateError
    from agent.imports import import_without

    try:
        config = ctx.config
    except click.ClickException as exc:  # an invalid configuration: a restart would read the same file
        click.echo(f"edge-agent: bad configuration: {exc.format_message()}", err=True)
        sys.exit(EXIT_BAD_LOCAL_STATE)
    # Before anything imports them: without numpy and rich, which they would load for features the daemon does
    # not use and keep resident for its whole life (agent/imports.py). The console renderer keeps rich.
    import_without("sqlite_utils", "numpy")
    if config.log.json:
        import_without("structlog", "rich")

    from agent import daemon
    from agent.logs import configure_logging

    configure_logging(config.log.level, json=config.log.json)
    try:
        status = asyncio.run(daemon.run(config, freeze_gc=True))
    except LocalStateError as exc:  # one line; the unit's RestartPreventExitStatus= stops the restarts
        import structlog

        structlog.get_logger("agent.daemon").critical("agent.bad_local_state", error=str(exc))
        click.echo(f"edge-agent: bad local state: {exc}", err=True)
        sys.exit(EXIT_BAD_LOCAL_STATE)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(status)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_context
def status(ctx: AgentContext, as_json: bool) -> None:
    """Show whether the daemon runs, its loaded models and the registry's active models."""
    import json

    from rich.console import Console
    from rich.table import Table

    from agent.client import ApiClient, ApiClientError, DaemonNotRunningError

    config = ctx.config
    client = ApiClient(config.api.socket_path, token=os.environ.get("EDGE_AGENT_TOKEN"))
    try:
        info = client.request("GET", "/v1/admin/status", timeout=5.0)
        running = True
    except DaemonNotRunningError:
        info, running = _offline_status(config), False
    except ApiClientError as exc:
        raise click.ClickException(exc.message) from exc
    if as_json:
        click.echo(json.dumps({"running": running, **info}, indent=2, default=str))
        return
    console = Console()
    console.print(
        f"daemon: {'[green]running[/]' if running else '[yellow]not running[/]'}  socket: {client.socket_path}"
    )
    table = Table("model", "variant", "version", "format", "state", "loaded")
    loaded = {m.get("sha256") for m in info.get("loaded_models", [])}
    for model in info.get("active_models", []):
        table.add_row(
            model["name"],
            model["variant"],
            str(model["version"]),
            model["format"],
            model["state"],
            "yes" if model["sha256"] in loaded else "",
        )
    console.print(table)


def _offline_status(config: AgentConfig) -> dict[str, object]:
    from agent.registry import Registry

    if not (config.state_dir / "registry.db").exists():
        return {"active_models": [], "loaded_models": []}
    registry = Registry.open(config.state_dir, config.registry)
    try:
        models = [
            {
                "name": m.name,
                "variant": m.variant,
                "version": m.version,
                "format": m.format,
                "state": m.state,
                "sha256": m.sha256,
            }
            for m in registry.active_models()
        ]
    finally:
        registry.close()
    return {"active_models": models, "loaded_models": []}


@main.command()
@click.argument("model")
@click.option("--system", default=None, help="System prompt.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True)
@click.option("--once", "prompt", default=None, help="Send one prompt, print the answer and exit.")
@pass_context
def chat(
    ctx: AgentContext, model: str, system: str | None, temperature: float, max_tokens: int, prompt: str | None
) -> None:
    """Chat with MODEL through the running daemon, streaming the answer (Ctrl-D to quit)."""
    from agent.client import ApiClient, ApiClientError

    client = ApiClient(ctx.config.api.socket_path, token=os.environ.get("EDGE_AGENT_TOKEN"))
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = prompt is None
    while True:
        if interactive:
            try:
                prompt = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
            except (EOFError, click.Abort):
                click.echo()
                return
            if not prompt.strip():
                continue
        assert prompt is not None
        history.append({"role": "user", "content": prompt})
        body = {"model": model, "messages": history, "temperature": temperature, "max_tokens": max_tokens}
        answer = []
        try:
            for event in client.stream("/v1/chat/completions", body):
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content") or ""
                    answer.append(piece)
                    click.echo(piece, nl=False)
        except ApiClientError as exc:
            raise click.ClickException(exc.message) from exc
        click.echo()
        history.append({"role": "assistant", "content": "".join(answer)})
        if not interactive:
            return
