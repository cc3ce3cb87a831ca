"""E2B's template build API under attack: findings of a security review, each
a harmless/malicious pair against a real ``glassroom serve`` on 127.0.0.1.

Fixed with the review (these pass):

- a path too long for the file system (COPY source or destination, WORKDIR)
  was an unhandled OSError: a 500 (the connection dropped) or an "internal
  error" build with a traceback in the server log;
- a COPY source ``x/../..`` (normalised: ``..``) passed the "inside the
  context" check;
- a glob with many ``**`` made the worker's glob exponential (every more
  ``**`` about 6x on a 30-deep upload: a build that holds a worker for ever);
- every COPY step unpacked its upload with a budget of its own: one small
  gzip bomb named by 256 steps was 256 GiB on the server's disk;
- the template's ENV was unbounded (256 steps of 64 kB): the first command
  in a sandbox made from it killed the sandbox;
- concurrent starts of one build queued it twice (a traceback, an "internal
  error", and a status that went error then ready).

Fixed after the review, each asserting its refusal:

- a RUN step wrote into the staged tree, on the store's file system, with
  no bound but the per-file RLIMIT_FSIZE (disk_mib): now a tree grown past
  disk_mib in one step has that step killed, naming resources.disk_mib;
- two builds of one tenant held both workers (each RUN up to 30 min, no
  build deadline): now one build per tenant waits or runs, and a build's
  steps share one deadline;
- a built template ran under the built-in ``base``, not the operator's
  ``[templates.base]`` (its tier, resources, network): a tenant got from
  risk medium/high down to namespaces by building any template;
- cpuCount/memoryMB/minFreeDiskMB raised a tenant's sandboxes above the
  operator's ``base`` resources: now a 400 past what base gives.

Fixed too: $GLASSROOM_DEBIAN_MIRROR took a newline or "[trusted=yes]" into
apt's sources (the operator's input, but a signature check off).

Held (regression tests): another tenant's store template named by its store
name (fromTemplate, fromImage) is "neither a template of yours".
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from glassroom.templates import import_oci
from glassroom.templates.testing import busybox_entries, docker_save_tar, scratch_store

from .serve_helpers import Server, serving_e2b

pytest.importorskip("e2b")

BASH = b'#!/bin/sh\nexec /bin/sh "$@"\n'


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    entries = busybox_entries(("sh", "cat", "echo", "ls", "true", "mkdir", "sleep", "dd", "rm"))
    entries["bin/bash"] = (BASH, 0o755)
    entries["opt"] = None
    with scratch_store() as (store, base):
        import_oci(docker_save_tar(base / "img.tar", entries), store, "busy")
        with serving_e2b(base / "data") as srv:
            yield srv


def _tar(files: dict[str, bytes | None]) -> bytes:
    """A tar.gz: name -> bytes, or None for a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


FH = "cd" * 32


def _start(srv: Server, name: str, steps: list[dict[str, Any]], upload: bytes | None = None,
           tenant: str = "alice", **body: Any) -> tuple[httpx.Response, dict[str, str]]:  # fmt: skip
    """POST /v3/templates, the upload (if any), POST the build: its response."""
    h = {"X-API-Key": srv.keys[tenant]}
    with httpx.Client(base_url=srv.url, headers=h, timeout=60) as c:
        r = c.post("/v3/templates", json={"name": name, **body.pop("request", {})})
        assert r.status_code == 202, r.text
        ids = {"tid": r.json()["templateID"], "bid": r.json()["buildID"], "tenant": tenant}
        if upload is not None:
            link = c.get(f"/templates/{ids['tid']}/files/{FH}").json()
            assert (
                httpx.put(link["url"], content=upload, headers=link["headers"]).status_code == 200
            )
        for s in steps:
            if s["type"] == "COPY":
                s.setdefault("filesHash", FH)
        body.setdefault("fromTemplate", "busy")
        r = c.post(f"/v2/templates/{ids['tid']}/builds/{ids['bid']}", json={**body, "steps": steps})
        return r, ids


def _wait(srv: Server, ids: dict[str, str], timeout_s: float = 120) -> dict[str, Any]:
    h = {"X-API-Key": srv.keys[ids["tenant"]]}
    end = time.monotonic() + timeout_s
    with httpx.Client(base_url=srv.url, headers=h, timeout=60) as c:
        while True:
            st: dict[str, Any] = c.get(f"/templates/{ids['tid']}/builds/{ids['bid']}/status").json()
            if st["status"] in ("ready", "error") or time.monotonic() > end:
                return st
            time.sleep(0.2)


def _built(srv: Server, name: str, steps: list[dict[str, Any]], upload: bytes | None = None,
           **kw: Any) -> dict[str, Any]:  # fmt: skip
    r, ids = _start(srv, name, steps, upload, **kw)
    assert r.status_code == 202, r.text
    return _wait(srv, ids)


def _refused(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    msg = r.json()["message"]
    assert all(w in msg for w in words), msg


# -- fixed ----------------------------------------------------------------------------


def test_a_path_too_long_for_the_file_system_is_a_400_not_a_500(served: Server) -> None:
    up = _tar({"a.txt": b"a\n"})
    st = _built(
        served,
        "longpath",
        [
            {"type": "COPY", "args": ["a.txt", "/opt/" + "d" * 200 + "/"]},
            {"type": "WORKDIR", "args": ["/opt/" + "w" * 200]},
        ],
        up,
    )
    assert st["status"] == "ready", st
    for steps in (
        [{"type": "COPY", "args": ["a.txt", "/opt/" + "d" * 300]}],
        [{"type": "COPY", "args": ["a" * 300, "/opt/"]}],
        [{"type": "WORKDIR", "args": ["w" * 300]}],
        [{"type": "COPY", "args": ["a.txt", "/" + "d/" * 2100]}],
    ):
        r, _ = _start(served, "longpath", steps, up)
        _refused(r, "step 1", "each of its names at most 255")
    assert not served.errors(), served.errors()


def test_a_copy_source_that_normalises_to_dotdot_is_refused(served: Server) -> None:
    up = _tar({"x": None, "x/a.txt": b"a\n"})
    st = _built(served, "dotdot", [{"type": "COPY", "args": ["x/../x/a.txt", "/opt/"]}], up)
    assert st["status"] == "ready", st
    for src in ("x/../..", "x/y/../../..", "./.."):
        r, _ = _start(served, "dotdot", [{"type": "COPY", "args": [src, "/opt/"]}], up)
        _refused(r, "step 1", "a path inside the context")


def test_a_glob_with_many_double_stars_is_refused(served: Server) -> None:
    """``**/**/**/**/**/z`` over a 30-deep upload: ~46,000 matches of one file,
    each copied, ~40 s; each more ``**`` six times that."""
    deep = {"d/" * n: None for n in range(1, 31)}
    up = _tar({**{k.rstrip("/"): v for k, v in deep.items()}, "d/" * 30 + "z": b"z\n"})
    st = _built(served, "globs", [{"type": "COPY", "args": ["**/z", "/opt/g/"]}], up)
    assert st["status"] == "ready", st
    r, _ = _start(served, "globs", [{"type": "COPY", "args": ["**/" * 5 + "z", "/opt/g/"]}], up)
    _refused(r, "step 1", "at most one '**'")


def test_the_copy_steps_of_a_build_share_one_unpack_budget(
    served: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One upload named by many COPY steps is unpacked once per step."""
    from glassroom.interfaces.e2b import _template_build

    monkeypatch.setattr(_template_build, "MAX_UNPACKED_BYTES", 3000)
    up = _tar({"big.bin": b"\0" * 1000})
    copy = {"type": "COPY", "args": ["big.bin", "/opt/"]}
    st = _built(served, "bomb", [dict(copy), dict(copy)], up)
    assert st["status"] == "ready", st
    st = _built(served, "bomb", [dict(copy) for _ in range(4)], up)
    assert st["status"] == "error", st
    assert st["reason"]["step"] == "4", st
    assert "unpacks to more than" in st["reason"]["message"], st


def test_the_template_env_is_bounded(served: Server) -> None:
    """40 ENV values of 60 kB: ready, and the first command killed the sandbox."""
    st = _built(served, "envs", [{"type": "ENV", "args": [f"V{i}", "x" * 1000]} for i in range(8)])
    assert st["status"] == "ready", st
    steps = [{"type": "ENV", "args": [f"V{i}", "x" * 60000]} for i in range(40)]
    r, _ = _start(served, "envs", steps)
    _refused(r, "step 2", "ENV would be over 65536 bytes")


def test_concurrent_starts_of_one_build_queue_it_once(served: Server) -> None:
    """Four POSTs of one build at once: two were queued, one of them failed
    on the other's context dir (FileExistsError, "internal error" and a
    traceback), and the build went error, then ready."""
    import threading

    h = {"X-API-Key": served.keys["alice"]}
    with httpx.Client(base_url=served.url, headers=h, timeout=60) as c:
        r = c.post("/v3/templates", json={"name": "twice"})
        ids = {"tid": r.json()["templateID"], "bid": r.json()["buildID"], "tenant": "alice"}
    codes: list[int] = []

    def start() -> None:
        with httpx.Client(base_url=served.url, headers=h, timeout=60) as c:
            r = c.post(f"/v2/templates/{ids['tid']}/builds/{ids['bid']}",
                       json={"fromTemplate": "busy", "steps": [
                           {"type": "RUN", "args": ["sleep 1; echo once"]}]})  # fmt: skip
            codes.append(r.status_code)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(codes) == [202, 409, 409, 409], codes
    st = _wait(served, ids)
    assert st["status"] == "ready", st
    assert sum(e["message"] == "once" for e in st["logEntries"]) == 1, st["logEntries"]
    assert not served.errors(), served.errors()


# -- held -----------------------------------------------------------------------------


def test_another_tenants_store_template_is_no_base_by_its_store_name(served: Server) -> None:
    from glassroom.interfaces.e2b._template_build import manager

    st = _built(served, "mine", [{"type": "RUN", "args": ["echo secret > /opt/s"]}])
    assert st["status"] == "ready", st
    reg = manager(served.service).registry
    found = reg.find("alice", "mine")
    assert found is not None
    store_name = reg.tagged(*found).store_name
    assert store_name and store_name.startswith("e2b-")
    st = _built(served, "bobs", [{"type": "RUN", "args": ["true"]}], tenant="bob")
    assert st["status"] == "ready", st  # bob builds on the store's own templates
    for body in ({"fromTemplate": store_name}, {"fromImage": store_name},
                 {"fromImage": f"docker.io/library/{store_name}:latest"},
                 {"fromTemplate": found[0].id}, {"fromTemplate": "mine:default"}):  # fmt: skip
        kw = {"fromTemplate": None, **body}
        r, _ = _start(served, "bobs", [{"type": "RUN", "args": ["cat /opt/s"]}], tenant="bob", **kw)
        assert r.status_code == 400, (body, r.text)
        msg = r.json()["message"]
        assert "neither a template of yours" in msg or "the template store has no" in msg, msg
        assert "e2b-" not in msg.replace(store_name, ""), msg  # the store's list hides them
    assert not served.errors(), served.errors()


# -- open -----------------------------------------------------------------------------


def test_a_run_step_cannot_write_more_than_the_build_disk(
    served: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged tree is on the store's file system, bound read-write: only a
    file's size is bounded (RLIMIT_FSIZE, disk_mib); with disk_mib 4096, two
    files of 2.6 GB were written by one step.  Here disk_mib is 16."""
    from glassroom.templates import _build

    monkeypatch.setitem(_build.BUILD_RESOURCES, "disk_mib", 16)
    st = _built(served, "disk", [{"type": "RUN", "args": [
        "dd if=/dev/zero of=/opt/a bs=1M count=8 2>/dev/null"]}])  # fmt: skip
    assert st["status"] == "ready", st
    st = _built(
        served,
        "disk",
        [
            {
                "type": "RUN",
                "args": [
                    "for i in 1 2 3 4; do dd if=/dev/zero of=/opt/f$i bs=1M count=12 2>/dev/null; done"
                ],
            }
        ],
    )
    assert st["status"] == "error", st
    assert st["reason"]["step"] == "1" and "disk" in st["reason"]["message"], st


def test_one_tenant_cannot_hold_every_build_worker(served: Server) -> None:
    slow = [{"type": "RUN", "args": ["sleep 20"]}]
    r1, a1 = _start(served, "slow1", [dict(s) for s in slow])
    r2, _ = _start(served, "slow2", [dict(s) for s in slow])
    assert r1.status_code == 202, r1.text
    assert r2.status_code == 429 and "at most 1 per tenant" in r2.json()["message"], r2.text
    time.sleep(2)
    try:
        t0 = time.monotonic()
        r, ids = _start(served, "quick", [{"type": "RUN", "args": ["true"]}], tenant="bob")
        assert r.status_code == 202, r.text
        st = _wait(served, ids, timeout_s=40)
        assert st["status"] == "ready", st
        assert time.monotonic() - t0 < 15, "bob's build waited for alice's two"
    finally:
        _wait(served, a1, 60)


def test_build_resources_cannot_exceed_the_operators_base(served: Server) -> None:
    h = {"X-API-Key": served.keys["alice"]}
    with httpx.Client(base_url=served.url, headers=h, timeout=30) as c:
        r = c.post("/v3/templates", json={"name": "sized", "cpuCount": 1, "memoryMB": 512})
        assert r.status_code == 202, r.text
        for body in ({"cpuCount": 4}, {"memoryMB": 4096}, {"minFreeDiskMB": 8192}):
            r = c.post("/v3/templates", json={"name": "sized", **body})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["message"].startswith(next(iter(body))), r.text


@pytest.mark.parametrize("mirror", [
    "http://127.0.0.1:9/debian bookworm main\ndeb [trusted=yes] http://127.0.0.1:9/evil",
    "http://127.0.0.1:9/debian [trusted=yes]",
    "http://127.0.0.1:9/debian/[trusted=yes]",
    "file:///srv/mirror",
    "http://user:secret@127.0.0.1:9/debian",
])  # fmt: skip
def test_the_debian_mirror_override_is_one_url(
    mirror: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$GLASSROOM_DEBIAN_MIRROR is one line of apt's sources in mmdebstrap's
    argv: a newline or a "[...]" added entries, or trusted=yes (no signature
    check).  Fixed with the review (templates/_debian.py sources_for)."""
    from glassroom._errors import TemplateError
    from glassroom.templates import _debian

    monkeypatch.setenv("GLASSROOM_DEBIAN_MIRROR", "http://[::1]:9/debian/")
    assert [s.line() for s in _debian.sources_for("bookworm")] == [
        "deb http://[::1]:9/debian bookworm main"
    ]
    monkeypatch.setenv("GLASSROOM_DEBIAN_MIRROR", mirror)
    with pytest.raises(TemplateError, match="an http:// or https:// URL"):
        _debian.sources_for("bookworm")


def test_a_built_template_runs_under_the_operators_base(served: Server) -> None:
    """The operator's ``[templates.base]`` (here: risk medium, so gVisor, and
    256 MiB) is what ``Sandbox.create("base")`` gets; a tenant's own template
    built on it ran under the built-in base instead (risk low: namespaces)."""
    from glassroom.policy import validate_policy

    saved = served.cfg.templates["base"]
    raw = saved.model_dump()
    raw["risk"] = "medium"
    raw["resources"] = {**raw["resources"], "memory_mib": 256}
    served.cfg.templates["base"] = validate_policy(raw)
    h = {"X-API-Key": served.keys["alice"]}
    try:
        st = _built(served, "tiered", [{"type": "RUN", "args": ["true"]}])
        assert st["status"] == "ready", st
        with httpx.Client(base_url=served.url, headers=h, timeout=120) as c:
            for tpl in ("base", "tiered"):
                r = c.post("/sandboxes", json={"templateID": tpl, "timeout": 30})
                assert r.status_code == 201, r.text
                sid = r.json()["sandboxID"]
                try:
                    (e,) = [e for e in served.service.live() if e.id == sid]
                    assert e.sb.policy.risk == "medium", (tpl, e.sb.policy.risk)
                    assert e.sb.policy.resources.memory_mib == 256, tpl
                finally:
                    c.delete(f"/sandboxes/{sid}")
    finally:
        served.cfg.templates["base"] = saved
