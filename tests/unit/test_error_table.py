"""The README's error table and the error classes agree: every code once, with its status."""

from __future__ import annotations

import re
from pathlib import Path

from control_plane.errors import MlcpError, error_classes

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `([a-z_]+)` \| (\d{3}) \| (.+) \|$")


def documented() -> list[tuple[str, int]]:
    text = README.read_text()
    section = text[text.index("## Errors") :]
    section = section[: section.index("\n## ", 1)]
    return [(m[1], int(m[2])) for line in section.splitlines() if (m := ROW.match(line))]


def test_every_code_is_documented_once_with_its_status() -> None:
    rows = documented()
    codes = [code for code, _ in rows]
    assert len(codes) == len(set(codes)), "a code is listed twice"
    classes = {(cls.code, cls.status_code) for cls in error_classes()}
    assert set(rows) == classes


def test_one_status_per_code() -> None:
    status: dict[str, int] = {}
    for cls in error_classes():
        assert status.setdefault(cls.code, cls.status_code) == cls.status_code, cls


def test_classes_fix_their_code_and_retry_hint() -> None:
    for cls in error_classes():
        err = cls("why")
        assert err.message == "why" and err.code == cls.code
        assert isinstance(err, MlcpError)
        if err.status_code == 503:
            assert "Retry-After" in err.headers(), cls
