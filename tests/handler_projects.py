"""Handler projects for tests, written as users write them (the two seeds' layouts).

`cortex_text_generator` is Cortex's text-generation example over a tiny local GPT-2;
`cellstrat_sentiment` is CellStrat's sentiment example over a tiny random sequence classifier;
`misbehaving` is a pure-Python handler whose calls raise, hang, exit or return non-JSON on
request, and `broken_project` writes projects that must fail to load.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from tests.tiny_model import EOS_TOKEN, _train_tokenizer, build_tiny_model

CORTEX_HANDLER = """\
import os

from transformers import pipeline


class Handler:
    def __init__(self, config):
        self.model = pipeline(task="text-generation", model=os.environ["MODEL_DIR"])
        self.max_new_tokens = config.get("max_new_tokens", 4)

    def handle_post(self, payload):
        return self.model(
            payload["text"], max_new_tokens=self.max_new_tokens, do_sample=False
        )[0]
"""

CELLSTRAT_MAIN = '''\
import os
from hub import hub_handler
import torch
from transformers import AutoTokenizer, AutoModelForSequenceClassification

MODEL_DIR = os.getenv("MODEL_DIR")

model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR)
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)

@hub_handler
def inference_handler(inputs, _):
    """The main inference function which gets triggered when the API is invoked"""
    inputs = tokenizer(inputs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits
        probs = torch.softmax(logits, dim=-1)
    output = []
    for prob in probs:
        preds = [(model.config.id2label[i], round(p.item() * 100, 2)) for i, p in enumerate(prob)]
        preds = sorted(preds, key=lambda x: x[1], reverse=True)
        output.append(preds)
    return output
'''

MISBEHAVING_MAIN = """\
import os
import sys
import time

from instance_agent.handler import handler

LOADED_AT = time.time()


@handler
def inference_handler(inputs, _):
    if not isinstance(inputs, dict):
        return {"echo": inputs, "model_dir": os.environ["MODEL_DIR"]}
    if "raise" in inputs:
        raise ValueError(inputs["raise"])
    if "sleep" in inputs:
        time.sleep(inputs["sleep"])
        return {"slept": inputs["sleep"]}
    if "exit" in inputs:
        sys.exit(inputs["exit"])
    if "bad_output" in inputs:
        return {"a set": {1, 2}}
    if "nan" in inputs:
        return float("nan")
    return {"loaded_at": LOADED_AT}
"""


def write_spec(project: Path, text: str, name: str = "mlcp.yaml") -> None:
    (project / name).write_text(textwrap.dedent(text))


def cortex_text_generator(dest: Path) -> Path:
    """Cortex's text-generator layout: handler.py, requirements.txt, text_generator.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "handler.py").write_text(CORTEX_HANDLER)
    (dest / "requirements.txt").write_text("transformers\ntorch\n")
    write_spec(
        dest,
        """\
        - name: text-generator
          kind: RealtimeAPI
          handler:
            type: python
            path: handler.py
            config: {max_new_tokens: 3}
          compute:
            gpu: 0
        """,
        "text_generator.yaml",
    )
    build_tiny_model(dest / "model", chat_template=False)
    return dest


def build_tiny_classifier(dest: Path) -> Path:
    """A tiny random GPT-2 sequence classifier with labels Negative/Positive (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = _train_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)  # type: ignore[attr-defined]
    config = GPT2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        pad_token_id=eos_id,
        num_labels=2,
        id2label={0: "Negative", 1: "Positive"},
        label2id={"Negative": 0, "Positive": 1},
    )
    torch.manual_seed(7)
    model = GPT2ForSequenceClassification(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)  # type: ignore[attr-defined]
    return dest


def cellstrat_sentiment(dest: Path) -> Path:
    """CellStrat's sentiment-analyser layout: src/main.py (@hub_handler), model/, mlcp.yaml."""
    (dest / "src").mkdir(parents=True, exist_ok=True)
    (dest / "src" / "main.py").write_text(CELLSTRAT_MAIN)
    (dest / "requirements.txt").write_text("torch\ntransformers\n")
    (dest / "hub_config.json").write_text(json.dumps({"name": "sentiment-analyser"}))
    write_spec(
        dest,
        """\
        name: sentiment-analyser
        kind: RealtimeAPI
        handler: {type: python, path: src/main.py}
        example: "so simple and quick!"
        """,
    )
    build_tiny_classifier(dest / "model")
    return dest


def misbehaving(dest: Path, *, concurrency: int = 2) -> Path:
    """A pure-Python handler that misbehaves on request (see MISBEHAVING_MAIN)."""
    (dest / "src").mkdir(parents=True, exist_ok=True)
    (dest / "model").mkdir(exist_ok=True)
    (dest / "src" / "main.py").write_text(MISBEHAVING_MAIN)
    write_spec(
        dest,
        f"""\
        name: misbehaving
        handler: {{type: python, path: src/main.py}}
        concurrency: {concurrency}
        example: {{}}
        """,
    )
    return dest


def broken_project(dest: Path, main_py: str, *, path: str = "src/main.py") -> Path:
    """A project whose handler file holds `main_py` (which should fail to load)."""
    (dest / "src").mkdir(parents=True, exist_ok=True)
    (dest / "src" / "main.py").write_text(textwrap.dedent(main_py))
    write_spec(dest, f"name: broken\nhandler: {{type: python, path: {path}}}\n")
    return dest


# Cortex's gRPC form (the seed's "gRPC" section): handler.proto, Handler(config, pb2).
SEED_PROTO = """\
syntax = "proto3";
package text_generator;

service Handler {
    rpc Predict (Message) returns (Message);
}

message Message {
    string text = 1;
}
"""

SEED_GRPC_HANDLER = """\
import os

from transformers import pipeline


class Handler:
    def __init__(self, config, proto_module_pb2):
        self.model = pipeline(task="text-generation", model=os.environ["MODEL_DIR"])
        self.proto_module_pb2 = proto_module_pb2

    def Predict(self, payload):
        generated = self.model(payload.text, max_new_tokens=3, do_sample=False)[0]
        assert generated["generated_text"].startswith(payload.text)
        return self.proto_module_pb2.Message(text="returned message")
"""


def cortex_grpc_text_generator(dest: Path) -> Path:
    """The seed's gRPC text-generator: handler.proto, handler.py, a tiny local GPT-2."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "handler.py").write_text(SEED_GRPC_HANDLER)
    (dest / "handler.proto").write_text(SEED_PROTO)
    (dest / "requirements.txt").write_text("transformers\ntorch\n")
    write_spec(
        dest,
        """\
        - name: text-generator
          kind: RealtimeAPI
          handler:
            type: python
            path: handler.py
            protobuf_path: handler.proto
          compute:
            gpu: 0
        """,
        "text_generator.yaml",
    )
    build_tiny_model(dest / "model", chat_template=False)
    return dest


# A pure-Python gRPC handler that misbehaves on request; `echo.proto` (package mlcp_echo).
ECHO_PROTO = """\
syntax = "proto3";
package mlcp_echo;

import "google/protobuf/empty.proto";

service Echo {
    rpc Predict (Text) returns (Text);
    rpc Count (CountRequest) returns (stream Text);
    rpc Ping (google.protobuf.Empty) returns (Text);
}

message Text {
    string text = 1;
}

message CountRequest {
    int32 n = 1;
    double pause_s = 2;
    string marker = 3;
}
"""

ECHO_HANDLER = """\
import pathlib
import time


class Handler:
    def __init__(self, config, proto_module_pb2):
        self.pb2 = proto_module_pb2
        self.prefix = config.get("prefix", "")
        time.sleep(config.get("init_sleep_s", 0))

    def Predict(self, payload):
        text = payload.text
        if text.startswith("raise:"):
            raise ValueError(text[len("raise:"):])
        if text.startswith("sleep:"):
            time.sleep(float(text[len("sleep:"):]))
            return self.pb2.Text(text="slept")
        if text == "wrong-type":
            return {"text": "a dict"}
        if text == "other-message":
            return self.pb2.CountRequest(n=1)
        return self.pb2.Text(text=self.prefix + text)

    def Count(self, request):
        marker = pathlib.Path(request.marker) if request.marker else None
        try:
            for i in range(request.n):
                if i and request.pause_s:
                    time.sleep(request.pause_s)
                yield self.pb2.Text(text=str(i))
        finally:
            if marker is not None:
                marker.write_text("closed")

    def Ping(self, _):
        return self.pb2.Text(text="pong")

    def handle_post(self, payload):
        return {"text": self.prefix + str(payload.get("text", ""))}
"""


def grpc_echo(
    dest: Path,
    *,
    concurrency: int = 2,
    prefix: str = "",
    init_sleep_s: float = 0,
    expiration_s: int = 600,
) -> Path:
    """A pure-Python gRPC project (echo.proto, package mlcp_echo) that misbehaves on request."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model").mkdir(exist_ok=True)
    (dest / "handler.py").write_text(ECHO_HANDLER)
    (dest / "echo.proto").write_text(ECHO_PROTO)
    write_spec(
        dest,
        f"""\
        name: grpc-echo
        handler:
          type: python
          path: handler.py
          protobuf_path: echo.proto
          config: {{prefix: {json.dumps(prefix)}, init_sleep_s: {init_sleep_s}}}
        concurrency: {concurrency}
        expirationPeriodSeconds: {expiration_s}
        """,
    )
    return dest


def grpc_project(dest: Path, files: dict[str, str], *, proto: str = "api.proto") -> Path:
    """A gRPC project made of `files` (path -> text), for the ones that must fail to load."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(textwrap.dedent(text))
    write_spec(
        dest,
        f"name: broken-grpc\nhandler: {{type: python, path: handler.py, protobuf_path: {proto}}}\n",
    )
    return dest


def grpc_echo_renamed(dest: Path, package: str, proto_file: str, **kwargs: Any) -> Path:
    """`grpc_echo` with its package and proto file renamed: a second, distinct service."""
    grpc_echo(dest, **kwargs)
    text = (dest / "echo.proto").read_text().replace("package mlcp_echo;", f"package {package};")
    (dest / "echo.proto").unlink()
    (dest / proto_file).write_text(text)
    spec = (
        (dest / "mlcp.yaml")
        .read_text()
        .replace("protobuf_path: echo.proto", f"protobuf_path: {proto_file}")
    )
    (dest / "mlcp.yaml").write_text(spec)
    return dest
