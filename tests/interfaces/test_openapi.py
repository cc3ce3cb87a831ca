"""The OpenAPI spec: checked in, current, and honoured under fuzzing (schemathesis)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from glassroom.interfaces.http import openapi_spec

from .serve_helpers import Server

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
EXAMPLES_PER_OPERATION = 100  # per mode: ~3000 requests, ~45 s on 2 cores
#: Operations that save or start whole sandboxes (a checkpoint, a fork) cost a
#: sandbox start or more per call: fewer examples, the same checks.
SLOW_SUFFIXES = ("/pause", "/resume", "/fork", "/snapshots")
SLOW_EXAMPLES = 15


def test_checked_in_spec_is_the_generated_one() -> None:
    from glassroom.interfaces.http.__main__ import render

    assert SPEC.exists(), "run: python -m glassroom.interfaces.http"
    assert SPEC.read_text() == render(), (
        "docs/openapi.json is stale; regenerate with: python -m glassroom.interfaces.http"
    )
    spec = json.loads(SPEC.read_text())
    assert spec == json.loads(json.dumps(openapi_spec()))
    # the models the SDK/MCP use are the ones in the spec
    assert {"CreateSandbox", "SandboxInfo", "CommandResult", "ReceiptModel", "AuditRecord"} <= set(
        spec["components"]["schemas"]
    )


def test_fuzz_the_api_no_5xx_no_unhandled_exception(serve: Server) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_path(SPEC)
    headers = serve.headers("bob")
    client = httpx.Client(base_url=serve.url, headers=headers, timeout=60)
    state = {"sid": client.post("/v1/sandboxes", json={"timeout_s": 600}).json()["sandbox_id"]}

    def real_sandbox() -> str:
        if client.get(f"/v1/sandboxes/{state['sid']}").status_code != 200:
            state["sid"] = client.post("/v1/sandboxes", json={"timeout_s": 600}).json()[
                "sandbox_id"
            ]
        return state["sid"]

    failures: list[str] = []
    calls: list[int] = []

    def make_check(op, mode):  # type: ignore[no-untyped-def]
        counter = {"n": 0}

        slow = op.method.upper() == "POST" and op.path.endswith(SLOW_SUFFIXES)

        @settings(
            max_examples=SLOW_EXAMPLES if slow else EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case) -> None:  # type: ignore[no-untyped-def]
            counter["n"] += 1
            if case.path_parameters and "sandbox_id" in case.path_parameters and counter["n"] % 2:
                case.path_parameters["sandbox_id"] = real_sandbox()  # reach the real handlers
            resp = case.call(base_url=serve.url, headers=headers, timeout=60)
            calls.append(resp.status_code)
            if resp.status_code >= 500:
                failures.append(
                    f"{op.method.upper()} {op.path} -> {resp.status_code}: "
                    f"{resp.text[:300]} (case {case.path_parameters} {case.query} "
                    f"{str(case.body)[:200]})"
                )
            if (
                op.path == "/v1/sandboxes"
                and op.method.upper() == "POST"
                and resp.status_code == 201
            ):
                client.delete(f"/v1/sandboxes/{resp.json()['sandbox_id']}")
            if op.path.endswith("/fork") and resp.status_code == 201:
                for child in resp.json():
                    client.delete(f"/v1/sandboxes/{child['sandbox_id']}")

        return check

    from schemathesis.generation.modes import GenerationMode

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                make_check(result.ok(), mode)()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /v1/health)
                assert mode is GenerationMode.NEGATIVE
    for s in serve.service.list(serve.service.tenant("bob")):
        serve.service.destroy(s)
    client.close()
    import collections

    print("status codes:", sorted(collections.Counter(calls).items()))
    assert len(calls) >= 200, len(calls)
    assert not failures, "\n".join(failures[:10])
    assert not serve.errors(), serve.errors()[:10]
