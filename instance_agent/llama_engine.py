"""The llama.cpp engine: a GGUF file served as is, several rows decoded in one batch.

The only module that imports `llama_cpp` (llama-cpp-python's low-level bindings; its high-level
`Llama` decodes one sequence at a time). Each row of a batch is one llama.cpp sequence in a
KV cache shared by all of them (`kv_unified`), so a decoding step is one `llama_decode` over
one token per live row; prompts are packed together the same way. Tokens are chosen by
`instance_agent.sampling`, so every generation parameter means what it means for the
transformers engine. Chat messages go through the GGUF's own chat template, rendered by
llama-cpp-python's Jinja2 formatter.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from instance_agent.engines import LLAMA_CPP, EngineName, cpu_threads
from instance_agent.protocol import InvalidPrompt, LoadFailed, Prompt
from instance_agent.sampling import choose_token
from instance_agent.streaming import Row
from instance_agent.weights import check_model_dir

logger = logging.getLogger(__name__)

# The KV cache is allocated (and written) when the context is made: 8192 cells of SmolLM2 are
# 189 MB, twice its Q4_1 weights, so a model's context is capped here.
MAX_CONTEXT_TOKENS = 8192
# The agent's largest concurrency (instance_agent.app.MAX_CONCURRENCY): one sequence per row.
MAX_SEQUENCES = 64
_BATCH_TOKENS = 512
_MEMORY_SAMPLE_EVERY_STEPS = 16

_GGML_LOG_ERROR = 3
_GGML_LOG_CONT = 5
_log_state = {"last": 0}


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Pass llama.cpp's errors to stderr; its dozens of lines per load go nowhere."""
    if level != _GGML_LOG_CONT:
        _log_state["last"] = level
    if _log_state["last"] == _GGML_LOG_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


@dataclass
class _Slot:
    """One row's llama.cpp sequence: its id, its next position and the ids it has seen."""

    row: Row
    seq: int
    seen: list[int] = field(default_factory=list)
    logits: npt.NDArray[np.float32] | None = None


class LlamaEngine:
    """A GGUF model in a llama.cpp context that tokenizes prompts and runs batches of rows."""

    engine: EngineName = LLAMA_CPP
    device = "cpu"

    def __init__(
        self,
        model: Any,
        context: Any,
        *,
        threads: int,
        step_delay_s: float = 0.0,
        on_step: Callable[[], object] = lambda: None,
    ) -> None:
        self._model = model
        self._ctx = context
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._memory = llama_cpp.llama_get_memory(context)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.threads = threads
        self.context_tokens = llama_cpp.llama_n_ctx(context)
        self._step_delay_s = step_delay_s
        self._on_step = on_step
        self._batch = llama_cpp.llama_batch_init(_BATCH_TOKENS, 0, 1)
        self._end_ids = np.array(
            [t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)],
            dtype=np.int64,
        )
        self._end_set = frozenset(int(t) for t in self._end_ids)
        self._formatter = self._chat_formatter()

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        if not template:
            return None
        return Jinja2ChatFormatter(
            template=template.decode("utf-8"),
            eos_token=self._piece(llama_cpp.llama_vocab_eos(self._vocab)),
            bos_token=self._piece(llama_cpp.llama_vocab_bos(self._vocab)),
        )

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def encode(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        """Tokenize a prompt; chat messages go through the GGUF's chat template.

        A plain string is one user message for a model with a chat template unless `raw`, as
        the transformers engine does.
        """
        if isinstance(prompt, str) and not raw and self._formatter is not None:
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, str):
            ids = self._tokenize(prompt, add_special=True)
        else:
            if self._formatter is None:
                raise InvalidPrompt("this model has no chat template; send the prompt as a string")
            try:
                text = self._formatter(messages=prompt).prompt  # type: ignore[arg-type]
            except (jinja2.TemplateError, ValueError) as exc:
                raise InvalidPrompt(f"the chat template rejected the messages: {exc}") from exc
            # The template already wrote any special tokens the model expects.
            ids = self._tokenize(text, add_special=False)
        if not ids:
            raise InvalidPrompt("the prompt encodes to no tokens")
        return ids

    def _tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            tokens = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), tokens, size, add_special, True
            )
            if n >= 0:
                return list(tokens[:n])
            size = -n

    def decode(self, ids: Sequence[int]) -> str:
        """Turn ids into text, leaving out special tokens."""
        if not ids:
            return ""
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self._vocab, tokens, len(ids), buf, size, True, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n

    def generate(self, rows: Sequence[Row], should_abort: Callable[[], bool]) -> None:
        """Run one batch until every row is finished; the rows receive their text as it comes.

        Rows whose prompts and budgets do not fit the KV cache together run in turn.
        """
        for group in _groups(rows, self.context_tokens):
            if should_abort():
                return
            self._generate_group(group, should_abort)

    def _generate_group(self, rows: Sequence[Row], should_abort: Callable[[], bool]) -> None:
        llama_cpp.llama_memory_clear(self._memory, False)
        params = rows[0].params
        # Rows batch together only with the same seed (`GenerationParams.sampling_key`).
        rng = np.random.default_rng(params.seed)
        slots = [_Slot(row, seq, list(row.prompt_ids)) for seq, row in enumerate(rows)]
        start = time.monotonic()
        for row in rows:
            row.start(self.decode, start)
        pending = [(slot, list(slot.row.prompt_ids), 0) for slot in slots]
        steps = 0
        try:
            while pending:
                if not self._decode(pending):
                    return
                steps += 1
                if steps % _MEMORY_SAMPLE_EVERY_STEPS == 1:
                    self._on_step()
                if self._step_delay_s > 0:
                    time.sleep(self._step_delay_s)
                if should_abort():
                    return
                now = time.monotonic()
                pending = []
                for slot in slots:
                    if slot.logits is None or slot.row.done:
                        continue
                    token = self._choose(slot, rng)
                    slot.logits = None
                    if slot.row.feed(token, is_eos=token in self._end_set, now=now):
                        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                        continue
                    slot.seen.append(token)
                    pending.append((slot, [token], len(slot.seen) - 1))
        finally:
            llama_cpp.llama_memory_clear(self._memory, False)

    def _choose(self, slot: _Slot, rng: np.random.Generator) -> int:
        assert slot.logits is not None
        row = slot.row
        banned = self._end_ids if row.tokens_generated < row.min_new_tokens else None
        return choose_token(slot.logits, row.params, slot.seen, banned, rng)

    def _decode(self, pending: Sequence[tuple[_Slot, list[int], int]]) -> bool:
        """Feed each slot's tokens from its position; keep the logits of each one's last token.

        False when llama.cpp cannot (the rows then end with what they have).
        """
        batch = self._batch
        n = 0
        wanted: list[tuple[int, _Slot]] = []
        for slot, tokens, first_pos in pending:
            for offset, token in enumerate(tokens):
                if n == _BATCH_TOKENS:
                    if not self._run(n, wanted):
                        return False
                    n, wanted = 0, []
                last = offset == len(tokens) - 1
                batch.token[n] = token
                batch.pos[n] = first_pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = last
                if last:
                    wanted.append((n, slot))
                n += 1
        return n == 0 or self._run(n, wanted)

    def _run(self, n: int, wanted: list[tuple[int, _Slot]]) -> bool:
        self._batch.n_tokens = n
        code = llama_cpp.llama_decode(self._ctx, self._batch)
        if code != 0:
            logger.error("llama_decode failed with code %d for %d tokens", code, n)
            return False
        for index, slot in wanted:
            pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
            slot.logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()
        return True

    def warm_up(self) -> None:
        """Decode one token once, so a model that loads but cannot run fails its load."""
        token = max(llama_cpp.llama_vocab_bos(self._vocab), 0)
        slot = _Slot(row=None, seq=0)  # type: ignore[arg-type]
        try:
            if not self._decode([(slot, [token], 0)]):
                raise LoadFailed("the model cannot generate: llama_decode failed")
        finally:
            llama_cpp.llama_memory_clear(self._memory, False)

    def close(self) -> None:
        """Free the context and the model (the engine is unusable afterwards)."""
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)


def _groups(rows: Sequence[Row], cells: int) -> list[list[Row]]:
    """Split rows, in order, into groups whose prompts and budgets fit `cells` KV cells."""
    groups: list[list[Row]] = []
    used = cells
    for row in rows:
        need = len(row.prompt_ids) + row.max_new_tokens
        if used + need > cells:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += need
    return groups


def load_llama_engine(
    model_dir: Path,
    gguf_file: str,
    *,
    device: str = "cpu",
    step_delay_s: float = 0.0,
    on_step: Callable[[], object] = lambda: None,
) -> LlamaEngine:
    """Load a GGUF file with llama.cpp on the CPU; raise `LoadFailed` on failure."""
    check_model_dir(model_dir, gguf_file)
    if device != "cpu":
        raise LoadFailed(f"the llama.cpp engine runs on the CPU only, not {device}")
    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    path = str(model_dir / gguf_file).encode()
    model = llama_cpp.llama_model_load_from_file(path, model_params)
    if not model:
        raise LoadFailed(f"llama.cpp could not load {gguf_file}")
    threads = cpu_threads()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = min(llama_cpp.llama_model_n_ctx_train(model), MAX_CONTEXT_TOKENS)
    params.n_batch = params.n_ubatch = _BATCH_TOKENS
    params.n_seq_max = MAX_SEQUENCES
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    context = llama_cpp.llama_init_from_model(model, params)
    if not context:
        llama_cpp.llama_model_free(model)
        raise LoadFailed(f"llama.cpp could not make a context for {gguf_file}")
    engine = LlamaEngine(
        model, context, threads=threads, step_delay_s=step_delay_s, on_step=on_step
    )
    try:
        engine.warm_up()
    except LoadFailed:
        engine.close()
        raise
    return engine
