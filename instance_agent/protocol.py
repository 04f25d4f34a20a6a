"""Wire types of the instance agent, shared with the control plane (standard library only).

The control plane imports this module to validate a request before proxying it, so it must never
import torch, transformers or anything else heavy.

Exception tree::

    AgentError
    ├── ProtocolError (ValueError)
    │   ├── InvalidJson (400 invalid_json)
    │   ├── PayloadTooLarge (413 payload_too_large)
    │   ├── UnsupportedMediaType (415 unsupported_media_type)
    │   ├── InvalidParams (422 invalid_params)
    │   ├── InvalidPrompt (422 invalid_prompt)
    │   └── WrongTask (422 wrong_task: generation asked of an embedding model, or the reverse)
    ├── NotFound (404 not_found)
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── ModelLoading (503 loading)
    ├── InstanceBusy (503 instance_busy, Retry-After: 1)
    ├── GenerationFailed (503 generation_failed)
    ├── LoadFailed (503 load_failed; the agent logs it and exits with code 3)
    └── InternalError (503 internal_error; never echoes the cause)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, NotRequired, TypedDict

from instance_agent.engines import EngineName

# Request body fields.
FIELD_PROMPT = "prompt"
FIELD_PARAMS = "params"

# Limits.
MAX_BODY_BYTES = 1024 * 1024
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_NEW_TOKENS_CAP = 1024
CHAT_ROLES = frozenset({"system", "user", "assistant"})

NDJSON_MEDIA_TYPE = "application/x-ndjson"


class AgentError(Exception):
    """The instance agent failed."""

    status_code: ClassVar[int] = 503
    code: ClassVar[str] = "internal_error"
    retry_after_s: ClassVar[int | None] = None

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (type(self).__doc__ or "error").strip()
        super().__init__(self.message)

    def body(self) -> ErrorBody:
        """Render the JSON error envelope."""
        return {"error": self.message, "code": self.code}


class ProtocolError(AgentError, ValueError):
    """The request does not follow the protocol."""

    status_code = 422
    code = "invalid_request"


class InvalidJson(ProtocolError):
    """The request body is not a JSON object."""

    status_code = 400
    code = "invalid_json"


class PayloadTooLarge(ProtocolError):
    """The request body is larger than 1 MiB."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ProtocolError):
    """The request body must be JSON (Content-Type: application/json)."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidParams(ProtocolError):
    """The generation parameters are invalid."""

    code = "invalid_params"


class InvalidPrompt(ProtocolError):
    """The prompt is invalid."""

    code = "invalid_prompt"


class WrongTask(ProtocolError):
    """This model does not serve that kind of request."""

    code = "wrong_task"


class NotFound(AgentError):
    """Not found."""

    status_code = 404
    code = "not_found"


class MethodNotAllowed(AgentError):
    """Method not allowed."""

    status_code = 405
    code = "method_not_allowed"


class ModelLoading(AgentError):
    """The model is still loading."""

    code = "loading"
    retry_after_s = 1


class InstanceBusy(AgentError):
    """The instance is serving as many requests as it can and its queue is full."""

    code = "instance_busy"
    retry_after_s = 1


class GenerationFailed(AgentError):
    """generation failed"""

    code = "generation_failed"


class LoadFailed(AgentError):
    """The model could not be loaded."""

    code = "load_failed"


class InternalError(AgentError):
    """The instance failed to handle the request."""

    code = "internal_error"


# Response bodies.


class ErrorBody(TypedDict):
    error: str
    code: str


FinishReason = Literal["stop", "length"]


class RunResponse(TypedDict):
    output: str
    tokens_generated: int
    time_seconds: float
    tokens_per_second: float
    # What OpenAI-style clients need: the prompt's length and why generation ended ("stop": an
    # end token or a stop string; "length": the token budget or the context ran out).
    prompt_tokens: int
    finish_reason: FinishReason


class StreamText(TypedDict):
    text: str


class StreamDone(TypedDict):
    done: Literal[True]
    tokens_generated: int
    time_seconds: float
    tokens_per_second: float
    prompt_tokens: int
    finish_reason: FinishReason


class StreamError(TypedDict):
    error: str
    code: str


class MemoryReading(TypedDict):
    rssBytes: int
    peakRssBytes: int
    gpuBytes: int | None
    peakGpuBytes: int | None


class BatchStats(TypedDict):
    batches: int
    maxBatchSize: int
    requests: int


# What the agent serves: generation (/run, /stream, /chat), embeddings (/embed), speech
# recognition (/transcribe) or a handler project's own code (/handle, `instance_agent.user_code`).
Task = Literal["text-generation", "feature-extraction", "handler", "automatic-speech-recognition"]
TASKS: tuple[Task, ...] = (
    "text-generation",
    "feature-extraction",
    "handler",
    "automatic-speech-recognition",
)

HEALTH_NOTE_READY = "Model is loaded in memory for fast inference"
HEALTH_NOTE_LOADING = "Model is loading; requests get 503 until it is ready"
HEALTH_NOTE_FAILED = "Model could not be loaded"


class HealthLoading(TypedDict):
    status: Literal["loading", "failed"]
    model: str
    model_loaded: Literal[False]
    note: str


class HealthReady(TypedDict):
    # The first four fields are the single-model server's contract (`GET /health` of the Flask
    # LLM server); the rest are what the control plane and the benchmarker read.
    status: Literal["healthy"]
    model: str
    model_loaded: Literal[True]
    note: str
    task: Task
    concurrency: int
    maxQueue: int
    inFlight: int
    queued: int
    loadSeconds: float
    device: str
    contextLength: int
    memory: MemoryReading
    stats: BatchStats
    # A handler project with a .proto: the port its gRPC server listens on.
    grpcPort: NotRequired[int]
    # A text-generation model: the engine generating for it (`instance_agent.engines`).
    engine: NotRequired[EngineName]


ChatMessage = dict[str, str]
Prompt = str | list[ChatMessage]


@dataclass(frozen=True)
class GenerationParams:
    """Validated generation parameters; `None` means the caller left the limit out."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_length: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    do_sample: bool = False
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    # A sampled batch starts from this seed, so a seeded request can be repeated.
    seed: int | None = None
    # Plain-string prompts go through a chat model's template as one user message (as Ollama's
    # generate does); raw=true sends the text as it is, for plain continuation.
    raw: bool = False

    @property
    def sampling_key(self) -> tuple[bool, float, float, int, float, int | None]:
        """The settings a batch must share; greedy requests ignore the sampling knobs."""
        if not self.do_sample:
            return (False, 1.0, 1.0, 0, self.repetition_penalty, None)
        return (
            True,
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.seed,
        )

    def new_tokens_for(self, prompt_tokens: int, *, context_tokens: int, cap: int) -> int:
        """Return how many tokens to generate after a prompt of `prompt_tokens` tokens.

        `max_length` counts the prompt, as in Hugging Face's `generate`; the smaller of the two
        limits wins, and neither may run past the model's context.
        """
        if prompt_tokens >= context_tokens:
            raise InvalidPrompt(
                f"the prompt is {prompt_tokens} tokens; this model's context is "
                f"{context_tokens} tokens, so a prompt may be at most "
                f"{context_tokens - 1} tokens"
            )
        limits = [cap, context_tokens - prompt_tokens]
        if self.max_new_tokens is not None:
            limits.append(self.max_new_tokens)
        if self.max_length is not None:
            if self.max_length <= prompt_tokens:
                raise InvalidParams(
                    f"max_length {self.max_length} leaves no room to generate after the "
                    f"prompt's {prompt_tokens} tokens"
                )
            limits.append(self.max_length - prompt_tokens)
        if self.max_new_tokens is None and self.max_length is None:
            limits.append(DEFAULT_MAX_NEW_TOKENS)
        return min(limits)


@dataclass(frozen=True)
class RunRequest:
    """A validated /run or /stream body."""

    prompt: Prompt
    params: GenerationParams


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _int(name: str, value: object, low: int, high: int) -> int:
    # JSON (and JSON Schema's "integer") does not tell 916 from 916.0: a whole number is one.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    # bool is a subclass of int, but `"max_new_tokens": true` is a client bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParams(f"{name} must be an integer, not {_type_name(value)}")
    if not low <= value <= high:
        raise InvalidParams(f"{name} must be between {low} and {high}, not {value}")
    return value


def _float(name: str, value: object, low: float, high: float, *, low_open: bool) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InvalidParams(f"{name} must be a number, not {_type_name(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidParams(f"{name} must be a finite number")
    too_low = number <= low if low_open else number < low
    if too_low or number > high:
        bounds = f"above {low:g}" if low_open else f"at least {low:g}"
        raise InvalidParams(f"{name} must be {bounds} and at most {high:g}, not {number:g}")
    return number


def _stop(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidParams(f"stop must be a string or a list of strings, not {_type_name(value)}")
    if len(items) > MAX_STOP_STRINGS:
        raise InvalidParams(f"stop may hold at most {MAX_STOP_STRINGS} strings, not {len(items)}")
    for item in items:
        if not isinstance(item, str):
            raise InvalidParams(f"each stop string must be a string, not {_type_name(item)}")
        if not 1 <= len(item) <= MAX_STOP_CHARS:
            raise InvalidParams(f"each stop string must be 1 to {MAX_STOP_CHARS} characters long")
    return tuple(items)


_KNOWN_PARAMS = (
    "max_new_tokens",
    "max_tokens",
    "max_length",
    "min_length",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "repetition_penalty",
    "stop",
    "seed",
    "raw",
)
MAX_SEED = 2**63 - 1

# Generous enough for any context a model served here has; the real bound is checked once the
# prompt is tokenized (`GenerationParams.new_tokens_for`).
_MAX_CONTEXT_TOKENS = 1 << 20


def validate_params(
    params: object, *, max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
) -> GenerationParams:
    """Check generation parameters against the allow-list and return them typed.

    Raises `InvalidParams` naming the first offending key.
    """
    if params is None:
        return GenerationParams()
    if not isinstance(params, dict):
        raise InvalidParams(f"params must be an object, not {_type_name(params)}")
    for key in params:
        if key not in _KNOWN_PARAMS:
            raise InvalidParams(f"unknown parameter {key!r}; allowed: {', '.join(_KNOWN_PARAMS)}")
    cap = max_new_tokens_cap
    defaults = GenerationParams()
    do_sample = params.get("do_sample", defaults.do_sample)
    if not isinstance(do_sample, bool):
        raise InvalidParams(f"do_sample must be a boolean, not {_type_name(do_sample)}")
    # `max_tokens` is what OpenAI and the single-model /chat call it.
    if "max_new_tokens" in params and "max_tokens" in params:
        raise InvalidParams("give max_new_tokens or its synonym max_tokens, not both")
    budget_name = "max_tokens" if "max_tokens" in params else "max_new_tokens"
    temperature = _float(
        "temperature", params.get("temperature", defaults.temperature), 0, 5, low_open=False
    )
    if temperature == 0:
        # Temperature 0 means greedy decoding (OpenAI, Ollama, vLLM), whatever do_sample says.
        do_sample, temperature = False, defaults.temperature
    return GenerationParams(
        max_new_tokens=(
            _int(budget_name, params[budget_name], 1, cap) if budget_name in params else None
        ),
        max_length=(
            _int("max_length", params["max_length"], 1, cap + _MAX_CONTEXT_TOKENS)
            if "max_length" in params
            else None
        ),
        min_length=_int("min_length", params.get("min_length", defaults.min_length), 0, cap),
        temperature=temperature,
        top_p=_float("top_p", params.get("top_p", defaults.top_p), 0, 1, low_open=True),
        top_k=_int("top_k", params.get("top_k", defaults.top_k), 0, 1000),
        do_sample=do_sample,
        repetition_penalty=_float(
            "repetition_penalty",
            params.get("repetition_penalty", defaults.repetition_penalty),
            0,
            10,
            low_open=True,
        ),
        stop=_stop(params["stop"]) if "stop" in params else (),
        seed=_int("seed", params["seed"], 0, MAX_SEED) if "seed" in params else None,
        raw=_bool("raw", params.get("raw", defaults.raw)),
    )


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidParams(f"{name} must be a boolean, not {_type_name(value)}")
    return value


def validate_prompt(prompt: object) -> Prompt:
    """Check a prompt: a non-empty string, or a list of chat messages with role and content.

    Raises `InvalidPrompt`.
    """
    if isinstance(prompt, str):
        if not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
            raise InvalidPrompt(f"prompt must be 1 to {MAX_PROMPT_CHARS} characters long")
        return prompt
    if not isinstance(prompt, list):
        raise InvalidPrompt(
            f"prompt must be a string or a list of messages, not {_type_name(prompt)}"
        )
    if not 1 <= len(prompt) <= MAX_MESSAGES:
        raise InvalidPrompt(f"prompt must hold 1 to {MAX_MESSAGES} messages, not {len(prompt)}")
    messages: list[ChatMessage] = []
    total_chars = 0
    for index, message in enumerate(prompt):
        where = f"prompt[{index}]"
        if not isinstance(message, dict):
            raise InvalidPrompt(f"{where} must be an object, not {_type_name(message)}")
        for key in message:
            if key not in ("role", "content"):
                raise InvalidPrompt(f"{where} has unknown field {key!r}; allowed: role, content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InvalidPrompt(f"{where}.role must be one of system, user, assistant")
        if not isinstance(content, str):
            raise InvalidPrompt(f"{where}.content must be a string, not {_type_name(content)}")
        total_chars += len(content)
        messages.append({"role": role, "content": content})
    if total_chars > MAX_PROMPT_CHARS:
        raise InvalidPrompt(f"the messages may hold at most {MAX_PROMPT_CHARS} characters in all")
    return messages


def validate_run_body(
    body: object, *, max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
) -> RunRequest:
    """Check a parsed /run or /stream body: {"prompt": ..., "params": {...}}."""
    if not isinstance(body, dict):
        raise InvalidJson(f"the request body must be a JSON object, not {_type_name(body)}")
    for key in body:
        if key not in (FIELD_PROMPT, FIELD_PARAMS):
            raise InvalidParams(f"unknown field {key!r} in the body; allowed: prompt, params")
    if FIELD_PROMPT not in body:
        raise InvalidPrompt("the body needs a prompt")
    prompt = validate_prompt(body[FIELD_PROMPT])
    params = validate_params(body.get(FIELD_PARAMS), max_new_tokens_cap=max_new_tokens_cap)
    return RunRequest(prompt=prompt, params=params)
