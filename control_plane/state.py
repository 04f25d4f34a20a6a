"""The typed state the lifespan opens and every handler reaches through `state_of`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from control_plane.auth import Authenticator
from control_plane.settings import Settings
from db.pool import Pool

if TYPE_CHECKING:
    pass

STATE_KEY = "mlcp"


@dataclass
class AppState:
    settings: Settings
    pool: Pool
    auth: Authenticator
    extras: dict[str, object] = field(default_factory=dict)


def state_of(request: Request) -> AppState:
    """The lifespan's state, typed."""
    state: AppState = getattr(request.state, STATE_KEY)
    return state
