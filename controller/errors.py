"""The controller's error tree.

Every error the controller raises on purpose derives from :class:`ControllerError`; the CLI prints
:meth:`ControllerError.diagnostics` and exits non-zero. Foreign exceptions are wrapped where they enter
(``raise HomeError(...) from exc``).

::

    ControllerError
     ├── HomeError                 the controller home is missing, incomplete or unusable
     │    └── ConfigError          fleet.toml is invalid
     ├── EnrollmentError           a device cannot be enrolled or revoked (bad id, exists, unknown)
     ├── StoreError                the fleet database refused an operation
     │    └── AuditShardError      an audit shard's worker process failed an upload or died (controller.audit_shards)
     ├── LinkError                 the MQTT link cannot be used (TLS files, broker refused us)
     └── ModelToolError            model tooling (quantize, inspect, compare) cannot do what was asked
          ├── ModelFileError       a model file is missing, unreadable, truncated or not valid GGUF/ONNX
          └── QuantizeError        quantization refused (already quantized, unknown target) or failed
"""

from __future__ import annotations

__all__ = [
    "AuditShardError",
    "ConfigError",
    "ControllerError",
    "EnrollmentError",
    "HomeError",
    "LinkError",
    "ModelFileError",
    "ModelToolError",
    "QuantizeError",
    "StoreError",
]


class ControllerError(Exception):
    """Root of the controller's own errors."""

    hint: str = ""

    def diagnostics(self) -> str:
        """What failed, and what usually helps."""
        text = str(self)
        if self.hint:
            text += f"\n{self.hint}"
        return text


class HomeError(ControllerError):
    """The controller home is missing, incomplete or unusable."""

    hint = "Create it with `edge-fleet init`, or point --home / EDGE_FLEET_HOME at the right directory."


class ConfigError(HomeError):
    """``fleet.toml`` is invalid."""

    hint = "Fix fleet.toml in the controller home (unknown keys and wrong types are errors)."


class EnrollmentError(ControllerError):
    """A device cannot be enrolled, revoked or assigned."""


class StoreError(ControllerError):
    """The fleet database refused an operation."""


class AuditShardError(StoreError):
    """An audit shard's worker process failed an upload (the error's text, from the worker) or died."""


class LinkError(ControllerError):
    """The MQTT link cannot be used."""

    hint = "Check that the broker runs with the configuration `edge-fleet init` wrote, and its address."


class ModelToolError(ControllerError):
    """Model tooling (quantize, inspect, compare) cannot do what was asked."""


class ModelFileError(ModelToolError):
    """A model file is missing, unreadable, truncated, or not a valid GGUF or ONNX file."""

    hint = "Check the path; a file that fails validation is corrupt or truncated: download or convert it again."


class QuantizeError(ModelToolError):
    """Quantization was refused (already-quantized source, unknown target) or llama.cpp/onnxruntime failed."""
