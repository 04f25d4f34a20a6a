"""The agent's one model slot: what it serves, loading it in the background, and its readiness.

The model loads on a daemon thread so a SIGTERM never waits for a load. The task (generation or
embeddings) is read from the model's config.json unless given; torch is imported only by the
loader thread (`instance_agent.model` or `instance_agent.encoder`), so importing this stays light.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from starlette.applications import Starlette
from starlette.requests import Request

from instance_agent.batcher import Batcher
from instance_agent.embeddings import EmbeddingBatcher
from instance_agent.engines import (
    LLAMA_CPP,
    EngineName,
    EngineUnavailable,
    choose_engine,
    llama_cpp_installed,
)
from instance_agent.lease import Lease
from instance_agent.memory import MemoryMonitor
from instance_agent.protocol import (
    DEFAULT_MAX_NEW_TOKENS_CAP,
    LoadFailed,
    ModelLoading,
    Task,
    WrongTask,
)
from instance_agent.weights import check_model_dir, detect_task

if TYPE_CHECKING:
    from instance_agent.encoder import EncoderEngine
    from instance_agent.llama_engine import LlamaEngine
    from instance_agent.model import TransformersEngine
    from instance_agent.speech import SpeechEngine
    from instance_agent.user_code import GrpcHandler, HandlerPool

logger = logging.getLogger(__name__)

# One transcription may take this long (an hour of audio on a CPU is minutes with whisper-tiny).
TRANSCRIBE_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class AgentConfig:
    """What the agent serves and how."""

    model_dir: Path
    model_name: str
    gguf_file: str | None = None
    concurrency: int = 1
    max_queue: int = 0
    device: str = "cpu"
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
    # None: read from the model's config.json (`weights.detect_task`).
    task: Task | None = None
    # Testing aid: slows every decoding step so tests can observe requests in flight.
    step_delay_s: float = 0.0
    # A handler project's calls end with 504 after this long.
    handler_timeout_s: float = 60.0
    # A handler project with a proto: where the generated modules go (None: a temporary folder),
    # the gRPC port (0: any free one, reported by /health) and the largest message either way.
    proto_out: Path | None = None
    grpc_port: int = 0
    grpc_max_message_bytes: int = 16 * 1024 * 1024
    # The engine asked for; None: llama.cpp for a GGUF file where installed, else transformers.
    engine: EngineName | None = None


@dataclass(frozen=True)
class HandlerEngine:
    """What /health reports for a handler project: its code picks its own device."""

    device: str
    context_tokens: int = 0


class AgentState:
    """The model slot: loading, then ready (engine and batcher), or failed."""

    def __init__(self, config: AgentConfig, on_load_failed: Callable[[str], None]) -> None:
        self.config = config
        self.status: Literal["loading", "ready", "failed"] = "loading"
        self.task: Task = config.task or "text-generation"
        self.engine: (
            TransformersEngine | LlamaEngine | EncoderEngine | HandlerEngine | SpeechEngine | None
        ) = None
        # The generating engine's name once a text-generation model is loaded.
        self.engine_name: EngineName | None = None
        self.speech: SpeechEngine | None = None
        self.batcher: Batcher | EmbeddingBatcher | HandlerPool | None = None
        self.load_seconds = 0.0
        self.memory = MemoryMonitor(gpu=config.device.startswith("cuda"))
        self._on_load_failed = on_load_failed
        self._shutting_down = False
        # Set when a control plane launched this agent (MLCP_INSTANCE_LEASE_S); renewed by
        # its health checks, the agent exits once it lapses.
        self.lease: Lease | None = None
        # A handler project with a proto, once loaded; `grpc_port` once its server listens.
        self.grpc_handler: GrpcHandler | None = None
        self.grpc_port: int | None = None

    def load(self) -> None:
        """Load the model (blocking; runs on the loader thread) and start its batcher."""
        started = time.monotonic()
        config = self.config
        try:
            self.task = config.task or detect_task(config.model_dir, config.gguf_file)
            if self.task != "handler":
                # Refuse a bad directory before spending seconds importing torch.
                check_model_dir(config.model_dir, config.gguf_file)
            batcher: Batcher | EmbeddingBatcher | HandlerPool
            engine: TransformersEngine | LlamaEngine | EncoderEngine | HandlerEngine | SpeechEngine
            if self.task == "handler":
                from instance_agent import user_code

                loaded = user_code.load_handler(config.model_dir, proto_out=config.proto_out)
                engine = HandlerEngine(device=config.device)
                self.grpc_handler = loaded.grpc
                batcher = user_code.HandlerPool(
                    loaded.call,
                    concurrency=config.concurrency,
                    max_queue=config.max_queue,
                    timeout_s=config.handler_timeout_s,
                )
            elif self.task == "automatic-speech-recognition":
                from instance_agent import speech, user_code

                speech_engine = speech.load_speech(config.model_dir, device=config.device)
                engine = speech_engine
                self.speech = speech_engine
                # Transcriptions run on worker threads in turn, bounded like handler calls.
                batcher = user_code.HandlerPool(
                    None,
                    concurrency=config.concurrency,
                    max_queue=config.max_queue,
                    timeout_s=TRANSCRIBE_TIMEOUT_S,
                )
            elif self.task == "feature-extraction":
                from instance_agent import encoder

                encoder_engine = encoder.load_encoder(config.model_dir, device=config.device)
                engine = encoder_engine
                batcher = EmbeddingBatcher(
                    encoder_engine, concurrency=config.concurrency, max_queue=config.max_queue
                )
            else:
                generator = self._load_generator()
                engine = generator
                batcher = Batcher(
                    generator, concurrency=config.concurrency, max_queue=config.max_queue
                )
        except LoadFailed as exc:
            self._fail(exc.message)
            return
        except Exception as exc:
            logger.exception("loading the model failed")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        batcher.start()
        self.engine, self.batcher = engine, batcher
        self.load_seconds = time.monotonic() - started
        self.memory.sample()
        self.status = "ready"
        if self._shutting_down:
            batcher.stop(timeout_s=0)
        logger.info("model %s ready in %.1f s", config.model_name, self.load_seconds)

    def _load_generator(self) -> TransformersEngine | LlamaEngine:
        config = self.config
        try:
            name = choose_engine(
                config.engine,
                gguf=config.gguf_file is not None,
                llama_available=llama_cpp_installed(),
            )
        except EngineUnavailable as exc:
            raise LoadFailed(str(exc)) from exc
        generator: TransformersEngine | LlamaEngine
        if name == LLAMA_CPP:
            from instance_agent import llama_engine

            assert config.gguf_file is not None
            generator = llama_engine.load_llama_engine(
                config.model_dir,
                config.gguf_file,
                device=config.device,
                step_delay_s=config.step_delay_s,
                on_step=self.memory.sample,
            )
        else:
            from instance_agent import model

            generator = model.load_engine(
                config.model_dir,
                gguf_file=config.gguf_file,
                device=config.device,
                step_delay_s=config.step_delay_s,
                on_step=self.memory.sample,
            )
        self.engine_name = name
        return generator

    def _fail(self, reason: str) -> None:
        self.status = "failed"
        self._on_load_failed(" ".join(reason.split()))

    def begin_shutdown(self) -> None:
        """Abort generation at once; never blocks, so a signal watcher may call it."""
        self._shutting_down = True
        if self.batcher is not None:
            self.batcher.stop(timeout_s=0)

    def ready(self) -> tuple[TransformersEngine | LlamaEngine, Batcher]:
        """Return the generating engine and its batcher, or raise `ModelLoading` / `WrongTask`."""
        if self.status != "ready" or self.engine is None or self.batcher is None:
            raise ModelLoading()
        if not isinstance(self.batcher, Batcher):
            raise WrongTask(
                f"{self.config.model_name} does not generate text: it answers "
                + {"handler": "/handle", "automatic-speech-recognition": "/transcribe"}.get(
                    self.task, "/embed"
                )
            )
        return cast("TransformersEngine | LlamaEngine", self.engine), self.batcher

    def ready_encoder(self) -> EmbeddingBatcher:
        """Return the embedding batcher, or raise `ModelLoading` / `WrongTask`."""
        if self.status != "ready" or self.batcher is None:
            raise ModelLoading()
        if not isinstance(self.batcher, EmbeddingBatcher):
            raise WrongTask(
                f"{self.config.model_name} does not compute embeddings: it answers "
                + ("/handle" if self.task == "handler" else "/run, /stream and /chat")
            )
        return self.batcher

    def ready_speech(self) -> tuple[SpeechEngine, HandlerPool]:
        """Return the speech engine and its pool, or raise `ModelLoading` / `WrongTask`."""
        if self.status != "ready" or self.batcher is None:
            raise ModelLoading()
        if self.speech is None:
            raise WrongTask(f"{self.config.model_name} does not recognise speech")
        return self.speech, cast("HandlerPool", self.batcher)

    def ready_handler(self) -> HandlerPool:
        """Return the handler pool, or raise `ModelLoading` / `WrongTask`."""
        if self.status != "ready" or self.batcher is None:
            raise ModelLoading()
        if self.task != "handler":
            raise WrongTask(f"{self.config.model_name} is a model, not a handler project")
        return cast("HandlerPool", self.batcher)


def state_of(request: Request) -> AgentState:
    """The agent state of the app serving `request`."""
    return cast(AgentState, request.app.state.agent)


def agent_state(app: Starlette) -> AgentState:
    """The typed state of an app made by `create_app`."""
    return cast(AgentState, app.state.agent)
