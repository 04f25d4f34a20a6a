"""Reading an agent's health: only a complete `healthy` body counts as ready."""

from __future__ import annotations

from typing import Any

import pytest

from instance_agent.client import parse_ready

READY: dict[str, Any] = {
    "status": "healthy",
    "model": "org/m",
    "model_loaded": True,
    "note": "",
    "task": "text-generation",
    "concurrency": 2,
    "maxQueue": 8,
    "inFlight": 1,
    "queued": 0,
    "loadSeconds": 0.5,
    "device": "cpu",
    "contextLength": 256,
    "memory": {"rssBytes": 1, "peakRssBytes": 2, "gpuBytes": None, "peakGpuBytes": None},
    "stats": {"batches": 0, "maxBatchSize": 1, "requests": 0},
}


def test_a_complete_healthy_body_is_ready() -> None:
    assert parse_ready(READY) == READY


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "healthy",
        {**READY, "status": "loading"},
        {**READY, "status": "failed", "model_loaded": False},
        {k: v for k, v in READY.items() if k != "inFlight"},
        {**READY, "queued": "3"},
        {**READY, "concurrency": None},
        {**READY, "memory": None},
    ],
)
def test_anything_else_is_not_ready(body: object) -> None:
    assert parse_ready(body) is None
