"""Bad input on the OpenAI-compatible routes: never a 500, always OpenAI's error envelope with
mlcp's status code, and nothing loaded for a request that could never run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness import ADMIN_KEY, Api, app_state
from tests.integration.test_openai import CHAT, EMBED, UNMEASURED, api  # noqa: F401

MSG = [{"role": "user", "content": "hi"}]
CHAT_CASES: dict[str, tuple[Any, int]] = {
    "body not an object": ([], 422),
    "messages missing": ({"model": CHAT}, 422),
    "messages not a list": ({"model": CHAT, "messages": "hi"}, 422),
    "messages an object": ({"model": CHAT, "messages": {"role": "user"}}, 422),
    "messages empty": ({"model": CHAT, "messages": []}, 422),
    "message not an object": ({"model": CHAT, "messages": ["hi"]}, 422),
    "role outside the three": (
        {"model": CHAT, "messages": [{"role": "tool", "content": "x"}]},
        422,
    ),
    "role an object": ({"model": CHAT, "messages": [{"role": {}, "content": "x"}]}, 422),
    "content an image part": (
        {"model": CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        422,
    ),
    "content a number": ({"model": CHAT, "messages": [{"role": "user", "content": 5}]}, 422),
    "messages all empty": ({"model": CHAT, "messages": [{"role": "user", "content": " "}]}, 422),
    "message with an extra field": (
        {"model": CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        422,
    ),
    "max_tokens 0": ({"model": CHAT, "messages": MSG, "max_tokens": 0}, 422),
    "max_tokens 10^9": ({"model": CHAT, "messages": MSG, "max_tokens": 10**9}, 422),
    "max_tokens a string": ({"model": CHAT, "messages": MSG, "max_tokens": "5"}, 422),
    "max_tokens true": ({"model": CHAT, "messages": MSG, "max_tokens": True}, 422),
    "max_completion_tokens -1": (
        {"model": CHAT, "messages": MSG, "max_completion_tokens": -1},
        422,
    ),
    "temperature 3": ({"model": CHAT, "messages": MSG, "temperature": 3}, 422),
    "temperature a string": ({"model": CHAT, "messages": MSG, "temperature": "hot"}, 422),
    "top_p 2": ({"model": CHAT, "messages": MSG, "top_p": 2}, 422),
    "n 5": ({"model": CHAT, "messages": MSG, "n": 5}, 422),
    "logprobs": ({"model": CHAT, "messages": MSG, "logprobs": True}, 422),
    "tools": ({"model": CHAT, "messages": MSG, "tools": [{"type": "function"}]}, 422),
    "presence_penalty 1": ({"model": CHAT, "messages": MSG, "presence_penalty": 1}, 422),
    "stop with 100 entries": ({"model": CHAT, "messages": MSG, "stop": ["x"] * 100}, 422),
    "stop a number": ({"model": CHAT, "messages": MSG, "stop": 7}, 422),
    "stream yes": ({"model": CHAT, "messages": MSG, "stream": "yes"}, 422),
    "stream_options without stream": (
        {"model": CHAT, "messages": MSG, "stream_options": {"include_usage": True}},
        422,
    ),
    "response_format json": (
        {"model": CHAT, "messages": MSG, "response_format": {"type": "json_object"}},
        422,
    ),
    "unknown field": ({"model": CHAT, "messages": MSG, "frobnicate": 1}, 422),
    "model missing": ({"messages": MSG}, 422),
    "model not an id": ({"model": "../../etc/passwd", "messages": MSG}, 422),
    "unknown model": ({"model": "nobody/nothing", "messages": MSG}, 404),
    "not benchmarked": ({"model": UNMEASURED, "messages": MSG}, 409),
    "chat on an embedding model": ({"model": EMBED, "messages": MSG}, 422),
}
COMPLETION_CASES: dict[str, tuple[Any, int]] = {
    "prompt missing": ({"model": CHAT}, 422),
    "prompt a list of tokens": ({"model": CHAT, "prompt": [1, 2, 3]}, 422),
    "prompt empty": ({"model": CHAT, "prompt": ""}, 422),
    "suffix": ({"model": CHAT, "prompt": "a", "suffix": "b"}, 422),
    "max_tokens NaN-like string": ({"model": CHAT, "prompt": "a", "max_tokens": "NaN"}, 422),
    "completion on an embedding model": ({"model": EMBED, "prompt": "a"}, 422),
}
EMBEDDING_CASES: dict[str, tuple[Any, int]] = {
    "input missing": ({"model": EMBED}, 422),
    "input a number": ({"model": EMBED, "input": 5}, 422),
    "input of 10,000 strings": ({"model": EMBED, "input": ["a"] * 10_000}, 422),
    "input of one 1 MB string": ({"model": EMBED, "input": "a" * 1_000_000}, 422),
    "input an empty string": ({"model": EMBED, "input": ""}, 422),
    "token arrays": ({"model": EMBED, "input": [[1, 2]]}, 422),
    "encoding_format hex": ({"model": EMBED, "input": "a", "encoding_format": "hex"}, 422),
    "embeddings of a generator": ({"model": CHAT, "input": "a"}, 422),
}
CASES = [
    *(("/v1/chat/completions", name, *case) for name, case in CHAT_CASES.items()),
    *(("/v1/completions", name, *case) for name, case in COMPLETION_CASES.items()),
    *(("/v1/embeddings", name, *case) for name, case in EMBEDDING_CASES.items()),
]


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("path", "name", "body", "status"), CASES, ids=[f"{c[0]} {c[1]}" for c in CASES]
)
async def test_bad_input_gets_the_openai_envelope(
    api: Api,  # noqa: F811
    path: str,
    name: str,
    body: Any,
    status: int,
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    async with api.session.post(api.base + path, data=json.dumps(body), headers=headers) as resp:
        payload = await resp.json(content_type=None)
        got = resp.status
    assert got == status, (name, payload)
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, payload
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    # Nothing was loaded for a request that could never run.
    live = await app_state(api).pool.fetchval(
        "SELECT count(*) FROM instances WHERE model = ANY($1::text[])", [CHAT, EMBED, UNMEASURED]
    )
    assert live == 0, name


async def test_broken_json_and_no_key(api: Api) -> None:  # noqa: F811
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    async with api.session.post(
        api.base + "/v1/chat/completions", data=b"{not json", headers=headers
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with api.session.get(api.base + "/v1/models") as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"
