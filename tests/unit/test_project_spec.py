"""Handler project specs: both seeds' forms parse; every bad spec is refused with its reason."""

from __future__ import annotations

import pytest

from instance_agent.project import RESERVED_NAMES, InvalidSpec, parse_spec


def test_the_mlcp_form_parses_with_defaults() -> None:
    spec = parse_spec("name: sentiment-analyser\nhandler: {type: python, path: src/main.py}\n")
    assert spec.name == "sentiment-analyser"
    assert spec.handler_path == "src/main.py"
    assert (spec.concurrency, spec.expiration_s, spec.public, spec.example) == (1, 600, False, None)


def test_cortex_list_form_parses_as_is() -> None:
    spec = parse_spec(
        "- name: text-generator\n  kind: RealtimeAPI\n  handler:\n    type: python\n"
        "    path: handler.py\n  compute:\n    gpu: 1\n"
    )
    assert (spec.name, spec.handler_path, spec.compute) == (
        "text-generator",
        "handler.py",
        {"gpu": 1},
    )


def test_every_field_is_read() -> None:
    spec = parse_spec(
        "name: a1\nkind: RealtimeAPI\nhandler: {type: python, path: m.py, config: {k: 2}}\n"
        "concurrency: 4\nexpirationPeriodSeconds: 30\nexample: {text: hi}\npublic: true\n"
    )
    assert spec.handler_config == {"k": 2}
    assert (spec.concurrency, spec.expiration_s, spec.public) == (4, 30, True)
    assert spec.example == {"text": "hi"}


def test_cortex_grpc_form_reads_protobuf_path() -> None:
    spec = parse_spec(
        "- name: text-generator\n  handler:\n    type: python\n    path: handler.py\n"
        "    protobuf_path: protos/handler.proto\n"
    )
    assert spec.protobuf_path == "protos/handler.proto"
    assert parse_spec("name: a\nhandler: {path: m.py}\n").protobuf_path is None


GOOD_HANDLER = "handler: {type: python, path: m.py}\n"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [unclosed\n", "not valid YAML"),
        ("just a string", "must be a mapping"),
        ("[]", "exactly one API"),
        (f"- name: a\n  {GOOD_HANDLER}- name: b\n  {GOOD_HANDLER}", "exactly one API"),
        (GOOD_HANDLER, "name must be"),
        ("name: Upper\n" + GOOD_HANDLER, "name must be"),
        ("name: -dash\n" + GOOD_HANDLER, "name must be"),
        ("name: a/b\n" + GOOD_HANDLER, "name must be"),
        ("name: " + "a" * 64 + "\n" + GOOD_HANDLER, "name must be"),
        ("name: 12\n" + GOOD_HANDLER, "name must be"),
        ("name: a\nkind: BatchAPI\n" + GOOD_HANDLER, "kind 'BatchAPI' is not supported"),
        ("name: a\n", "handler must be a mapping"),
        ("name: a\nhandler: {type: docker, path: m.py}\n", "handler.type must be python"),
        ("name: a\nhandler: {type: python}\n", "relative path of a .py file"),
        ("name: a\nhandler: {path: m.txt}\n", "relative path of a .py file"),
        ("name: a\nhandler: {path: /etc/m.py}\n", "stay inside the project"),
        ("name: a\nhandler: {path: ../m.py}\n", "stay inside the project"),
        ("name: a\nhandler: {path: src/../../m.py}\n", "stay inside the project"),
        ("name: a\nhandler: {path: 'a\\\\m.py'}\n", "relative path of a .py file"),
        ("name: a\nhandler: {path: m.py, config: [1]}\n", "handler.config must be a mapping"),
        ("name: a\nconcurrency: 0\n" + GOOD_HANDLER, "concurrency must be an integer"),
        ("name: a\nconcurrency: 65\n" + GOOD_HANDLER, "concurrency must be an integer"),
        ("name: a\nconcurrency: true\n" + GOOD_HANDLER, "concurrency must be an integer"),
        ("name: a\nexpirationPeriodSeconds: -1\n" + GOOD_HANDLER, "expirationPeriodSeconds"),
        ("name: a\npublic: 'yes'\n" + GOOD_HANDLER, "public must be true or false"),
        ("name: a\ncompute: 4\n" + GOOD_HANDLER, "compute must be a mapping"),
        ("name: a\nsurprise: 1\n" + GOOD_HANDLER, "unknown spec keys: surprise"),
        ("name: a\nhandler: {path: m.py, protobuf_path: m.txt}\n", "relative path of a .proto"),
        ("name: a\nhandler: {path: m.py, protobuf_path: ../m.proto}\n", "stay inside the project"),
        ("name: a\nhandler: {path: m.py, protobuf_path: /m.proto}\n", "stay inside the project"),
        ("name: a\nhandler: {path: m.py, protobuf_path: 7}\n", "relative path of a .proto"),
        ("name: a\nexample: '" + "x" * 70_000 + "'\n" + GOOD_HANDLER, "larger than 64 KiB"),
    ],
)
def test_a_bad_spec_is_refused_with_its_reason(text: str, fragment: str) -> None:
    with pytest.raises(InvalidSpec) as refused:
        parse_spec(text)
    assert refused.value.status_code == 422
    assert fragment in refused.value.message


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_reserved_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidSpec, match="reserved"):
        parse_spec(f"name: {name}\n" + GOOD_HANDLER)
