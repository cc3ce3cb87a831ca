"""Lifecycle guarantees of the namespaces backend, exercised for real.

* a supervisor killed with SIGKILL mid-task leaves an orphan that dies by
  itself (``--die-with-parent``) and whose cgroups and state record the
  reaper removes on the next start;
* a sandbox whose construction fails after its cgroups exist leaves nothing;
* 200 create/run/destroy cycles leave no fd, thread, child, cgroup, state
  record, /tmp entry or mount behind;
* ``max_runtime_s`` kills every process of the sandbox, not just the command.

Each test gets its own state dir, audit log and cgroup parent (helpers are
local to this file on purpose: tests/conftest.py is owned elsewhere).
Every wait is bounded; nothing asserts on timing.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import glassroom
import glassroom.backends.namespaces
from conftest import build_compiled_init
from glassroom import BackendUnavailable, Sandbox, WallError
from glassroom._sys import cgroups, proc
from glassroom.audit import read_records, verify

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="these lifecycle tests run glassroom as root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

CONTROLLERS = ("memory", "pids", "cpu", "freezer")


# -- helpers -----------------------------------------------------------------


@dataclass
class Env:
    root: Path
    state: Path
    audit: Path
    parent: str

    def vars(self) -> dict[str, str]:
        return {
            "GLASSROOM_STATE_DIR": str(self.state),
            "GLASSROOM_AUDIT_LOG": str(self.audit),
            "GLASSROOM_CGROUP_PARENT": self.parent,
        }

    def records(self) -> list[str]:
        d = self.state / "sandboxes"
        return sorted(os.listdir(d)) if d.is_dir() else []


def _wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy or ``timeout`` passes; return the last value."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)


def _parent_dirs(parent: str) -> list[str]:
    lay = cgroups.layout()
    return sorted({os.path.join(lay[c][1], parent) for c in CONTROLLERS if c in lay})


def _cleanup_parent(parent: str) -> None:
    """Best effort: kill and remove whatever a failed test left, then the parent dirs."""
    for name in cgroups.list_names(parent):
        with contextlib.suppress(Exception):
            cs = cgroups.CgroupSet.open(name, parent=parent)
            cs.kill_all(timeout=5.0)
            cs.remove()
    for d in _parent_dirs(parent):
        with contextlib.suppress(OSError):
            os.rmdir(d)


@pytest.fixture
def gr_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    # Not pytest's tmp_path: that is 0700 under /tmp/pytest-of-root, and the
    # sandbox (uid 65534) must traverse the state dir to read its init.
    root = Path(tempfile.mkdtemp(prefix="gr-lifecycle-"))
    os.chmod(root, 0o755)
    env = Env(
        root=root,
        state=root / "state",
        audit=root / "audit" / "audit.jsonl",
        parent=f"gr-test-lifecycle-{secrets.token_hex(4)}",
    )
    for key, value in env.vars().items():
        monkeypatch.setenv(key, value)
    build_compiled_init(env.state)  # the session's init
    try:
        yield env
    finally:
        _cleanup_parent(env.parent)
        shutil.rmtree(root, ignore_errors=True)


def _proc_cgroup_mentions(needle: str) -> list[int]:
    """Pids whose /proc/PID/cgroup names ``needle`` (the host's view of every hierarchy)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup", encoding="utf-8", errors="replace") as f:
                if needle in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return out


def _uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _sleepers(parent: str) -> list[int]:
    """uid-65534 ``sleep 1000`` processes that live in a cgroup under our test parent."""
    return [
        pid
        for pid in _proc_cgroup_mentions(f"/{parent}/")
        if _uid(pid) == 65534 and _cmdline(pid) == ["sleep", "1000"]
    ]


def _alive(pid: int, start: int | None) -> bool:
    now = proc.process_start_time(pid)
    return now is not None and now == start


def _mounts_mentioning(needle: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line for line in f if needle in line]


def _records_of(audit: Path, sandbox_id: str) -> list[dict[str, Any]]:
    return [r for r in read_records(audit) if r.get("sandbox") == sandbox_id]


def _readline(stream: Any, timeout: float) -> str:
    """One line from a pipe, or '' if none arrives within ``timeout``."""
    buf = b""
    fd = stream.fileno()
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").split("\n", 1)[0]


# -- 1. supervisor SIGKILL mid-task ---------------------------------------------

SUPERVISOR = textwrap.dedent(
    """
    import sys, threading, time
    from glassroom import Sandbox

    sb = Sandbox()
    t = threading.Thread(
        target=sb.run,
        args=(["sh", "-c", "echo ready > /workspace/r; sleep 1000"],),
        daemon=True,
    )
    t.start()
    end = time.monotonic() + 30
    while time.monotonic() < end and not sb.files.exists("/workspace/r"):
        time.sleep(0.05)
    print(sb.id if sb.files.exists("/workspace/r") else "not-ready", flush=True)
    time.sleep(1000)
    """
)

REAP_BY_STARTING = textwrap.dedent(
    """
    from glassroom import Sandbox
    with Sandbox() as sb:
        print(sb.run(["true"]).exit_code, flush=True)
    """
)


def test_supervisor_sigkill_mid_task_orphan_dies_and_is_reaped(gr_env: Env) -> None:
    env = {**os.environ, **gr_env.vars()}
    child = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    try:
        line = _readline(child.stdout, timeout=60)
        if not line.startswith("sb-"):
            child.kill()
            _, err = child.communicate(timeout=10)
            pytest.fail(f"supervisor did not get ready: {line!r}\n{err.decode(errors='replace')}")
        sb_id = line.strip()

        # Before the crash: the task runs in the sandbox's cgroup, as nobody.
        record = json.loads((gr_env.state / "sandboxes" / f"{sb_id}.json").read_text())
        assert record["supervisor"]["pid"] == child.pid
        cs = cgroups.CgroupSet.open(sb_id, parent=gr_env.parent)
        members = {pid: proc.process_start_time(pid) for pid in cs.pids()}
        sleepers = _sleepers(gr_env.parent)
        assert sleepers, "the sandboxed `sleep 1000` is not running"
        assert set(sleepers) <= set(members), (sleepers, members)
        recorded = {e["pid"]: e["start"] for e in record["pids"]}
        assert recorded, record

        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream:
                stream.close()

    # "died": --die-with-parent takes the whole sandbox down with its supervisor.
    def all_dead() -> bool:
        return (
            not _proc_cgroup_mentions(sb_id)
            and not _sleepers(gr_env.parent)
            and not any(_alive(p, s) for p, s in {**members, **recorded}.items())
        )

    assert _wait_for(all_dead, timeout=15), (
        f"sandbox processes outlived their supervisor: in cgroup {_proc_cgroup_mentions(sb_id)}, "
        f"sleepers {_sleepers(gr_env.parent)}"
    )
    # ... but what lives outside the processes is still there for the reaper.
    assert sb_id in cgroups.list_names(gr_env.parent)
    assert f"{sb_id}.json" in gr_env.records()

    # "reaped": the next supervisor to start a sandbox cleans the orphan up first.
    reaper = subprocess.run(
        [sys.executable, "-c", REAP_BY_STARTING],
        env=env,
        capture_output=True,
        timeout=120,
        cwd="/",
    )
    assert reaper.returncode == 0, reaper.stderr.decode(errors="replace")
    assert reaper.stdout.strip() == b"0"

    assert not _proc_cgroup_mentions(sb_id)
    assert not _sleepers(gr_env.parent)
    assert sb_id not in cgroups.list_names(gr_env.parent)
    assert cgroups.list_names(gr_env.parent) == []  # the reaper's own test sandbox is gone too
    assert gr_env.records() == []
    assert not _mounts_mentioning(sb_id)

    result = verify(gr_env.audit)
    assert result.ok, result.problems
    cleaned = [r for r in _records_of(gr_env.audit, sb_id) if r["event"] == "reaper.cleaned"]
    assert len(cleaned) == 1, _records_of(gr_env.audit, sb_id)
    assert cleaned[0]["details"]["sandbox_id"] == sb_id
    assert cleaned[0]["rule"] == "lifecycle.reaper"
    assert len(cleaned[0]["details"].get("cgroups", [])) >= 3, cleaned[0]
    assert not any(r["event"] == "sandbox.destroyed" for r in _records_of(gr_env.audit, sb_id))


# -- 2. partial construction is cleaned up ----------------------------------------


def _assert_nothing_left(env: Env, children_before: set[int]) -> None:
    assert cgroups.list_names(env.parent) == []
    assert env.records() == []
    assert _wait_for(lambda: set(proc.children(os.getpid())) <= children_before, 5), (
        set(proc.children(os.getpid())) - children_before
    )
    assert not _mounts_mentioning(env.parent)
    # Re-parented to init, a process would escape the check above: look
    # host-wide for anything still naming this test's state dir.
    def orphans() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(env.state).encode() in f.read():
                        found.append(pid)
            except OSError:
                continue
        return found

    assert _wait_for(lambda: not orphans(), 5), f"orphaned sandbox processes: {orphans()}"


def _refusals(audit: Path) -> list[dict[str, Any]]:
    return [r for r in read_records(audit) if r.get("event") == "sandbox.refused"]


def test_seccomp_failure_after_cgroups_exist_leaves_nothing(
    gr_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: list[str] = []

    def boom(*_a: Any, **_k: Any) -> int:
        reached.append("seccomp")
        raise RuntimeError("filter compiler exploded")

    # The seccomp module exactly as the backend imported it.
    monkeypatch.setattr(vars(glassroom.backends.namespaces)["seccomp"], "bpf_memfd", boom)
    before = set(proc.children(os.getpid()))
    with pytest.raises(WallError) as info:
        Sandbox(audit_log=gr_env.audit)
    exc = info.value
    assert not isinstance(exc, BackendUnavailable)
    assert exc.exit_code == 125
    assert "seccomp" in str(exc)
    assert exc.rule == "seccomp"
    _assert_nothing_left(gr_env, before)
    refused = _refusals(gr_env.audit)
    assert [r["rule"] for r in refused] == ["seccomp"]
    assert verify(gr_env.audit).ok


def test_cgroup_join_failure_kills_blocked_sandbox(
    gr_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bwrap is running (blocked) and the cgroups exist when joining fails:
    the sandbox must be killed before it is released, and nothing is left."""
    reached: list[str] = []

    def boom(self: Any, pid: int) -> None:
        reached.extend(cgroups.list_names(gr_env.parent))
        raise WallError("cgroups: cannot join (test)", rule="cgroups")

    monkeypatch.setattr(cgroups.CgroupSet, "add_pid", boom)
    before = set(proc.children(os.getpid()))
    with pytest.raises(WallError) as info:
        Sandbox(audit_log=gr_env.audit)
    assert info.value.rule == "cgroups" and info.value.exit_code == 125
    assert len(reached) == 1, "add_pid was not called with the cgroups in place"
    _assert_nothing_left(gr_env, before)
    assert [r["rule"] for r in _refusals(gr_env.audit)] == ["cgroups"]
    assert verify(gr_env.audit).ok


@pytest.mark.parametrize("how", ["no-bwrap-on-PATH", "_bwrap-raises"])
def test_missing_bwrap_leaves_nothing(
    gr_env: Env, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "no-bwrap-on-PATH":
        empty = gr_env.root / "empty-bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
        assert shutil.which("bwrap") is None
    else:

        def no_bwrap() -> str:
            raise BackendUnavailable("namespaces: bwrap is gone", rule="backend.namespaces")

        monkeypatch.setattr(glassroom.backends.namespaces, "_bwrap", no_bwrap)
    before = set(proc.children(os.getpid()))
    with pytest.raises(BackendUnavailable) as info:
        Sandbox(audit_log=gr_env.audit)
    assert info.value.exit_code == 125
    assert "bwrap" in str(info.value)
    _assert_nothing_left(gr_env, before)
    assert [r["rule"] for r in _refusals(gr_env.audit)] == ["backend.namespaces"]
    assert verify(gr_env.audit).ok


# -- 3. 200 cycles leave nothing behind -----------------------------------------------


def _snapshot(env: Env) -> dict[str, Any]:
    # Objects left by earlier tests may be collected (closing their fds) at
    # any time; collect first so only fds glassroom holds are compared.
    gc.collect()
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for _ in f)
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "children": sorted(proc.children(os.getpid())),
        "cgroups": cgroups.list_names(env.parent),
        "records": env.records(),
        "private_tmp": sorted(os.listdir(tempfile.gettempdir())),
        "mounts": mounts,
    }


def _tmp_glassroom() -> set[str]:
    return {n for n in os.listdir("/tmp") if n.startswith("glassroom")}


@pytest.mark.slow
def test_200_cycles_leave_nothing_behind(gr_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    cycles = 200
    # Anything glassroom makes through tempfile lands in a private dir we can
    # watch exactly; /tmp itself is shared with concurrently running suites.
    private_tmp = gr_env.root / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    warm = gr_env.root / "warmup.jsonl"
    with Sandbox(audit_log=warm) as sb:  # first use: reaper, init install, state dirs
        assert sb.run(["true"]).exit_code == 0
    before = _snapshot(gr_env)
    tmp_before = _tmp_glassroom()
    audit = gr_env.root / "cycles.jsonl"
    failures = []
    ids = []
    for _ in range(cycles):
        with Sandbox(audit_log=audit) as sb:
            ids.append(sb.id)
            r = sb.run(["true"])
            if r.exit_code != 0:
                failures.append((sb.id, r))
    assert failures == []

    def same(s: dict[str, Any]) -> bool:
        # No fd may be new; fds of earlier tests' garbage may have closed.
        return set(s["fds"]) <= set(before["fds"]) and {**s, "fds": 0} == {**before, "fds": 0}

    def settled() -> dict[str, Any] | None:
        snap = _snapshot(gr_env)
        return snap if same(snap) else None

    after = _wait_for(settled, timeout=5)
    after = after or _snapshot(gr_env)
    assert sorted(set(after["fds"]) - set(before["fds"])) == [], "supervisor fds leaked"
    assert {**after, "fds": 0} == {**before, "fds": 0}
    # /tmp: other suites create glassroom-* entries concurrently, so only the
    # names glassroom itself would use count (its non-root default state dir,
    # or anything named after one of our sandboxes).
    new_tmp = _tmp_glassroom() - tmp_before
    ours = [n for n in new_tmp if n == f"glassroom-{os.geteuid()}" or any(i in n for i in ids)]
    assert ours == []

    result = verify(audit)
    assert result.ok, result.problems
    recs = list(read_records(audit))
    created = [r for r in recs if r["event"] == "sandbox.created"]
    destroyed = [r for r in recs if r["event"] == "sandbox.destroyed"]
    assert len(created) == cycles
    assert len(destroyed) == cycles
    assert {r["sandbox"] for r in created} == {r["sandbox"] for r in destroyed}
    dirty = [r for r in destroyed if not r["details"].get("clean") or r["decision"] != "info"]
    assert dirty == []
    for rec in destroyed:
        assert all(not v for v in rec["details"]["leftovers"].values()), rec


# -- 4. max runtime is a hard kill of the whole sandbox ------------------------------


def test_max_runtime_kills_every_process_of_the_sandbox(gr_env: Env) -> None:
    policy = {"resources": {"max_runtime_s": 1}}
    with Sandbox(policy, audit_log=gr_env.audit) as sb:
        cs = cgroups.CgroupSet.open(sb.id, parent=gr_env.parent)
        seen: list[set[int]] = []
        watcher_stop = threading.Event()

        def watch() -> None:  # what was in the cgroup while the command ran
            while not watcher_stop.is_set():
                seen.append(cs.pids())
                time.sleep(0.05)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        try:
            r = sb.run(["sh", "-c", "sleep 100 & sleep 100 & wait"], timeout_s=60)
        finally:
            watcher_stop.set()
            w.join(timeout=5)
        assert r.timed_out, r
        assert r.exit_code == 128 + signal.SIGKILL, r
        assert "resources.max_runtime_s" in [b.rule for b in r.blocked], r.blocked
        assert max((len(s) for s in seen), default=0) >= 4, "sh and both sleeps were never seen"
        # Every process of the sandbox is gone, not just the command.
        assert _wait_for(lambda: not cs.pids(), timeout=5), cs.pids()
        assert _wait_for(lambda: not _proc_cgroup_mentions(sb.id), timeout=5)
        with pytest.raises(glassroom.SandboxClosed):
            sb.run(["true"])
        sb_id = sb.id
    assert sb_id not in cgroups.list_names(gr_env.parent)
    assert gr_env.records() == []
    result = verify(gr_env.audit)
    assert result.ok, result.problems
    anomalies = [
        r
        for r in _records_of(gr_env.audit, sb_id)
        if r["event"] == "anomaly" and r["rule"] == "resources.max_runtime_s"
    ]
    assert len(anomalies) == 1
    assert anomalies[0]["decision"] == "deny"


def test_failure_before_child_pid_is_known_leaves_no_orphan(
    gr_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bwrap is running but its child's pid was not read yet when start fails:
    killing only the outer bwrap would orphan a sandbox pid 1, which a closed
    block-fd would then release.  It must be found and killed."""
    inst_cls = glassroom.backends.namespaces.NamespacesInstance
    real = inst_cls._read_info
    calls: list[float] = []

    def late(self: Any, fd: int, timeout: float = 10.0) -> dict[str, Any]:
        calls.append(timeout)
        if len(calls) == 1:
            raise WallError("namespaces: bwrap did not report its child in time (test)",
                            rule="namespaces")  # fmt: skip
        return real(self, fd, timeout=timeout)

    monkeypatch.setattr(inst_cls, "_read_info", late)
    before = set(proc.children(os.getpid()))
    with pytest.raises(WallError):
        Sandbox(audit_log=gr_env.audit)
    assert len(calls) == 2, "the failure path did not look for bwrap's child"
    _assert_nothing_left(gr_env, before)
