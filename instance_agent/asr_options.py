"""Speech-recognition options: the Whisper options the Tiyaro seed sends, checked by name.

Standard library only: the control plane checks a submission's options with this module before
storing it, and the agent applies them (`instance_agent.speech`). Options transformers'
Whisper `generate` can honour are applied (`language`, `task`, `temperature`, `beam_size` as
`num_beams` capped at MAX_BEAMS, `length_penalty`, `initial_prompt` as prompt ids,
`suppress_tokens`); the others (openai-whisper's fallback and patience knobs) are accepted and
listed in the result's `ignored`, so a client sees what had no effect.
"""

from __future__ import annotations

import math
from typing import Any

from instance_agent.protocol import InvalidParams

# Beam search multiplies decoding work; the seed asks for 5, more buys little on Whisper.
MAX_BEAMS = 5
MAX_PROMPT_CHARS = 1000
MAX_SUPPRESS_TOKENS = 512
TASKS = ("transcribe", "translate")

APPLIED = frozenset(
    {"language", "task", "temperature", "beam_size", "length_penalty", "initial_prompt"}
    | {"suppress_tokens"}
)
IGNORED = frozenset(
    {
        "no_speech_threshold",
        "patience",
        "compression_ratio_threshold",
        "temperature_increment_on_fallback",
        "logprob_threshold",
        "condition_on_previous_text",
        "best_of",
    }
)
KNOWN = APPLIED | IGNORED


def _number(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParams(f"{name!r} must be a number")
    if not lo <= value <= hi:
        raise InvalidParams(f"{name!r} must be from {lo:g} to {hi:g}")
    return float(value)


def _integer(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidParams(f"{name!r} must be a whole number from {lo} to {hi}")
    return value


def _suppress(value: object) -> list[int] | None:
    """openai-whisper's "-1" (the model's default list), a comma-separated string or a list."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list):
        parts = value
    else:
        raise InvalidParams("'suppress_tokens' must be a string like \"-1\" or a list of ids")
    ids: list[int] = []
    for part in parts:
        try:
            token = (
                int(part)
                if isinstance(part, str)
                else _integer("suppress_tokens", part, -1, 1 << 20)
            )
        except ValueError as exc:
            raise InvalidParams("'suppress_tokens' must hold token ids") from exc
        if token < -1:
            raise InvalidParams("'suppress_tokens' must hold token ids")
        ids.append(token)
    if len(ids) > MAX_SUPPRESS_TOKENS:
        raise InvalidParams(f"'suppress_tokens' may hold at most {MAX_SUPPRESS_TOKENS} ids")
    if ids == [-1] or not ids:
        return None
    return [t for t in ids if t >= 0]


def validate_asr_options(options: object) -> dict[str, Any]:
    """Check the options by name and type; return them normalised (None values dropped)."""
    if not isinstance(options, dict):
        raise InvalidParams("'input' must be an object of Whisper options")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in KNOWN:
            raise InvalidParams(
                f"unknown Whisper option {str(name)[:64]!r}; known: {', '.join(sorted(KNOWN))}"
            )
        if value is None:
            continue
        if name == "language":
            if not isinstance(value, str) or not 2 <= len(value) <= 32:
                raise InvalidParams("'language' must be a language code or name, like \"en\"")
            out[name] = value.lower()
        elif name == "task":
            if value not in TASKS:
                raise InvalidParams('\'task\' must be "transcribe" or "translate"')
            out[name] = value
        elif name == "temperature":
            # openai-whisper takes one temperature or a fallback list; the first is used.
            first = value[0] if isinstance(value, list) and value else value
            out[name] = _number("temperature", first, 0.0, 2.0)
        elif name in ("beam_size", "best_of"):
            out[name] = _integer(name, value, 1, 64)
        elif name == "length_penalty":
            out[name] = _number(name, value, -10.0, 10.0)
        elif name == "initial_prompt":
            if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
                raise InvalidParams(f"'initial_prompt' must be text of at most {MAX_PROMPT_CHARS}")
            if value:
                out[name] = value
        elif name == "suppress_tokens":
            ids = _suppress(value)
            if ids is not None:
                out[name] = ids
        elif name == "condition_on_previous_text":
            if not isinstance(value, bool):
                raise InvalidParams("'condition_on_previous_text' must be true or false")
            out[name] = value
        else:
            out[name] = _number(name, value, -1e6, 1e6)
    return out


def ignored(options: dict[str, Any]) -> list[str]:
    """The given options this engine does not apply, sorted."""
    return sorted(name for name in options if name in IGNORED)
