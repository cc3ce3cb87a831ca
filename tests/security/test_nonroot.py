"""The walls hold when glassroom itself does NOT run as root.

The pyenv interpreter lives under /root (0700), so an unprivileged process
cannot exec it.  Instead the test imports everything it needs, prepares a
delegated cgroup parent, a state dir and an audit dir owned by uid 65534 (as
root), then forks; the child drops to 65534 for good and drives glassroom from
there, writing its observations as JSON to a pipe.  The parent asserts.

Helpers are local to this file on purpose (tests/conftest.py is owned elsewhere).
"""

from __future__ import annotations

import contextlib
import ctypes  # noqa: F401  - pre-imported for the unprivileged child
import errno
import json
import os
import secrets
import select
import shutil
import signal
import subprocess  # noqa: F401
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import glassroom
import glassroom.audit
import glassroom.backends.namespaces
import glassroom.lifecycle.reaper
import glassroom.policy
from conftest import build_compiled_init
from glassroom import Sandbox, WallError
from glassroom._sys import cgroups, proc

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root to prepare delegation and drop to 65534"
    ),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

NOBODY = 65534
CONTROLLERS = ("memory", "pids", "cpu", "freezer")
CHILD_TIMEOUT_S = 120.0

POLICY = {"tools": {"allow": ["sh", "python3", "cat", "true", "sleep", "echo"]}}

SYSCALLS = r"""
import ctypes, json, os, time
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    ctypes.set_errno(0)
    r = fn(*args)
    return [r, ctypes.get_errno()]
out = {"getpid": call(libc.getpid)}
pid = os.fork()
if pid == 0:
    time.sleep(5)
    os._exit(0)
out["kill0_child"] = call(libc.kill, pid, 0)
out["ptrace_attach_child"] = call(libc.ptrace, 16, pid, None, None)   # PTRACE_ATTACH
out["mount_tmpfs"] = call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None)
out["unshare_user"] = call(libc.unshare, 0x10000000)                   # CLONE_NEWUSER
out["unshare_mount"] = call(libc.unshare, 0x00020000)                  # CLONE_NEWNS
os.kill(pid, 9)
os.waitpid(pid, 0)
print(json.dumps(out))
"""

WRITE_OUT = r"""
import errno, json, sys
out = {}
for path in sys.argv[1:]:
    try:
        with open(path, "w") as f:
            f.write("x")
        out[path] = "written"
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""


# -- helpers -------------------------------------------------------------------


@dataclass
class Setup:
    root: Path
    state: Path
    audit: Path
    parent: str
    canary: Path
    secret: str
    made: list[str]


def _mounts() -> list[str]:
    lay = cgroups.layout()
    return sorted({lay[c][1] for c in CONTROLLERS if c in lay})


def _delegate(parent: str, uid: int) -> list[str]:
    """What cgroup delegation means on v1/v2: a parent dir the user may fill."""
    made = []
    for mount in _mounts():
        d = os.path.join(mount, parent)
        os.mkdir(d)
        made.append(d)
        os.chown(d, uid, uid)
        for name in ("cgroup.procs", "tasks", "cgroup.subtree_control"):
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(d, name), uid, uid)
    return made


def _undelegate(made: list[str]) -> None:
    for d in made:
        parent = os.path.basename(d)
        for name in cgroups.list_names(parent):
            with contextlib.suppress(Exception):
                cs = cgroups.CgroupSet.open(name, parent=parent)
                cs.kill_all(timeout=5.0)
                cs.remove()
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _owned_dir(path: Path, uid: int, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


@pytest.fixture
def nonroot() -> Iterator[Setup]:
    # Warm every lazy import (pydantic validators, libseccomp via ctypes, ...)
    # while still root: the child cannot read the interpreter's tree under /root.
    warm_root = Path(tempfile.mkdtemp(prefix="gr-nonroot-warm-"))
    os.chmod(warm_root, 0o755)
    warm_parent = f"gr-test-nonroot-warm-{secrets.token_hex(4)}"
    saved = {k: os.environ.get(k) for k in ("GLASSROOM_STATE_DIR", "GLASSROOM_CGROUP_PARENT")}
    os.environ["GLASSROOM_STATE_DIR"] = str(warm_root / "state")
    os.environ["GLASSROOM_CGROUP_PARENT"] = warm_parent
    try:
        build_compiled_init(warm_root / "state")  # the init the tests below run
        with Sandbox(POLICY, audit_log=warm_root / "audit.jsonl") as sb:
            sb.run(["true"])
            sb.run(["/usr/bin/id"])  # the exec-denied path
            sb.files.write("/workspace/w", "w")
            sb.files.list("/workspace")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for m in _mounts():
            for name in cgroups.list_names(warm_parent):
                with contextlib.suppress(Exception):
                    cs = cgroups.CgroupSet.open(name, parent=warm_parent)
                    cs.kill_all(timeout=5.0)
                    cs.remove()
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(m, warm_parent))
        shutil.rmtree(warm_root, ignore_errors=True)

    root = Path(tempfile.mkdtemp(prefix="gr-nonroot-"))
    os.chmod(root, 0o755)
    secret = "canary-" + secrets.token_hex(8)
    canary = root / "host-canary.txt"
    canary.write_text(secret)
    os.chmod(canary, 0o644)  # readable by 65534 on the host: only the sandbox wall hides it
    parent = f"gr-test-nonroot-{secrets.token_hex(4)}"
    made: list[str] = []
    try:
        made = _delegate(parent, NOBODY)
        state = _owned_dir(root / "state", NOBODY)
        build_compiled_init(state)  # the session's choice of init, for 65534 too
        yield Setup(
            root=root,
            state=state,
            audit=_owned_dir(root / "audit", NOBODY) / "audit.jsonl",
            parent=parent,
            canary=canary,
            secret=secret,
            made=made,
        )
    finally:
        _undelegate(made)
        shutil.rmtree(root, ignore_errors=True)


def _as_nobody(env: dict[str, str], body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child that is uid/gid 65534 for good; return its JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            os.chdir("/")
            os.environ.update(env)
            try:
                out = body()
            except BaseException as exc:
                out = {"_crash": f"{type(exc).__name__}: {exc}", "_tb": traceback.format_exc()}
            data = json.dumps(out, default=str).encode()
            while data:
                data = data[os.write(w, data) :]
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    buf = b""
    end = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while True:
            left = end - time.monotonic()
            ready, _, _ = select.select([r], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"unprivileged child did not answer in {CHILD_TIMEOUT_S:g}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(r)
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
    assert buf, f"child exited (status {status}) without a report"
    report: dict[str, Any] = json.loads(buf)
    assert "_crash" not in report, report.get("_tb", report)
    return report


def _env(s: Setup, parent: str | None = None) -> dict[str, str]:
    return {
        "GLASSROOM_STATE_DIR": str(s.state),
        "GLASSROOM_AUDIT_LOG": str(s.audit),
        "GLASSROOM_CGROUP_PARENT": parent or s.parent,
    }


def _write_out_opens(audit: Path) -> list[list[Any]]:
    """[decision, rule, path, result] of each logged open of WRITE_OUT's two paths."""
    return [
        [rec["decision"], rec["rule"], rec["details"]["path"], rec["details"]["result"]]
        for rec in glassroom.audit.read_records(audit)
        if rec.get("event") == "file.open" and rec["details"]["path"].startswith(
            ("/workspace/ok", "/usr/gr-evil"))
    ]  # fmt: skip


def _status_fields(text: str, *names: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[key] = value.strip()
    return out


# -- the walls, as nobody -------------------------------------------------------


def test_walls_hold_when_glassroom_is_not_root(nonroot: Setup) -> None:
    s = nonroot
    evil = [f"/usr/gr-evil-{secrets.token_hex(4)}", f"/gr-evil-{secrets.token_hex(4)}",
            f"/etc/gr-evil-{secrets.token_hex(4)}", str(s.root / "gr-evil")]  # fmt: skip

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {"euid": os.geteuid(), "egid": os.getegid()}
        out["host_can_read_canary"] = Path(s.canary).read_text() == s.secret
        with Sandbox(POLICY) as sb:
            out["id"] = sb.id
            out["cgroup_paths"] = list(sb.walls["cgroups"]["paths"])

            def run(*argv: str) -> dict[str, Any]:
                r = sb.run(list(argv), timeout_s=30)
                return {
                    "exit": r.exit_code,
                    "stdout": r.stdout,
                    "stderr": r.stderr,
                    "blocked": [b.rule for b in r.blocked],
                }

            out["harmless_print"] = run("python3", "-c", "print(6 * 7)")
            out["write_workspace"] = run("python3", "-c", WRITE_OUT, "/workspace/ok", "/tmp/ok")
            out["write_outside"] = run("python3", "-c", WRITE_OUT, *evil)
            out["exec_allowed"] = run("cat", "/proc/self/status")
            out["exec_not_allowed"] = run("/usr/bin/id")
            out["exec_not_allowed_from_shell"] = run("sh", "-c", "/usr/bin/id")
            out["syscalls"] = run("python3", "-c", SYSCALLS)
            sb.files.write("/workspace/mine.txt", "mine")
            out["read_own"] = run("cat", "/workspace/mine.txt")
            out["read_canary"] = run("cat", str(s.canary))
            out["canary_dir_listing"] = run("sh", "-c", f"echo {s.root}/*")
            out["status"] = run("cat", "/proc/self/status")
            out["uid_map_inside"] = run("cat", "/proc/self/uid_map")

            # The host's view of the sandbox's processes while one is running.
            cs = cgroups.CgroupSet.open(sb.id, parent=s.parent)
            t = threading.Thread(target=sb.run, args=(["sleep", "3"],), daemon=True)
            t.start()
            host: dict[str, Any] = {}
            end = time.monotonic() + 10
            while time.monotonic() < end and not any(
                "sleep" in v.get("cmd", "") for v in host.values()
            ):
                for pid in cs.pids():
                    try:
                        host[str(pid)] = {
                            "cmd": Path(f"/proc/{pid}/cmdline")
                            .read_bytes()
                            .decode(errors="replace"),
                            "status": _status_fields(
                                Path(f"/proc/{pid}/status").read_text(),
                                "Uid",
                                "Gid",
                                "CapEff",
                                "CapPrm",
                                "NoNewPrivs",
                            ),  # fmt: skip
                            "uid_map": Path(f"/proc/{pid}/uid_map").read_text(),
                        }
                    except OSError:
                        continue
                time.sleep(0.05)
            t.join(timeout=15)
            out["host_view"] = host
            receipt = sb.destroy()
            out["receipt_clean"] = receipt.clean
            out["receipt"] = receipt.as_dict()
        out["cgroups_left"] = cgroups.list_names(s.parent)
        out["records_left"] = os.listdir(os.path.join(s.state, "sandboxes"))
        out["children_left"] = proc.children(os.getpid())
        v = glassroom.audit.verify(s.audit)
        out["audit_ok"] = v.ok
        out["audit_problems"] = v.problems
        return out

    out = _as_nobody(_env(s), body)

    assert (out["euid"], out["egid"]) == (NOBODY, NOBODY)
    assert out["host_can_read_canary"], "the canary must be readable by 65534 outside the sandbox"
    # The limits were real cgroups under the delegated parent.
    assert out["cgroup_paths"] and all(f"/{s.parent}/{out['id']}" in p for p in out["cgroup_paths"])

    # harmless
    assert out["harmless_print"]["exit"] == 0 and out["harmless_print"]["stdout"] == "42\n"
    assert json.loads(out["write_workspace"]["stdout"]) == {
        "/workspace/ok": "written",
        "/tmp/ok": "written",
    }
    # malicious: every write outside the workspace fails, and nothing lands on the host
    wrote = json.loads(out["write_outside"]["stdout"])
    assert set(wrote) == set(evil)
    for path, outcome in wrote.items():
        assert outcome in ("EROFS", "EACCES", "ENOENT", "EPERM"), (path, outcome)
        assert not os.path.exists(path), path

    assert out["exec_allowed"]["exit"] == 0
    assert out["exec_not_allowed"]["exit"] == 126, out["exec_not_allowed"]
    assert "tools.allow" in out["exec_not_allowed"]["blocked"]
    assert out["exec_not_allowed_from_shell"]["exit"] == 126, out["exec_not_allowed_from_shell"]
    assert "uid=" not in out["exec_not_allowed_from_shell"]["stdout"]

    sc = json.loads(out["syscalls"]["stdout"])
    assert sc["getpid"][0] > 0 and sc["kill0_child"] == [0, 0]  # the harmless twins
    eperm = errno.EPERM
    assert sc["ptrace_attach_child"] == [-1, eperm], sc
    assert sc["mount_tmpfs"] == [-1, eperm], sc
    assert sc["unshare_user"] == [-1, eperm], sc
    assert sc["unshare_mount"] == [-1, eperm], sc

    assert out["read_own"]["exit"] == 0 and out["read_own"]["stdout"] == "mine"
    assert out["read_canary"]["exit"] != 0
    assert s.secret not in out["read_canary"]["stdout"] + out["read_canary"]["stderr"]
    assert "No such file" in out["read_canary"]["stderr"], out["read_canary"]
    assert "host-canary" not in out["canary_dir_listing"]["stdout"]

    inside = _status_fields(out["status"]["stdout"], "CapEff", "CapPrm", "NoNewPrivs", "Uid")
    assert inside["CapEff"] == "0000000000000000"
    assert inside["CapPrm"] == "0000000000000000"
    assert inside["NoNewPrivs"] == "1"
    assert inside["Uid"].split() == ["1000"] * 4

    # Inside, uid 1000 is the only uid, a single-id map.  (The second field is
    # relative to the *parent* user namespace, which with bwrap's
    # --disable-userns is an intermediate one; the host view is checked below.)
    inside_map = out["uid_map_inside"]["stdout"].split()
    assert len(inside_map) == 3 and inside_map[0] == "1000" and inside_map[2] == "1", inside_map

    host = out["host_view"]
    sleepers = [v for v in host.values() if v["cmd"].startswith("sleep\0")]
    assert sleepers, host
    for pid, v in host.items():
        assert v["status"]["Uid"].split() == [str(NOBODY)] * 4, (pid, v)
        assert v["status"]["CapEff"] == "0000000000000000", (pid, v)
        assert v["uid_map"].split() == ["1000", str(NOBODY), "1"], (pid, v)
    assert sleepers[0]["status"]["NoNewPrivs"] == "1"

    assert out["receipt_clean"], out["receipt"]
    assert out["cgroups_left"] == [] and out["records_left"] == [] and out["children_left"] == []
    assert out["audit_ok"], out["audit_problems"]


def test_file_audit_when_glassroom_is_not_root(nonroot: Setup) -> None:
    """``audit.level = "files"`` as nobody: the tracer (also nobody) sees inside,
    the harmless write is logged as allowed and the malicious one as denied."""
    s = nonroot
    policy = {**POLICY, "audit": {"level": "files"}}

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with Sandbox(policy) as sb:
            out["id"] = sb.id
            out["tracer_uid"] = os.stat(f"/proc/{sb._sup._instance._trace._proc.pid}").st_uid
            r = sb.run(["python3", "-c", WRITE_OUT, "/workspace/ok", "/usr/gr-evil"], timeout_s=30)
            out["stdout"] = r.stdout
        out["opens"] = _write_out_opens(s.audit)
        out["audit_ok"] = glassroom.audit.verify(s.audit).ok
        return out

    out = _as_nobody(_env(s), body)
    assert out["tracer_uid"] == NOBODY
    assert json.loads(out["stdout"]) == {"/workspace/ok": "written", "/usr/gr-evil": "EROFS"}
    assert out["opens"] == [
        ["allow", None, "/workspace/ok", "ok"],
        ["deny", "filesystem.write", "/usr/gr-evil", "EROFS"],
    ]
    assert out["audit_ok"]


def test_microvm_when_glassroom_is_not_root(nonroot: Setup) -> None:
    """The microvm tier as nobody, from the images root prepared (read-only to
    nobody): QEMU runs as the caller, with no capabilities; the harmless write
    works, the write to the read-only image is refused, and the guest's file
    audit logs both."""
    from glassroom.backends.microvm import image, qemu

    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    s = nonroot
    env = {**_env(s), "GLASSROOM_MICROVM_ALLOW_TCG": "1",
           "GLASSROOM_MICROVM_CACHE": str(image.cache_dir())}  # fmt: skip

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        policy = {**POLICY, "risk": "high", "audit": {"level": "files"}}
        with Sandbox(policy, backend="microvm") as sb:
            out["id"] = sb.id
            pid = sb._sup.instance.proc.pid
            out["qemu"] = _status_fields(Path(f"/proc/{pid}/status").read_text(),
                                         "Uid", "CapEff", "CapPrm", "NoNewPrivs")  # fmt: skip
            r = sb.run(["python3", "-c", WRITE_OUT, "/workspace/ok", "/usr/gr-evil"], timeout_s=60)
            out["stdout"] = r.stdout
        out["opens"] = _write_out_opens(s.audit)
        out["audit_ok"] = glassroom.audit.verify(s.audit).ok
        return out

    out = _as_nobody(env, body)
    assert out["qemu"]["Uid"].split() == [str(NOBODY)] * 4
    assert out["qemu"]["CapEff"] == out["qemu"]["CapPrm"] == "0000000000000000"
    result = json.loads(out["stdout"])
    assert result["/workspace/ok"] == "written"
    assert result["/usr/gr-evil"] in ("EROFS", "EACCES")
    assert out["opens"] == [
        ["allow", None, "/workspace/ok", "ok"],
        ["deny", "filesystem.write", "/usr/gr-evil", result["/usr/gr-evil"]],
    ]
    assert out["audit_ok"]


@pytest.mark.parametrize("how", ["parent-missing", "parent-not-writable"])
def test_nonroot_without_delegated_cgroups_fails_closed(nonroot: Setup, how: str) -> None:
    s = nonroot
    parent = f"gr-test-nonroot-undelegated-{secrets.token_hex(4)}"
    made: list[str] = []
    if how == "parent-not-writable":
        for mount in _mounts():  # exists, but owned by root: not delegated
            os.mkdir(os.path.join(mount, parent))
            made.append(os.path.join(mount, parent))
    marker = s.root / "ran"  # a host path the sandbox could never write anyway; belt and braces

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            sb = Sandbox(POLICY)
        except glassroom.GlassroomError as exc:
            out["error_type"] = type(exc).__name__
            out["is_wall"] = isinstance(exc, WallError)
            out["error"] = str(exc)
            out["rule"] = exc.rule
            out["exit_code"] = exc.exit_code
        else:
            out["started"] = sb.id
            out["ran"] = sb.run(["true"]).exit_code
            sb.destroy()
        out["children_left"] = proc.children(os.getpid())
        d = os.path.join(s.state, "sandboxes")
        out["records_left"] = os.listdir(d) if os.path.isdir(d) else []
        out["audit"] = [
            {"event": r.get("event"), "rule": r.get("rule"), "decision": r.get("decision")}
            for r in glassroom.audit.read_records(s.audit)
        ]
        return out

    try:
        out = _as_nobody(_env(s, parent), body)
    finally:
        _undelegate(made)
    assert "started" not in out, f"sandbox ran without its cgroup limits: {out}"
    assert out["is_wall"], out
    assert out["exit_code"] == 125
    assert out["error"].startswith("cgroups"), out["error"]
    assert parent in out["error"]
    assert out["children_left"] == [] and out["records_left"] == []
    assert not marker.exists()
    assert {"event": "sandbox.refused", "rule": out["rule"], "decision": "deny"} in out["audit"]
    assert not any(r["event"] == "sandbox.created" for r in out["audit"])
    assert cgroups.list_names(parent) == []
    # Nothing escaped by being re-parented to init: no process anywhere on
    # the host still names this test's state dir.
    orphans = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(s.state).encode() in f.read():
                    orphans.append(pid)
        except OSError:
            continue
    assert orphans == [], f"orphaned sandbox processes: {orphans}"


def test_memory_cap_is_memory_mib_when_glassroom_is_not_root(nonroot: Setup) -> None:
    """Unprivileged: no loop device, so /workspace and /tmp are tmpfs counted
    inside memory_mib (chosen up front and said in the walls); the cap is the
    policy's number, never memory + disk.  Harmless: memory_mib - 48 MiB is
    held.  Attack: memory_mib + 64 MiB (far below memory + disk) is killed."""
    s = nonroot
    policy = {**POLICY, "resources": {"memory_mib": 128, "disk_mib": 256}}
    hold = "import sys\nx=[bytearray(1<<20) for _ in range(int(sys.argv[1]))]\nprint('held')"

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with Sandbox(policy) as sb:
            out["workspace"] = sb.walls["workspace"]
            out["memory_bytes"] = sb.walls["cgroups"]["memory_bytes"]
            for n in (80, 192):
                r = sb.run(["python3", "-c", hold, str(n)], timeout_s=60)
                out[str(n)] = [r.exit_code, r.signal, r.stdout.strip(),
                               [b.rule for b in r.blocked]]  # fmt: skip
        return out

    out = _as_nobody(_env(s), body)
    assert out["memory_bytes"] == 128 << 20
    assert out["workspace"]["counts_in"] == "resources.memory_mib"
    assert out["80"] == [0, None, "held", []]
    assert out["192"][1] == 9 and out["192"][2] == ""
    assert "resources.memory_mib" in out["192"][3]


def test_a_template_when_glassroom_is_not_root(nonroot: Setup) -> None:
    """A template as ``/`` with glassroom as nobody: the task runs the
    template's shell, writes /workspace, cannot write the template, and cannot
    read the host's /usr bound in for the init (tests/security/test_templates.py
    has the full set as root)."""
    from glassroom.templates import TemplateStore, import_oci
    from glassroom.templates.testing import busybox_entries, docker_save_tar

    s = nonroot
    entries = busybox_entries(("sh", "cat", "echo"))
    entries["etc/os-release"] = b"ID=busy\n"
    docker_save_tar(s.root / "img.tar", entries, env={"PATH": "/bin"})
    store = TemplateStore(s.root / "templates")
    import_oci(s.root / "img.tar", store, "busy")  # as root; the tree is 0555/0444
    env = {**_env(s), "GLASSROOM_TEMPLATE_DIR": str(store.root)}

    def body() -> dict[str, Any]:
        out: dict[str, Any] = {"euid": os.geteuid()}
        policy = {"template": "busy", "tools": {"allow": ["sh", "cat", "echo"]}}
        with Sandbox(policy) as sb:
            for key, cmd in (("ok", "cat /etc/os-release; echo w > /workspace/w; cat /workspace/w"),
                             ("ro", "echo x > /etc/os-release"),
                             ("host", "cat /.glassroom-host/usr/lib/os-release")):  # fmt: skip
                r = sb.run(["sh", "-c", cmd], timeout_s=30)
                out[key] = [r.exit_code, r.stdout, r.stderr]
        return out

    out = _as_nobody(env, body)
    assert out["euid"] == NOBODY
    assert out["ok"] == [0, "ID=busy\nw\n", ""]
    assert out["ro"][0] != 0 and "Read-only file system" in out["ro"][2]
    # the Python init needs the host's /usr (bound, no Landlock rule); the
    # compiled one is static: then it is not there at all
    assert out["host"][0] != 0 and ("Permission denied" in out["host"][2]
                                    or "No such file or directory" in out["host"][2])
