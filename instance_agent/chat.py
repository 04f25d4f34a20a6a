"""The single-model HTTP server's `POST /chat` contract (the Flask LLM server), as wire types.

`{"prompt": "...", "max_tokens": 128, "temperature": 0.0}` answers
`{"prompt", "response", "tokens_generated", "time_seconds", "tokens_per_second"}`; errors are
`{"error": "..."}` alone. `prompt` is required; `max_tokens` is 1 to 2048 (default 128) and
`temperature` 0.0 to 2.0 (default 0.0, greedy). Standard library only: the control plane's own
`/chat` validates with the same function, adding its optional `model` field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

from instance_agent.protocol import (
    MAX_PROMPT_CHARS,
    AgentError,
    GenerationParams,
    InvalidJson,
    ProtocolError,
)

CHAT_DEFAULT_MAX_TOKENS = 128
CHAT_MAX_TOKENS = 2048
CHAT_MAX_TEMPERATURE = 2.0
_FIELDS = ("prompt", "max_tokens", "temperature")


class ChatResponse(TypedDict):
    prompt: str
    response: str
    tokens_generated: int
    time_seconds: float
    tokens_per_second: float


class ChatErrorBody(TypedDict):
    error: str


class InvalidChat(ProtocolError):
    """The chat request is invalid."""

    # Flask's own answer to a bad request body; the single-model server's clients expect it.
    status_code = 400
    code = "invalid_request"


@dataclass(frozen=True)
class ChatRequest:
    """A validated /chat body."""

    prompt: str
    max_tokens: int = CHAT_DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    model: str | None = None

    def params(self) -> GenerationParams:
        """The generation parameters this request means (temperature 0 is greedy)."""
        if self.temperature == 0:
            return GenerationParams(max_new_tokens=self.max_tokens)
        return GenerationParams(
            max_new_tokens=self.max_tokens, do_sample=True, temperature=self.temperature
        )


def validate_chat_body(body: object, *, allow_model: bool = False) -> ChatRequest:
    """Check a parsed /chat body; raise `InvalidChat` (400) naming the first problem."""
    if not isinstance(body, dict):
        raise InvalidChat("the request body must be a JSON object with a prompt")
    allowed = (*_FIELDS, "model") if allow_model else _FIELDS
    for key in body:
        if key not in allowed:
            raise InvalidChat(f"unknown field {key!r}; allowed: {', '.join(allowed)}")
    prompt = body.get("prompt")
    if "prompt" not in body:
        raise InvalidChat("prompt is required")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidChat("prompt must be a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidChat(f"prompt must be at most {MAX_PROMPT_CHARS} characters long")
    max_tokens = body.get("max_tokens", CHAT_DEFAULT_MAX_TOKENS)
    # JSON has one number type: 64.0 is the integer 64.
    if isinstance(max_tokens, float) and math.isfinite(max_tokens) and max_tokens.is_integer():
        max_tokens = int(max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidChat("max_tokens must be an integer")
    if not 1 <= max_tokens <= CHAT_MAX_TOKENS:
        raise InvalidChat(f"max_tokens must be between 1 and {CHAT_MAX_TOKENS}")
    temperature = body.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise InvalidChat("temperature must be a number")
    if not math.isfinite(temperature) or not 0 <= temperature <= CHAT_MAX_TEMPERATURE:
        raise InvalidChat(f"temperature must be between 0.0 and {CHAT_MAX_TEMPERATURE}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidChat("model must be a string")
    return ChatRequest(prompt, max_tokens, float(temperature), model)


def chat_error(error: AgentError) -> tuple[int, ChatErrorBody]:
    """The status and `{"error": ...}` body the single-model server answers for an error."""
    status = error.status_code
    if (isinstance(error, ProtocolError) and status == 422) or isinstance(error, InvalidJson):
        status = 400
    return status, {"error": error.message}


def render_chat(
    prompt: str, response: str, tokens_generated: int, time_seconds: float
) -> ChatResponse:
    """The /chat answer, with the speed figures the single-model server prints."""
    return {
        "prompt": prompt,
        "response": response,
        "tokens_generated": tokens_generated,
        "time_seconds": round(time_seconds, 3),
        "tokens_per_second": round(tokens_generated / time_seconds, 2) if time_seconds else 0.0,
    }
