"""The agent's model registry: SQLite records, content-addressed blobs, a crash-safe install pipeline.

Public surface (everything else in this package is private)::

    Registry.open(state_dir, config) -> Registry      # then .recover() once
      .import_file(src, name=, variant=, ...) -> ModelRecord
      .list_models / .get / .active / .active_models / .blob_path / .events
      .activate / .rollback / .remove / .quarantine / .gc -> GcResult / .recover -> RecoveryReport
    validate_gguf(path) -> GgufInfo                    # header validation before llama.cpp opens a file
    inspect_model(path) -> ModelFacts                  # format detection + validation (GGUF, ONNX)

Errors are those of :mod:`agent.errors` (``RegistryError`` and its subclasses). Modules: ``gguf`` (GGUF header
validator), ``formats`` (format detection, ONNX check), ``schema`` (SQLite schema and event log), ``store``
(blob store and ``Registry``), ``install`` (install state machine, fault points), ``gc`` (garbage collection).
"""

from agent.registry.formats import ModelFacts, inspect_model
from agent.registry.gc import GcResult
from agent.registry.gguf import GgufArraySummary, GgufInfo, GgufLimits, validate_gguf
from agent.registry.install import FAULT_ENV, FAULT_EXIT_CODE, FAULT_POINTS, RecoveryReport
from agent.registry.store import ModelEvent, ModelRecord, Registry

__all__ = [
    "FAULT_ENV",
    "FAULT_EXIT_CODE",
    "FAULT_POINTS",
    "GcResult",
    "GgufArraySummary",
    "GgufInfo",
    "GgufLimits",
    "ModelEvent",
    "ModelFacts",
    "ModelRecord",
    "RecoveryReport",
    "Registry",
    "inspect_model",
    "validate_gguf",
]
