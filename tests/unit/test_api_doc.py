"""docs/api.md names every route the application serves (a newcomer's one file for the API)."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Mount, Route

from control_plane.app import create_app
from tests.harness import make_settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_route_is_documented(tmp_path: Path) -> None:
    app = create_app(make_settings("postgresql://127.0.0.1:1/none", tmp_path))
    text = DOC.read_text()
    # A documented path is written in backticks, optionally after its methods.
    documented = set(re.findall(r"(/[A-Za-z0-9_./{}:-]*)", text))
    missing = []
    for route in app.routes:
        if isinstance(route, Route | Mount) and route.path and route.path not in documented:
            missing.append(route.path)
    assert missing == [], f"routes missing from docs/api.md: {missing}"
