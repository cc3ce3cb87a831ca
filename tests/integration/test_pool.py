"""The warm pool hands out new sandboxes only, and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

from glassroom import SandboxPool
from glassroom._config import cgroup_parent
from glassroom._sys import cgroups
from glassroom.audit import verify


def test_pool_hands_out_fresh_sandboxes_and_cleans_up(tmp_path: Path) -> None:
    log = tmp_path / "pool.jsonl"
    ids = []
    with SandboxPool(size=2, audit_log=log) as pool:
        for i in range(4):
            with pool.sandbox() as sb:
                ids.append(sb.id)
                # Harmless twin: state persists within one sandbox ...
                sb.run(["sh", "-c", f"echo {i} > /workspace/mark"])
                assert sb.run(["cat", "/workspace/mark"]).stdout.strip() == str(i)
                # ... and never crosses to the next one handed out.
                if i:
                    assert sb.run(["cat", "/workspace/prev"]).exit_code != 0
                sb.run(["touch", "/workspace/prev"])
    assert len(set(ids)) == 4
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    claimed = [r["sandbox"] for r in recs if r["event"] == "sandbox.claimed"]
    created = {r["sandbox"] for r in recs if r["event"] == "sandbox.created"}
    destroyed = [r for r in recs if r["event"] == "sandbox.destroyed"]
    assert claimed == ids
    # Every sandbox the pool built (handed out or idle at close) was destroyed clean.
    assert {r["sandbox"] for r in destroyed} == created
    assert all(r["details"]["clean"] for r in destroyed)
    assert not [n for n in cgroups.list_names(cgroup_parent()) if n in created]
    assert verify(log).ok
