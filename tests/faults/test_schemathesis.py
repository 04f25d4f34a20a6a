"""Generated requests from /openapi.json (schemathesis): never a 500, and what the spec calls
valid is never refused as invalid (issue 17, defect 9).

The control plane runs as a subprocess, as `mlcp serve` does, so the generator's blocking HTTP
calls never share an event loop with it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import Server, http, start, stop
from tests.harness import ADMIN_KEY

pytestmark = pytest.mark.faults

# Examples per operation and generation mode: ~20 operations x 2 modes x 50, fewer where an
# operation runs out of distinct cases, makes over 1,000 cases (~1.5 min here).
EXAMPLES = 50
# Answers that never end by design (server-sent events): each case would only wait out its
# timeout. Their input checks have tests of their own.
ENDLESS = frozenset({"/events"})
# Bodies whose validity no schema can state (a tar.gz project; bytes that must match the SHA-256
# in their path): a generated one is refused, rightly, with 422. They are still sent in both
# modes (never a 500); their refusals are tests/integration/test_apis_bad_input.py's.
OPAQUE_BODIES = frozenset({("put", "/apis/{name}"), ("put", "/apis/blobs/{sha256}")})


@pytest.fixture
def server(db_dsn: str, tmp_path: Path) -> Iterator[Server]:
    served = start(
        tmp_path / "data",
        tmp_path,
        "schemathesis",
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_INCLUDE_PACKAGED_MODELS="false",
    )
    try:
        yield served
    finally:
        stop(served)


def run_cases(
    base: str,
    operation: Any,
    mode: Any,
    own_key_id: int,
    seen: Counter[str],
    problems: list[str],
) -> None:
    """EXAMPLES generated cases of one operation in one mode, sent to `base`."""
    import hypothesis
    from schemathesis.generation.modes import GenerationMode

    headers = {"Authorization": f"Key {ADMIN_KEY}"}
    where = f"{operation.method.upper()} {operation.path} ({mode.value})"

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        if (case.path_parameters or {}).get("key_id") == own_key_id:
            return  # revoking the key this test authenticates with would end the test
        # Generated credentials are random: authentication has tests of its own.
        case.headers = {**(case.headers or {}), **headers}
        resp = case.call(base_url=base, timeout=10)
        seen[f"{mode.value} {resp.status_code}"] += 1
        if resp.status_code >= 500 and resp.status_code != 503:
            problems.append(f"{where}: {resp.status_code} for {case.as_curl_command()}")
        elif (
            mode is GenerationMode.POSITIVE
            and resp.status_code in (400, 422)
            and (operation.method.lower(), operation.path) not in OPAQUE_BODIES
        ):
            problems.append(
                f"{where}: spec-valid request refused: {resp.text[:300]} for "
                f"{json.dumps(case.body, default=str)[:300]} {case.query}"
            )

    try:
        send()
    except hypothesis.errors.Unsatisfiable:
        # No case to make: an operation without inputs has no negative ones, and a path
        # parameter that may hold '/' (an org/name model) cannot be generated in a path.
        seen[f"{mode.value} unsatisfiable"] += 1


def generate_and_send(base: str) -> tuple[Counter[str], list[str]]:
    """Run every operation in both modes; (cases per mode and status, problems found)."""
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    _, keys = http("GET", base + "/admin/keys", ADMIN_KEY)
    (own_key_id,) = [k["id"] for k in keys if ADMIN_KEY.startswith(k["prefix"])]
    seen: Counter[str] = Counter()
    problems: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in ENDLESS:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_cases(base, operation, mode, own_key_id, seen, problems)
    return seen, problems


@pytest.mark.timeout(400)
async def test_generated_requests(server: Server) -> None:
    seen, problems = await asyncio.to_thread(generate_and_send, server.base)
    assert sum(seen.values()) >= 1000, seen
    assert problems == [], "\n".join(problems[:20])
