"""The controller's configuration: one frozen dataclass read from ``HOME/fleet.toml``.

``edge-fleet init`` writes the file with the options it was given; every later command reads it. Unknown
keys and wrong types are errors (a typo never silently falls back to a default). Sections::

    [broker]       where devices and controllers connect, and the limits written into mosquitto.conf
    [controller]   this controller's MQTT identity, shared-subscription group and liveness timing

One environment variable overrides the file: ``EDGE_FLEET_CONTROLLER_NAME`` sets ``controller.name``, so that
several ``edge-fleet serve`` processes can share one home (and its fleet DB) on one host, each with its own
controller identity (``edge-fleet controller add NAME`` issues it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import ConfigError
from protocols.enrollment import HOST_RE
from protocols.topics import controller_subscriptions

__all__ = [
    "LEGACY_SHARE_GROUP",
    "BrokerConfig",
    "ControllerConfig",
    "FleetConfig",
    "dump_config",
    "load_config",
    "new_share_group",
]

CONTROLLER_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"

LEGACY_SHARE_GROUP = "edge-fleet"
"""The share group every home used before ``init`` made a random one; kept as the default of homes whose
fleet.toml does not name one. It is public, so any device can join it (docs/THREAT_MODEL.md)."""

CONTROLLER_NAME_ENV = "EDGE_FLEET_CONTROLLER_NAME"
"""Overrides ``controller.name`` (a second ``serve`` on the same home)."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """The broker, as devices and controllers see it and as mosquitto.conf configures it."""

    host: str = "127.0.0.1"
    """Address clients connect to; it is put in the broker's server certificate."""
    port: int = 8883
    bind: str = "0.0.0.0"  # noqa: S104 - a broker listens for devices on the network by design
    """Address the TLS listener binds to."""
    extra_names: tuple[str, ...] = ()
    """More DNS names or IP addresses for the server certificate."""
    max_packet_size: int = 2 * 1024 * 1024
    """Largest MQTT packet the broker accepts (model chunks must fit with their framing)."""
    max_queued_messages: int = 1000
    """QoS 1 messages queued per offline client before the broker drops new ones."""
    user: str = ""
    """mosquitto's ``user`` option (the account it drops to when started as root); empty = its default."""
    persistent_client_expiration: str = "30d"
    """Sessions of clients that never come back are removed after this long."""


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """This controller's MQTT identity and timing."""

    name: str = "main"
    """Its certificate is ``edge-fleet-controller:<name>`` (never a valid device id)."""
    share_group: str = LEGACY_SHARE_GROUP
    """MQTT v5 shared-subscription group that splits report/audit/fetch among controllers. Secret in effect:
    the ACL cannot stop a device from subscribing to ``$share/<group>/...``, and a device in the group takes a
    share of the messages (which the ACL then drops). ``edge-fleet init`` writes a random one."""
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    heartbeat_timeout_s: int = 180
    """A device whose last message is older than this is shown offline, whatever its last state said."""
    assignment_poll_s: float = 1.0
    """How often ``serve`` looks for assignments written by the CLI that it has not published yet."""
    artifact_bind: str = "127.0.0.1"
    """Address of ``serve``'s HTTP artifact server (release metadata and blobs, controller.link.http)."""
    artifact_port: int = 0
    """Its port; 0 = no artifact server (releases go over MQTT only)."""
    audit_workers: int = -1
    """Worker processes that verify and store audit uploads, sharded by device (controller.audit_shards).
    0 = on serve's DB writer thread, with state and reports; -1 = auto: one per CPU serve may use, at most 4,
    and 0 on a single CPU."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Everything in ``fleet.toml``."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)


def validate(config: FleetConfig) -> FleetConfig:
    """Check values beyond their types.

    Raises:
        ConfigError: naming the bad setting.
    """
    broker, ctl = config.broker, config.controller
    for name in (broker.host, *broker.extra_names):
        if not HOST_RE.fullmatch(name):
            raise ConfigError(f"broker host {name!r} is not a DNS name or IP address")
    try:
        ipaddress.ip_address(broker.bind)
    except ValueError as exc:
        raise ConfigError(f"broker.bind {broker.bind!r} must be an IP address") from exc
    if not 1 <= broker.port <= 65535:
        raise ConfigError(f"broker.port {broker.port} is not a TCP port")
    if not 4096 <= broker.max_packet_size <= 268_435_455:
        raise ConfigError("broker.max_packet_size must be between 4096 and 268435455")
    if broker.max_queued_messages < 1:
        raise ConfigError("broker.max_queued_messages must be at least 1")
    if broker.user and not broker.user.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"broker.user {broker.user!r} is not a user name")
    if not ctl.name or len(ctl.name) > 32 or set(ctl.name) - set(CONTROLLER_NAME_CHARS):
        raise ConfigError(f"controller.name {ctl.name!r}: 1-32 of a-z, 0-9 and '-'")
    if not 2 <= ctl.keepalive_s <= 600:
        raise ConfigError("controller.keepalive_s must be between 2 and 600")
    if ctl.heartbeat_timeout_s < 1:
        raise ConfigError("controller.heartbeat_timeout_s must be at least 1")
    if not -1 <= ctl.audit_workers <= 64:
        raise ConfigError(f"controller.audit_workers {ctl.audit_workers}: 0 (in-process), 1-64, or -1 (auto)")
    try:
        controller_subscriptions(ctl.share_group)
    except ValueError as exc:
        raise ConfigError(f"controller.share_group: {exc}") from exc
    if not 0 <= ctl.artifact_port <= 65535:
        raise ConfigError(f"controller.artifact_port {ctl.artifact_port} is not a TCP port (0 = off)")
    return config


def new_share_group() -> str:
    """A share group name no device can guess (64 random bits), so none can join the controllers' group."""
    return f"{LEGACY_SHARE_GROUP}-{secrets.token_hex(8)}"


def load_config(path: Path) -> FleetConfig:
    """Read ``fleet.toml``.

    Raises:
        ConfigError: unreadable, not TOML, unknown key, wrong type or bad value.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"broker", "controller"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)} in {path}")
    controller = _build(ControllerConfig, data.get("controller", {}), "controller")
    name = os.environ.get(CONTROLLER_NAME_ENV)
    if name:
        controller = dataclasses.replace(controller, name=name)
    return validate(FleetConfig(broker=_build(BrokerConfig, data.get("broker", {}), "broker"), controller=controller))


def _build(cls: type[Any], table: object, where: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"unknown setting {where}.{key}")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}.{key} must be an integer")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where}.{key} must be a positive number")
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string")
        kwargs[key] = value
    return cls(**kwargs)


def dump_config(config: FleetConfig) -> str:
    """``fleet.toml`` text for ``config`` (what ``edge-fleet init`` writes)."""
    lines = ["# edge-fleet controller configuration, written by `edge-fleet init`.", ""]
    for section, value in (("broker", config.broker), ("controller", config.controller)):
        lines.append(f"[{section}]")
        for f in dataclasses.fields(value):
            lines.append(f"{f.name} = {_toml_value(getattr(value, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
