"""Loads asked with "benchmark": true: started through the one load path once measured."""

from __future__ import annotations

import logging

from control_plane.errors import MlcpError
from control_plane.loading import load
from control_plane.schemas import LoadRequest
from control_plane.state import AppState
from db import queries
from instance_agent.engines import parse_engine

logger = logging.getLogger(__name__)


async def load_pending(state: AppState) -> None:
    """One pass over pending loads: load measured models, drop those whose benchmark failed."""
    for pending in await queries.pending_loads(state.pool):
        if not pending.measured:
            if pending.job_state == "failed":
                logger.warning(
                    "dropping the pending load of %s: its benchmark failed", pending.model
                )
                await queries.delete_pending_load(state.pool, pending.model)
            continue
        request = LoadRequest(
            pending.model,
            pending.concurrency,
            pending.expiration_s,
            engine=parse_engine(pending.engine),
        )
        try:
            await load(state, request, pending.owner_key_id)
        except MlcpError as exc:
            if exc.retry_after_s is not None:
                # Full for now, or the model's previous instance is still stopping: both pass.
                continue
            logger.warning("dropping the pending load of %s: %s", pending.model, exc.message)
        await queries.delete_pending_load(state.pool, pending.model)
