"""What a handler project imports: the `@handler` decorator (alias `@hub_handler`).

    from instance_agent.handler import handler

    @handler
    def inference_handler(inputs, context):
        return ...

CellStrat projects keep their `from hub import hub_handler` unchanged: the agent makes this
module importable as `hub` (and as `mlcp_handler`) before it imports the project. A project
may instead define Cortex's `class Handler` with `__init__(self, config)` and
`handle_post(self, payload)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["handler", "hub_handler", "registered"]

HandlerFunction = Callable[[Any, Any], Any]
_F = TypeVar("_F", bound=HandlerFunction)
_registered: list[HandlerFunction] = []


def handler(function: _F) -> _F:
    """Mark `function(inputs, context)` as the project's inference function."""
    _registered.append(function)
    return function


hub_handler = handler


def registered() -> list[HandlerFunction]:
    """The functions decorated so far, oldest first."""
    return list(_registered)
