"""Async requests: validate and store a submission, render one, cancel one, clean up old ones.

A request is stored `accepted` and answered 202 only once committed; the worker loop
(async_worker.py) moves it through `pending` (waiting for an instance, with the reason) and
`processing` to `success` or `failed`; a client may `cancel` it until it finishes.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from benchmarker.model_ids import model_id_problem
from control_plane import uploads
from control_plane.async_queue import GroupCommit
from control_plane.errors import (
    InvalidField,
    InvalidModelId,
    InvalidParams,
    InvalidPrompt,
    InvalidWebhook,
    NotBenchmarked,
    RequestFinished,
    RequestNotFound,
    TooManyRequests,
)
from control_plane.jobs import is_measured
from control_plane.loading import check_runnable
from control_plane.schemas import iso, reject_unknown, require_object
from control_plane.state import AppState
from control_plane.webhooks import AllowList, check_webhook, new_secret
from db import async_queries as aq
from db import queries
from db.rows import AsyncRequestRow
from instance_agent.asr_options import validate_asr_options
from instance_agent.protocol import InvalidPrompt as InvalidPromptError
from instance_agent.protocol import ProtocolError, validate_params, validate_prompt

FINISHED = frozenset({"success", "failed", "cancelled"})
INPUT, URL, WEBHOOK, EVENTS = "input", "URL", "webhook", "webhook_events_filter"
SPEECH_TASK = "automatic-speech-recognition"
MAX_PAGE = 100


@dataclass(frozen=True)
class Submission:
    """A submission as parsed before its model is known: the task decides what `input` is."""

    model: str
    input: dict[str, Any]
    url: object = None
    webhook: str | None = None
    webhook_events: list[str] | None = None


def parse_submission(model: str, body: object, allow: AllowList) -> Submission:
    """The body of `POST /v1/async/{model}`: `{"input": {...}, "URL": <upload url>}`, and
    optionally `"webhook"` with `"webhook_events_filter"`."""
    problem = model_id_problem(model)
    if problem:
        raise InvalidModelId(f"the model in the path {problem}")
    obj = require_object(body)
    reject_unknown(obj, frozenset({INPUT, URL, WEBHOOK, EVENTS}))
    data = obj.get(INPUT)
    if not isinstance(data, dict):
        raise InvalidField("'input' must be an object")
    webhook, events = None, None
    if obj.get(WEBHOOK) is not None:
        webhook, events = check_webhook(obj[WEBHOOK], obj.get(EVENTS), allow)
    elif obj.get(EVENTS) is not None:
        raise InvalidWebhook("'webhook_events_filter' needs a 'webhook'")
    return Submission(model, data, obj.get(URL), webhook, events)


def text_input(sub: Submission) -> dict[str, Any]:
    """A text-generation request's input: `{"prompt", "params"}`, and no upload."""
    if sub.url is not None:
        raise InvalidField("a text-generation model takes no upload: leave out 'URL'")
    data = sub.input
    reject_unknown(data, frozenset({"prompt", "params"}))
    if "prompt" not in data:
        raise InvalidPrompt("'input.prompt' is required")
    params = data.get("params") or {}
    try:
        validate_prompt(data["prompt"])
        validate_params(params)
    except InvalidPromptError as exc:
        raise InvalidPrompt(exc.message) from exc
    except ProtocolError as exc:
        raise InvalidParams(exc.message) from exc
    return {"prompt": data["prompt"], "params": params}


def speech_input(sub: Submission) -> dict[str, Any]:
    """A speech-recognition request's input: Whisper options by name (the upload is apart)."""
    if sub.url is None:
        raise InvalidField(
            "a speech-recognition model reads an upload: send its URL as 'URL' "
            "(POST /v1/input/upload-url, then PUT the file)"
        )
    try:
        return validate_asr_options(sub.input)
    except ProtocolError as exc:
        raise InvalidParams(exc.message) from exc


async def submit(state: AppState, key_id: int, sub: Submission) -> AsyncRequestRow:
    """Store the request (committed when this returns) after checking its model can run."""
    model = check_runnable(await queries.get_model(state.pool, sub.model), sub.model)
    upload = None
    if model.task == SPEECH_TASK:
        data = speech_input(sub)
        upload = await uploads.for_submission(state, key_id, sub.url)
    else:
        data = text_input(sub)
    if not is_measured(model):
        raise NotBenchmarked(
            f"model {sub.model} has not been benchmarked; request it first with POST /model/job"
        )
    if sub.webhook is not None:
        # Made before the request exists, so its first delivery always has a secret to sign.
        await signing_secret(state, key_id)
    row = await _store(
        state,
        aq.NewAsyncRequest(
            uuid.uuid4(),
            key_id,
            sub.model,
            data,
            state.settings.async_max_queued,
            upload.id if upload is not None else None,
            sub.webhook,
            sub.webhook_events,
        ),
    )
    if row is None:
        raise TooManyRequests(
            f"this key has {state.settings.async_max_queued} unfinished async requests; "
            "retry once some finish"
        )
    state.wake_async()
    return row


async def _store(state: AppState, new: aq.NewAsyncRequest) -> AsyncRequestRow | None:
    """Store one request, committed when this returns; the submits of a burst that arrive while
    one insert runs are stored together by the next (one statement for all of them)."""
    if state.async_inserts is None:
        state.async_inserts = GroupCommit(functools.partial(aq.insert_async_requests, state.pool))
    return await state.async_inserts(new)


async def signing_secret(state: AppState, key_id: int) -> str:
    """The key's webhook signing secret, made on first use."""
    while True:
        found = await aq.ensure_webhook_secret(state.pool, key_id, new_secret())
        if found is not None:
            return found


def parse_request_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError as exc:
        raise RequestNotFound("no such async request") from exc


async def get(state: AppState, key_id: int, request_id: str) -> AsyncRequestRow:
    row = await aq.get_async_request(state.pool, parse_request_id(request_id), key_id)
    if row is None:
        raise RequestNotFound("no such async request")
    return row


async def cancel(state: AppState, key_id: int, request_id: str) -> AsyncRequestRow:
    """Cancel an unfinished request of this key; a finished one is 409."""
    rid = parse_request_id(request_id)
    row = await aq.cancel_async_request(state.pool, rid, key_id)
    if row is not None:
        return row
    current = await aq.get_async_request(state.pool, rid, key_id)
    if current is None:
        raise RequestNotFound("no such async request")
    raise RequestFinished(f"the async request has already finished ({current.state})")


def urls(base: str, request_id: uuid.UUID) -> dict[str, str]:
    url = f"{base.rstrip('/')}/v1/async/requests/{request_id}"
    return {"GET": url, "cancel": f"{url}/cancel"}


def render(row: AsyncRequestRow, base: str) -> dict[str, Any]:
    """A request as polled: status, the result once success, the error once failed."""
    return {
        "id": str(row.id),
        "model": row.model,
        "status": row.state,
        "result": row.result if row.state == "success" else None,
        "error": row.reason if row.state in ("failed", "cancelled") else None,
        # Why a pending request waits (loading its model, retrying); null otherwise.
        "reason": row.reason if row.state in ("accepted", "pending") else None,
        "attempts": row.attempts,
        "timestamps": {
            "accepted": iso(row.created_at),
            "pending": iso(row.pending_at),
            "processing": iso(row.started_at),
            "finished": iso(row.finished_at),
        },
        "urls": urls(base, row.id),
        "webhook": (
            {"url": row.webhook, "events": row.webhook_events} if row.webhook is not None else None
        ),
    }


def retention_cutoff(now: datetime, retention_s: float) -> datetime:
    """Requests finished before this are deleted."""
    return now - timedelta(seconds=retention_s)


async def clean_up(state: AppState, now: datetime) -> int:
    """Delete requests finished longer ago than the retention period, then the uploads no
    request reads any more (with their files); how many requests went."""
    cutoff = retention_cutoff(now, state.settings.async_retention_s)
    gone = len(await aq.delete_finished_async_requests(state.pool, cutoff))
    await uploads.delete_stale(state, cutoff)
    return gone
