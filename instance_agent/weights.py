"""What weights a model directory holds, decided before torch is imported.

Unpickling a `pytorch_model.bin` can run arbitrary code, so a directory with only pickle weights is
refused outright; this check is cheap enough for the control plane to run before starting an agent.
"""

from __future__ import annotations

from pathlib import Path

from instance_agent.protocol import LoadFailed

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_dir(model_dir: Path, gguf_file: str | None = None) -> None:
    """Raise `LoadFailed` unless `model_dir` holds safetensors weights (or the named GGUF file)."""
    if not model_dir.is_dir():
        raise LoadFailed(f"model directory {model_dir} does not exist")
    if gguf_file is not None:
        if not (model_dir / gguf_file).is_file():
            raise LoadFailed(f"GGUF file {gguf_file} is not in {model_dir}")
        return
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise LoadFailed(
            f"{model_dir} holds only pickle weights ({', '.join(pickles)}); refusing to load "
            "them because unpickling can run arbitrary code: provide safetensors weights"
        )
    raise LoadFailed(f"{model_dir} holds no safetensors weights")
