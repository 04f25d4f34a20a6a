"""How the CLI prints: rich tables for people, `--json` for scripts, errors as one line."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def error(message: str) -> None:
    # markup=False: a server message may contain '[' (e.g. a model name); never interpret it.
    err.print(f"mlcp: {message}", markup=False)


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    out.print(t, markup=False)


def human_bytes(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool) or n <= 0:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    return "-"


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def until(value: object, now: datetime | None = None) -> str:
    """'4 minutes from now', as `ollama ps` writes an expiry."""
    at = parse_time(value)
    if at is None:
        return "-"
    left = (at - (now or datetime.now(UTC))).total_seconds()
    if left <= 0:
        return "expiring"
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "expiring"
