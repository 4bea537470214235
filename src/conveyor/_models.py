"""Bundled models and model-path resolution."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ._errors import ModelNotFoundError

__all__ = [
    "BUNDLED_DIR",
    "COMPILED_SUFFIX",
    "base_name",
    "bundled_models",
    "file_digest",
    "resolve_model",
]

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
COMPILED_SUFFIX = "_edgetpu"


def base_name(path: Path) -> str:
    """The model name of a plain or compiled file: ``name`` for ``name_edgetpu.tflite``."""
    stem = path.stem
    return stem[: -len(COMPILED_SUFFIX)] if stem.endswith(COMPILED_SUFFIX) else stem


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex: whether two paths hold the same model.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_models() -> dict[str, Path]:
    """Names of the bundled ``.tflite`` models mapped to their paths, sorted by name."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.tflite"))}


def resolve_model(model: str | Path) -> Path:
    """The path of a model given as a file path or as the name of a bundled model.

    Raises:
        ModelNotFoundError: neither a file at that path nor a bundled model of that name.
    """
    path = Path(model)
    if path.is_file():
        return path
    bundled = bundled_models()
    name = str(model)
    if name.endswith(".tflite"):
        name = name[: -len(".tflite")]
    if name in bundled:
        return bundled[name]
    raise ModelNotFoundError(
        f"no model file at {str(model)!r} and no bundled model of that name "
        f"(bundled: {', '.join(bundled)})"
    )
