"""Run one enrolled agent's link with the audit uploader in its own process, for tests that kill the agent.

    python tests/audit_agent_proc.py STATE_DIR LINK_JSON DEVICE [--crash-on-ack]

``--crash-on-ack`` makes the process SIGKILL itself when the first audit ack arrives, before the uploader
records it (the batch was sent and stored by the controller; the device has not deleted anything). The process
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

from agent.audit import AuditLog, AuditUploader
from agent.config import AgentConfig, LinkConfig, RegistryConfig
from agent.link.mqtt import open_agent_link
from agent.registry import Registry
from protocols.messages import Ack


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("link_json")
    parser.add_argument("device")
    parser.add_argument("--crash-on-ack", action="store_true")
    args = parser.parse_args()
    config = dataclasses.replace(AgentConfig(), state_dir=args.state_dir, link=LinkConfig(**json.loads(args.link_json)))
    registry = Registry.open(args.state_dir, RegistryConfig())
    registry.recover()
    audit = AuditLog.open(registry, args.device)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def crash(ack: Ack) -> None:
        if ack.audit is not None:
            print(f"CRASHING on the ack of seq {ack.audit.seq}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        async with open_agent_link(config, registry, agent_version="0.1.0-test") as link:
            assert link is not None, "not enrolled"
            if args.crash_on_ack:
                link.ack_listeners.append(crash)
            uploader = AuditUploader(audit, link, interval=0.1)
            if args.crash_on_ack:  # the crash runs before the uploader records the ack
                link.ack_listeners.remove(uploader.on_ack)
                link.ack_listeners.append(uploader.on_ack)
            tasks = [asyncio.create_task(link.run()), asyncio.create_task(uploader.run())]
            print("READY", flush=True)
            await stop.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        registry.close()


if __name__ == "__main__":
    asyncio.run(main())
