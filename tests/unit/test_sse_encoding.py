"""The relay's server-sent events are byte for byte what sse-starlette writes for the same event."""

from __future__ import annotations

import pytest
from sse_starlette.event import ServerSentEvent

from control_plane.relay import encode_event


@pytest.mark.parametrize(
    "event",
    [
        {"data": "tok0 "},
        {"data": ""},
        {"data": "two\nlines\r\nand\rmore"},
        {"event": "done", "data": '{"tokens_generated": 3}'},
        {"event": "err\nor", "data": "x"},
        {"data": "ünïcödé ✓"},
    ],
)
def test_encode_event_matches_sse_starlette(event: dict[str, str]) -> None:
    assert encode_event(event) == ServerSentEvent(**event).encode()  # type: ignore[arg-type]
