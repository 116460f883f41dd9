"""Agent configuration: one frozen dataclass built once from a TOML file and the environment.

Precedence, lowest first: built-in defaults, the TOML file (``--config`` or ``EDGE_AGENT_CONFIG``; the
default path ``/etc/edge-agent/agent.toml`` is read only if it exists), environment variables
(``EDGE_AGENT_STATE_DIR``, ``EDGE_AGENT_SOCKET``), command-line options. The result is passed down
explicitly; nothing reads configuration from globals.

Unknown keys are errors, so a typo in the file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from protocols.limits import DEVICE_ID_RE

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AgentConfig",
    "ApiConfig",
    "AuditConfig",
    "InferenceConfig",
    "LinkConfig",
    "LogConfig",
    "ModelOverrides",
    "RegistryConfig",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")
DEFAULT_SOCKET = Path("/run/edge-agent/api.sock")

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The local HTTP API."""

    socket_path: Path = DEFAULT_SOCKET
    socket_mode: int = 0o660
    allowed_uids: tuple[int, ...] = ()
    """Peers (by ``SO_PEERCRED`` uid) allowed to call inference without a token; empty = any peer that can open
    the socket (its file mode and group are then the gate)."""
    allowed_gids: tuple[int, ...] = ()
    """Peers whose primary gid is listed are allowed like ``allowed_uids``."""
    admin_uids: tuple[int, ...] = ()
    """Peers allowed admin routes without a token; empty = root and the agent's own uid."""
    require_token: bool = False
    """Require a bearer token on the unix socket too (the TCP listener always requires one)."""
    tcp_port: int | None = None
    """Optional TCP listener on ``tcp_host`` (loopback only); always requires a token."""
    tcp_host: str = "127.0.0.1"
    max_body_bytes: int = 1 * MiB
    max_tokens_limit: int = 4096
    max_messages: int = 256
    drain_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ModelOverrides:
    """Per-model inference settings (keyed by model name in ``[inference.models.NAME]``)."""

    n_ctx: int | None = None
    n_parallel: int | None = None
    n_threads: int | None = None
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class InferenceConfig:
    """Inference engines and model residency."""

    memory_budget_bytes: int = 2 * GiB
    n_threads: int = 0
    """Threads per engine; 0 = number of physical cores (at least 1)."""
    n_ctx: int = 2048
    """Context length per sequence for GGUF models (capped by the model's trained context)."""
    n_parallel: int = 4
    """Parallel sequences (slots) per loaded GGUF model."""
    n_batch: int = 512
    max_queue: int = 64
    """Most requests waiting per model and queue (generation, embeddings, tensor runs); past it the API answers 429."""
    max_queue_tokens: int = 65536
    """Most prompt tokens (generation) or tokens to embed (embeddings) waiting per model; past it 429."""
    max_queue_bytes: int = 64 * MiB
    """Most input bytes of tensor (ONNX) runs waiting per model; past it 429."""
    request_timeout_s: float = 300.0
    load_timeout_s: float = 600.0
    """A model load running longer is a stall: the watchdog pings stop and systemd restarts the agent. Generous:
    a big model on a slow disk takes minutes to load."""
    models: Mapping[str, ModelOverrides] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """The model registry."""

    disk_quota_bytes: int | None = None
    """Most bytes the blob store may hold; ``None`` = limited by free disk only."""
    min_free_bytes: int = 256 * MiB
    """Free disk that must remain after any copy."""
    keep_previous: int = 1
    """Versions kept per name besides the active one (for instant rollback)."""
    crash_quarantine_after: int = 3
    """An install or activation that crashed the agent this many times is quarantined."""
    load_crash_quarantine_after: int = 3
    """A model whose load was in progress when the agent died this many times in a row is quarantined."""


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The device's audit log (docs/audit.md): how much of it is kept on the device."""

    max_records: int = 100_000
    """Records kept at most."""
    max_bytes: int = 64 * MiB
    """The retention size cap: bytes of records kept at most. Over either cap, the oldest records the controller
    acknowledged are deleted first; only if the unacknowledged ones alone are over it is a range of them
    dropped, and a chained GAP record says which (never a silent drop)."""

    def __post_init__(self) -> None:
        if self.max_records < 16:
            raise ConfigError(f"audit.max_records: at least 16, not {self.max_records}")
        if self.max_bytes < 64 * 1024:
            raise ConfigError(f"audit.max_bytes: at least 65536, not {self.max_bytes}")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging."""

    level: str = "info"
    json: bool = True
    log_prompts: bool = False
    """Debug only: include prompt and completion text in logs. Off by default."""


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """The MQTT link to the controller (used once the device is enrolled: ``edge-agent enroll``)."""

    enabled: bool = True
    host: str = ""
    """Override the broker host from the enrollment bundle (empty = the bundle's)."""
    port: int = 0
    """Override the broker port from the enrollment bundle (0 = the bundle's)."""
    keepalive_s: int = 30
    """MQTT keepalive; a dead (even half-open) connection is noticed within about twice this."""
    session_expiry_s: int = 7 * 24 * 3600
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    state_interval_s: float = 60.0
    """The retained state is re-published at least this often (the controller's heartbeat)."""
    state_check_interval_s: float = 5.0
    """How often the state is rebuilt to see whether it changed (it is published at once when it did)."""
    progress_interval_s: float = 1.0
    """A download's progress is re-published at most this often (other changes are published at once)."""
    resend_after_s: float = 30.0
    """An unacked outbox message is sent again after this long, doubling up to ``resend_max_s``."""
    resend_max_s: float = 600.0
    max_outbox_messages: int = 10000
    """Most messages waiting for an ack; past it new ones are refused (never silently dropped)."""
    max_send_attempts: int = 3
    """Connections that may die while one message is in flight before it is set aside as undeliverable."""
    artifact_url: str = ""
    """Base URL of the controller's HTTP artifact server (``http://host:port``): release metadata and blobs come
    from it (Range-resumable), falling back to MQTT for blobs. Empty: releases over MQTT only."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent is configured with."""

    state_dir: Path = DEFAULT_STATE_DIR
    device_id: str | None = None
    api: ApiConfig = field(default_factory=ApiConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    link: LinkConfig = field(default_factory=LinkConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    config_path: Path | None = None


def _build(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking names and coarse types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields or key == "config_path":
            raise ConfigError(f"unknown setting {where + '.' if where else ''}{key}")
        kwargs[key] = _convert(cls, key, value, f"{where + '.' if where else ''}{key}")
    return cls(**kwargs)


def _convert(cls: type[Any], key: str, value: Any, where: str) -> Any:
    nested = {
        (AgentConfig, "api"): ApiConfig,
        (AgentConfig, "inference"): InferenceConfig,
        (AgentConfig, "registry"): RegistryConfig,
        (AgentConfig, "audit"): AuditConfig,
        (AgentConfig, "log"): LogConfig,
        (AgentConfig, "link"): LinkConfig,
    }
    if (cls, key) in nested:
        return _build(nested[(cls, key)], value, where)
    if cls is InferenceConfig and key == "models":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of tables")
        return {str(name): _build(ModelOverrides, table, f"{where}.{name}") for name, table in value.items()}
    if cls is AgentConfig and key == "device_id":
        # the id is bound into the audit chain (protocols.audit) and the MQTT topics: refused here, not at start-up
        if not isinstance(value, str) or not DEVICE_ID_RE.fullmatch(value):
            raise ConfigError(
                f"{where} must be 1-64 lower-case letters, digits, '.', '_' or '-' (starting with a letter or digit),"
                f" not {value!r}"
            )
        return value
    if key in {"state_dir", "socket_path"}:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty path string")
        return Path(value)
    if key in {"allowed_uids", "allowed_gids", "admin_uids"}:
        if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise ConfigError(f"{where} must be a list of non-negative integers")
        return tuple(value)
    expected = _field_type(cls, key)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{where} must be a non-negative integer")
    if expected is float and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
        raise ConfigError(f"{where} must be a non-negative number")
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    return float(value) if expected is float else value


def _field_type(cls: type[Any], key: str) -> type | None:
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.split(" | ")[0] == name:
            return kind
    return None


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    socket_path: Path | None = None,
) -> AgentConfig:
    """Build the agent's configuration.

    Args:
        path: TOML file; ``None`` means ``EDGE_AGENT_CONFIG`` or the default path if it exists, else no file.
        env: environment (defaults to an empty mapping; the CLI passes ``os.environ``).
        state_dir: command-line override of the state directory.
        socket_path: command-line override of the API socket path.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or a value of the wrong type.
    """
    env = env or {}
    if path is None and env.get("EDGE_AGENT_CONFIG"):
        path = Path(env["EDGE_AGENT_CONFIG"])
    explicit = path is not None
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            if explicit:
                raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    config: AgentConfig = _build(AgentConfig, data, "")
    if env.get("EDGE_AGENT_STATE_DIR"):
        config = dataclasses.replace(config, state_dir=Path(env["EDGE_AGENT_STATE_DIR"]))
    if env.get("EDGE_AGENT_SOCKET"):
        config = dataclasses.replace(
            config, api=dataclasses.replace(config.api, socket_path=Path(env["EDGE_AGENT_SOCKET"]))
        )
    if state_dir is not None:
        config = dataclasses.replace(config, state_dir=state_dir)
    if socket_path is not None:
        config = dataclasses.replace(config, api=dataclasses.replace(config.api, socket_path=socket_path))
    if config.api.tcp_port is not None and config.api.tcp_host not in {"127.0.0.1", "::1", "localhost"}:
        raise ConfigError(f"api.tcp_host must be a loopback address, not {config.api.tcp_host!r}")
    return dataclasses.replace(config, config_path=path)
