"""The benchmarker: claims model jobs, resolves the model's files, and measures its memory.

Each failure kind has a stable `code` (stored on the job) and a `retryable` flag: a job that
failed for a reason which will not change by itself (the model is missing, its weights are a
pickle, it needs remote code, it does not fit) fails for good; others are retried with backoff.

Exception tree::

    BenchmarkError
    ├── ModelNotFound (not_found)
    ├── UnsafeWeights (unsafe_weights)
    ├── NeedsRemoteCode (remote_code)
    ├── OutOfMemory (out_of_memory)
    └── LoadFailed (load_error, retried)
"""

from __future__ import annotations

from typing import ClassVar


class BenchmarkError(Exception):
    """The model could not be benchmarked."""

    code: ClassVar[str] = "benchmark_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (type(self).__doc__ or "error").strip()
        super().__init__(self.message)


class ModelNotFound(BenchmarkError):
    """Model not found."""

    code = "not_found"


class UnsafeWeights(BenchmarkError):
    """Unsafe weights format (pickle); only safetensors are loaded."""

    code = "unsafe_weights"


class NeedsRemoteCode(BenchmarkError):
    """Model needs remote code (trust_remote_code), which mlcp never runs."""

    code = "remote_code"


class OutOfMemory(BenchmarkError):
    """Out of memory while loading or running the model."""

    code = "out_of_memory"


class HandlerFailed(BenchmarkError):
    """A handler project's code failed to load (import, Handler(config)): not worth a retry."""

    code = "handler_failed"


class LoadFailed(BenchmarkError):
    """Load error: the model could not be loaded or run."""

    code = "load_error"
    retryable = True
