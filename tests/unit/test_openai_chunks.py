"""/v1 stream chunks: the per-token template renders exactly the JSON of the whole chunk."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from control_plane import relay
from control_plane.openai_schemas import Generation
from control_plane.routes.openai import _MARK, _chunks

TEXTS = ["Hello", " wörld ✓", 'quote " and \\ backslash', "new\nline\r\t", "\x00\x1f", "😀", " "]


async def _render(gen: Generation, kind: str) -> list[str]:
    async def pieces() -> AsyncIterator[relay.Piece]:
        for text in TEXTS:
            yield text, None
        done = {"done": True, "finish_reason": "length", "prompt_tokens": 4, "tokens_generated": 7}
        yield "", done

    out: list[str] = []
    async for batch in _chunks(gen, kind)(pieces()):
        for event in batch if isinstance(batch, list) else [batch]:
            out.append(event["data"])
    return out


def _expected(first: dict[str, Any], kind: str, text: str, usage: bool) -> dict[str, Any]:
    base = {k: first[k] for k in ("id", "object", "created", "model")}
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice.update(logprobs=None, finish_reason=None)
    chunk: dict[str, Any] = {**base, "choices": [choice]}
    if usage:
        chunk["usage"] = None
    return chunk


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("usage", [True, False])
@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", f"odd/{_MARK}"])
def test_text_chunks_are_the_whole_chunk_json(kind: str, usage: bool, model: str) -> None:
    gen = Generation(model=model, payload={}, stream=True, include_usage=usage)
    data = asyncio.run(_render(gen, kind))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    texts = chunks[1 : 1 + len(TEXTS)] if kind == "chat" else chunks[: len(TEXTS)]
    for text, chunk, raw in zip(TEXTS, texts, data[1 if kind == "chat" else 0 :], strict=False):
        assert chunk == _expected(chunks[0], kind, text, usage)
        # Byte for byte what encoding the whole chunk gives (ensure_ascii=False).
        assert raw == json.dumps(chunk, ensure_ascii=False)
    last = chunks[len(TEXTS) + (1 if kind == "chat" else 0)]
    assert last["choices"][0]["finish_reason"] == "length"
    if usage:
        counts = {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}
        assert chunks[-1]["usage"] == counts
