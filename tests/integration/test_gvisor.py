"""What only the gvisor tier has to prove: refusal, allowlist mechanism, audit, teardown, reaper.

The shared behaviour (SDK, drill walls, network) runs on gvisor through the
backend-parametrized tests; these check the parts that work differently
under runsc.  Runs on every host the suite runs on (CI installs runsc).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import records
from glassroom import Sandbox
from glassroom._sys import probe
from glassroom.lifecycle import reaper

CLI = [sys.executable, "-m", "glassroom.interfaces.cli"]
NARROW = 'risk = "low"\n[tools]\nallow = ["sh", "echo"]\n'


def _cli(*args: str, log: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, GLASSROOM_AUDIT_LOG=str(log), **env)
    return subprocess.run([*CLI, *args], env=full, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def _refused(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 125, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("glassroom: "), proc.stderr
    return lines[0]


def _never_created(log: Path) -> None:
    """Refused means refused: no sandbox at all, on no backend."""
    events = [r["event"] for r in records(log)]
    assert "sandbox.refused" in events and "sandbox.created" not in events, events


def test_missing_runsc_is_125_and_no_fallback(audit_log: Path) -> None:
    line = _refused(_cli("run", "--backend", "gvisor", "--", "true", log=audit_log,
                         GLASSROOM_RUNSC="/nonexistent/runsc"))  # fmt: skip
    assert "runsc" in line
    _never_created(audit_log)


def test_medium_risk_without_runsc_never_falls_back(tmp_path: Path, audit_log: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text('risk = "medium"\n')
    line = _refused(_cli("run", "--policy", str(pol), "--", "true", log=audit_log,
                         GLASSROOM_RUNSC="/nonexistent/runsc"))  # fmt: skip
    assert "gvisor" in line
    _never_created(audit_log)


def test_kvm_platform_on_pvm_is_refused_not_hung(audit_log: Path) -> None:
    kind, _detail = probe.kvm()
    t0 = time.monotonic()
    proc = _cli("run", "--backend", "gvisor", "--", "true", log=audit_log,
                GLASSROOM_GVISOR_PLATFORM="kvm")  # fmt: skip
    if kind == "real":  # real KVM: the platform must simply work
        assert proc.returncode == 0, proc.stderr
        return
    line = _refused(proc)
    assert "kvm" in line and kind in line
    assert time.monotonic() - t0 < 30  # refused up front, never waited on a hang
    _never_created(audit_log)


def test_medium_risk_runs_on_gvisor(tmp_path: Path, audit_log: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text('risk = "medium"\n')
    proc = _cli("run", "--policy", str(pol), "--json", "--", "echo", "hi", log=audit_log)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"] == "gvisor" and out["stdout"] == "hi\n"


def test_allowlist_without_landlock(audit_log: Path) -> None:
    """noexec everywhere but the allowed tools: from a shell, from python, from the workspace."""
    with Sandbox(NARROW, backend="gvisor", audit_log=audit_log) as sb:
        shell = sb.run(["sh", "-c", "cat /dev/null; echo rc=$?; python3 -c 1; echo rc=$?"])
        assert shell.stdout == "rc=126\nrc=126\n", shell
        # A copy of an allowed tool in a writable place is not allowed.
        copy = sb.run(["sh", "-c", "echo '#!/bin/sh' > /workspace/x; chmod +x /workspace/x 2>&1;"
                       " /workspace/x; echo rc=$?; /tmp/nothing; echo rc=$?"])  # fmt: skip
        assert "rc=126" in copy.stdout, copy
        walls = next(r for r in records(audit_log, sb.id) if r["event"] == "sandbox.created")
        assert walls["details"]["walls"]["tools"]["executable"]
    with Sandbox(backend="gvisor", audit_log=audit_log) as sb:
        py = sb.run(["python3", "-c", "import os\ntry:\n os.execv('/usr/bin/perl', ['perl'])\n"
                     "except OSError as e: print(e.errno)"])  # fmt: skip
        assert py.stdout == "13\n", py


def test_exec_events_from_strace_never_hold_the_env(audit_log: Path) -> None:
    with Sandbox(NARROW, backend="gvisor", audit_log=audit_log) as sb:
        sb.run(["sh", "-c", "echo ok; cat /etc/passwd"], env={"TOKEN": "s3cr3t-xyz"})
        sid = sb.id
    execs = [r for r in records(audit_log, sid) if r["event"] == "exec"]
    by_argv = {tuple(r["details"]["argv"]): r for r in execs}
    ok = by_argv[("sh", "-c", "echo ok; cat /etc/passwd")]
    assert ok["decision"] == "allow" and ok["details"]["path"] == "/usr/bin/sh"
    denied = by_argv[("cat", "/etc/passwd")]
    assert denied["decision"] == "deny" and denied["rule"] == "tools.allow"
    assert denied["details"]["result"] == "EACCES"
    assert "s3cr3t-xyz" not in audit_log.read_text()


def _host_leftovers(sid: str) -> list[str]:
    left = [p for p in glob.glob("/sys/fs/cgroup/**/" + sid, recursive=True)]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if sid.encode() in cmd:
                left.append(f"pid {pid}: {cmd[:80]!r}")
    left += [m for m in Path("/proc/self/mountinfo").read_text().splitlines() if sid in m]
    return left


def test_teardown_leaves_nothing(audit_log: Path, glassroom_state_dir: Path) -> None:
    before = set(glob.glob("/tmp/runsc-*"))
    sb = Sandbox(backend="gvisor", audit_log=audit_log)
    sid = sb.id
    assert sb.run(["sh", "-c", "sleep 60 & echo started"]).stdout == "started\n"
    receipt = sb.destroy()
    assert receipt.clean, receipt.as_dict()
    assert receipt.removed["runsc_state"]
    assert not (glassroom_state_dir / "gvisor" / "run" / sid).exists()
    assert not (glassroom_state_dir / "sandboxes" / f"{sid}.json").exists()
    assert _host_leftovers(sid) == []
    assert set(glob.glob("/tmp/runsc-*")) <= before


_CRASHER = """
import os, sys
from glassroom import Sandbox
sb = Sandbox(backend="gvisor", audit_log=sys.argv[1])
sb.run(["sh", "-c", "sleep 300 & true"])
print(sb.id, flush=True)
os.kill(os.getpid(), 9)
"""


def test_reaper_cleans_after_a_crashed_supervisor(
    audit_log: Path, glassroom_state_dir: Path
) -> None:
    proc = subprocess.run([sys.executable, "-c", _CRASHER, str(audit_log)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    sid = proc.stdout.strip()
    assert sid.startswith("sb-")
    assert _host_leftovers(sid), "the crashed supervisor's sandbox should still be there"
    cleaned = [c for c in reaper.reap() if c["sandbox_id"] == sid]
    assert cleaned and not cleaned[0].get("errors"), cleaned
    deadline = time.monotonic() + 5
    while _host_leftovers(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _host_leftovers(sid) == []
    assert not (glassroom_state_dir / "gvisor" / "run" / sid).exists()
    assert not (glassroom_state_dir / "sandboxes" / f"{sid}.json").exists()


# 3 s: the sandbox must be up and its command started before the deadline,
# which a slow machine may not do within 1 s.
@pytest.mark.parametrize("runtime", [3])
def test_max_runtime_kills_the_sentry(runtime: int, audit_log: Path) -> None:
    pol = f'risk = "low"\n[resources]\nmax_runtime_s = {runtime}\n'
    with Sandbox(pol, backend="gvisor", audit_log=audit_log) as sb:
        r = sb.run(["sleep", "30"])
        sid = sb.id
        assert r.timed_out and r.signal == 9
        assert not sb._sup.instance.alive()
    assert _host_leftovers(sid) == []


def test_background_process_streams_and_signals(audit_log: Path) -> None:
    """``Instance.spawn`` on gVisor: output as it comes, stdin, signal, result."""
    from glassroom.backends.base import ExecRequest

    with Sandbox(backend="gvisor", audit_log=audit_log) as sb:
        inst = sb._sup.instance
        req = ExecRequest(argv=("sh", "-c", "read x; echo got $x; sleep 30"),
                          env=dict(sb._sup.plan.env), cwd="/workspace")  # fmt: skip
        p = inst.spawn(req)
        assert p.pid > 0 and p.result is None
        p.write_stdin(b"hello\n")
        events: list[tuple[str, bytes]] = []
        index, deadline = 0, time.monotonic() + 10
        while b"got hello\n" not in b"".join(d for _s, d in events) and time.monotonic() < deadline:
            new, index, _done = p.events_since(index, 1.0)
            events += new
        assert ("stdout", b"got hello\n") in events
        p.signal(signal.SIGTERM)
        res = p.wait(10)
        assert res is not None and res.signal == signal.SIGTERM and res.stdout == b"got hello\n"
