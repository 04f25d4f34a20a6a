"""Choosing the next token from one row's logits, as transformers' `generate` does (numpy only).

The llama.cpp engine samples here rather than with llama.cpp's own samplers so every generation
parameter means what it means for the transformers engine: the repetition penalty divides
positive logits and multiplies negative ones over the prompt and the text so far, then the
temperature divides, top-k keeps the k best, top-p the smallest set whose probability reaches p
(always at least one token), and greedy decoding applies only the penalty and the end-token ban.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from instance_agent.protocol import GenerationParams

Logits = npt.NDArray[np.float32]


def choose_token(
    logits: Logits,
    params: GenerationParams,
    seen: Iterable[int],
    banned: npt.NDArray[np.int64] | None,
    rng: np.random.Generator,
) -> int:
    """The next token for one row; `logits` is modified in place.

    `seen` are the row's prompt and generated ids (for the repetition penalty); `banned` ids
    may not be chosen (end tokens before the row's minimum length).
    """
    if params.repetition_penalty != 1.0:
        ids = np.fromiter(set(seen), dtype=np.int64)
        if ids.size:
            scores = logits[ids]
            penalty = params.repetition_penalty
            logits[ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    if banned is not None and banned.size:
        logits[banned] = -np.inf
    if not params.do_sample:
        return int(np.argmax(logits))
    candidates = np.arange(logits.shape[0])
    warped = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < warped.shape[0]:
        best = np.argpartition(-warped, params.top_k - 1)[: params.top_k]
        candidates, warped = candidates[best], warped[best]
    order = np.argsort(-warped, kind="stable")
    candidates, warped = candidates[order], warped[order]
    finite = np.isfinite(warped)
    if not finite.any():
        return int(candidates[0])
    candidates, warped = candidates[finite], warped[finite]
    probs = np.exp(warped - warped[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep tokens until the probability before them reaches top_p: at least the first.
        before = np.cumsum(probs) - probs
        keep = before < params.top_p
        candidates, probs = candidates[keep], probs[keep]
        probs /= probs.sum()
    return int(rng.choice(candidates, p=probs))
