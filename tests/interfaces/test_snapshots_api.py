"""Pause, resume, snapshot and fork through ``glassroom serve`` (docs/snapshots.md):
the unmodified E2B SDK against the E2B-compatible API, and the own API (``/v1``).
The default tier is namespaces: a pause freezes the processes in place, a
snapshot or fork keeps the files only (and says so)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from glassroom._errors import PolicyError
from glassroom.audit import read_records, verify
from glassroom.interfaces.http._config import ServeConfig, snapshot_limits
from glassroom.lifecycle.snapshots import SnapshotLimits

from .serve_helpers import Server, start_server

e2b = pytest.importorskip("e2b")
from e2b import Sandbox, SandboxState  # noqa: E402
from e2b.exceptions import SandboxException, SandboxNotRunningException  # noqa: E402


@pytest.fixture
def api(serve: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve.url, headers=serve.headers("alice"), timeout=60) as c:
        yield c


def _records(serve: Server, sandbox_id: str) -> list[dict]:
    return [r for r in read_records(serve.cfg.audit_log) if r.get("sandbox") == sandbox_id]


def _events(serve: Server, sandbox_id: str) -> list[str]:
    return [r["event"] for r in _records(serve, sandbox_id)]


def _wait(cond, timeout_s: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


# -- E2B SDK -------------------------------------------------------------------------


def test_pause_and_connect_resume_the_same_sandbox(serve: Server, sbx: Sandbox) -> None:
    sbx.files.write("/home/user/kept.txt", "before pause")
    bg = sbx.commands.run("sleep 300", background=True)
    assert sbx.pause() is True
    assert not sbx.is_running()
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    paused = Sandbox.list(
        query=e2b.SandboxQuery(state=[SandboxState.PAUSED]), limit=100
    ).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in paused]
    # envd calls are answered as E2B's proxy does for a paused sandbox
    with pytest.raises(SandboxNotRunningException) as ei:
        sbx.files.read("/home/user/kept.txt")
    assert "paused" in str(ei.value)
    # a second pause is E2B's 409: the SDK says False
    assert sbx.pause() is False
    r = httpx.post(
        f"{serve.url}/sandboxes/{sbx.sandbox_id}/pause", json={}, headers=serve.headers()
    )
    assert r.status_code == 409 and "already paused" in r.json()["message"]

    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.sandbox_id == sbx.sandbox_id
    assert resumed.is_running() and sbx.is_running()
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    assert sbx.files.read("/home/user/kept.txt") == "before pause"
    # namespaces: the processes were frozen in place, not ended
    assert bg.pid in [p.pid for p in sbx.commands.list()]
    # connect on a running sandbox is 200, on a paused one 201
    raw = httpx.post(
        f"{serve.url}/sandboxes/{sbx.sandbox_id}/connect",
        json={"timeout": 60},
        headers=serve.headers(),
    )
    assert raw.status_code == 200
    events = _events(serve, sbx.sandbox_id)
    assert "sandbox.paused" in events and "sandbox.resumed" in events
    paused_rec = next(r for r in _records(serve, sbx.sandbox_id) if r["event"] == "sandbox.paused")
    assert paused_rec["details"]["how"] == "freeze" and paused_rec["details"]["memory"] is True


def test_paused_sandbox_has_no_running_deadline(serve: Server) -> None:
    sb = Sandbox.create(timeout=2)
    try:
        sb.pause()
        time.sleep(3)  # past the deadline it had: kept, paused
        assert Sandbox.get_info(sb.sandbox_id).state == SandboxState.PAUSED
        sb.connect()  # given back the time it had left (about 2 s), or more
        assert sb.commands.run("echo back").stdout == "back\n"
    finally:
        sb.kill()


def test_pause_files_only(serve: Server, sbx: Sandbox) -> None:
    sbx.files.write("/home/user/marker.txt", "persisted")
    bg = sbx.commands.run("sleep 300", background=True)
    assert sbx.pause(keep_memory=False) is True
    assert not sbx.is_running()
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    resumed = sbx.connect()
    assert resumed.sandbox_id == sbx.sandbox_id
    assert resumed.files.read("/home/user/marker.txt") == "persisted"
    # the files only: the processes ended
    assert bg.pid not in [p.pid for p in resumed.commands.list()]
    rec = next(r for r in _records(serve, sbx.sandbox_id) if r["event"] == "sandbox.paused")
    assert rec["details"]["how"] == "files" and rec["details"]["memory"] is False


def test_snapshot_create_from_list_and_delete(serve: Server, sbx: Sandbox) -> None:
    sbx.files.make_dir("/home/user/app")
    sbx.files.write("/home/user/app/config.json", '{"env": "test"}')
    snap = sbx.create_snapshot(name="after-setup")
    assert snap.snapshot_id.startswith("snap-") and snap.names == ["after-setup"]
    assert sbx.is_running()  # a snapshot does not stop the sandbox
    try:
        new = Sandbox.create(snap.snapshot_id)
        try:
            assert new.sandbox_id != sbx.sandbox_id
            assert new.files.read("/home/user/app/config.json") == '{"env": "test"}'
            info = Sandbox.get_info(new.sandbox_id)
            assert info.template_id == snap.snapshot_id
            created = next(
                r for r in _records(serve, new.sandbox_id) if r["event"] == "service.created"
            )
            assert created["details"]["snapshot"] == snap.snapshot_id
            assert created["details"]["parent"] == sbx.sandbox_id
        finally:
            new.kill()
        # by name, too (E2B's Sandbox.create("my-snapshot"))
        named = Sandbox.create("after-setup")
        try:
            assert named.files.read("/home/user/app/config.json") == '{"env": "test"}'
        finally:
            named.kill()

        listed = Sandbox.list_snapshots().next_items()
        assert snap.snapshot_id in [s.snapshot_id for s in listed]
        mine = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()
        assert [s.snapshot_id for s in mine] == [snap.snapshot_id]
        assert Sandbox.list_snapshots(name="after-setup").next_items()[0].names == ["after-setup"]
        assert Sandbox.list_snapshots(name="no-such-name").next_items() == []
        # namespaces cannot save processes: asking for them is refused, with the rule
        with pytest.raises(SandboxException) as ei:
            sbx.create_snapshot(mode="full")
        assert "snapshot.memory" in str(ei.value)
    finally:
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    assert snap.snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    deleted = [r for r in _records(serve, sbx.sandbox_id) if r["event"] == "snapshot.deleted"]
    assert deleted and deleted[0]["details"]["snapshot"] == snap.snapshot_id
    assert deleted[0]["details"]["why"] == "client"
    with pytest.raises(SandboxException):
        Sandbox.create(snap.snapshot_id)


def test_snapshot_list_pages(serve: Server, sbx: Sandbox) -> None:
    ids = [sbx.create_snapshot().snapshot_id for _ in range(3)]
    try:
        pager = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id, limit=2)
        first = pager.next_items()
        assert len(first) == 2 and pager.has_next
        second = pager.next_items()
        assert len(second) == 1 and not pager.has_next
        # newest first
        assert [s.snapshot_id for s in first + second] == ids[::-1]
    finally:
        for sid in ids:
            Sandbox.delete_snapshot(sid)


def test_fork(serve: Server, sbx: Sandbox) -> None:
    sbx.files.write("/home/user/state.txt", "state before fork")
    forks = sbx.fork(count=2, timeout=60)
    assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
    try:
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 2 and sbx.sandbox_id not in ids
        for f in forks:
            assert f.is_running()
            assert f.files.read("/home/user/state.txt") == "state before fork"
        forks[0].files.write("/home/user/state.txt", "changed in the fork")
        assert sbx.files.read("/home/user/state.txt") == "state before fork"
        assert forks[1].files.read("/home/user/state.txt") == "state before fork"
        # each has its own trail; the parent's names the children
        parent_forked = [
            r for r in _records(serve, sbx.sandbox_id) if r["event"] == "sandbox.forked"
        ]
        assert {r["details"]["child"] for r in parent_forked} == ids
        for f in forks:
            evs = _events(serve, f.sandbox_id)
            assert "sandbox.created" in evs and "sandbox.forked" in evs
        # forks leave no snapshot behind
        assert Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items() == []
    finally:
        for f in forks:
            f.kill()
    sbx.kill()
    with pytest.raises(e2b.SandboxNotFoundException):
        sbx.fork()


def test_auto_pause_at_the_deadline(serve: Server) -> None:
    sb = Sandbox.create(timeout=2, lifecycle={"on_timeout": "pause"})
    try:
        sb.files.write("/home/user/auto.txt", "kept")
        assert Sandbox.get_info(sb.sandbox_id).lifecycle["on_timeout"] == "pause"
        _wait(lambda: Sandbox.get_info(sb.sandbox_id).state == SandboxState.PAUSED, 8, "pause")
        assert not sb.is_running()
        rec = next(r for r in _records(serve, sb.sandbox_id) if r["event"] == "service.auto_paused")
        assert rec["rule"] == "lifecycle.timeout" and rec["details"]["memory"] is True
        assert "sandbox.expired" not in _events(serve, sb.sandbox_id)
        sb.connect()
        assert sb.files.read("/home/user/auto.txt") == "kept"
    finally:
        sb.kill()


def test_auto_pause_files_only(serve: Server) -> None:
    sb = Sandbox.create(
        timeout=2, lifecycle={"on_timeout": {"action": "pause", "keep_memory": False}}
    )
    try:
        sb.files.write("/home/user/auto.txt", "on disk")
        _wait(lambda: Sandbox.get_info(sb.sandbox_id).state == SandboxState.PAUSED, 8, "pause")
        rec = next(r for r in _records(serve, sb.sandbox_id) if r["event"] == "sandbox.paused")
        assert rec["details"]["how"] == "files"
        sb.connect()
        assert sb.files.read("/home/user/auto.txt") == "on disk"
    finally:
        sb.kill()


def test_auto_resume_is_refused_not_pretended(serve: Server) -> None:
    with pytest.raises(SandboxException) as ei:
        Sandbox.create(timeout=5, lifecycle={"on_timeout": "pause", "auto_resume": True})
    assert "autoResume" in str(ei.value)


def test_a_changed_snapshot_is_refused(serve: Server, sbx: Sandbox) -> None:
    sbx.files.write("/home/user/secret-plan.txt", "the original")
    snap = sbx.create_snapshot()
    try:
        d = serve.cfg.data_dir / "snapshots" / snap.snapshot_id
        files = [
            p
            for p in d.rglob("*")
            if p.is_file() and p.name not in ("manifest.json", "manifest.sig")
        ]
        assert files, f"nothing to change under {d}"
        with open(max(files, key=lambda p: p.stat().st_size), "ab") as f:
            f.write(b"tampered")
        before = {e.id for e in serve.service.list(serve.service.tenant("alice"))}
        with pytest.raises(SandboxException) as ei:
            Sandbox.create(snap.snapshot_id)
        assert "snapshot.integrity" in str(ei.value) or "refused" in str(ei.value)
        after = {e.id for e in serve.service.list(serve.service.tenant("alice"))}
        assert after == before  # nothing was started
        refused = [r for r in _records(serve, snap.snapshot_id) if r["event"] == "snapshot.refused"]
        assert refused and refused[0]["decision"] == "deny"
        assert refused[0]["rule"] == "snapshot.integrity"
    finally:
        Sandbox.delete_snapshot(snap.snapshot_id)
    assert verify(serve.cfg.audit_log).ok


def test_another_tenant_cannot_see_or_use_a_snapshot(serve: Server, sbx: Sandbox) -> None:
    snap = sbx.create_snapshot(name="alice-only")
    bob = serve.keys["bob"]
    try:
        assert Sandbox.list_snapshots(api_key=bob).next_items() == []
        assert Sandbox.list_snapshots(api_key=bob, name="alice-only").next_items() == []
        with pytest.raises(SandboxException):
            Sandbox.create(snap.snapshot_id, api_key=bob)
        with pytest.raises(SandboxException):
            Sandbox.create("alice-only", api_key=bob)
        assert Sandbox.delete_snapshot(snap.snapshot_id, api_key=bob) is False
        with pytest.raises(e2b.SandboxNotFoundException):
            Sandbox.pause(sbx.sandbox_id, api_key=bob)
        with pytest.raises(e2b.SandboxNotFoundException):
            Sandbox.fork(sbx.sandbox_id, api_key=bob)
        with pytest.raises(e2b.SandboxNotFoundException):
            Sandbox.create_snapshot(sbx.sandbox_id, api_key=bob)
        h = {"X-API-Key": bob}
        assert (
            httpx.get(f"{serve.url}/v1/snapshots/{snap.snapshot_id}", headers=h).status_code == 404
        )
        assert (
            httpx.delete(f"{serve.url}/v1/snapshots/{snap.snapshot_id}", headers=h).status_code
            == 404
        )
        # still there for alice
        assert snap.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    finally:
        assert Sandbox.delete_snapshot(snap.snapshot_id) is True


# -- own API (/v1) -------------------------------------------------------------------


def test_v1_pause_resume(api: httpx.Client) -> None:
    sid = api.post("/v1/sandboxes", json={"timeout_s": 60}).json()["sandbox_id"]
    try:
        api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "echo hi > /workspace/f"})
        r = api.post(f"/v1/sandboxes/{sid}/pause", json={})
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["state"] == "paused" and info["paused_at"]
        assert info["pause"]["how"] == "freeze" and info["pause"]["memory"] is True
        assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "paused"
        # paused: commands, files and a new deadline are refused with the rule
        r = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "true"})
        assert r.status_code == 409 and r.json()["error"]["rule"] == "snapshot.state"
        r = api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f"})
        assert r.status_code == 409 and r.json()["error"]["rule"] == "snapshot.state"
        r = api.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout_s": 30})
        assert r.status_code == 409
        r = api.post(f"/v1/sandboxes/{sid}/pause")
        assert r.status_code == 409 and r.json()["error"]["rule"] == "snapshot.state"
        r = api.post(f"/v1/sandboxes/{sid}/snapshots", json={})
        assert r.status_code == 409

        r = api.post(f"/v1/sandboxes/{sid}/resume", json={"timeout_s": 45})
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["state"] == "running" and info["paused_at"] is None
        assert 43 < info["timeout_s"] <= 45
        r = api.post(f"/v1/sandboxes/{sid}/resume")
        assert r.status_code == 409 and r.json()["error"]["rule"] == "snapshot.state"
        r = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "cat /workspace/f"})
        assert r.json()["stdout"] == "hi\n"

        r = api.post(f"/v1/sandboxes/{sid}/pause", json={"memory": False})
        assert r.json()["pause"]["how"] == "files"
        r = api.post(f"/v1/sandboxes/{sid}/resume", json={})  # the time it had left
        assert r.status_code == 200 and r.json()["timeout_s"] > 30
        r = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "cat /workspace/f"})
        assert r.json()["stdout"] == "hi\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_v1_snapshots_and_fork(api: httpx.Client, serve: Server) -> None:
    sid = api.post("/v1/sandboxes", json={"timeout_s": 60}).json()["sandbox_id"]
    made: list[str] = []
    try:
        api.post(
            f"/v1/sandboxes/{sid}/commands",
            json={"command": "echo w > /workspace/w; echo t > /tmp/t"},
        )
        r = api.post(
            f"/v1/sandboxes/{sid}/snapshots", json={"name": "v1-snap", "include_tmp": True}
        )
        assert r.status_code == 201, r.text
        snap = r.json()
        assert snap["names"] == ["v1-snap"] and snap["sandbox_id"] == sid
        assert snap["tier"] == "namespaces" and snap["memory"] is False
        assert snap["memory_refused"] and snap["size_bytes"] > 0
        r = api.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True})
        assert r.status_code == 400 and r.json()["error"]["rule"] == "snapshot.memory"

        sn = snap["snapshot_id"]
        assert api.get(f"/v1/snapshots/{sn}").json() == snap
        assert [s["snapshot_id"] for s in api.get("/v1/snapshots").json()] == [sn]
        assert api.get("/v1/snapshots", params={"sandbox_id": sid}).json() == [snap]
        assert api.get("/v1/snapshots", params={"name": "nope"}).json() == []

        r = api.post("/v1/sandboxes", json={"snapshot": sn, "timeout_s": 30})
        assert r.status_code == 201, r.text
        child = r.json()
        made.append(child["sandbox_id"])
        assert child["snapshot"] == sn and child["parent"] == sid
        out = api.post(
            f"/v1/sandboxes/{child['sandbox_id']}/commands",
            json={"command": "cat /workspace/w /tmp/t"},
        ).json()
        assert out["stdout"] == "w\nt\n"

        r = api.post(f"/v1/sandboxes/{sid}/fork", json={"count": 2, "timeout_s": 30})
        assert r.status_code == 201, r.text
        forks = r.json()
        made += [f["sandbox_id"] for f in forks]
        assert len(forks) == 2 and all(f["parent"] == sid for f in forks)
        assert len({f["sandbox_id"] for f in forks} | {sid}) == 3
        for f in forks:
            out = api.post(
                f"/v1/sandboxes/{f['sandbox_id']}/commands", json={"command": "cat /workspace/w"}
            ).json()
            assert out["stdout"] == "w\n"

        assert api.delete(f"/v1/snapshots/{sn}").status_code == 204
        r = api.delete(f"/v1/snapshots/{sn}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = api.get(f"/v1/snapshots/{sn}")
        assert r.status_code == 404
        r = api.post("/v1/sandboxes", json={"snapshot": sn})
        assert r.status_code == 404
    finally:
        for s in [*made, sid]:
            api.delete(f"/v1/sandboxes/{s}")
    assert not serve.errors(), serve.errors()


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("pause", {"memory": "no"}, 422, "memory"),
        ("pause", {"memory": True, "extra": 1}, 422, "extra"),
        ("resume", {"timeout_s": -1}, 422, "timeout_s"),
        ("snapshots", {"name": "bad name!"}, 400, "name"),
        ("snapshots", {"name": ""}, 422, "name"),
        ("snapshots", {"include_tmp": 1}, 422, "include_tmp"),
        ("fork", {"count": 0}, 422, "count"),
        ("fork", {"count": 21}, 422, "count"),
        ("fork", {"count": True}, 422, "count"),
    ],
)
def test_v1_bad_input_names_the_field(
    api: httpx.Client, path: str, body: dict, status: int, field: str
) -> None:
    sid = api.post("/v1/sandboxes", json={"timeout_s": 60}).json()["sandbox_id"]
    try:
        r = api.post(f"/v1/sandboxes/{sid}/{path}", json=body)
        assert r.status_code == status, r.text
        assert field in r.json()["error"]["message"]
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_v1_create_from_snapshot_checks_its_input(api: httpx.Client) -> None:
    r = api.post("/v1/sandboxes", json={"snapshot": "snap-0000000000000000"})
    assert r.status_code == 404 and r.json()["error"]["rule"] == "snapshot.not_found"
    r = api.post("/v1/sandboxes", json={"snapshot": "../../etc"})
    assert r.status_code == 404
    r = api.post("/v1/sandboxes", json={"snapshot": "snap-00aa00aa", "template": "base"})
    assert r.status_code == 400 and r.json()["error"]["rule"] == "snapshot"
    r = api.post("/v1/sandboxes", json={"auto_pause": "yes"})
    assert r.status_code == 422
    assert api.post("/v1/sandboxes/sb-nope/pause").status_code == 404
    assert api.post("/v1/sandboxes/sb-nope/fork").status_code == 404


# -- limits, kept time, config ------------------------------------------------------------


@pytest.fixture
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose tenants may keep one snapshot, and a paused sandbox 2 s."""
    srv, server, th = start_server(
        tmp_path_factory.mktemp("tight"),
        snapshot_limits=SnapshotLimits(max_count=1, max_bytes=1 << 30, max_age_s=2),
    )
    try:
        yield srv
    finally:
        server.should_exit = True
        th.join(20)
        srv.service.close()


def test_limits_and_the_time_a_paused_sandbox_is_kept(tight: Server) -> None:
    with httpx.Client(base_url=tight.url, headers=tight.headers(), timeout=60) as c:
        sid = c.post("/v1/sandboxes", json={"timeout_s": 60}).json()["sandbox_id"]
        r = c.post(f"/v1/sandboxes/{sid}/snapshots", json={})
        assert r.status_code == 201
        r = c.post(f"/v1/sandboxes/{sid}/snapshots", json={})
        assert r.status_code == 429 and r.json()["error"]["rule"] == "snapshot.limit"
        # another tenant has its own limit
        bob = {"X-API-Key": tight.keys["bob"]}
        bsid = c.post("/v1/sandboxes", json={"timeout_s": 60}, headers=bob).json()["sandbox_id"]
        assert c.post(f"/v1/sandboxes/{bsid}/snapshots", json={}, headers=bob).status_code == 201
        c.delete(f"/v1/sandboxes/{bsid}", headers=bob)

        assert c.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
        info = c.get(f"/v1/sandboxes/{sid}").json()
        assert info["timeout_s"] <= 2  # kept paused at most max_age_s

        def gone() -> bool:
            return c.get(f"/v1/sandboxes/{sid}").status_code == 404

        _wait(gone, 8, "the paused sandbox to be destroyed")
    recs = [r for r in read_records(tight.cfg.audit_log) if r.get("sandbox") == sid]
    expired = [r for r in recs if r["event"] == "sandbox.expired"]
    assert expired and expired[0]["rule"] == "snapshots.max_age_s"
    assert expired[0]["details"]["paused"] is True
    _wait(
        lambda: any(
            r["event"] == "sandbox.destroyed"
            for r in read_records(tight.cfg.audit_log)
            if r.get("sandbox") == sid
        ),
        8,
        "sandbox.destroyed",
    )


def test_snapshots_table_in_serve_toml(tmp_path: Path) -> None:
    p = tmp_path / "serve.toml"
    p.write_text("[snapshots]\nmax_count = 3\nmax_bytes = 1048576\nmax_age_s = 60.5\n")
    cfg = ServeConfig.load(p)
    assert cfg.snapshot_limits == SnapshotLimits(max_count=3, max_bytes=1 << 20, max_age_s=60.5)
    assert cfg.snapshot_dir == cfg.data_dir / "snapshots"
    assert ServeConfig().snapshot_limits == SnapshotLimits()
    for bad, field in [
        ({"max_cont": 3}, "snapshots.max_cont"),
        ({"max_count": 0}, "snapshots.max_count"),
        ({"max_count": True}, "snapshots.max_count"),
        ({"max_bytes": 1.5}, "snapshots.max_bytes"),
        ({"max_age_s": float("nan")}, "snapshots.max_age_s"),
        ({"max_age_s": "7d"}, "snapshots.max_age_s"),
    ]:
        with pytest.raises(PolicyError) as ei:
            snapshot_limits(bad)
        assert ei.value.field == field, bad
    p.write_text('[snapshots]\nmax_age = "1w"\n')
    with pytest.raises(PolicyError) as ei:
        ServeConfig.load(p)
    assert "max_age" in str(ei.value) and "known" in str(ei.value)
