"""The model itself: loading with transformers, tokenizing, and generating one batch at a time.

The only module of the agent that imports torch or transformers, so the control plane, which
imports `instance_agent.protocol`, and the app, which imports this lazily, start fast.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.utils import logging as transformers_logging

from instance_agent.engines import TRANSFORMERS, EngineName
from instance_agent.engines import cpu_threads as _cpu_threads
from instance_agent.protocol import GenerationParams, InvalidPrompt, LoadFailed, Prompt
from instance_agent.streaming import Row
from instance_agent.weights import check_model_dir

logger = logging.getLogger(__name__)

# A model's own config may claim an effectively unbounded context (tokenizers default to 1e30).
_FALLBACK_CONTEXT_TOKENS = 2048
_MEMORY_SAMPLE_EVERY_STEPS = 16


def apply_thread_settings() -> int:
    """Set torch's thread count for this process from its environment; return it."""
    torch.set_num_threads(_cpu_threads())
    threads: int = torch.get_num_threads()
    return threads


def _resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise LoadFailed(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LoadFailed(f"device {device} was asked for but CUDA is not available")
    if resolved.type not in ("cpu", "cuda"):
        raise LoadFailed(f"device {device} is not supported; use cpu, cuda or cuda:N")
    return resolved


def _dtype_for(device: torch.device) -> torch.dtype:
    # bfloat16 halves GPU memory at no quality cost; on CPU float32 is both faster and exact.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _context_tokens(model: Any, tokenizer: Any) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return _FALLBACK_CONTEXT_TOKENS


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return sorted(ids)


class _RowCriteria(StoppingCriteria):
    """Feeds each step's tokens to their rows and tells generate() which rows are finished.

    Stopping criteria run right after each token is chosen, before the streamer sees it, so the
    rows learn about a token, a stop string, an exhausted budget or a vanished client without
    the one-step lag a streamer would add; a row done here gets no more text.
    """

    def __init__(
        self,
        rows: Sequence[Row],
        eos_ids: Sequence[int],
        should_abort: Callable[[], bool],
        on_step: Callable[[], object],
        step_delay_s: float,
    ) -> None:
        self._rows = rows
        self._eos_ids = frozenset(eos_ids)
        self._should_abort = should_abort
        self._on_step = on_step
        self._step_delay_s = step_delay_s
        self._done = torch.zeros(len(rows), dtype=torch.bool)
        self._steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self._steps += 1
        if self._steps % _MEMORY_SAMPLE_EVERY_STEPS == 1:
            self._on_step()
        if self._step_delay_s > 0:
            time.sleep(self._step_delay_s)
        if self._should_abort():
            self._done.fill_(True)
            return self._done.clone().to(input_ids.device)
        now = time.monotonic()
        for index, token_id in enumerate(input_ids[:, -1].tolist()):
            if self._done[index]:
                continue
            row = self._rows[index]
            if row.feed(token_id, is_eos=token_id in self._eos_ids, now=now):
                self._done[index] = True
        return self._done.clone().to(input_ids.device)


class _MinNewTokens(LogitsProcessor):
    """Keeps end-of-sequence away from rows that have not yet reached their own minimum."""

    def __init__(self, rows: Sequence[Row], prompt_width: int, eos_ids: Sequence[int]) -> None:
        self._minimums = [row.min_new_tokens for row in rows]
        self._prompt_width = prompt_width
        self._eos_ids = list(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self._prompt_width
        for index, minimum in enumerate(self._minimums):
            if generated < minimum:
                scores[index, self._eos_ids] = -float("inf")
        return scores


class TransformersEngine:
    """A loaded model and tokenizer that tokenize prompts and run batches of rows."""

    engine: EngineName = TRANSFORMERS

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        step_delay_s: float = 0.0,
        on_step: Callable[[], object] = lambda: None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._device = device
        self._step_delay_s = step_delay_s
        self._on_step = on_step
        # Fast tokenizers raise "Already borrowed" when one instance is used from two threads.
        self._tokenizer_lock = threading.Lock()
        self._eos_ids = _eos_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id
        fallback_pad_id = self._eos_ids[0] if self._eos_ids else 0
        self._pad_id: int = pad_id if isinstance(pad_id, int) else fallback_pad_id
        self.context_tokens = _context_tokens(model, tokenizer)
        self.device = str(device)

    def encode(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        """Tokenize a prompt; chat messages go through the tokenizer's chat template.

        A plain string is one user message for a model with a chat template unless `raw`: an
        instruct model given bare text often answers with nothing at all (SmolLM2 emitted its
        end token at once for "What is the capital of France?").
        """
        if isinstance(prompt, str) and not raw and self._tokenizer.chat_template:
            prompt = [{"role": "user", "content": prompt}]
        with self._tokenizer_lock:
            if isinstance(prompt, str):
                ids = self._tokenizer(prompt, add_special_tokens=True)["input_ids"]
            else:
                if not self._tokenizer.chat_template:
                    raise InvalidPrompt(
                        "this model has no chat template; send the prompt as a string"
                    )
                try:
                    text = self._tokenizer.apply_chat_template(
                        prompt, add_generation_prompt=True, tokenize=False
                    )
                except jinja2.TemplateError as exc:
                    raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
                # The template already wrote any special tokens the model expects.
                ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidPrompt("the prompt encodes to no tokens")
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids into text, leaving out special tokens."""
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def generate(self, rows: Sequence[Row], should_abort: Callable[[], bool]) -> None:
        """Run one batch until every row is finished; the rows receive their text as it comes."""
        # torch's intra-op thread count is per calling thread under OpenMP.
        torch.set_num_threads(_cpu_threads())
        width = max(len(row.prompt_ids) for row in rows)
        # Left padding keeps every row's newest token in the last column.
        input_ids = torch.tensor(
            [[self._pad_id] * (width - len(row.prompt_ids)) + row.prompt_ids for row in rows],
            dtype=torch.long,
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in rows],
            dtype=torch.long,
        )
        criteria = _RowCriteria(
            rows, self._eos_ids, should_abort, self._on_step, self._step_delay_s
        )
        processors = LogitsProcessorList()
        if any(row.min_new_tokens > 0 for row in rows):
            processors.append(_MinNewTokens(rows, width, self._eos_ids))
        config = self._generation_config(rows[0].params, max(row.max_new_tokens for row in rows))
        seed = rows[0].params.seed
        if config.do_sample and seed is not None:
            # Rows batch together only with the same seed (`GenerationParams.sampling_key`).
            torch.manual_seed(seed)
        start = time.monotonic()
        for row in rows:
            row.start(self.decode, start)
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids.to(self._device),
                attention_mask=attention_mask.to(self._device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([criteria]),
                logits_processor=processors,
            )

    def warm_up(self) -> None:
        """Generate one token once, before the first request.

        The first generate() pays one-time allocation costs, and a model that loads but cannot
        generate should fail its load rather than its first request. One token, not two: each
        costs a forward pass (~0.3 s for SmolLM2 on a busy 2-core box), a third of a forked
        agent's cold start.
        """
        ids = torch.tensor([[self._pad_id]], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            self._model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=self._generation_config(GenerationParams(), 1),
            )

    def _generation_config(self, params: GenerationParams, max_new_tokens: int) -> GenerationConfig:
        # Every knob is set explicitly so a model's own generation_config.json cannot turn a
        # greedy request into a sampled one; greedy gets the values GenerationConfig.validate()
        # treats as unset, so it does not warn about sampling flags.
        sampling: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
        if params.do_sample:
            sampling = {"temperature": params.temperature, "top_p": params.top_p}
            sampling["top_k"] = params.top_k
        return GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=max_new_tokens,
            do_sample=params.do_sample,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=self._pad_id,
            eos_token_id=self._eos_ids or None,
            num_beams=1,
            **sampling,
        )


def load_engine(
    model_dir: Path,
    *,
    gguf_file: str | None = None,
    device: str = "cpu",
    step_delay_s: float = 0.0,
    on_step: Callable[[], object] = lambda: None,
) -> TransformersEngine:
    """Load a model directory (safetensors) or a GGUF file in it; raise `LoadFailed` on failure.

    Never runs code shipped with the model: `trust_remote_code` is always False, and pickle
    weights are refused before transformers sees them.
    """
    check_model_dir(model_dir, gguf_file)
    resolved = _resolve_device(device)
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.set_num_threads(_cpu_threads())
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **common)
        weights: dict[str, Any] = {"dtype": _dtype_for(resolved)}
        if gguf_file is None:
            weights["use_safetensors"] = True
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **common, **weights)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise LoadFailed(f"{type(exc).__name__}: {exc}") from exc
    model.to(resolved)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    engine = TransformersEngine(
        model, tokenizer, resolved, step_delay_s=step_delay_s, on_step=on_step
    )
    try:
        engine.warm_up()
    except Exception as exc:
        raise LoadFailed(f"the model cannot generate: {type(exc).__name__}: {exc}") from exc
    return engine


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors model directory; return it.

    The directory appears atomically (written beside it, then renamed), so its existence means
    the conversion finished; an existing one is reused as is.
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    if not gguf_path.is_file():
        raise LoadFailed(f"GGUF file {gguf_path} does not exist")
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.set_num_threads(_cpu_threads())
    source = {
        "gguf_file": gguf_path.name,
        "local_files_only": True,
        "trust_remote_code": False,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **source)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, **source, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise LoadFailed(f"{type(exc).__name__}: {exc}") from exc
    try:
        staging.rename(out_dir)
    except OSError:
        # Another converter finished first; its result is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not (out_dir / "config.json").is_file():
            raise
    return out_dir
