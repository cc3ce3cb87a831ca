"""50 concurrent sandboxes through the API from 2 tenants: isolation, no leaks,
and an audit chain that verifies."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from glassroom._sys import cgroups
from glassroom.audit import read_records, verify

from .serve_helpers import TENANTS, Server

N = 50


def _proc_cgroup_mentions(needle: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cgroup", encoding="utf-8", errors="replace") as f:
                    if needle in f.read():
                        out.append(int(entry))
            except OSError:
                continue
    return out


def _children() -> set[int]:
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def test_fifty_concurrent_sandboxes_two_tenants(serve: Server) -> None:
    assert TENANTS["alice"] >= N // 2 and TENANTS["bob"] >= N // 2
    parent = os.environ["GLASSROOM_CGROUP_PARENT"]
    kids_before = _children()
    state = Path(os.environ["GLASSROOM_STATE_DIR"]) / "sandboxes"

    def one(i: int) -> dict:
        tenant, other = ("alice", "bob") if i % 2 else ("bob", "alice")
        with httpx.Client(base_url=serve.url, headers=serve.headers(tenant), timeout=120) as c:
            r = c.post("/v1/sandboxes", json={"timeout_s": 300, "metadata": {"i": str(i)}})
            assert r.status_code == 201, r.text
            sid = r.json()["sandbox_id"]
            secret = f"{tenant}-{i}-secret"
            r = c.put(
                f"/v1/sandboxes/{sid}/files",
                params={"path": "/workspace/s"},
                content=secret.encode(),
            )
            assert r.status_code == 200, r.text
            r = c.post(
                f"/v1/sandboxes/{sid}/commands",
                json={"command": "cat /workspace/s; ls /workspace | wc -l"},
            )
            assert r.json()["stdout"] == f"{secret}1\n", r.text
            # the other tenant cannot see, read, run in, audit or kill it
            oh = serve.headers(other)
            denied = [
                c.get(f"/v1/sandboxes/{sid}", headers=oh),
                c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/s"}, headers=oh),
                c.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["true"]}, headers=oh),
                c.get(f"/v1/sandboxes/{sid}/audit", headers=oh),
                c.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout_s": 10}, headers=oh),
                c.delete(f"/v1/sandboxes/{sid}", headers=oh),
            ]
            assert [d.status_code for d in denied] == [404] * 6
            listed = {s["sandbox_id"] for s in c.get("/v1/sandboxes", headers=oh).json()}
            assert sid not in listed
            # ... and the sandbox is still fine
            assert (
                c.post(
                    f"/v1/sandboxes/{sid}/commands", json={"argv": ["cat", "/workspace/s"]}
                ).json()["stdout"]
                == secret
            )
            return {"sid": sid, "tenant": tenant}

    with ThreadPoolExecutor(N) as pool:
        made = list(pool.map(one, range(N)))
    assert len({m["sid"] for m in made}) == N
    live = serve.service.list(serve.service.tenant("alice")) + serve.service.list(
        serve.service.tenant("bob")
    )
    assert len(live) >= N
    lists = {}
    for t in ("alice", "bob"):
        lists[t] = {
            s["sandbox_id"]
            for s in httpx.get(f"{serve.url}/v1/sandboxes", headers=serve.headers(t)).json()
        }
    assert not lists["alice"] & lists["bob"]
    for m in made:
        assert m["sid"] in lists[m["tenant"]]

    def destroy(m: dict) -> dict:
        r = httpx.delete(
            f"{serve.url}/v1/sandboxes/{m['sid']}", headers=serve.headers(m["tenant"]), timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(N) as pool:
        receipts = list(pool.map(destroy, made))
    assert all(r["clean"] for r in receipts), [r for r in receipts if not r["clean"]][:2]

    # nothing left: processes, cgroups, mounts, state records
    for m in made:
        assert not _proc_cgroup_mentions(m["sid"]), m["sid"]
        assert not (state / f"{m['sid']}.json").exists()
    assert not [n for n in cgroups.list_names(parent) if n in {m["sid"] for m in made}]
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        mounts = f.read()
    assert not [m["sid"] for m in made if m["sid"] in mounts]
    assert _children() <= kids_before, _children() - kids_before
    # every sandbox's records are in the chain, and the chain verifies
    res = verify(serve.cfg.audit_log)
    assert res.ok, res.problems[:5]
    events = {}
    for r in read_records(serve.cfg.audit_log):
        events.setdefault(r.get("sandbox"), set()).add(r.get("event"))
    for m in made:
        assert {"sandbox.created", "command.started", "sandbox.destroyed"} <= events[m["sid"]]
    assert not serve.errors(), serve.errors()[:5]
