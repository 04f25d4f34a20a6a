"""`mlcp init NAME`: the files of a new handler project that deploys and answers on the first try.

Two layouts, both read by `instance_agent.project` and served by `instance_agent.user_code`:
`cellstrat` (the default; CellStrat Hub's `src/main.py` with a decorated function and `mlcp.yaml`)
and `cortex` (Cortex's `handler.py` with `class Handler` and a one-element YAML list). Neither
needs weights: the handler counts and echoes the words it is sent, and its comments show where
to load a model from `MODEL_DIR`.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.cli.client import CliError
from instance_agent.image import DEFAULT_REPOSITORY
from instance_agent.project import InvalidSpec, check_name

TEMPLATES = ("cellstrat", "cortex")
EXAMPLE_PAYLOAD = "so simple and quick!"
AGENT_IMAGE = f"{DEFAULT_REPOSITORY}:latest"

_CELLSTRAT_SPEC = """\
# The API's spec, read by `mlcp deploy` (keys: docs/handlers.md).
name: {name}
kind: RealtimeAPI
handler:
  type: python
  path: src/main.py
compute:
  cpu: 1
  gpu: 0
concurrency: 1                  # calls served at once, each on its own thread
expirationPeriodSeconds: 600    # idle seconds before the instance stops
example: "{example}"   # the payload the benchmark calls the handler with
public: false                   # true: every user's key may call it
"""

_CELLSTRAT_MAIN = '''\
"""{name}: the code behind the API. Each request calls `inference_handler` with its JSON body."""

import os

from instance_agent.handler import handler  # CellStrat's `from hub import hub_handler` works too

# The files of model/ (uploaded apart from the code, deduplicated by content) are here.
MODEL_DIR = os.environ.get("MODEL_DIR", "model")

# Load weights once, at import: it runs once per instance, before the first request. E.g.
#   from transformers import pipeline
#   classifier = pipeline("text-classification", model=MODEL_DIR)
# (and list transformers in requirements.txt).


@handler
def inference_handler(inputs, context):
    """Return a JSON value for one request; `inputs` is its decoded JSON body."""
    # With a model: return classifier(inputs)
    text = inputs if isinstance(inputs, str) else str(inputs)
    return {{"words": len(text.split()), "echo": inputs}}
'''

_CORTEX_SPEC = """\
# The API's spec in Cortex's list form, read by `mlcp deploy {spec_file}`.
- name: {name}
  kind: RealtimeAPI
  handler:
    type: python
    path: handler.py
    config: {{}}                # passed to Handler(config)
  compute:
    cpu: 1
    gpu: 0
  concurrency: 1
  expirationPeriodSeconds: 600
  example: {{"text": "{example}"}}
  public: false
"""

_CORTEX_HANDLER = '''\
"""{name}: the code behind the API. Each request calls `Handler.handle_post` with its JSON body."""

import os


class Handler:
    def __init__(self, config):
        """Runs once per instance, before the first request: load weights here."""
        self.model_dir = os.environ.get("MODEL_DIR", "model")
        # E.g. (and list transformers and torch in requirements.txt):
        #   from transformers import pipeline
        #   self.model = pipeline(task="text-generation", model=self.model_dir)

    def handle_post(self, payload):
        """Return a JSON value for one request."""
        # With a model: return self.model(payload["text"])[0]
        text = payload.get("text", "") if isinstance(payload, dict) else str(payload)
        return {{"words": len(text.split()), "echo": payload}}
'''

_REQUIREMENTS = """\
# The packages your code needs beyond the agent's own (torch and transformers are already there
# and reused), one per line as pip reads them, e.g.
#   scikit-learn==1.5.2
"""

_MODEL_README = """\
Put the weights here: every file of model/ is uploaded apart from the code, once per content,
and your code finds them at the path in the MODEL_DIR environment variable.
"""

_DOCKERFILE = f"""\
# This API's container image. With the docker runtime (MLCP_RUNTIME=docker), each version is
# built into an image from this file (offline: host network, nothing pulled from a registry;
# cached by content) and its instances run in it, with the project mounted at /model. It starts
# FROM mlcp's agent image (built offline by `make image`), which serves the project. That image
# has no shell, so RUN cannot work here: add files with COPY (the build's context is this
# folder less model/), settings with ENV; packages go in requirements.txt.
FROM {AGENT_IMAGE}
"""

_README = """\
# {name}

An mlcp API ({layout} layout), made by `mlcp init {name}`.

- `{spec_file}`: the spec (name, handler, compute, concurrency, expiry, example payload)
- `{handler_file}`: the code; each request calls {entry}
- `requirements.txt`: packages beyond the agent's own
- `model/`: the weights, read from `MODEL_DIR`
- `Dockerfile`: the image for the docker runtime

```sh
mlcp deploy{deploy_arg}                # upload, build, benchmark; shows progress
mlcp get {name} --watch
curl -X POST "$MLCP_URL/{name}" -H "x-api-key: $MLCP_KEY" \\
  -H 'Content-Type: application/json' -d '{payload}'
mlcp logs {name}
mlcp delete {name}
```
"""


def cortex_spec_file(name: str) -> str:
    """Cortex names its spec after the API with underscores: `text_generator.yaml`."""
    return name.replace("-", "_") + ".yaml"


def project_files(name: str, template: str = "cellstrat") -> dict[str, str]:
    """The new project's files by relative path; raises `CliError` for a bad name or template."""
    try:
        check_name(name)
    except InvalidSpec as exc:
        raise CliError(f"cannot use {name!r} as an API name: {exc.message}") from None
    if template not in TEMPLATES:
        raise CliError(f"unknown template {template!r}: use {' or '.join(TEMPLATES)}")
    common = {
        "requirements.txt": _REQUIREMENTS,
        "model/README.md": _MODEL_README,
        "Dockerfile": _DOCKERFILE,
    }
    if template == "cortex":
        spec_file = cortex_spec_file(name)
        readme = _README.format(
            name=name,
            layout="Cortex",
            spec_file=spec_file,
            handler_file="handler.py",
            entry="`Handler.handle_post(payload)`",
            deploy_arg=f" {spec_file}",
            payload=f'{{"text": "{EXAMPLE_PAYLOAD}"}}',
        )
        return {
            spec_file: _CORTEX_SPEC.format(name=name, spec_file=spec_file, example=EXAMPLE_PAYLOAD),
            "handler.py": _CORTEX_HANDLER.format(name=name),
            **common,
            "README.md": readme,
        }
    readme = _README.format(
        name=name,
        layout="CellStrat",
        spec_file="mlcp.yaml",
        handler_file="src/main.py",
        entry="the `@handler` function",
        deploy_arg="",
        payload=f'"{EXAMPLE_PAYLOAD}"',
    )
    return {
        "mlcp.yaml": _CELLSTRAT_SPEC.format(name=name, example=EXAMPLE_PAYLOAD),
        "src/main.py": _CELLSTRAT_MAIN.format(name=name),
        **common,
        "README.md": readme,
    }


def write_project(dest: Path, name: str, template: str = "cellstrat") -> list[str]:
    """Write the project into `dest` (absent or empty); return the paths written."""
    files = project_files(name, template)
    if dest.exists() and not dest.is_dir():
        raise CliError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise CliError(f"{dest} already exists and is not empty: choose another name or folder")
    try:
        for rel, text in files.items():
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return list(files)
