"""The embedding model: sentence embeddings from an encoder, as sentence-transformers computes them.

Mean pooling of the last hidden state over the attention mask, then L2 normalisation: what
all-MiniLM-L6-v2's `1_Pooling` and `2_Normalize` modules do. Like `model.py` (kept apart so each
engine reads in one sitting), this module imports torch and transformers, and only the agent's
loader thread imports it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from instance_agent.protocol import LoadFailed
from instance_agent.weights import check_model_dir

# Texts encoded in one forward pass; longer lists are split. Padding makes a batch cost its
# longest text, so the caller's batch is also sorted by length (as sentence-transformers does).
MAX_TEXTS_PER_PASS = 32
_FALLBACK_MAX_TOKENS = 512


@dataclass(frozen=True)
class Embeddings:
    """One vector per text, in order, and how many tokens the texts held."""

    vectors: list[list[float]]
    token_counts: list[int]


def _max_tokens(model: Any, tokenizer: Any, model_dir: Path) -> int:
    # sentence-transformers' own limit (256 for all-MiniLM-L6-v2) is what it was trained with.
    limits = []
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            value = json.loads(st_config.read_text("utf-8")).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, int) and value > 0:
            limits.append(value)
    position = getattr(model.config, "max_position_embeddings", None)
    if isinstance(position, int) and position > 0:
        limits.append(position)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else _FALLBACK_MAX_TOKENS


class EncoderEngine:
    """A loaded encoder and tokenizer that turn texts into normalised mean-pooled vectors."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, max_tokens: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self._lock = threading.Lock()
        self.context_tokens = max_tokens
        self.device = str(device)
        self.dimensions = int(model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed texts (each truncated to the model's limit, as sentence-transformers does)."""
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[list[float]] = [[] for _ in texts]
        counts = [0] * len(texts)
        for start in range(0, len(order), MAX_TEXTS_PER_PASS):
            chunk = order[start : start + MAX_TEXTS_PER_PASS]
            pooled, lengths = self._pass([texts[i] for i in chunk])
            for index, vector, length in zip(chunk, pooled, lengths, strict=True):
                vectors[index] = vector
                counts[index] = length
        return Embeddings(vectors, counts)

    def _pass(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        with self._lock:
            encoded = self._tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.context_tokens,
                return_tensors="pt",
            )
        mask = encoded["attention_mask"].to(self._device)
        inputs = {name: tensor.to(self._device) for name, tensor in encoded.items()}
        with torch.inference_mode():
            hidden = self._model(**inputs).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * weights).sum(dim=1)
            pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
            normalised = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
        vectors: list[list[float]] = normalised.cpu().tolist()
        lengths: list[int] = mask.sum(dim=1).cpu().tolist()
        return vectors, lengths

    def warm_up(self) -> None:
        """Embed one text, so a model that loads but cannot run fails its load, not a request."""
        self.embed(["warm up"])


def load_encoder(model_dir: Path, *, device: str = "cpu") -> EncoderEngine:
    """Load an encoder directory (safetensors only, never remote code); raise `LoadFailed`."""
    check_model_dir(model_dir)
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise LoadFailed(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LoadFailed(f"device {device} was asked for but CUDA is not available")
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **common)
        model: Any = AutoModel.from_pretrained(
            model_dir, **common, use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise LoadFailed(f"{type(exc).__name__}: {exc}") from exc
    model.to(resolved)
    model.eval()
    engine = EncoderEngine(model, tokenizer, resolved, _max_tokens(model, tokenizer, model_dir))
    try:
        engine.warm_up()
    except Exception as exc:
        raise LoadFailed(f"the model cannot embed: {type(exc).__name__}: {exc}") from exc
    return engine
