"""Every file access attempt and every exec inside, with its result, on every tier.

The scripted task of issue 7: a Python script creates, reads, renames and
deletes a file, runs ``ls``, then tries one write the policy forbids and one
exec it forbids.  With ``[audit] level = "files"`` the log must hold each of
those accesses, in order, with its result, and each refusal with its rule;
at ``actions`` none of them (the tracer is not there at all).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import find_record, records
from glassroom import Sandbox
from glassroom.audit import verify
from glassroom.policy import parse_policy

FILES = parse_policy('[audit]\nlevel = "files"\n')
DENIED_TOOL = "/usr/bin/od"  # readable, executable on the host, not in tools.allow

SCRIPT = r"""
import os, subprocess, sys
with open("a.txt", "w") as f:
    f.write("hello")
with open("a.txt") as f:
    assert f.read() == "hello"
os.rename("a.txt", "b.txt")
os.unlink("b.txt")
subprocess.run(["ls"], check=True)
try:
    open("/usr/glassroom-denied", "w")
    print("WRITE-ALLOWED")
except OSError as e:
    print("write refused", e.errno)
try:
    subprocess.run([sys.argv[1], "--version"])
    print("EXEC-ALLOWED")
except OSError as e:
    print("exec refused", e.errno)
"""


def _inside(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r["event"] == "exec" or (r["event"].startswith("file.")
            and "source" in r["details"])]  # fmt: skip


def test_scripted_task_logs_each_access_in_order(backend: str, audit_log: Path) -> None:
    with Sandbox(FILES, backend=backend, audit_log=audit_log) as sb:
        res = sb.run(["python3", "-c", SCRIPT, DENIED_TOOL])
        sid = sb.id
    assert res.exit_code == 0, res.stderr
    assert "WRITE-ALLOWED" not in res.stdout and "EXEC-ALLOWED" not in res.stdout
    assert "write refused" in res.stdout and "exec refused" in res.stdout
    recs = records(audit_log, sid)
    inside = _inside(recs)

    def ends(name: str) -> Any:
        return lambda p: isinstance(p, str) and p.endswith("/" + name)

    def has(flag: str) -> Any:
        return lambda f: isinstance(f, str) and flag in f

    # The harmless accesses: each one there, allowed, in the order it happened.
    order = [
        find_record(inside, "exec", result="ok", argv=lambda a: a and a[0] == "python3"),
        find_record(inside, "file.open", path=ends("a.txt"), flags=has("O_CREAT"), result="ok"),
        find_record(inside, "file.open", path=ends("a.txt"), flags=has("O_RDONLY"), result="ok"),
        find_record(inside, "file.rename", path=ends("a.txt"), path2=ends("b.txt"), result="ok"),
        find_record(inside, "file.unlink", path=ends("b.txt"), result="ok"),
        find_record(inside, "exec", result="ok", argv=["ls"]),
    ]
    assert order == sorted(order), f"accesses out of order: {order}"
    for i in order:
        assert inside[i]["decision"] == "allow"
    # The malicious ones: refused, with the rule that refused them.
    write = inside[find_record(inside, "file.open", path="/usr/glassroom-denied")]
    assert write["decision"] == "deny" and write["rule"] == "filesystem.write"
    assert write["details"]["result"] in ("EROFS", "EACCES")
    exe = inside[find_record(inside, "exec", path=DENIED_TOOL)]
    assert exe["decision"] == "deny" and exe["rule"] == "tools.allow"
    assert exe["details"]["result"] == "EACCES"
    assert order[-1] < inside.index(write) < inside.index(exe)
    if backend == "microvm":  # the guest reports it: every such record says so
        assert all(r["details"]["untrusted"] is True
                   and r["details"]["source"] == "guest agent (untrusted)" for r in inside)  # fmt: skip
    # A normal run and teardown raise no alarm (the tracer's clean exit is not a loss).
    assert [r for r in recs if r["event"] == "anomaly"] == []
    # Every event of the command is logged before the command's end is.
    ended = next(i for i, r in enumerate(recs) if r["event"] == "command.ended")
    assert recs.index(exe) < ended
    assert verify(audit_log).ok


def test_actions_level_has_no_tracer(backend: str, audit_log: Path) -> None:
    """The default level costs nothing: no tracer, no per-call records (gVisor
    keeps its always-on ``--strace`` view of writes and refusals, see docs)."""
    with Sandbox(None, backend=backend, audit_log=audit_log) as sb:
        assert sb.run(["python3", "-c", "open('/workspace/x','w')"]).exit_code == 0
        assert "file_audit" not in sb.walls
        sid = sb.id
    reads = [r for r in _inside(records(audit_log, sid)) if r["event"] == "file.open"
             and "O_RDONLY" in r["details"].get("flags", "")]  # fmt: skip
    assert reads == []
    if backend != "gvisor":
        assert _inside(records(audit_log, sid)) == []


# -- the tracer's own walls (namespaces: ptrace from outside) ------------------


def _tracer_pid(sb: Sandbox) -> int:
    inst = sb._sup._instance  # the test needs the host process behind the wall
    return int(inst._trace._proc.pid)


def test_the_tracer_holds_no_more_than_the_sandbox(audit_log: Path) -> None:
    """As root, the tracer runs as the sandbox's own host uid, without capabilities."""
    from glassroom._config import is_root, sandbox_ids

    with Sandbox(FILES, backend="namespaces", audit_log=audit_log) as sb:
        status = Path(f"/proc/{_tracer_pid(sb)}/status").read_text()
        assert sb.run(["true"]).exit_code == 0
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = sandbox_ids()[0] if is_root() else os.getuid()
    assert fields["Uid"].split() == [str(uid)] * 4
    assert int(fields["CapEff"], 16) == 0


def test_killing_the_tracer_kills_the_sandbox(audit_log: Path) -> None:
    """Fail closed: no tracer, no sandbox (PTRACE_O_EXITKILL)."""
    with Sandbox(FILES, backend="namespaces", audit_log=audit_log) as sb:
        assert sb.run(["true"]).exit_code == 0  # harmless: runs while traced
        proc = sb.spawn(["sleep", "30"])
        time.sleep(0.2)
        os.kill(_tracer_pid(sb), signal.SIGKILL)
        res = proc.wait(timeout=10)
        assert res.signal == signal.SIGKILL


UNTRACED = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
CLONE_UNTRACED = 0x00800000
flags = 17 | (CLONE_UNTRACED if sys.argv[1] == "untraced" else 0)   # SIGCHLD
pid = libc.syscall(56, flags, 0, 0, 0, 0)                          # raw clone: a fork
if pid == 0:
    try:
        os.open("/workspace/escaped", os.O_WRONLY | os.O_CREAT, 0o644)
        os._exit(0)
    except OSError as e:
        os._exit(e.errno)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("how", ["traced", "untraced"])
def test_clone_untraced_cannot_touch_files(how: str, audit_log: Path) -> None:
    """A child that refuses tracing (CLONE_UNTRACED) has the filter but no
    tracer: every watched call fails with ENOSYS instead of going unseen."""
    with Sandbox(FILES, backend="namespaces", audit_log=audit_log) as sb:
        res = sb.run(["python3", "-c", UNTRACED, how])
        sid = sb.id
    assert res.exit_code == 0, res.stderr
    opens = [r for r in records(audit_log, sid)
             if r["event"] == "file.open" and r["details"]["path"] == "/workspace/escaped"]  # fmt: skip
    if how == "traced":
        assert res.stdout.strip() == "0"
        assert [r["details"]["result"] for r in opens] == ["ok"]
    else:
        assert res.stdout.strip() == "38"  # ENOSYS: the open never ran
        assert opens == []


RACE = r"""
import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(40)
ctypes.memmove(buf, b"/workspace/innocent.txt\0", 24)
stop = []
def flip():
    while not stop:
        ctypes.memmove(buf, b"/workspace/HIDDEN.txt\0\0\0", 24)
        ctypes.memmove(buf, b"/workspace/innocent.txt\0", 24)
t = threading.Thread(target=flip)
t.start()
for _ in range(300):
    fd = libc.open(buf, 0o101, 0o644)
    if fd >= 0:
        os.close(fd)
stop.append(1)
t.join()
print(sorted(os.listdir("/workspace")))
"""


def test_a_path_rewritten_during_the_call_is_logged_as_the_kernel_saw_it(
    audit_log: Path,
) -> None:
    """TOCTOU on the log: a second thread flips the path buffer while open()
    runs.  Every file that exists must appear in the log under its real name
    (taken from the fd the kernel returned), with the claimed name beside it."""
    with Sandbox(FILES, backend="namespaces", audit_log=audit_log) as sb:
        res = sb.run(["python3", "-c", RACE])
        sid = sb.id
    assert res.exit_code == 0, res.stderr
    created = set(json.loads(res.stdout.replace("'", '"')))
    opens = [r["details"] for r in records(audit_log, sid) if r["event"] == "file.open"
             and r["details"]["path"].startswith("/workspace/")]  # fmt: skip
    logged = {d["path"].rsplit("/", 1)[1] for d in opens if d["result"] == "ok"}
    assert created <= logged, (created, logged)
    for d in opens:
        if "path_arg" in d:  # the race was caught: the kernel's name wins
            assert d["path_arg"] != d["path"]


MORE_CALLS = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os.mknod("/workspace/fifo", 0o600 | 0o010000)
os.utime("/workspace/fifo")
fd = os.open("/workspace/f", os.O_RDONLY | os.O_CREAT, 0o644)
os.fchmod(fd, 0o600)
os.close(fd)
os.setxattr("/workspace/f", "user.k", b"v")
for name in ("a", "b"):
    open("/workspace/" + name, "w").close()
assert libc.renameat2(-100, b"/workspace/a", -100, b"/workspace/b", 2) == 0
# openat(AT_FDCWD, <a pointer to nothing>): EFAULT, and the log must not name the cwd
assert libc.syscall(257, -100, ctypes.c_void_p(8), 0, 0) == -1 and ctypes.get_errno() == 14
"""


def test_calls_beyond_open_are_logged(audit_log: Path) -> None:
    with Sandbox(FILES, backend="namespaces", audit_log=audit_log) as sb:
        res = sb.run(["python3", "-c", MORE_CALLS])
        sid = sb.id
    assert res.exit_code == 0, res.stderr
    got = {(r["event"], r["details"]["path"], r["details"].get("flags"))
           for r in records(audit_log, sid) if r["event"].startswith("file.")}  # fmt: skip
    for want in [
        ("file.mknod", "/workspace/fifo", None),
        ("file.utime", "/workspace/fifo", None),
        ("file.chmod", "/workspace/f", None),  # fchmod, named through its fd
        ("file.xattr", "/workspace/f", None),
        ("file.rename", "/workspace/a", "RENAME_EXCHANGE"),
    ]:
        assert want in got, want
    bad = [r["details"] for r in records(audit_log, sid) if r["event"] == "file.open"
           and r["details"].get("path_unreadable")]  # fmt: skip
    assert [(d["path"], d["result"]) for d in bad] == [("", "EFAULT")]


def test_spending_the_audit_budget_kills_the_sandbox(
    audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: a task cannot flood past its audit and then act unseen."""
    from glassroom._sys import tracewatch

    monkeypatch.setattr(tracewatch, "MAX_EVENTS", 500)
    with Sandbox(FILES, backend="namespaces", audit_log=audit_log) as sb:
        assert sb.run(["true"]).exit_code == 0  # harmless: well inside the budget
        flood = (
            "import os\nfor i in range(100000):\n    os.path.exists('/nope/%d' % i) or "
            "os.access('/nope', 0) or open('/workspace/x', 'w').close()\n"
        )
        res = sb.run(["python3", "-c", flood])
        sid = sb.id
    assert res.exit_code != 0 and res.signal == signal.SIGKILL
    anomalies = [r for r in records(audit_log, sid) if r["event"] == "anomaly"]
    assert any(r["rule"] == "audit.level" and "budget" in r["details"]["reason"]
               for r in anomalies)  # fmt: skip


def test_a_tracer_that_cannot_start_refuses_the_sandbox(
    audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: no tracer, no sandbox, and the error names the rule."""
    from glassroom import WallError
    from glassroom._sys import tracewatch

    def broken(*_a: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/usr/bin/python3")

    monkeypatch.setattr(tracewatch.TraceWatch, "_spawn", staticmethod(broken))
    with pytest.raises(WallError) as err:
        Sandbox(FILES, backend="namespaces", audit_log=audit_log)
    assert err.value.rule == "audit.level"
    assert "cannot start the tracer" in str(err.value)
    refused = [r for r in records(audit_log) if r["event"] == "sandbox.refused"]
    assert refused and refused[-1]["rule"] == "audit.level"
