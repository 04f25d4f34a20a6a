"""`mlcp logs -f` polls the log's tail and prints what came after the previous read."""

from __future__ import annotations

from control_plane.cli.models import new_lines


def test_new_lines_after_the_overlap() -> None:
    assert new_lines(["a", "b", "c"], ["a", "b", "c"]) == []
    assert new_lines(["a", "b", "c"], ["a", "b", "c", "d"]) == ["d"]
    # The tail window slid: the old first lines fell off the front.
    assert new_lines(["a", "b", "c"], ["c", "d", "e"]) == ["d", "e"]
    # No overlap: the log was replaced (a new instance) or grew past the window.
    assert new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]
    assert new_lines([], ["x"]) == ["x"]
    # Repeated lines: the longest overlap wins, so nothing already printed comes again.
    assert new_lines(["x", "x"], ["x", "x", "y"]) == ["y"]
