"""What weights a model directory holds, decided before torch is imported.

Unpickling a `pytorch_model.bin` can run arbitrary code, so a directory with only pickle weights is
refused outright; this check is cheap enough for the control plane to run before starting an agent.
"""

from __future__ import annotations

import json
from pathlib import Path

from instance_agent.protocol import LoadFailed, Task

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Architectures whose names end so generate text; any other bare encoder (BertModel, ...) is
# served for feature extraction, as Hugging Face's pipeline picks a task from the architecture.
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CONFIG_MAX_BYTES = 1_048_576
# Whisper-family speech recognisers (`instance_agent.speech`).
SPEECH_ARCHITECTURES = frozenset({"WhisperForConditionalGeneration"})
# A directory holding this file is a handler project (`instance_agent.project`).
HANDLER_SPEC_FILE = "mlcp.yaml"


def detect_task(model_dir: Path, gguf_file: str | None = None) -> Task:
    """The task a model directory serves, read from its config.json (GGUF files generate text)."""
    if gguf_file is not None:
        return "text-generation"
    if (model_dir / HANDLER_SPEC_FILE).is_file():
        return "handler"
    path = model_dir / "config.json"
    try:
        if path.stat().st_size > _CONFIG_MAX_BYTES:
            raise LoadFailed(f"{path.name} is larger than 1 MiB")
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise LoadFailed(f"{model_dir} has no readable config.json") from exc
    archs = config.get("architectures") if isinstance(config, dict) else None
    names = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    if any(name in SPEECH_ARCHITECTURES for name in names):
        return "automatic-speech-recognition"
    if not names or any(name.endswith(_GENERATIVE_SUFFIXES) for name in names):
        return "text-generation"
    return "feature-extraction"


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
