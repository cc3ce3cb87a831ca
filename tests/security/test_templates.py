"""A template as the sandbox's ``/`` never weakens a wall (issue 15).

The template is made here from an OCI image the test builds (a static
busybox, a script, an os-release; no registry is reachable).  Harmless: the
task runs the template's tools under its env, reads its files, writes
/workspace.  Malicious, each checked with its exact error: writing into the
template (read-only), running a template file that tools.allow does not
list (Landlock, exit 126), reading or running the host's /usr that the init
needs (hidden: no Landlock rule), a setuid bit planted in the store (no
effect, and verify names the change), the network (still none): on every
tier (the microVM boots a root image made from the template).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import records
from glassroom import PlanError, Sandbox, TemplateError
from glassroom.templates import TemplateStore, build, import_oci, load_recipe
from glassroom.templates.testing import busybox_entries, docker_save_tar, scratch_store

APPLETS = ("sh", "ls", "cat", "echo", "id", "touch", "wget")
TOOLS = ["sh", "ls", "cat", "echo", "id", "touch"]
#: A Dockerfile-subset recipe on top of the imported image: a COPY, an ENV
#: and a RUN (in a build sandbox); the same pairs run on what it makes.
RECIPE = """\
FROM busy
COPY note.txt /opt/note.txt
ENV BUILT=yes
RUN echo made-by-run > /opt/run.txt
"""


def _image(dest: Path) -> Path:
    entries = busybox_entries(APPLETS)
    entries.update({
        "etc/os-release": b"ID=busy\n",
        "usr/bin/evil": (b"#!/bin/sh\necho evil ran\n", 0o755),
        "opt/suid": (b"x", 0o4755),
    })  # fmt: skip
    return docker_save_tar(dest, entries,
                           env={"PATH": "/bin:/usr/bin", "FROM_IMAGE": "yes", "HOME": "/root"})


@pytest.fixture(scope="module")
def store() -> Iterator[TemplateStore]:
    with scratch_store() as (s, base):
        t = import_oci(_image(base / "img.tar"), s, "busy")
        assert t.meta.dropped == {"setuid/setgid bits": 1}
        (base / "recipe").mkdir()
        (base / "recipe" / "note.txt").write_text("copied\n")
        (base / "recipe" / "Dockerfile").write_text(RECIPE)
        build(load_recipe(base / "recipe" / "Dockerfile"), s, "built",
              audit_log=base / "build.jsonl")  # fmt: skip
        yield s


TIERS = ["namespaces", "gvisor", "microvm"]


@pytest.fixture(params=["busy", "built"])
def name(request: pytest.FixtureRequest) -> str:
    """The imported template, and the one the recipe built from it."""
    return str(request.param)


def policy(name: str, *extra: str) -> dict[str, object]:
    return {"template": name, "tools": {"allow": [*TOOLS, *extra]}}
HOST_PY = "/.glassroom-host" + os.path.realpath("/usr/bin/python3")  # as the sandbox sees it


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_task_runs_in_the_template(
    store: TemplateStore, name: str, audit_log: Path, tier: str
) -> None:
    with Sandbox(policy(name), audit_log=audit_log, backend=tier) as sb:
        r = sb.run(["sh", "-c", "cat /etc/os-release; echo $PATH $FROM_IMAGE $HOME; id -u; "
                    "sh /usr/bin/evil; echo out > /workspace/o; cat /workspace/o; ls /"])  # fmt: skip
        sid = sb.id
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    # the image's PATH and variables apply; HOME stays glassroom's
    assert lines[:4] == ["ID=busy", "/bin:/usr/bin yes /workspace", "1000", "evil ran"]
    assert lines[4] == "out"
    assert "usr" in lines and "workspace" in lines and "opt" in lines
    created = next(x for x in records(audit_log, sid) if x["event"] == "sandbox.created")
    t = store.get(name)
    assert created["details"]["template"] == f"{name}@{t.digest}"
    if name == "built":  # what the recipe's COPY, ENV and RUN made
        with Sandbox(policy(name), backend=tier) as sb:
            r = sb.run(["sh", "-c", "cat /opt/note.txt /opt/run.txt; echo $BUILT"])
        assert r.stdout == "copied\nmade-by-run\nyes\n", r.stderr


# namespaces: a read-only bind; gVisor: its gofer refuses the write to a ro mount;
# microVM: the guest's read-only root disk
RO_ERROR = {"namespaces": "Read-only file system", "gvisor": "Permission denied",
            "microvm": "Read-only file system"}  # fmt: skip


def test_the_template_is_read_only(store: TemplateStore, name: str, tier: str) -> None:
    t = store.get(name)
    with Sandbox(policy(name), backend=tier) as sb:
        r = sb.run(["sh", "-c", "echo x > /etc/os-release"])
        assert r.exit_code != 0 and RO_ERROR[tier] in r.stderr, r.stderr
        r = sb.run(["touch", "/bin/new"])
        assert r.exit_code != 0 and RO_ERROR[tier] in r.stderr, r.stderr
    assert (t.rootfs / "etc" / "os-release").read_text() == "ID=busy\n"
    store.verify(name)


def test_a_template_file_not_in_tools_allow_does_not_run(
    store: TemplateStore, name: str, audit_log: Path, tier: str
) -> None:
    with Sandbox(policy(name), audit_log=audit_log, backend=tier) as sb:
        ok = sb.run(["sh", "/usr/bin/evil"])  # reading it is fine
        r = sb.run(["sh", "-c", "/usr/bin/evil"])
    assert ok.exit_code == 0 and ok.stdout == "evil ran\n"
    assert r.exit_code == 126 and "Permission denied" in r.stderr


def test_the_hosts_usr_for_the_init_is_hidden(store: TemplateStore, name: str, tier: str) -> None:
    """namespaces and microVM: neither readable nor runnable (no Landlock rule;
    on the microVM it is the copy of the host's python3 runtime in its image).
    gVisor has no Landlock: with the Python init the host's installed software
    there is readable, as it is on that tier without a template (/usr is
    required), but nothing in it runs.  The compiled init (either tier) is
    static: the host's /usr is not there at all."""
    with Sandbox(policy(name), backend=tier) as sb:
        compiled = sb.walls.get("init") == "compiled" if tier != "microvm" else False
        r = sb.run(["sh", "-c", "cat /.glassroom-host/usr/lib/python3.11/os.py"])
        if compiled:  # the static init needs none of the host's /usr: not even there
            assert r.exit_code != 0 and "No such file or directory" in r.stderr, r.stderr
        elif tier == "gvisor":
            assert r.exit_code == 0 and "OS routines" in r.stdout
        else:
            assert r.exit_code != 0 and "Permission denied" in r.stderr, r.stderr
        r = sb.run(["sh", "-c", f"{HOST_PY} -c 1"])
        if compiled:
            assert r.exit_code == 127 and "not found" in r.stderr, r.stderr
        else:
            assert r.exit_code == 126 and "Permission denied" in r.stderr
        r = sb.run(["python3", "-c", "1"])  # the template has none: the host's is not used
        assert r.exit_code == 127 and r.stderr == "glassroom: python3: command not found\n"


def test_a_planted_setuid_bit_has_no_effect(store: TemplateStore, name: str, tier: str) -> None:
    t = store.get(name)
    assert stat.S_IMODE((t.rootfs / "opt" / "suid").stat().st_mode) & 0o6000 == 0  # dropped
    bb = t.rootfs / "bin" / "busybox"
    mode = stat.S_IMODE(bb.stat().st_mode)
    os.chmod(bb, mode | 0o4000)  # a host root tampers with the store
    try:
        with Sandbox(policy(name), backend=tier) as sb:
            r = sb.run(["id"])
        # (named "agent" where glassroom could name it: this template has no /etc/passwd)
        assert r.exit_code == 0 and re.match(r"uid=1000(\(agent\))? gid=1000", r.stdout), r.stdout
        assert "euid" not in r.stdout
        with pytest.raises(TemplateError) as info:
            store.verify(name)
        assert info.value.rule == "template.integrity"
    finally:
        os.chmod(bb, mode)
    store.verify(name)


def test_the_network_is_still_none(store: TemplateStore, name: str, tier: str) -> None:
    with Sandbox(policy(name, "wget"), backend=tier) as sb:
        r = sb.run(["wget", "-q", "-T", "3", "-O", "-", "http://127.0.0.1:9/"])
    assert r.exit_code != 0  # loopback of its own net namespace: nothing there


def test_an_unknown_template_is_refused(store: TemplateStore) -> None:
    with pytest.raises(PlanError) as info:
        Sandbox(policy("nope"))
    assert info.value.rule == "template"
    assert str(info.value) == "template: template 'nope' was not found (known: built, busy)"


def test_a_tree_given_ld_so_preload_after_import_is_refused(
    store: TemplateStore, name: str, tier: str
) -> None:
    """The host's loader that starts the init would read it before any wall
    is up; the store strips it at every commit (test_templates_oci.py), and a
    tree changed on disk since is refused at compile time on every tier."""
    t = store.get(name)
    etc = t.rootfs / "etc"
    os.chmod(etc, 0o755)
    (etc / "ld.so.preload").write_text("/opt/suid\n")
    try:
        with pytest.raises(PlanError) as info:
            Sandbox({**policy(name), "risk": {"namespaces": "low", "gvisor": "medium",
                                             "microvm": "high"}[tier]}, backend=tier)  # fmt: skip
        assert info.value.rule == "template"
        assert "holds /etc/ld.so.preload" in str(info.value)
    finally:
        (etc / "ld.so.preload").unlink()
        os.chmod(etc, 0o555)


def test_a_loader_path_that_leads_out_of_the_template_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tool whose PT_INTERP, resolved in the tree, is ``/`` (or a name of
    glassroom's own) would have Landlock grant execute on all of it."""
    base = Path(tempfile.mkdtemp(prefix="glassroom-test-tpl-interp-"))
    try:
        os.chmod(base, 0o755)
        s = TemplateStore(base / "store")
        true = os.path.realpath("/usr/bin/true")  # dynamic: PT_INTERP /lib64/ld-linux-x86-64.so.2
        entries = {"bin/true": (Path(true).read_bytes(), 0o755),
                   "lib64/ld-linux-x86-64.so.2": ("link", "/")}  # fmt: skip
        import_oci(docker_save_tar(base / "i.tar", entries), s, "interp")  # type: ignore[arg-type]
        monkeypatch.setenv("GLASSROOM_TEMPLATE_DIR", str(s.root))
        with pytest.raises(PlanError) as info:
            Sandbox({"template": "interp", "tools": {"allow": ["true"]}})
        assert info.value.rule == "tools.allow[0]"
        assert "which is not a regular file of the template" in str(info.value)
    finally:
        shutil.rmtree(base, ignore_errors=True)
