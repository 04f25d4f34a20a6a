"""The llama.cpp engine: a GGUF file served as is, several rows decoded in one batch.

The only module that imports `llama_cpp` (llama-cpp-python's low-level bindings; its high-level
`Llama` decodes one sequence at a time). Each live row is one llama.cpp sequence in a KV
cache shared by all of them (`kv_unified`), so a decoding step is one `llama_decode` over one
token per live row. Batching is continuous: a request that arrives while others generate joins
at the next step, its prompt prefilled in that same `llama_decode`, and a row that ends gives
its sequence back at once. Tokens are chosen by `instance_agent.sampling`, each row with its own
random generator (seeded by its own seed), so every generation parameter means what it means for
the transformers engine and a row's text does not depend on which rows run beside it. Chat
messages go through the GGUF's own chat template, rendered by llama-cpp-python's Jinja2
formatter.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from instance_agent.batcher import TakeMore
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
    """One live row's llama.cpp sequence: the ids it has seen and how many are in the cache."""

    row: Row
    seq: int
    # KV cells set aside for the row: its prompt and its whole budget.
    cells: int
    rng: np.random.Generator
    seen: list[int]
    fed: int = 0
    logits: npt.NDArray[np.float32] | None = None


class LlamaEngine:
    """A GGUF model in a llama.cpp context that tokenizes prompts and runs batches of rows."""

    engine: EngineName = LLAMA_CPP
    device = "cpu"
    # New rows join between decoding steps (`generate`'s `take_more`), each with its own sampler.
    joins_running_batch = True

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

    def generate(
        self,
        rows: Sequence[Row],
        should_abort: Callable[[], bool],
        take_more: TakeMore | None = None,
    ) -> None:
        """Decode rows until none is left; the rows receive their text as it comes.

        Between decoding steps, rows that finished or were cancelled give their sequence and
        KV cells back at once, and new rows join: first the waiting ones of `rows`, then those
        `take_more` hands over (the batcher's queue). A row joins only when its prompt and its
        whole budget fit the free KV cells; its prompt is then prefilled in the same
        `llama_decode` as the next token of every running row, at most `_BATCH_TOKENS` tokens a
        step, so a long prompt never stalls the others for longer than one such chunk.
        """
        waiting = deque(rows)
        live: dict[int, _Slot] = {}
        free_seqs = list(range(MAX_SEQUENCES - 1, -1, -1))
        free_cells = self.context_tokens

        def claim(row: Row) -> bool:
            nonlocal free_cells
            need = len(row.prompt_ids) + row.max_new_tokens
            if not free_seqs or need > free_cells:
                return False
            free_cells -= need
            seq = free_seqs.pop()
            live[seq] = _Slot(
                row, seq, need, np.random.default_rng(row.params.seed), list(row.prompt_ids)
            )
            row.start(self.decode)
            return True

        def release(slot: _Slot) -> None:
            nonlocal free_cells
            del live[slot.seq]
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            free_cells += slot.cells
            free_seqs.append(slot.seq)

        llama_cpp.llama_memory_clear(self._memory, False)
        steps = 0
        try:
            while True:
                for slot in list(live.values()):
                    if slot.row.cancelled:
                        slot.row.drop()
                    if slot.row.done:
                        release(slot)
                while waiting and (waiting[0].cancelled or claim(waiting[0])):
                    row = waiting.popleft()
                    if row.cancelled:
                        row.drop()
                if take_more is not None and not waiting:
                    take_more(claim)
                if not live:
                    return
                if not self._step(live.values()):
                    return
                steps += 1
                if steps % _MEMORY_SAMPLE_EVERY_STEPS == 1:
                    self._on_step()
                if self._step_delay_s > 0:
                    time.sleep(self._step_delay_s)
                if should_abort():
                    return
                now = time.monotonic()
                for slot in list(live.values()):
                    if slot.logits is None:
                        continue
                    token = self._choose(slot)
                    slot.logits = None
                    if slot.row.feed(token, is_eos=token in self._end_set, now=now):
                        release(slot)
                    else:
                        slot.seen.append(token)
        finally:
            llama_cpp.llama_memory_clear(self._memory, False)

    def _choose(self, slot: _Slot) -> int:
        assert slot.logits is not None
        row = slot.row
        banned = self._end_ids if row.tokens_generated < row.min_new_tokens else None
        return choose_token(slot.logits, row.params, slot.seen, banned, slot.rng)

    def _step(self, slots: Iterable[_Slot]) -> bool:
        """One decoding step: prompt chunks of joining rows, then every generating row's token.

        Each prompt chunk is a `llama_decode` of its own, cut at the same places whatever else
        runs (every `_BATCH_TOKENS` ids from the prompt's start), and chunks stop once a step
        has prefilled `_BATCH_TOKENS` ids, so a long prompt delays the others by one chunk at a
        time. With flash attention, llama.cpp's numbers for a sequence then do not depend on
        the others: decoding several sequences' tokens in one batch gives each the logits it
        gets alone, but prompts packed into one batch with other sequences' ids do not (up to
        1.7 apart on SmolLM2). A slot whose ids are all in the cache afterwards gets the logits
        of its last one. False when llama.cpp cannot decode (the rows then end with what they
        have).
        """
        generating: list[_Slot] = []
        prefilled = 0
        for slot in slots:
            if slot.fed >= len(slot.row.prompt_ids):
                generating.append(slot)
            elif prefilled < _BATCH_TOKENS:
                end = min(slot.fed + _BATCH_TOKENS, len(slot.seen))
                if not self._feed([(slot, end)], keep_logits=True):
                    return False
                prefilled += end - slot.fed
                slot.fed = end
        if not generating:
            return True
        if not self._feed([(slot, len(slot.seen)) for slot in generating], keep_logits=False):
            return False
        for slot in generating:
            slot.fed = len(slot.seen)
        return True

    def _feed(self, chunks: Sequence[tuple[_Slot, int]], *, keep_logits: bool) -> bool:
        """One `llama_decode` of each slot's ids from `fed` to `end`; the last one's logits.

        A slot fed up to its last id gets that id's logits: a view of llama.cpp's buffer, valid
        until the next decode, unless `keep_logits` (a copy). False when llama.cpp cannot.
        """
        batch = self._batch
        n = 0
        wanted: list[tuple[int, _Slot]] = []
        for slot, end in chunks:
            for pos in range(slot.fed, end):
                batch.token[n] = slot.seen[pos]
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = False
                n += 1
            if end == len(slot.seen):
                batch.logits[n - 1] = True
                wanted.append((n - 1, slot))
        if not self._run(n):
            return False
        for index, slot in wanted:
            pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
            logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
            slot.logits = logits.copy() if keep_logits else logits
        return True

    def _run(self, n: int) -> bool:
        self._batch.n_tokens = n
        code = llama_cpp.llama_decode(self._ctx, self._batch)
        if code != 0:
            logger.error("llama_decode failed with code %d for %d tokens", code, n)
            return False
        return True

    def warm_up(self) -> None:
        """Decode one token once, so a model that loads but cannot run fails its load."""
        batch = self._batch
        batch.token[0] = max(llama_cpp.llama_vocab_bos(self._vocab), 0)
        batch.pos[0] = 0
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = True
        try:
            if not self._run(1):
                raise LoadFailed("the model cannot generate: llama_decode failed")
        finally:
            llama_cpp.llama_memory_clear(self._memory, False)

    def close(self) -> None:
        """Free the context and the model (the engine is unusable afterwards)."""
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)


def load_llama_engine(
    model_dir: Path,
    gguf_file: str,
    *,
    device: str = "cpu",
    step_delay_s: float = 0.0,
    on_step: Callable[[], object] = lambda: None,
    max_context_tokens: int = MAX_CONTEXT_TOKENS,
) -> LlamaEngine:
    """Load a GGUF file with llama.cpp on the CPU; raise `LoadFailed` on failure.

    The context (the KV cells all live rows share) is the model's trained length, at most
    `max_context_tokens`.
    """
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
    params.n_ctx = min(llama_cpp.llama_model_n_ctx_train(model), max_context_tokens)
    params.n_batch = params.n_ubatch = _BATCH_TOKENS
    params.n_seq_max = MAX_SEQUENCES
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = threads
    # Flash attention keeps a sequence's numbers apart from the others' (see `_step`); without
    # it, SmolLM2's greedy text beside other rows parts from its text alone within 30 tokens.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
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
