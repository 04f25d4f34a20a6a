"""Speech recognition with a Whisper-family model (transformers): the agent's ASR engine.

Audio is cut into 30 s windows (Whisper's receptive field), each turned into log-mel features
and decoded on its own; the result is the joined text and one chunk per window with its time
span. Options come checked from `instance_agent.asr_options`; the ones applied become
`generate` arguments, the rest are reported back as `ignored`. Loading follows the text engine:
safetensors only, local files only, never `trust_remote_code`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor
from transformers.utils import logging as transformers_logging

from instance_agent.asr_options import MAX_BEAMS, ignored
from instance_agent.audio import SAMPLE_RATE
from instance_agent.protocol import GenerationFailed, InvalidParams, LoadFailed
from instance_agent.weights import check_model_dir

WINDOW_S = 30
# Tokens one 30 s window may produce: Whisper's own decoder limit is 448.
MAX_WINDOW_TOKENS = 444


class SpeechEngine:
    """A loaded Whisper model and its processor; `transcribe` is blocking (run it on a thread)."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self._device = device
        self._lock = threading.Lock()
        limit = int(getattr(model.config, "max_target_positions", MAX_WINDOW_TOKENS + 4))
        self.max_new_tokens = max(1, min(MAX_WINDOW_TOKENS, limit - 4))

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def context_tokens(self) -> int:
        return int(getattr(self.model.config, "max_target_positions", 0))

    def _generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if "language" in options:
            kwargs["language"] = options["language"]
        if "task" in options:
            kwargs["task"] = options["task"]
        temperature = options.get("temperature", 0.0)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        beams = min(int(options.get("beam_size", 1)), MAX_BEAMS)
        if beams > 1 and temperature == 0:
            kwargs["num_beams"] = beams
            if "length_penalty" in options:
                kwargs["length_penalty"] = options["length_penalty"]
        if "suppress_tokens" in options:
            vocab = int(self.model.config.vocab_size)
            kwargs["suppress_tokens"] = [t for t in options["suppress_tokens"] if t < vocab]
        if "initial_prompt" in options:
            try:
                prompt_ids = self.processor.tokenizer.get_prompt_ids(
                    options["initial_prompt"], return_tensors="pt"
                ).to(self._device)
            except ValueError as exc:
                raise InvalidParams(f"'initial_prompt' cannot be used: {exc}") from exc
            # The prompt and the start tokens share the decoder's positions with the output.
            room = self.context_tokens - int(prompt_ids.shape[-1]) - 5
            if room < 1:
                raise InvalidParams("'initial_prompt' is longer than this model's decoder allows")
            kwargs["prompt_ids"] = prompt_ids
            kwargs["max_new_tokens"] = min(self.max_new_tokens, room)
        return kwargs

    def transcribe(
        self,
        audio: np.ndarray[Any, np.dtype[np.float32]],
        options: dict[str, Any],
        should_abort: Callable[[], bool] = lambda: False,
    ) -> dict[str, Any]:
        """`{"text", "chunks": [{"timestamp": [start_s, end_s], "text"}], "ignored", ...}`."""
        kwargs = self._generate_kwargs(options)
        window = WINDOW_S * SAMPLE_RATE
        chunks: list[dict[str, Any]] = []
        started = time.monotonic()
        with self._lock, torch.inference_mode():
            for start in range(0, max(audio.size, 1), window):
                if should_abort():
                    raise GenerationFailed("the transcription was cancelled")
                piece = audio[start : start + window]
                features = self.processor.feature_extractor(
                    piece, sampling_rate=SAMPLE_RATE, return_tensors="pt"
                ).input_features.to(self._device, dtype=self.model.dtype)
                try:
                    ids = self.model.generate(features, **kwargs)
                except ValueError as exc:
                    # transformers says so for a language or task the model does not know.
                    raise InvalidParams(f"Whisper refused the options: {exc}") from exc
                text = self.processor.tokenizer.decode(ids[0], skip_special_tokens=True).strip()
                chunks.append(
                    {
                        "timestamp": [
                            round(start / SAMPLE_RATE, 3),
                            round((start + piece.size) / SAMPLE_RATE, 3),
                        ],
                        "text": text,
                    }
                )
        return {
            "text": " ".join(c["text"] for c in chunks if c["text"]),
            "chunks": chunks,
            "ignored": ignored(options),
            "audio_seconds": round(audio.size / SAMPLE_RATE, 3),
            "time_seconds": round(time.monotonic() - started, 6),
        }


def load_speech(model_dir: Path, *, device: str = "cpu") -> SpeechEngine:
    """Load a Whisper model directory (safetensors); raise `LoadFailed` on failure."""
    check_model_dir(model_dir)
    from instance_agent.engines import cpu_threads
    from instance_agent.model import _dtype_for, _resolve_device

    resolved = _resolve_device(device)
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.set_num_threads(cpu_threads())
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        processor = AutoProcessor.from_pretrained(model_dir, **common)  # type: ignore[no-untyped-call]
        model: Any = AutoModelForSpeechSeq2Seq.from_pretrained(
            model_dir, **common, use_safetensors=True, dtype=_dtype_for(resolved)
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise LoadFailed(f"{type(exc).__name__}: {exc}") from exc
    model.to(resolved)
    model.eval()
    engine = SpeechEngine(model, processor, resolved)
    try:
        engine.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), {})
    except Exception as exc:
        raise LoadFailed(f"the model cannot transcribe: {type(exc).__name__}: {exc}") from exc
    return engine
