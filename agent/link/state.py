"""The device's state message: status, hardware profile, models, agent version, audit head.

:class:`StateBuilder` reads the registry and the machine (blocking: call it in a worker thread) and builds a
:class:`~protocols.messages.DeviceState`. :func:`fingerprint` is what "the state changed" means: everything but
the timestamp, the heartbeat counter and small moves of the free disk space, so the state is re-published at
once when something real changed and otherwise only every ``state_interval_s`` (the heartbeat).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from pathlib import Path

import structlog

from agent.hardware import hardware_profile
from agent.link.dispatch import ModelRegistry
from protocols.audit import AuditHead
from protocols.canonical import canonical_json
from protocols.errors import DecodeError
from protocols.messages import MAX_VERSION, DeviceState, HardwareProfile, ModelInfo, TransferProgress

__all__ = ["StateBuilder", "fingerprint"]

log = structlog.get_logger(__name__)

DISK_GRANULE = 256 * 1024 * 1024
"""Free-disk changes smaller than this do not count as a state change."""


def fingerprint(state: DeviceState) -> bytes:
    """The parts of ``state`` whose change warrants publishing at once."""
    body = state.body()
    body.pop("ts_ms")
    body.pop("heartbeat")
    body["hardware"] = dict(body["hardware"], disk_free_bytes=state.hardware.disk_free_bytes // DISK_GRANULE)
    return canonical_json(body, allow_floats=True)


class StateBuilder:
    """Builds the device's state from the registry and the machine."""

    def __init__(
        self,
        *,
        device: str,
        registry: ModelRegistry,
        state_dir: Path,
        memory_budget_bytes: int,
        agent_version: str,
        audit_head: Callable[[], AuditHead | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device = device
        self.registry = registry
        self.state_dir = state_dir
        self.memory_budget_bytes = memory_budget_bytes
        self.agent_version = agent_version
        self.audit_head = audit_head or (lambda: None)
        self.clock = clock
        self._hardware: HardwareProfile | None = None
        self.transfers: Callable[[], tuple[TransferProgress, ...]] = lambda: ()
        """Release downloads in progress (set by the link's release installer)."""

    def hardware(self) -> HardwareProfile:
        """The hardware profile (static facts cached; free disk read each time)."""
        current = hardware_profile(self.state_dir, self.memory_budget_bytes)
        if self._hardware is None:
            self._hardware = current
        return HardwareProfile(
            arch=self._hardware.arch,
            cpu_features=self._hardware.cpu_features,
            cores=self._hardware.cores,
            ram_bytes=self._hardware.ram_bytes,
            ram_budget_bytes=self._hardware.ram_budget_bytes,
            disk_free_bytes=current.disk_free_bytes,
            accelerators=self._hardware.accelerators,
        )

    def models(self, loaded: Collection[tuple[str, str, str]] = ()) -> tuple[ModelInfo, ...]:
        """The registry's models as the protocol describes them (invalid records are left out, logged).

        Args:
            loaded: ``(name, variant, sha256)`` of the models resident in memory.
        """
        infos = []
        for record in self.registry.list_models():
            try:
                info = ModelInfo(
                    name=record.name,
                    variant=record.variant,
                    version=record.version,
                    sha256=record.sha256,
                    size=record.size,
                    state=record.state,
                    loaded=(record.name, record.variant, record.sha256) in loaded,
                )
                ModelInfo.from_dict(info.to_dict())
            except DecodeError as exc:
                log.warning("state.model_skipped", model=record.name, error=str(exc))
                continue
            if 1 <= info.version <= MAX_VERSION:
                infos.append(info)
        return tuple(infos)

    def build(self, status: str, heartbeat: int, loaded: Collection[tuple[str, str, str]] = ()) -> DeviceState:
        """The current state with ``status`` and ``heartbeat``; ``loaded`` as for :meth:`models`."""
        return DeviceState(
            device=self.device,
            status=status,
            ts_ms=int(self.clock() * 1000),
            agent_version=self.agent_version,
            hardware=self.hardware(),
            models=self.models(loaded),
            heartbeat=heartbeat,
            audit_head=self.audit_head(),
            transfers=self.transfers(),
        )
