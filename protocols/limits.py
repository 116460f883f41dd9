"""Size and syntax limits shared by every parser in ``protocols/``.

Every length that a peer controls is bounded here, in one place, so that a hostile message can cost at
most a known amount of memory and CPU. Parsers take a :class:`Limits` (default :data:`DEFAULT_LIMITS`)
instead of hard-coding numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_LIMITS",
    "DEVICE_ID_RE",
    "MODEL_NAME_RE",
    "VARIANT_RE",
    "Limits",
]

#: Device ids: lower-case letters, digits, ``.``, ``_`` and ``-``; start with a letter or digit; at most 64
#: characters. This excludes the MQTT wildcards ``+`` and ``#``, the level separator ``/``, NUL, spaces and
#: anything that could be a path component such as ``..``.
DEVICE_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

#: Model (family) names, e.g. ``smollm2-135m-instruct``.
MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")

#: Variant names, e.g. ``q4_0``, ``q8_0``, ``onnx-fp32``.
VARIANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds on what a peer may send."""

    max_message_bytes: int = 256 * 1024
    """Largest encoded control message (envelope included). Blob chunks are bounded separately."""

    max_signatures: int = 16
    """Most signatures one envelope may carry."""

    max_string: int = 4096
    """Longest free-text string field (reasons, error texts, versions)."""

    max_list: int = 1024
    """Longest list field in a control message (models, features, ids)."""

    max_chunk_bytes: int = 1024 * 1024
    """Largest blob chunk on the wire; chunks must also fit the broker's ``max_packet_size``."""

    max_chunks: int = 1 << 20
    """Most chunks in one blob (1 MiB chunks → 1 TiB)."""

    max_audit_batch: int = 1000
    """Most audit records in one upload batch."""

    max_audit_data_bytes: int = 16 * 1024
    """Largest encoded ``data`` object of one audit record."""


DEFAULT_LIMITS = Limits()
