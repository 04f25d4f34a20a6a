"""Loads asked with "benchmark": true: started once their model is measured."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from control_plane.admission import admit
from control_plane.errors import MlcpError
from control_plane.state import AppState
from db import queries

logger = logging.getLogger(__name__)

PENDING_INTERVAL_S = 1.0


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
        model = await queries.get_model(state.pool, pending.model)
        if model is None:
            await queries.delete_pending_load(state.pool, pending.model)
            continue
        try:
            live = await state.supervisor.update_live(
                model.name, pending.concurrency, pending.expiration_s
            )
            if live is None:
                await state.activity.flush(state.pool)
                admission = await admit(
                    state.pool,
                    state.settings,
                    state.supervisor.runtime.name,
                    model,
                    pending.concurrency,
                    pending.expiration_s,
                    pending.owner_key_id,
                    datetime.now(UTC),
                )
                if admission.row is not None:
                    state.supervisor.launch(admission.row, model, admission.evicted)
        except MlcpError as exc:
            if exc.retry_after_s is not None:
                # Full for now, or the model's previous instance is still stopping: both pass.
                continue
            logger.warning("dropping the pending load of %s: %s", pending.model, exc.message)
        await queries.delete_pending_load(state.pool, pending.model)
