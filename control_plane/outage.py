"""Whether the database is reachable, as this control plane last saw it, logged once per change.

A database outage answered 503 per request and a traceback per scheduled pass made 116
tracebacks in 10 s (issue 17): the log should say "down" once and "back" once, with counts.
"""

from __future__ import annotations

import logging

from db import DatabaseUnavailable
from db.pool import LOST_CONNECTION_ERRORS

logger = logging.getLogger(__name__)

# What "the database is unreachable" looks like: a failed connect, or a connection lost under a
# query. (Not every OSError or timeout: those of an instance agent are no database outage.)
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (DatabaseUnavailable, *LOST_CONNECTION_ERRORS)


def is_outage(exc: BaseException) -> bool:
    """True when `exc` means the database cannot be reached now, not a bug of ours."""
    return isinstance(exc, OUTAGE_ERRORS)


class DatabaseOutage:
    """Tracks one outage at a time: its start, what failed, and how many calls it refused."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, where: str, exc: BaseException, now: float) -> None:
        """Record a call that found the database unreachable; log only the first of an outage."""
        self.failures += 1
        if self.down_since is None:
            self.down_since = now
            logger.error(
                "database unreachable (%s: %s); answering 503 where it is needed, serving known "
                "keys from the cache, until it returns",
                where,
                type(exc).__name__,
            )

    def ok(self, now: float) -> None:
        """Record a call the database answered; log the end of an outage once."""
        if self.down_since is None:
            return
        logger.warning(
            "database reachable again after %.1f s (%d calls failed meanwhile)",
            now - self.down_since,
            self.failures,
        )
        self.down_since, self.failures = None, 0
