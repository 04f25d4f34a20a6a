"""The Runtime protocol every way of running an instance implements (process, docker, …)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from instance_agent.engines import EngineName
from instance_agent.launch import AgentArgs


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one instance agent."""

    instance_id: int
    generation: int
    model: str
    model_dir: Path
    gguf_file: str | None
    concurrency: int
    max_queue: int
    device: str = "cpu"
    # A hard memory limit where the runtime can enforce one (docker); None: no limit.
    mem_limit_bytes: int | None = None
    # A deployed handler API's environment (control_plane/api_envs.py): the agent runs under
    # this interpreter, never forked from the zygote; None: the agent's own.
    python: str | None = None
    # The memory admission reserved, for runtimes whose scheduler is told it (ray).
    reserve_bytes: int = 0
    # What generates text (`instance_agent.engines`); None: the agent picks.
    engine: EngineName | None = None
    # A deployed handler API's version folder: the docker runtime runs its instance in the
    # image built from the folder's Dockerfile, when it has one; None: a catalog model.
    project_dir: Path | None = None

    def agent_args(self, port: int) -> AgentArgs:
        """The agent's `serve` options for this instance, listening on loopback at `port`."""
        return AgentArgs(
            model_dir=self.model_dir,
            model_name=self.model,
            port=port,
            concurrency=self.concurrency,
            max_queue=self.max_queue,
            device=self.device,
            gguf_file=self.gguf_file,
            engine=self.engine,
        )


@dataclass(frozen=True)
class Launched:
    """A started (not necessarily healthy) instance: where it listens and how to find it again."""

    handle: str
    endpoint: str


@dataclass(frozen=True)
class Exited:
    """Why an instance is no longer running."""

    reason: str


@dataclass(frozen=True)
class Listed:
    """An instance the runtime knows about, identified by the labels it was started with."""

    instance_id: int
    generation: int
    handle: str
    endpoint: str | None


class Runtime(Protocol):
    name: str

    async def start(self, spec: InstanceSpec) -> Launched:
        """Launch the agent; return at once, before it is healthy."""
        ...

    async def exited(self, handle: str) -> Exited | None:
        """None while the instance runs; why it ended otherwise."""
        ...

    async def stop(self, handle: str, grace_s: float) -> None:
        """Terminate, wait up to `grace_s`, then kill; return once it is really gone."""
        ...

    async def list(self) -> list[Listed]:
        """Every instance this runtime is running on this host with mlcp's labels."""
        ...

    async def logs(self, handle: str, tail_lines: int) -> str:
        """The instance's last log lines."""
        ...


class ProjectImageFailed(Exception):
    """A handler project's Dockerfile did not build; the message ends with the build's output."""


@runtime_checkable
class BuildsProjectImages(Protocol):
    """A runtime that runs a handler API's instances in an image built from its Dockerfile."""

    async def project_image(self, project: Path) -> str:
        """Build (or find, by content) the project's image; its name. ProjectImageFailed."""
        ...


@runtime_checkable
class WarmsUp(Protocol):
    """A runtime that prepares in the background what makes its cold starts fast."""

    def warm_up(self) -> None:
        """Start preparing (a zygote, spare containers); return at once."""
        ...

    async def close(self) -> None:
        """Stop and remove what `warm_up` made; instances keep running."""
        ...
