"""E2B's template build API: the unmodified ``e2b`` SDK's ``Template`` against a
real ``glassroom serve`` on 127.0.0.1 (docs/templates.md, "E2B's template
build API").

Harmless: a template built from a busybox store template with a copy, an env,
a workdir and a RUN step is ready, exists, is tagged, and ``Sandbox.create``
runs in it.  Malicious, in pairs: an upload holding a symlink, a ``..`` or an
absolute entry is a build error that writes nothing outside; a RUN that fails
names its step; another tenant can neither see, use, build into nor delete
the template; a deleted template is gone (exists false, create 404).
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from glassroom.audit import read_records
from glassroom.policy import validate_policy
from glassroom.templates import TemplateStore, import_oci
from glassroom.templates.testing import busybox_entries, docker_save_tar, scratch_store

from .serve_helpers import Server, serving_e2b

e2b = pytest.importorskip("e2b")
from e2b import BuildException, Sandbox, Template  # noqa: E402

RISK = {"namespaces": "low", "gvisor": "medium", "microvm": "high"}
#: E2B's SDK runs commands with ``/bin/bash -l -c``; busybox has no bash applet.
BASH = b'#!/bin/sh\nexec /bin/sh "$@"\n'


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    entries = busybox_entries(("sh", "cat", "echo", "ls", "true", "env", "mkdir", "sleep"))
    entries["bin/bash"] = (BASH, 0o755)
    entries["opt"] = None
    with scratch_store() as (store, base):
        import_oci(docker_save_tar(base / "img.tar", entries), store, "busy")
        with serving_e2b(base / "data") as srv:
            yield srv


def _ctx(files: dict[str, str | tuple[str, str]]) -> Path:
    """A build context dir: name -> text, or ("link", target)."""
    d = Path(tempfile.mkdtemp(prefix="glassroom-test-ctx-"))
    for name, v in files.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(v, tuple):
            os.symlink(v[1], p)
        else:
            p.write_text(v)
    return d


def _keyed(srv: Server, tenant: str) -> dict[str, Any]:
    return {"api_key": srv.keys[tenant]}


@pytest.fixture(scope="module")
def built(served: Server) -> dict[str, Any]:
    """``app``, built once with the SDK by alice."""
    ctx = _ctx({"hello.txt": "hi from copy\n", "data/a.txt": "A\n"})
    t = (
        Template(file_context_path=ctx)
        .from_template("busy")
        .copy("hello.txt", "/opt/app/")
        .copy("data", "/opt/data/", mode=0o755)
        .set_envs({"GREETING": "hello there"})
        .set_workdir("/opt/app")
        .run_cmd("sh -c 'echo built > /opt/marker' && echo done-run")
    )
    logs: list[Any] = []
    info = Template.build(t, "app", on_build_logs=logs.append)
    return {"info": info, "logs": [getattr(x, "message", str(x)) for x in logs]}


def test_the_sdk_builds_a_template_and_a_sandbox_runs_in_it(served: Server, built: Any) -> None:
    info = built["info"]
    assert info.name == "app" and info.tags == ["default"]
    assert any("done-run" in m for m in built["logs"]), built["logs"]
    assert Template.exists("app") is True
    assert Template.exists("no-such-template") is False
    tags = Template.get_tags(info.template_id)
    assert [x.tag for x in tags] == ["default"]
    status = Template.get_build_status(info, logs_offset=0)
    assert status.status.value == "ready" and status.log_entries

    sb = Sandbox.create("app", timeout=60)
    try:
        r = sb.commands.run("cat /opt/app/hello.txt /opt/marker /opt/data/a.txt; echo $GREETING")
        assert r.stdout == "hi from copy\nbuilt\nA\nhello there\n"
        assert sb.get_info().template_id == "app"
        # the template is read-only in the sandbox
        r = sb.commands.run("echo x > /opt/marker 2>&1 || echo refused")
        assert "refused" in r.stdout
    finally:
        sb.kill()
    recs = read_records(served.cfg.audit_log)
    assert any(r["event"] == "template.built" and r["details"]["name"].startswith("e2b-")
               for r in recs)  # fmt: skip
    assert any(r["event"] == "template.build_ready" and r["details"]["tenant"] == "alice"
               and r["details"]["name"] == "app" for r in recs)  # fmt: skip
    assert not served.errors(), served.errors()


def test_tags_assign_use_and_remove(served: Server, built: Any) -> None:
    tid = built["info"].template_id
    got = Template.assign_tags("app:default", ["stable", "v1"])
    assert sorted(got.tags) == ["stable", "v1"] and got.build_id == built["info"].build_id
    assert sorted(x.tag for x in Template.get_tags(tid)) == ["default", "stable", "v1"]
    sb = Sandbox.create("app:stable", timeout=60)
    try:
        assert sb.commands.run("cat /opt/marker").stdout == "built\n"
    finally:
        sb.kill()
    Template.remove_tags("app", ["stable", "v1"])
    assert [x.tag for x in Template.get_tags(tid)] == ["default"]
    with pytest.raises(e2b.SandboxException):
        Sandbox.create("app:stable", timeout=60)
    with pytest.raises(e2b.TemplateException):
        Template.remove_tags("app", "no-such-tag")


def test_the_built_template_on_every_tier(served: Server, built: Any, backend: str) -> None:
    """The built tree on each tier, through a serve template of the operator's
    (a tenant's own E2B templates take the base policy's tier)."""
    reg = _registry(served)
    found = reg.find("alice", "app")
    assert found is not None
    store_name = reg.tagged(*found).store_name
    served.cfg.templates[f"app-{backend}"] = validate_policy(
        {"risk": RISK[backend], "template": store_name, "tools": {"allow": ["sh", "cat"]}}
    )
    try:
        with httpx.Client(base_url=served.url, headers=served.headers(), timeout=300) as c:
            r = c.post("/v1/sandboxes", json={"template": f"app-{backend}", "timeout_s": 50})
            assert r.status_code == 201, r.text
            sid = r.json()["sandbox_id"]
            try:
                r = c.post(
                    f"/v1/sandboxes/{sid}/commands",
                    json={"argv": ["sh", "-c", "cat /opt/marker /opt/app/hello.txt"]},
                )
                assert r.json()["stdout"] == "built\nhi from copy\n", r.text
            finally:
                c.delete(f"/v1/sandboxes/{sid}")
    finally:
        del served.cfg.templates[f"app-{backend}"]


def _registry(srv: Server) -> Any:
    from glassroom.interfaces.e2b._template_build import manager

    return manager(srv.service).registry


# -- malicious ------------------------------------------------------------------------


def test_another_tenant_cannot_see_use_build_into_or_delete_it(served: Server, built: Any) -> None:
    info = built["info"]
    bob = _keyed(served, "bob")
    assert Template.exists("app", **bob) is False
    with pytest.raises(e2b.SandboxException) as ei:
        Sandbox.create("app", timeout=30, **bob)
    assert "not found" in str(ei.value)
    with pytest.raises(e2b.SandboxException):
        Sandbox.create(info.template_id, timeout=30, **bob)
    assert Sandbox.delete_snapshot(info.template_id, **bob) is False
    assert Sandbox.delete_snapshot("app", **bob) is False
    with pytest.raises(e2b.TemplateException):
        Template.get_tags(info.template_id, **bob)
    with pytest.raises(e2b.TemplateException):
        Template.assign_tags("app:default", "mine", **bob)
    # bob's from_template("app") is not alice's
    with pytest.raises(BuildException) as be:
        Template.build(Template().from_template("app").run_cmd("true"), "bobs", **bob)
    assert "neither a template of yours" in str(be.value)
    h = {"X-API-Key": served.keys["bob"]}
    tid, bid = info.template_id, info.build_id
    with httpx.Client(base_url=served.url, headers=h, timeout=30) as c:
        for method, path, body in [
            ("GET", f"/templates/{tid}/builds/{bid}/status", None),
            ("GET", f"/templates/{tid}/files/{'0' * 64}", None),
            ("POST", f"/v2/templates/{tid}/builds/{bid}", {"steps": [], "fromTemplate": "busy"}),
            ("GET", f"/templates/{tid}/tags", None),
            ("GET", "/templates/aliases/app", None),
        ]:
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (path, r.text)
            assert set(r.json()) == {"code", "message"}
        # nor by the store name, through the own API's inline policy
        reg = _registry(served)
        store_name = reg.tagged(*reg.find("alice", "app")).store_name
        r = c.post("/v1/sandboxes", json={"policy": {"template": store_name}})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["rule"] == "template"
    # bob's own template of the same name is another template
    bobs = Template.build(Template().from_template("busy").run_cmd("true"), "app", **bob)
    assert bobs.template_id != info.template_id
    assert Sandbox.delete_snapshot("app", **bob) is True
    assert Template.exists("app") is True  # alice's is untouched
    assert not served.errors(), served.errors()


def test_a_symlink_in_the_upload_is_a_build_error(served: Server) -> None:
    ctx = _ctx({"ok.txt": "fine\n", "evil": ("link", "/etc/shadow")})
    t = Template(file_context_path=ctx).from_template("busy").copy("evil", "/opt/")
    with pytest.raises(BuildException) as ei:
        Template.build(t, "linky")
    assert "is a symlink" in str(ei.value) and "step 1" in str(ei.value)
    assert not any(p.name == "evil" for p in _store_files(served))


def _tar_gz(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for ti in entries:
            b = data.get(ti.name)
            if b is not None:
                ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b) if b is not None else None)
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, link, 0o644
    return ti


def _store_files(srv: Server) -> list[Path]:
    """Every file of the server's data dir (os.walk: a build may be cleaning up)."""
    return [Path(d, f) for d, _, files in os.walk(srv.cfg.data_dir) for f in files]


def _raw_build(srv: Server, name: str, upload: bytes, steps: list[dict[str, Any]],
               tenant: str = "alice") -> dict[str, Any]:  # fmt: skip
    """The SDK's calls by hand, with an upload the SDK would not make."""
    h = {"X-API-Key": srv.keys[tenant]}
    with httpx.Client(base_url=srv.url, headers=h, timeout=60) as c:
        r = c.post("/v3/templates", json={"name": name})
        assert r.status_code == 202, r.text
        tid, bid = r.json()["templateID"], r.json()["buildID"]
        fh = "ab" * 32
        r = c.get(f"/templates/{tid}/files/{fh}")
        assert r.status_code == 201, r.text
        link = r.json()
        assert link["present"] is False
        r = httpx.put(link["url"], content=upload, headers=link["headers"])
        assert r.status_code == 200, r.text
        r = httpx.put(link["url"], content=upload, headers=link["headers"])
        assert r.status_code == 404, "an upload URL is single-use"
        for s in steps:
            s.setdefault("filesHash", fh)
        r = c.post(
            f"/v2/templates/{tid}/builds/{bid}",
            json={"fromTemplate": "busy", "steps": steps, "force": False},
        )
        assert r.status_code == 202, r.text
        end = time.monotonic() + 120
        while True:
            st = c.get(f"/templates/{tid}/builds/{bid}/status").json()
            if st["status"] in ("ready", "error"):
                return st
            assert time.monotonic() < end, st
            time.sleep(0.2)


@pytest.mark.parametrize("entry", [
    _entry("../escaped.txt"),
    _entry("x/../../escaped.txt"),
    _entry("/tmp/escaped.txt"),
    _entry("x/escaped.txt", tarfile.SYMTYPE, "/etc/passwd"),
    _entry("x/escaped.txt", tarfile.LNKTYPE, "../../../../etc/passwd"),
    _entry("x/escaped.txt", tarfile.FIFOTYPE),
    _entry("x/escaped.txt", tarfile.CHRTYPE),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo", "device"])  # fmt: skip
def test_a_malicious_upload_is_refused_and_writes_nothing_outside(
    served: Server, entry: tarfile.TarInfo
) -> None:
    before = set(_store_files(served))
    ok = _entry("x/ok.txt")
    up = _tar_gz([_entry("x", tarfile.DIRTYPE), ok, entry],
                 {"x/ok.txt": b"ok\n", entry.name: b"pwned\n"})  # fmt: skip
    st = _raw_build(served, "evil", up, [{"type": "COPY", "args": ["x", "/opt/x/"]}])
    assert st["status"] == "error", st
    assert st["reason"]["step"] == "1"
    msg = st["reason"]["message"]
    assert msg.startswith("step 1: COPY x: entry") and "refused" in msg, msg
    assert not Path("/tmp/escaped.txt").exists()
    assert not any(p.name == "escaped.txt" for p in set(_store_files(served)) - before)
    assert not any(Path(d).name == "escaped.txt" for d in os.listdir(Path(served.cfg.data_dir)))
    assert Sandbox.delete_snapshot("evil") is True


def test_a_failing_run_is_an_error_naming_its_step(served: Server) -> None:
    t = (Template().from_template("busy").set_envs({"A": "1"})
         .run_cmd("echo about to fail; echo oops >&2; exit 3"))  # fmt: skip
    with pytest.raises(BuildException) as ei:
        Template.build(t, "failing")
    msg = str(ei.value)
    assert msg.startswith("step 2: RUN exited 3") and "oops" in msg, msg
    reg = _registry(served)
    tpl, _ = reg.find("alice", "failing")
    b = next(iter(tpl.builds.values()))
    with httpx.Client(base_url=served.url, headers=served.headers(), timeout=30) as c:
        st = c.get(f"/templates/{tpl.id}/builds/{b.id}/status").json()
        assert st["status"] == "error" and st["reason"]["step"] == "2"
        assert any("about to fail" in e["message"] for e in st["logEntries"])
        # paging by logsOffset: the rest, then nothing
        n = len(st["logEntries"])
        assert c.get(f"/templates/{tpl.id}/builds/{b.id}/status",
                     params={"logsOffset": n}).json()["logEntries"] == []  # fmt: skip
    recs = read_records(served.cfg.audit_log)
    assert any(r["event"] == "template.build_failed" and r["details"]["name"] == "failing"
               for r in recs)  # fmt: skip
    with pytest.raises(e2b.SandboxException):
        Sandbox.create("failing", timeout=30)
    assert Sandbox.delete_snapshot("failing") is True


@pytest.mark.parametrize("make, want", [
    (lambda: Template().from_image("python:3"), "pulls from no registry"),
    (lambda: Template().from_debian_image("bookworm").run_cmd("true").apt_install("vim"),
     "apt and dpkg cannot run"),
    (lambda: Template().from_base_image(), "no 'base'"),
    (lambda: Template().from_template("busy").run_cmd("apt-get install -y vim", user="root"),
     "apt and dpkg cannot run"),
    (lambda: Template().from_template("busy").set_start_cmd("sleep 1", "true"),
     "no start or ready command"),
    (lambda: Template().from_template("e2b-nope"), "neither a template of yours"),
], ids=["registry-image", "debian-apt-late", "base-missing", "apt", "start-cmd", "e2b-store-name"])  # fmt: skip
def test_what_cannot_be_built_here_is_a_clear_error(served: Server, make: Any, want: str) -> None:
    with pytest.raises(BuildException) as ei:
        Template.build(make(), "refused")
    assert want in str(ei.value), str(ei.value)
    assert Sandbox.delete_snapshot("refused") is True


def test_bad_input_is_4xx_in_the_e2b_envelope(served: Server) -> None:
    with httpx.Client(base_url=served.url, headers=served.headers(), timeout=30) as c:
        r = c.post("/v3/templates", json={"name": "ok-name"})
        tid, bid = r.json()["templateID"], r.json()["buildID"]
        cases = [
            ("POST", "/v3/templates", {"name": "Bad Name!"}, 400),
            ("POST", "/v3/templates", {"name": "x" * 60}, 400),
            ("POST", "/v3/templates", {"name": "ok:bad tag"}, 400),
            ("POST", "/v3/templates", {"name": "base"}, 409),
            ("POST", "/v3/templates", {"name": "y", "cpuCount": 1000}, 400),
            ("POST", "/v3/templates", {"name": "y", "memoryMB": True}, 400),
            ("POST", "/v3/templates", {"name": "y", "tags": "notalist"}, 400),
            ("POST", "/v3/templates", [], 400),
            ("GET", f"/templates/{tid}/files/notahash", None, 400),
            ("GET", f"/templates/{tid}/builds/{bid}/status?logsOffset=-1", None, 400),
            ("GET", f"/templates/{tid}/builds/{bid}/status?level=loud", None, 400),
            ("GET", f"/templates/{tid}/builds/nope/status", None, 404),
            ("POST", f"/v2/templates/{tid}/builds/{bid}", {"steps": "x"}, 400),
            ("POST", "/templates/tags", {"target": "ok-name", "tags": []}, 400),
            ("DELETE", "/templates/tags", {"name": "ok-name", "tags": ["nope"]}, 404),
        ]
        for method, path, body, want in cases:
            r = c.request(method, path, json=body)
            assert r.status_code == want, (path, body, r.text)
            assert set(r.json()) == {"code", "message"}, r.text
        steps = [
            {"type": "ADD", "args": ["a", "b"]},
            {"type": "RUN", "args": []},
            {"type": "RUN", "args": ["x\0y"]},
            {"type": "ENV", "args": ["1BAD", "v"]},
            {"type": "ENV", "args": ["ODD"]},
            {"type": "COPY", "args": ["a", "/b"]},
            {"type": "COPY", "args": ["a", "/b"], "filesHash": "cd" * 32},
            {"type": "COPY", "args": ["a", "/b", "", "9x"], "filesHash": "ab" * 32},
        ]
        for s in steps:
            r = c.post("/v3/templates", json={"name": "ok-name"})
            tid, bid = r.json()["templateID"], r.json()["buildID"]
            r = c.post(
                f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "busy", "steps": [s]}
            )
            assert r.status_code == 400, (s, r.text)
            assert r.json()["message"].startswith("step 1:"), r.text
        r = c.post(f"/v2/templates/{tid}/builds/{bid}", json={"fromTemplate": "busy", "steps": []})
        assert r.status_code == 409, r.text  # started already (and failed)
        r = httpx.put(f"{served.url}/e2b-template-files/forged", content=b"x",
                      headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 404 and set(r.json()) == {"code", "message"}
        assert c.delete(f"/templates/{tid}").status_code == 204
    assert not served.errors(), served.errors()


def test_delete_removes_it(served: Server) -> None:
    info = Template.build(Template().from_template("busy").run_cmd("true"), "doomed")
    reg = _registry(served)
    store_name = reg.tagged(*reg.find("alice", "doomed")).store_name
    assert store_name in [t.name for t in TemplateStore().list()]
    assert Template.exists("doomed") is True
    assert Sandbox.delete_snapshot(info.template_id) is True
    assert Template.exists("doomed") is False
    with pytest.raises(e2b.SandboxException) as ei:
        Sandbox.create("doomed", timeout=30)
    assert "not found" in str(ei.value)
    assert store_name not in [t.name for t in TemplateStore().list()]
    assert Sandbox.delete_snapshot(info.template_id) is False
    recs = read_records(served.cfg.audit_log)
    assert any(r["event"] == "template.deleted" and r["details"]["name"] == "doomed"
               for r in recs)  # fmt: skip
    assert not served.errors(), served.errors()


def test_a_sandbox_outlives_its_deleted_template_then_the_tree_goes(served: Server) -> None:
    info = Template.build(Template().from_template("busy").run_cmd("echo v > /opt/v"), "inuse")
    reg = _registry(served)
    store_name = reg.tagged(*reg.find("alice", "inuse")).store_name
    sb = Sandbox.create("inuse", timeout=60)
    try:
        assert Sandbox.delete_snapshot(info.template_id) is True
        with pytest.raises(e2b.SandboxException):
            Sandbox.create("inuse", timeout=30)
        assert sb.commands.run("cat /opt/v").stdout == "v\n"  # its tree stays while it runs
        assert store_name in [t.name for t in TemplateStore().list()]
    finally:
        sb.kill()
    from glassroom.interfaces.e2b._template_build import GC_DELAY_S

    end = time.monotonic() + GC_DELAY_S + 10
    while store_name in [t.name for t in TemplateStore().list()]:
        assert time.monotonic() < end, "the deleted template's tree was not removed"
        time.sleep(0.2)


def test_the_registry_survives_a_restart(served: Server, built: Any) -> None:
    from glassroom.interfaces.e2b._template_registry import Registry

    reg = Registry(Path(served.cfg.data_dir) / "e2b-templates")
    found = reg.find("alice", "app")
    assert found is not None and found[0].id == built["info"].template_id
    assert reg.tagged(*found).store_name is not None
    assert reg.find("bob", "app") is None


def test_the_async_sdk_builds_too(served: Server) -> None:
    import asyncio

    from e2b import AsyncTemplate

    async def go() -> Any:
        t = AsyncTemplate().from_template("busy").set_envs({"X": "1"}).run_cmd("echo async")
        info = await AsyncTemplate.build(t, "asyncbuilt")
        assert await AsyncTemplate.exists("asyncbuilt") is True
        return info

    info = asyncio.run(go())
    assert Sandbox.delete_snapshot(info.template_id) is True
    assert Template.exists("asyncbuilt") is False


def test_the_build_queue_is_bounded(served: Server) -> None:
    from glassroom.interfaces.e2b._template_build import MAX_PENDING_PER_TENANT

    h = {"X-API-Key": served.keys["bob"]}
    started = []
    with httpx.Client(base_url=served.url, headers=h, timeout=60) as c:
        for i in range(MAX_PENDING_PER_TENANT + 1):
            r = c.post("/v3/templates", json={"name": f"slow{i}"})
            tid, bid = r.json()["templateID"], r.json()["buildID"]
            body = {"fromTemplate": "busy", "steps": [{"type": "RUN", "args": ["sleep 2"]}]}
            r = c.post(f"/v2/templates/{tid}/builds/{bid}", json=body)
            if i < MAX_PENDING_PER_TENANT:
                assert r.status_code == 202, r.text
                started.append((tid, bid))
            else:
                assert r.status_code == 429, r.text
                assert "rule template.build_queue" in r.json()["message"]
                assert c.delete(f"/templates/{tid}").status_code == 204
        end = time.monotonic() + 120
        for tid, bid in started:
            while c.get(f"/templates/{tid}/builds/{bid}/status").json()["status"] != "ready":
                assert time.monotonic() < end
                time.sleep(0.2)
            assert c.delete(f"/templates/{tid}").status_code == 204
    assert not served.errors(), served.errors()
