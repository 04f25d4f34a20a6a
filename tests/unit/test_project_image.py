"""The docker runtime's image per handler-API version: its context, base images, tag, failure."""

from __future__ import annotations

from pathlib import Path

from control_plane.runtimes.docker import (
    NO_SHELL,
    base_images,
    build_failure,
    context_files,
    project_tag,
)


def test_the_context_is_the_project_less_weights_and_bytecode(tmp_path: Path) -> None:
    for rel in ("Dockerfile", "src/main.py", "model/weights.bin", "src/__pycache__/main.pyc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert [rel for rel, _ in context_files(tmp_path)] == ["Dockerfile", "src/main.py"]


def test_base_images_are_the_from_lines_less_stage_names() -> None:
    text = "FROM mlcp-agent:latest AS base\nfrom --platform=linux/amd64 other:1\nFROM base\n"
    assert base_images(text) == ["mlcp-agent:latest", "other:1"]
    assert base_images("# no FROM\nENV A=1\n") == []


def test_the_tag_follows_content_and_base_image() -> None:
    files = [("Dockerfile", b"FROM a\n"), ("x.txt", b"1")]
    tag = project_tag(files, ["sha256:aa"])
    assert tag.startswith("mlcp-api:") and tag == project_tag(list(files), ["sha256:aa"])
    assert project_tag([files[0], ("x.txt", b"2")], ["sha256:aa"]) != tag
    assert project_tag([files[0], ("y.txt", b"1")], ["sha256:aa"]) != tag
    assert project_tag(files, ["sha256:bb"]) != tag  # the agent image was rebuilt


def test_a_failed_build_says_its_last_lines_and_why_run_cannot_work() -> None:
    output = [f"Step {i}/40" for i in range(40)]
    error = 'OCI runtime create failed: exec: "/bin/sh": stat /bin/sh: no such file or directory'
    reason = build_failure("FROM a\nRUN pip install x\n", output, error)
    assert reason.startswith("building the project's Dockerfile failed:\n")
    assert "Step 39/40" in reason and "Step 10/40" not in reason and error in reason
    assert reason.endswith(f"({NO_SHELL})")
    assert NO_SHELL not in build_failure("FROM a\nCOPY x /x\n", [], "COPY failed: no x")
