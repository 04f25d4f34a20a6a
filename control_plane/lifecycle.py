"""Instance lifecycle: the states, which transitions are allowed, and how long a start may take.

    STARTING → RUNNING → STOPPING → STOPPED
        └──────────┴─────────┴──→ FAILED (with a reason)

Pure; db/queries.sql applies each transition as one conditional UPDATE (`transition_instance`),
and expiry is computed there too, by the database's clock (`claim_expired_instances`).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


# to-state → the states it may be entered from.
ALLOWED_FROM: dict[State, tuple[State, ...]] = {
    State.STARTING: (),
    State.RUNNING: (State.STARTING,),
    State.STOPPING: (State.STARTING, State.RUNNING),
    State.STOPPED: (State.STOPPING,),
    State.FAILED: (State.STARTING, State.RUNNING, State.STOPPING),
}


def allowed_from(to: State) -> list[str]:
    return [s.value for s in ALLOWED_FROM[to]]


def health_timeout_s(param_bytes: int | None) -> float:
    """How long an instance may take to become healthy: grows with the model's size.

    Measured here: a fresh agent importing transformers and loading GPT-2 took ~8 s, SmolLM2 from
    safetensors ~3 s after import; allow generously for slow disks and 2 shared cores.
    """
    gb = (param_bytes or 0) / 1e9
    return 60.0 + 60.0 * gb
