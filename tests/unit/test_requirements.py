"""A handler project's requirements.txt: what is refused, what needs no environment, its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from instance_agent.environment import (
    RequirementsRefused,
    env_dir,
    parse_requirements,
    python_for_version,
)

AGENT = {"torch": "2.13.0+cpu"}


@pytest.mark.parametrize(
    "text",
    [
        "--index-url https://download.pytorch.org/whl/cu121\n",
        "--index-url=https://example.invalid/simple\n",
        "-i https://example.invalid/simple\n",
        "numpy\n--extra-index-url https://example.invalid\n",
        "--trusted-host example.invalid\n",
        "torch==2.1.0\n",
        "torch==2.13.0+cu121\n",
        "torch>=2\n",
        "torch<3\n",
        "Torch==1.0\n",
        "torch @ https://example.invalid/torch-2.13.0-cp311-linux_x86_64.whl\n",
        "-r other.txt\n",
        "--constraint pins.txt\n",
        "x" * 70_000,
    ],
)
def test_refused(text: str) -> None:
    with pytest.raises(RequirementsRefused):
        parse_requirements(text, AGENT)


@pytest.mark.parametrize(
    "text", ["torch\n", "torch==2.13.0\n", "torch == 2.13.0+cpu  # the agent's\n", "numpy\n"]
)
def test_allowed(text: str) -> None:
    parse_requirements(text, AGENT)


def test_comments_and_blanks_are_not_requirements() -> None:
    reqs = parse_requirements("# a comment\n\n  \nnumpy  # inline\n", AGENT)
    assert reqs.lines == ("numpy",)


def test_an_empty_file_needs_no_environment() -> None:
    assert parse_requirements("", AGENT).sha256 is None
    assert parse_requirements("# nothing\n", AGENT).sha256 is None


def test_what_the_agent_has_needs_no_environment() -> None:
    # This interpreter has pyyaml and pytest; a local path is never "already there".
    assert parse_requirements("pyyaml\npytest\n", {}).sha256 is None
    assert parse_requirements("pyyaml\n./vendored\n", {}).sha256 is not None
    assert parse_requirements("pyyaml==0.0.1\n", {}).sha256 is not None


def test_the_key_is_the_requirement_lines() -> None:
    one = parse_requirements("./a\n# comment\n./b\n", AGENT).sha256
    assert one == parse_requirements("./a\n./b\n", AGENT).sha256
    assert one != parse_requirements("./b\n./a\n", AGENT).sha256


def test_a_version_finds_its_environment_from_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "apis"
    version = root / "versions" / "alice" / "echo" / "3"
    version.mkdir(parents=True)
    assert python_for_version(version) is None
    (version / "requirements.txt").write_text("./vendored\n")
    digest = parse_requirements("./vendored\n").sha256
    assert digest is not None
    assert python_for_version(version) == str(env_dir(root, digest) / "bin" / "python")
