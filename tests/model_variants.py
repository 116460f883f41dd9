"""Quantized variants of the real SmolLM2 test model, made once and cached in ``.cache/models/variants/``.

The variants are produced by edgefleet's own quantizer (:func:`controller.quantize.quantize_gguf`, llama.cpp's
``llama_model_quantize``) from the pinned Q4_1 file, so requantization is allowed (the source is already
quantized; the variants are test inputs, not models to ship). They are cached in a directory keyed by the
source's sha256: a later session (or a parallel one, serialised by a lock file) reuses every file whose header
validates and declares the expected type, and remakes any other.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from controller.errors import ModelFileError
from controller.quantize import GGUF_TARGETS, output_path, quantize_gguf, read_gguf

VARIANTS = ("q4_0", "q5_1", "q8_0")
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models" / "variants"


def _valid(path: Path, variant: str) -> bool:
    try:
        return path.is_file() and read_gguf(path).file_type == GGUF_TARGETS[variant]
    except ModelFileError:
        return False


def ensure_variants(source: Path, source_sha256: str, variants: tuple[str, ...] = VARIANTS) -> dict[str, Path]:
    """Return ``{variant: path}``, quantizing only the variants missing from the cache."""
    directory = CACHE / source_sha256[:16]
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        paths = {}
        for variant in variants:
            path = output_path(source, variant, directory)
            if not _valid(path, variant):
                quantize_gguf(source, variant, path, allow_requantize=True, overwrite=True)
            paths[variant] = path
        return paths
    finally:
        os.close(fd)
