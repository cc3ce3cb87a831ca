"""Every drill attempt as a test: the harmless twin works, the attack is blocked.

Each attempt checks the exact outcome (errno printed by the attack, exit
status or signal) and, where the supervisor can see the block, the audit
record with its rule.  Parametrized over every backend.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from glassroom.drill import _one
from glassroom.drill._attempts import Ctx, attempts, setup_ctx
from glassroom.policy import default_policy

BACKENDS = ["namespaces", "gvisor", "microvm"]  # microvm under TCG here (conftest allows it)


@pytest.fixture(scope="module")
def ctx() -> Iterator[Ctx]:
    tmp = tempfile.mkdtemp(prefix="glassroom-drill-test-")
    c, cleanup = setup_ctx(tmp, set(default_policy().tools.allow))
    yield c
    cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


def _pairs() -> list[tuple[str, str]]:
    """(attempt, backend) for every tier the attempt applies to.  An attempt
    about a wall a tier does not have (a writable host dir on the microVM
    tier, which refuses them at compile time) is not generated there: under
    CI a skip is a failure, and a combination that cannot exist is no test."""
    from glassroom._sys import fusegate

    # The writable-dir attempts exist where setup_ctx can make their repo (a
    # write gate here); under CI that is always, so none is silently dropped.
    repo = "/x-repo" if fusegate.available() is None else ""
    dummy = Ctx("/x", "s", "N", "v", 1, [], "/usr/bin/perl", repo=repo)
    return [(a.name, b) for a in attempts(dummy) for b in BACKENDS
            if not a.tiers or b in a.tiers]  # fmt: skip


@pytest.mark.parametrize(("name", "backend"), _pairs())
def test_attempt(name: str, backend: str, ctx: Ctx, tmp_path: Path) -> None:
    att = next(a for a in attempts(ctx) if a.name == name)
    log = tmp_path / "audit.jsonl"
    res = _one(att, default_policy(), backend, log, ctx)
    assert res.twin_ok, f"harmless twin of {name} was blocked: {res.detail}"
    assert res.blocked, f"{name} was NOT blocked: {res.detail}"
    assert res.audited, f"{name}: no deny record with rule {att.rule} in the audit log"
    # The log the attempt wrote is intact.
    from glassroom.audit import verify

    assert verify(log).ok


def test_blocked_exec_record_names_rule(tmp_path: Path) -> None:
    """The exact audit record of a blocked exec: event, decision, rule, target."""
    from glassroom import Sandbox

    log = tmp_path / "a.jsonl"
    with Sandbox(audit_log=log) as sb:
        ok = sb.run(["ls", "/"])
        bad = sb.run(["/usr/bin/perl", "-e", "1"])
        sid = sb.id
    assert ok.exit_code == 0 and not ok.blocked
    assert bad.exit_code == 126
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    blocked = [r for r in recs if r["sandbox"] == sid and r["event"] == "blocked"]
    assert blocked == [
        {**blocked[0], "decision": "deny", "rule": "tools.allow",
         "details": {"action": "exec", "target": "/usr/bin/perl"}}
    ]  # fmt: skip
