"""Checks run on a model folder before any process loads it: file names and JSON only.

Nothing here imports or unpickles anything from the folder, so a folder that would run code on
load (remote code, pickle weights) is refused without having executed a byte of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarker import ModelNotFound, NeedsRemoteCode, UnsafeWeights

# Files torch.load would unpickle (arbitrary code on load).
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_JSON_MAX_BYTES = 4 * 1_048_576
# Hugging Face files that can point at Python code shipped with the model.
_CODE_POINTERS = ("config.json", "tokenizer_config.json", "processor_config.json")


def read_small_json(path: Path) -> dict[str, object] | None:
    """A JSON object from a file of at most 4 MiB, or None when missing or unreadable."""
    try:
        if not path.is_file() or path.stat().st_size > _JSON_MAX_BYTES:
            return None
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_remote_code(folder: Path, model: str) -> None:
    """Raise NeedsRemoteCode when the folder's configs point at Python code shipped with it."""
    for name in _CODE_POINTERS:
        data = read_small_json(folder / name)
        if data is not None and "auto_map" in data:
            raise NeedsRemoteCode(
                f"Model {model} needs remote code ({name} has auto_map); "
                "mlcp never runs code shipped with a model"
            )


def check_model_folder(folder: Path, model: str) -> None:
    """Raise when the folder must not be loaded: it needs remote code or holds only pickles."""
    if read_small_json(folder / "config.json") is None:
        raise ModelNotFound(f"Model {model} has no readable config.json")
    check_remote_code(folder, model)
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    if any(p.suffix in PICKLE_SUFFIXES for p in files):
        raise UnsafeWeights()
    raise ModelNotFound(f"Model {model} has no weights (*.safetensors)")
