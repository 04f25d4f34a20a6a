"""The last model source: the Hugging Face Hub, safetensors only, at a pinned revision.

A model is downloaded into the model store (`<data_dir>/models/hub/<org>/<name>/<revision>`)
only after its config has been checked for remote code and its file list for safetensors, so
nothing that mlcp would refuse to load is ever fetched in full. Offline (HF_HUB_OFFLINE, as the
Hub client itself reads it) this fails at once with a clear reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarker import ModelNotFound, UnsafeWeights
from benchmarker.model_ids import model_id_problem
from benchmarker.safety import PICKLE_SUFFIXES, check_model_folder, check_remote_code

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 15.0
# Everything a transformers model folder needs besides weights; never *.py, *.bin, *.pt.
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_REVISION = re.compile(r"[0-9a-f]{40}")
_TRUE = frozenset({"1", "true", "yes", "on"})
LOOKUP_TIMEOUT_S = 2.0
LOOKUP_MEMORY_S = 60.0
# host -> (when, whether its name resolved): a fact about this box's network, not app state.
_LOOKUPS: dict[str, tuple[float, bool]] = {}


def hub_offline() -> bool:
    """Whether the Hub may not be asked (HF_HUB_OFFLINE, read now rather than at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def not_found_offline(model: str, why: str = "offline (HF_HUB_OFFLINE)") -> ModelNotFound:
    return ModelNotFound(
        f"Model {model} was not found: it is not in MLCP_MODEL_DIRS, the Hugging Face cache or "
        f"the packaged models, and the Hugging Face Hub is {why}"
    )


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return urlsplit(endpoint).hostname or "huggingface.co"


async def hub_unavailable() -> str | None:
    """Why the Hub cannot be asked now ("offline …", "unreachable"), or None when it may be.

    Without HF_HUB_OFFLINE, a box with no network would only find out in the worker, behind
    whatever it is measuring; a name lookup (2 s at most, remembered for a minute) lets
    /model/job fail an unknown model at once instead.
    """
    if hub_offline():
        return "offline (HF_HUB_OFFLINE)"
    host = _hub_host()
    now = time.monotonic()
    known = _LOOKUPS.get(host)
    if known is not None and now - known[0] < LOOKUP_MEMORY_S:
        return None if known[1] else "unreachable"
    try:
        await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, 443), LOOKUP_TIMEOUT_S)
        resolved = True
    except (OSError, TimeoutError):
        resolved = False
    _LOOKUPS[host] = (now, resolved)
    return None if resolved else "unreachable"


async def fetch(store: Path, model: str) -> Path:
    """Download `model` into the store and return its folder; raise a BenchmarkError if not."""
    if model_id_problem(model) is not None:
        raise ModelNotFound(f"Model {model!r} is not a valid model id")
    if hub_offline():
        raise not_found_offline(model)
    return await asyncio.to_thread(_download, store, model)


def _download(store: Path, model: str) -> Path:
    try:
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as exc:
        raise ModelNotFound(
            f"Model {model} is not available locally and the Hub client is not installed"
        ) from exc
    try:
        info = HfApi().model_info(model, timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFound(f"Model {model} was not found on the Hugging Face Hub") from exc
    except Exception as exc:
        logger.warning("the Hub could not be reached for %s: %s", model, type(exc).__name__)
        raise not_found_offline(model, "unreachable") from exc
    files = [s.rfilename for s in info.siblings or []]
    if not any(f.endswith(".safetensors") for f in files):
        if any(Path(f).suffix in PICKLE_SUFFIXES for f in files):
            raise UnsafeWeights()
        raise ModelNotFound(f"Model {model} has no safetensors weights on the Hub")
    if not info.sha or not _REVISION.fullmatch(info.sha):
        raise ModelNotFound(f"Model {model} has no revision to pin on the Hub")
    org, name = model.split("/")
    dest = store / "hub" / org / name / info.sha
    try:
        # The config first: a model that needs remote code is refused before its weights come.
        for pointer in ("config.json", "tokenizer_config.json"):
            if pointer in files:
                hf_hub_download(
                    model, pointer, revision=info.sha, local_dir=dest, etag_timeout=HUB_TIMEOUT_S
                )
    except Exception as exc:
        logger.warning("downloading %s failed: %s", model, type(exc).__name__)
        raise ModelNotFound(f"Model {model} could not be downloaded from the Hub") from exc
    check_remote_code(dest, model)
    try:
        snapshot_download(
            model,
            revision=info.sha,
            local_dir=dest,
            allow_patterns=_ALLOW,
            etag_timeout=HUB_TIMEOUT_S,
        )
    except Exception as exc:
        logger.warning("downloading %s failed: %s", model, type(exc).__name__)
        raise ModelNotFound(f"Model {model} could not be downloaded from the Hub") from exc
    check_model_folder(dest, model)
    return dest
