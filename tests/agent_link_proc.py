"""Run one enrolled agent's link in its own process, for tests that kill the agent.

    python tests/agent_link_proc.py STATE_DIR LINK_JSON [--crash-at POINT]

``LINK_JSON`` holds the :class:`agent.config.LinkConfig` fields. ``--crash-at accepted`` (or ``applied``) makes
the process SIGKILL itself at that point of the dispatcher (the dispatcher's fault seam), i.e. right after it
persisted a received assignment and before acting on it (or after acting, before recording it). The process
prints ``READY`` once its link runs, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path

from agent.config import AgentConfig, LinkConfig, RegistryConfig
from agent.link.mqtt import open_agent_link
from agent.registry import Registry


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("link_json")
    parser.add_argument("--crash-at", default=None)
    args = parser.parse_args()
    config = dataclasses.replace(AgentConfig(), state_dir=args.state_dir, link=LinkConfig(**json.loads(args.link_json)))

    def fault(point: str) -> None:
        if point == args.crash_at:
            print(f"CRASHING at {point}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    registry = Registry.open(args.state_dir, RegistryConfig())
    registry.recover()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        async with open_agent_link(config, registry, agent_version="0.1.0-test", fault=fault) as link:
            assert link is not None, "not enrolled"
            task = asyncio.create_task(link.run())
            print("READY", flush=True)
            await stop.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        registry.close()


if __name__ == "__main__":
    asyncio.run(main())
