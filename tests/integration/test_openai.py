"""The OpenAI-compatible routes and /chat, with the real `openai` SDK as the client, against a
real control plane whose instances are real agents serving tiny models (loaded on demand).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ADMIN_KEY, Api, app_state, create_database, make_settings, serve
from tests.tiny_model import build_tiny_encoder, build_tiny_model

CHAT = "acme/tiny-chat"
EMBED = "acme/tiny-embed"
UNMEASURED = "acme/unmeasured"


@pytest.fixture(scope="module")
async def api(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    """One control plane for the module: loading agents on demand costs seconds each."""
    root = tmp_path_factory.mktemp("openai-models")
    build_tiny_model(root / "acme" / "tiny-chat")
    build_tiny_encoder(root / "acme" / "tiny-embed")
    build_tiny_model(root / "acme" / "unmeasured")
    name, dsn = await create_database(pg_dsn, "mlcp_openai", template_db)
    settings = make_settings(
        dsn,
        tmp_path_factory.mktemp("openai") / "data",
        model_dirs=str(root),
        include_packaged_models=False,
    )
    try:
        async with serve(settings) as base, aiohttp.ClientSession() as session:
            api = Api(base, session, settings)
            for model in (CHAT, EMBED):
                await app_state(api).pool.execute(
                    "UPDATE models SET required_ram_bytes = $2, benchmarked_at = now() "
                    "WHERE name = $1",
                    model,
                    200_000_000,
                )
            yield api
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="module")
async def client(api: Api) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=api.base + "/v1", api_key=ADMIN_KEY, max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def instances_of(api: Api, model: str) -> int:
    count = await app_state(api).pool.fetchval(
        "SELECT count(*) FROM instances WHERE model = $1", model
    )
    return int(count)


async def test_concurrent_cold_requests_share_one_load(
    api: Api, client: openai.AsyncOpenAI
) -> None:
    assert await instances_of(api, CHAT) == 0
    answers = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=CHAT,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=6,
                temperature=0,
            )
            for _ in range(3)
        )
    )
    assert await instances_of(api, CHAT) == 1
    assert len({a.choices[0].message.content for a in answers}) == 1
    status, body = await api.call("POST", "/model/status", {"model": CHAT})
    assert status == 200 and body["status"] == "RUNNING"
    assert body["expirationPeriodSeconds"] == api.settings.on_demand_expiration_s == 300
    assert body["concurrency"] == 1


async def test_models_lists_only_benchmarked_ones(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    ids = {m.id: m for m in page.data}
    assert set(ids) == {CHAT, EMBED}
    assert ids[EMBED].model_extra is not None
    assert ids[EMBED].model_extra["task"] == "feature-extraction"
    assert ids[CHAT].object == "model"


async def test_streams_reuse_the_connection_to_the_agent(
    api: Api, client: openai.AsyncOpenAI
) -> None:
    # A completed stream gives its agent connection back; closing it made every streamed
    # request connect anew, which cost each one's first token a TCP handshake.
    messages: Any = [{"role": "user", "content": "Once upon a time"}]
    await client.chat.completions.create(model=CHAT, messages=messages, max_tokens=2)
    relay = app_state(api).agents
    made = relay.connects
    for _ in range(3):
        stream = await client.chat.completions.create(
            model=CHAT,
            messages=messages,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _chunk in stream:
            pass
        # The agent's final chunk may reach the control plane just after the client has its
        # last byte; until then the connection is not idle, and a request sent at once would
        # rightly take another one.
        await asyncio.sleep(0.05)
        async with api.session.post(
            api.base + "/model/run",
            json={"model": CHAT, "prompt": "Once", "stream": True, "params": {"max_new_tokens": 4}},
            headers={"Authorization": f"Key {ADMIN_KEY}", "Accept": "text/event-stream"},
        ) as resp:
            assert resp.status == 200
            assert "text/event-stream" in resp.headers["Content-Type"]
            await resp.read()
        await asyncio.sleep(0.05)
    assert relay.connects == made


async def test_chat_answer_matches_its_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Once upon a time"}]
    whole = await client.chat.completions.create(
        model=CHAT, messages=messages, max_tokens=10, temperature=0
    )
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None
    assert whole.usage.completion_tokens <= 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = await client.chat.completions.create(
        model=CHAT,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == choice.message.content
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


async def test_completions_and_stop_strings(client: openai.AsyncOpenAI) -> None:
    full = await client.completions.create(
        model=CHAT, prompt="Hello world", max_tokens=30, temperature=0
    )
    assert full.object == "text_completion"
    text = full.choices[0].text
    assert full.choices[0].finish_reason in ("stop", "length")
    stop = text[8:10]
    assert len(text) > 10 and stop
    cut = await client.completions.create(
        model=CHAT, prompt="Hello world", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = await client.completions.create(
        model=CHAT, prompt="Hello world", max_tokens=2, temperature=0
    )
    assert short.usage is not None and short.usage.completion_tokens <= 2


async def test_embeddings_float_and_base64(client: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    default = await client.embeddings.create(model=EMBED, input=["hello world", "paris"])
    floats = await client.embeddings.create(
        model=EMBED, input=["hello world", "paris"], encoding_format="float"
    )
    assert [d.index for d in floats.data] == [0, 1]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(b.embedding) == 32
        assert math.sqrt(sum(x * x for x in b.embedding)) == pytest.approx(1.0, abs=1e-5)
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens > 0


async def test_errors_raise_the_sdk_exceptions(api: Api, client: openai.AsyncOpenAI) -> None:
    hello: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="acme/nowhere", messages=hello)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.ConflictError) as unmeasured:
        await client.chat.completions.create(model=UNMEASURED, messages=hello)
    assert "POST /model/job" in unmeasured.value.message
    with pytest.raises(openai.UnprocessableEntityError) as many:
        await client.chat.completions.create(model=CHAT, messages=hello, n=5)
    assert isinstance(many.value.body, dict) and many.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as wrong:
        await client.chat.completions.create(model=EMBED, messages=hello)
    assert wrong.value.code == "unsupported_task"
    with pytest.raises(openai.UnprocessableEntityError):
        await client.embeddings.create(model=CHAT, input="hi")
    bad_key = openai.AsyncOpenAI(base_url=api.base + "/v1", api_key="nope", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await bad_key.models.list()
    finally:
        await bad_key.close()


async def test_chat_route_answers_the_single_model_fields(api: Api) -> None:
    fields = {"prompt", "response", "tokens_generated", "time_seconds", "tokens_per_second"}
    body = {"model": CHAT, "prompt": "What is machine learning?", "max_tokens": 8}
    status, answer = await api.call("POST", "/chat", body)
    assert status == 200, answer
    assert set(answer) == fields
    assert answer["prompt"] == body["prompt"] and answer["tokens_generated"] <= 8
    # The embedding model is running too by now, so a body without a model must name one.
    await api.call("POST", "/model/load", {"model": EMBED})
    status, answer = await api.call("POST", "/chat", {"prompt": "hi"})
    assert status == 422 and CHAT in answer["error"] and EMBED in answer["error"]
    status, answer = await api.call("POST", "/chat", {"model": CHAT, "max_tokens": 3000})
    assert status == 422


async def test_metrics_after_traffic(api: Api) -> None:
    status, scraper = await api.call("POST", "/admin/keys", {"name": "prom", "scope": "metrics"})
    assert status == 201, scraper
    status, user = await api.call("POST", "/admin/keys", {"name": "u", "scope": "user"})
    assert status == 201
    assert (await api.call("GET", "/metrics", key=user["key"]))[0] == 403
    assert (await api.call("GET", "/model/list", key=scraper["key"]))[0] == 403
    headers = {"Authorization": f"Bearer {scraper['key']}"}
    async with api.session.get(api.base + "/metrics", headers=headers) as reply:
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain")
        text = await reply.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "mlcp_requests",
        "mlcp_request_duration_seconds",
        "mlcp_time_to_first_token_seconds",
        "mlcp_prompt_tokens",
        "mlcp_generation_tokens",
        "mlcp_instances",
        "mlcp_instance_requests_running",
        "mlcp_instance_requests_waiting",
        "mlcp_evictions",
        "mlcp_load_duration_seconds",
        "mlcp_jobs",
        "mlcp_memory_reserved_bytes",
        "mlcp_memory_free_bytes",
    ):
        assert name in families, name

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    node = app_state(api).metrics.node
    ok = {"model": CHAT, "route": "/v1/chat/completions", "status": "200", "node": node}
    assert value("mlcp_requests", "mlcp_requests_total", **ok) >= 5
    assert (
        value("mlcp_requests", "mlcp_requests_total", route="/v1/chat/completions", status="404")
        >= 1
    )
    assert value("mlcp_generation_tokens", "mlcp_generation_tokens_total", model=CHAT) > 0
    assert value("mlcp_prompt_tokens", "mlcp_prompt_tokens_total", model=EMBED) > 0
    assert value("mlcp_time_to_first_token_seconds", "mlcp_time_to_first_token_seconds_count") >= 1
    assert value("mlcp_load_duration_seconds", "mlcp_load_duration_seconds_count", model=CHAT) == 1
    assert value("mlcp_instances", "mlcp_instances", state="RUNNING") == 2
    assert value("mlcp_memory_reserved_bytes", "mlcp_memory_reserved_bytes", device="cpu") > 0
