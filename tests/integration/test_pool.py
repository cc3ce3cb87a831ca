"""The warm pool hands out new sandboxes only, and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_a_warm_pool_of_microvms(tmp_path: Path) -> None:
    """The pool works for the microvm tier too: each VM is new, none is reused,
    and every VM it started (handed out or idle at close) is destroyed."""
    from glassroom.backends.microvm import qemu

    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    log = tmp_path / "pool.jsonl"
    ids = []
    with SandboxPool({"risk": "high"}, size=1, backend="microvm", audit_log=log) as pool:
        for i in range(2):
            with pool.sandbox() as sb:
                ids.append(sb.id)
                assert sb.run(["ls", "/workspace"]).stdout == ""  # nothing carried over
                sb.run(["sh", "-c", f"echo {i} > /workspace/mark"])
    assert len(set(ids)) == 2
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    created = {r["sandbox"] for r in recs if r["event"] == "sandbox.created"}
    destroyed = [r for r in recs if r["event"] == "sandbox.destroyed"]
    assert {r["sandbox"] for r in destroyed} == created and set(ids) <= created
    assert all(r["details"]["clean"] for r in destroyed)
    assert verify(log).ok


def test_close_returns_when_a_build_fails_unexpectedly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that raises something other than a glassroom error must neither
    kill the pool's thread mid-build nor leave close() waiting for it."""
    import threading
    import time

    from glassroom import SandboxError
    from glassroom.lifecycle import pool as pool_mod

    def boom(*_a: object, **_k: object) -> None:
        raise TimeoutError("simulated")

    monkeypatch.setattr(pool_mod, "Supervised", boom)
    p = SandboxPool(size=1, audit_log=tmp_path / "pool.jsonl")
    end = time.monotonic() + 10
    while p._pool.last_error is None and time.monotonic() < end:  # the build was tried
        time.sleep(0.01)
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive(), "close() hung"
    with pytest.raises(SandboxError, match="TimeoutError: simulated"):
        p._pool.take(timeout=1)
