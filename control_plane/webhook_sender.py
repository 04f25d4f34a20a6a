"""The webhook sender loop: claim due deliveries, POST them signed, record what happened.

Apart from the async worker, so a slow or dead receiver never holds up a request: each delivery
is its own task with `MLCP_WEBHOOK_TIMEOUT_S`, at most SENDERS at once per control plane. A
claim pushes the delivery's next attempt out by the timeout first (the lease), so deliveries a
control plane was sending when it died are picked up again by any other. Redirects are not
followed (the target was checked, the redirect's would not be), and the allow-list is checked
again before each attempt, so narrowing it stops deliveries already queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from control_plane import webhooks
from control_plane.outage import is_outage
from control_plane.schemas import iso
from control_plane.state import AppState
from db import async_queries as aq
from db.rows import WebhookDeliveryRow

logger = logging.getLogger(__name__)

SENDERS = 16
POLL_S = 0.2
# What a receiver's error answer is kept of, for the delivery's record.
_ERROR_CHARS = 200


def body_of(row: WebhookDeliveryRow) -> bytes:
    """The delivery's JSON body: Standard Webhooks' {type, timestamp, data}."""
    event = {
        "type": f"async_request.{row.event}",
        "timestamp": iso(row.created_at),
        "data": row.payload,
    }
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


async def send_one(
    state: AppState, row: WebhookDeliveryRow, secret: str | None
) -> tuple[bool, int | None, str | None]:
    """One attempt: (delivered, the receiver's status, why it failed)."""
    settings = state.settings
    problem = webhooks.url_problem(row.url, webhooks.parse_allow(settings.webhook_allow))
    if problem is not None:
        return False, None, f"the webhook URL {problem}"
    if secret is None:
        return False, None, "the key has no webhook secret"
    body = body_of(row)
    stamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": str(row.id),
        "webhook-timestamp": str(stamp),
        "webhook-signature": webhooks.signature(secret, str(row.id), stamp, body),
        "User-Agent": "mlcp-webhooks",
    }
    timeout = aiohttp.ClientTimeout(total=settings.webhook_timeout_s)
    try:
        async with state.session.post(
            row.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            if 200 <= resp.status < 300:
                return True, resp.status, None
            text = (await resp.text(errors="replace"))[:_ERROR_CHARS]
            return False, resp.status, f"the receiver answered {resp.status}: {text}"
    except TimeoutError:
        return False, None, f"no answer within {settings.webhook_timeout_s:g} s"
    except aiohttp.ClientError as exc:
        return False, None, f"could not reach the receiver ({type(exc).__name__})"


async def deliver(state: AppState, row: WebhookDeliveryRow, secret: str | None) -> None:
    """Send one claimed delivery and record the outcome (retry, delivered or failed)."""
    settings = state.settings
    ok, status, error = await send_one(state, row, secret)
    final = webhooks.outcome(row.attempts, settings.webhook_max_attempts, ok)
    retry_in = webhooks.backoff_s(row.attempts, settings.webhook_backoff_s)
    await aq.record_webhook_attempt(state.pool, row.id, final, status, error, retry_in)
    if final == "failed":
        logger.warning("webhook delivery %s failed for good: %s", row.id, error)


class WebhookSender:
    """Runs due deliveries until stopped; one per control plane."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        # The claim's lease outlasts one attempt (its timeout), so it is never sent twice at once.
        lease_s = self.state.settings.webhook_timeout_s + 5
        while not stop.is_set():
            try:
                while len(self._tasks) < SENDERS:
                    claimed = await aq.claim_webhook_delivery(self.state.pool, lease_s)
                    if claimed is None:
                        break
                    task = asyncio.create_task(self._deliver(*claimed))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception as exc:
                if is_outage(exc):
                    self.state.outage.failed("webhook sender", exc, loop.time())
                else:
                    logger.exception("webhook sender pass failed; retrying")
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(stop, self.wake), POLL_S)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _deliver(self, row: WebhookDeliveryRow, secret: str | None) -> None:
        try:
            await deliver(self.state, row, secret)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Its lease runs out and it is tried again then.
            logger.exception("webhook delivery %s could not be recorded", row.id)


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


@contextlib.asynccontextmanager
async def webhook_sender(state: AppState) -> AsyncIterator[WebhookSender]:
    """Run the sender for the lifespan of the block."""
    sender = WebhookSender(state)
    stop = asyncio.Event()
    task = asyncio.create_task(sender.run(stop), name="webhook-sender")
    try:
        yield sender
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            logger.warning("webhook sender did not stop in time")
