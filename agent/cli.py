"""``edge-agent``: the device agent's command line.

Every subcommand takes the global options ``--config``, ``--state-dir`` and ``--socket`` (or
``EDGE_AGENT_CONFIG``, ``EDGE_AGENT_STATE_DIR``, ``EDGE_AGENT_SOCKET``), so a throwaway agent runs with no
config file at all: ``edge-agent --state-dir ./scratch --socket ./scratch/api.sock run``.
"""

from __future__ import annotations

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
def main(
    ctx: click.Context, config_path: Path | None, state_dir: Path | None, socket_path: Path | None
) -> None:
    """edge-agent: serve small language models on this device, online or offline."""
    ctx.obj = AgentContext(config_path=config_path, state_dir=state_dir, socket_path=socket_path)


def _run() -> None:  # pragma: no cover - exercised through the console script
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    _run()
