"""Both seeds' projects deployed unchanged and called as their walkthroughs call them: CellStrat's
sentiment analyser (a tiny random sequence classifier) and Cortex's text generator (a tiny GPT-2
through `pipeline`, its spec `text_generator.yaml` in Cortex's list form)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api_deploy import deploy, wait_api
from tests.handler_projects import cellstrat_sentiment, cortex_text_generator
from tests.harness import Api

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


async def test_both_seed_projects_deploy_and_answer(api: Api, tmp_path: Path) -> None:
    status, body = await api.call("POST", "/admin/keys", {"name": "alice", "scope": "user"})
    assert status == 201, body
    key = body["key"]
    sentiment = cellstrat_sentiment(tmp_path / "sentiment-analyser")
    generator = cortex_text_generator(tmp_path / "text-generator")
    status, body = await deploy(api, sentiment, key)
    assert (status, body["model"]) == (202, "alice/sentiment-analyser"), body
    status, body = await deploy(api, generator, key, spec="text_generator.yaml")
    assert (status, body["model"]) == (202, "alice/text-generator"), body

    await wait_api(api, "sentiment-analyser", key, "available", timeout_s=300)
    # CellStrat: GET loads it into memory, POST predicts; x-api-key as the seed sends it.
    seed_headers = {"x-api-key": key}
    status, got = await api.call("GET", "/alice/sentiment-analyser", key=None, headers=seed_headers)
    assert status == 200 and got["instance"]["status"] == "RUNNING", got
    status, got = await api.call(
        "POST",
        "/alice/sentiment-analyser",
        key=None,
        headers=seed_headers,
        data='"so simple and quick!"',
    )
    assert status == 200 and got["statusCode"] == 200, got
    [predictions] = got["body"]["output"]
    assert sorted(label for label, _ in predictions) == ["Negative", "Positive"]
    assert abs(sum(score for _, score in predictions) - 100) < 0.1

    await wait_api(api, "text-generator", key, "available", timeout_s=300)
    # Cortex: POST to the API's path; the handler's return value as JSON.
    status, got = await api.call("POST", "/text-generator", {"text": "hello world"}, key=key)
    assert status == 200 and isinstance(got["generated_text"], str), got
    assert got["generated_text"].startswith("hello world")
    status, logs = await api.call("GET", "/model/logs?model=alice/text-generator&tail=50", key=key)
    assert status == 200 and isinstance(logs, str), logs
