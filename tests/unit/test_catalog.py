"""Catalog discovery over folders built in tmp_path: HF layout, .gguf files, the HF cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarker import catalog
from benchmarker.catalog import (
    DEMO_MODEL,
    discover,
    packaged_models,
    scan_hf_cache,
    scan_model_dir,
    task_of,
)


def hf_model(folder: Path, arch: str = "LlamaForCausalLM", weights: int = 100) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def names(found: list[catalog.FoundModel]) -> list[str]:
    return [m.name for m in found]


# -- task_of ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "task"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, "text-generation"),
        ({"architectures": ["GPT2LMHeadModel"]}, "text-generation"),
        ({"architectures": ["T5ForSeq2SeqLM"]}, "text2text-generation"),
        ({"architectures": ["BertForSequenceClassification"]}, "text-classification"),
        ({"architectures": ["BertForTokenClassification"]}, "token-classification"),
        ({"architectures": ["BertForQuestionAnswering"]}, "question-answering"),
        ({"architectures": ["BertForMaskedLM"]}, "fill-mask"),
        ({"architectures": ["BertModel"]}, "feature-extraction"),
        ({"architectures": [3, None, "MistralForCausalLM"]}, "text-generation"),
        ({"architectures": "LlamaForCausalLM"}, "feature-extraction"),
        ({"architectures": []}, "feature-extraction"),
        ({}, "feature-extraction"),
    ],
)
def test_task_of(config: dict[str, object], task: str) -> None:
    assert task_of(config) == task


# -- MLCP_MODEL_DIRS folders --------------------------------------------------------------------


def test_scan_finds_hf_folders_and_gguf_files(tmp_path: Path) -> None:
    root = tmp_path / "models"
    hf_model(root / "acme" / "tiny-gpt", "GPT2LMHeadModel", weights=123)
    hf_model(root / "acme" / "classifier", "BertForSequenceClassification")
    (root / "acme" / "quant.Q4_0.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (root / "loose.gguf").write_bytes(b"GGUF" * 4)
    found = {m.name: m for m in scan_model_dir(root)}
    assert set(found) == {
        "acme/tiny-gpt",
        "acme/classifier",
        "acme/quant.Q4_0",
        "local/loose",
    }
    tiny = found["acme/tiny-gpt"]
    assert (tiny.task, tiny.source_kind, tiny.param_bytes) == ("text-generation", "dir", 123)
    assert tiny.source_path == str(root / "acme" / "tiny-gpt")
    assert tiny.gguf_file is None
    assert found["acme/classifier"].task == "text-classification"
    quant = found["acme/quant.Q4_0"]
    assert (quant.source_kind, quant.gguf_file, quant.param_bytes) == (
        "gguf",
        "quant.Q4_0.gguf",
        64,
    )
    assert quant.source_path == str(root / "acme")
    assert found["local/loose"].gguf_file == "loose.gguf"


def test_scan_skips_what_is_not_a_model(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "acme" / "no-config").mkdir(parents=True)
    (root / "acme" / "no-config" / "model.safetensors").write_bytes(b"\0")
    bad_json = root / "acme" / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    list_json = root / "acme" / "list-json"
    list_json.mkdir()
    (list_json / "config.json").write_text("[1, 2]")
    dir_config = root / "acme" / "dir-config"
    (dir_config / "config.json").mkdir(parents=True)
    (root / "acme" / "notes.txt").write_text("hello")
    (root / "acme" / "folder.gguf").mkdir()  # a folder named like a gguf file
    (root / "README.md").write_text("a file at the top level")
    assert scan_model_dir(root) == []


def test_scan_of_missing_folder_is_empty(tmp_path: Path) -> None:
    assert scan_model_dir(tmp_path / "nope") == []
    (tmp_path / "file").write_text("x")
    assert scan_model_dir(tmp_path / "file") == []


def test_models_without_weights_have_unknown_size(tmp_path: Path) -> None:
    folder = tmp_path / "m" / "acme" / "x"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    [found] = scan_model_dir(tmp_path / "m")
    assert found.param_bytes is None
    assert found.task == "feature-extraction"


def test_sharded_weights_are_summed(tmp_path: Path) -> None:
    folder = hf_model(tmp_path / "m" / "acme" / "x", weights=10)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 5)
    [found] = scan_model_dir(tmp_path / "m")
    assert found.param_bytes == 15


@pytest.mark.parametrize(
    ("org", "name"),
    [
        ("org--x", "y"),
        ("acme", "x--y"),
        ("-acme", "x"),
        ("acme", "x-"),
        (".hidden", "x"),
        ("acme", ".hidden"),
        ("acme", "has space"),
        ("acme", "ünï"),
        ("acme", "x" * 97),
    ],
)
def test_invalid_names_are_skipped(tmp_path: Path, org: str, name: str) -> None:
    root = tmp_path / "models"
    hf_model(root / org / name)
    (root / org / f"{name}.gguf").write_bytes(b"GGUF")
    hf_model(root / "acme" / "good")
    assert names(scan_model_dir(root)) == ["acme/good"]


def test_gguf_with_invalid_stem_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "bad name.gguf").write_bytes(b"GGUF")
    (root / "x-.gguf").write_bytes(b"GGUF")
    (root / "..gguf").write_bytes(b"GGUF")
    assert scan_model_dir(root) == []


def outside_model(tmp_path: Path) -> Path:
    """A real model folder that lies outside every scanned root."""
    return hf_model(tmp_path / "outside" / "secret-org" / "secret-model")


def test_symlinked_model_folder_does_not_escape(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "acme").mkdir(parents=True)
    os.symlink(outside_model(tmp_path), root / "acme" / "linked")
    assert scan_model_dir(root) == []


def test_symlinked_org_folder_does_not_escape(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(outside_model(tmp_path).parent, root / "linked-org")
    assert scan_model_dir(root) == []


def test_symlinked_config_and_gguf_do_not_escape(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = root / "acme" / "x"
    folder.mkdir(parents=True)
    outside = outside_model(tmp_path)
    os.symlink(outside / "config.json", folder / "config.json")
    secret_gguf = tmp_path / "outside" / "secret.gguf"
    secret_gguf.write_bytes(b"GGUF")
    os.symlink(secret_gguf, root / "acme" / "stolen.gguf")
    os.symlink(secret_gguf, root / "stolen.gguf")
    assert scan_model_dir(root) == []


def test_symlinks_inside_the_root_are_followed(tmp_path: Path) -> None:
    root = tmp_path / "models"
    real = hf_model(root / "acme" / "real")
    os.symlink(real, root / "acme" / "alias")
    assert names(scan_model_dir(root)) == ["acme/alias", "acme/real"]


def test_dotdot_in_folder_names_never_escapes(tmp_path: Path) -> None:
    # Model dirs given with '..' are resolved first; a model name can never contain '..'.
    root = tmp_path / "models"
    hf_model(root / "acme" / "x")
    (tmp_path / "sub").mkdir()
    found = scan_model_dir(tmp_path / "sub" / ".." / "models")
    assert names(found) == ["acme/x"]
    for model in found:
        assert ".." not in model.name


def test_broken_symlinks_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "acme").mkdir(parents=True)
    os.symlink(tmp_path / "missing", root / "acme" / "gone")
    os.symlink(tmp_path / "missing.gguf", root / "acme" / "gone.gguf")
    os.symlink(tmp_path / "missing-org", root / "gone-org")
    assert scan_model_dir(root) == []


# -- the Hugging Face cache ---------------------------------------------------------------------


def cached_repo(
    cache: Path,
    org: str,
    name: str,
    revision: str = "abc123",
    *,
    ref: bool = True,
    arch: str = "LlamaForCausalLM",
) -> Path:
    """The hub cache layout: files in snapshots/<rev>/ are symlinks into ../../blobs/."""
    repo = cache / f"models--{org}--{name}"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "cfg").write_text(json.dumps({"architectures": [arch]}))
    (blobs / "weights").write_bytes(b"\0" * 42)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    os.symlink(Path("..") / ".." / "blobs" / "cfg", snapshot / "config.json")
    os.symlink(Path("..") / ".." / "blobs" / "weights", snapshot / "model.safetensors")
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision + "\n")
    return snapshot


def test_hf_cache_layout(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cached_repo(cache, "openai-community", "gpt2", arch="GPT2LMHeadModel")
    cached_repo(cache, "acme", "no-ref", ref=False)
    found = {m.name: m for m in scan_hf_cache(cache)}
    assert set(found) == {"openai-community/gpt2", "acme/no-ref"}
    gpt2 = found["openai-community/gpt2"]
    assert (gpt2.task, gpt2.source_kind, gpt2.param_bytes) == ("text-generation", "hf_cache", 42)
    assert gpt2.source_path == str(snapshot)


def test_hf_cache_prefers_the_main_ref(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    cached_repo(cache, "acme", "m", revision="bbb")
    older = cache / "models--acme--m" / "snapshots" / "zzz"
    older.mkdir()
    [found] = scan_hf_cache(cache)
    assert found.source_path.endswith("/snapshots/bbb")


def test_hf_cache_skips_bad_entries(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    (cache / "models--gpt2").mkdir()  # legacy id without an org
    (cache / "models--a--b--c").mkdir()
    (cache / "datasets--acme--d").mkdir()
    (cache / "models--acme--empty").mkdir()
    (cache / "models--acme--nosnap" / "snapshots").mkdir(parents=True)
    cached_repo(cache, ".hidden", "x")
    cached_repo(cache, "acme", "x-")
    assert scan_hf_cache(cache) == []
    assert scan_hf_cache(tmp_path / "missing") == []


@pytest.mark.parametrize("revision", ["..", ".", "../../..", "a/../..", ""])
def test_hf_cache_ref_cannot_point_outside_snapshots(tmp_path: Path, revision: str) -> None:
    cache = tmp_path / "hub"
    snapshot = cached_repo(cache, "acme", "m")
    repo = cache / "models--acme--m"
    (repo / "refs" / "main").write_text(revision)
    # A config.json placed where a '..' ref would lead must not be read.
    (repo / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    found = scan_hf_cache(cache)
    assert [m.source_path for m in found] == [str(snapshot)]


def test_hf_cache_snapshot_symlink_does_not_escape(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--m"
    (repo / "snapshots").mkdir(parents=True)
    os.symlink(outside_model(tmp_path), repo / "snapshots" / "abc")
    assert scan_hf_cache(cache) == []


def test_hf_cache_blob_symlink_does_not_escape(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cached_repo(cache, "acme", "m")
    (snapshot / "config.json").unlink()
    os.symlink(outside_model(tmp_path) / "config.json", snapshot / "config.json")
    assert scan_hf_cache(cache) == []


# -- the packaged demo model and the merge ------------------------------------------------------


def test_packaged_demo_model() -> None:
    demo, embedding = packaged_models()
    assert demo.name == DEMO_MODEL
    assert demo.source_kind == "package"
    assert demo.gguf_file == catalog.DEMO_GGUF
    assert demo.param_bytes is not None and demo.param_bytes > 1_000_000
    assert (Path(demo.source_path) / demo.gguf_file).is_file()
    assert embedding.name == catalog.EMBEDDING_MODEL
    assert embedding.task == "feature-extraction"
    assert embedding.source_kind == "package" and embedding.gguf_file is None
    assert (Path(embedding.source_path) / "model.safetensors").is_file()


def test_discover_merges_sources_first_wins(tmp_path: Path) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    hf_model(first / "acme" / "shared", weights=1)
    hf_model(second / "acme" / "shared", weights=2)
    hf_model(second / "acme" / "only-second")
    # A local copy of the demo model shadows the packaged one.
    hf_model(first / "HuggingFaceTB" / "SmolLM2-135M-Instruct", weights=3)
    cache = tmp_path / "hub"
    cached_repo(cache, "acme", "shared")
    cached_repo(cache, "acme", "cached-only")
    found = {m.name: m for m in discover([first, second], cache, packaged=True)}
    assert set(found) == {
        "acme/shared",
        "acme/only-second",
        "acme/cached-only",
        DEMO_MODEL,
        catalog.EMBEDDING_MODEL,
    }
    assert found["acme/shared"].param_bytes == 1
    assert found["acme/cached-only"].source_kind == "hf_cache"
    assert found[DEMO_MODEL].source_kind == "dir"


def test_discover_without_packaged(tmp_path: Path) -> None:
    assert discover([], tmp_path / "hub", packaged=False) == []
    assert names(discover([], tmp_path / "hub", packaged=True)) == [
        DEMO_MODEL,
        catalog.EMBEDDING_MODEL,
    ]
