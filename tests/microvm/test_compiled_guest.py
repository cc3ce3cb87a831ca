"""The microVM's compiled guest agent (``_sys/agent``, ``guest.c``) is a drop-in
for ``guest/agent.py``.

Which agent a VM boots is never silent: ``walls.init`` (and the
``sandbox.created`` record) names it, with the reason when it is the Python
one.  Under ``auto`` the compiled agent runs every sandbox when the image
holds it (the rest of the suite runs on it), a file audit included: each
request gets its own tracer (``tracer.c``; test_microvm_file_audit.py runs
on both agents).  Each harmless request here works and its malicious twin
is refused, on both agents, with the same result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import created_details, records
from glassroom import Sandbox, SandboxError, WallError
from glassroom._config import state_dir
from glassroom._sys import agent_build
from glassroom.backends.microvm import qemu

POLICY: dict[str, Any] = {"risk": "maximum"}


@pytest.fixture(autouse=True)
def _built() -> None:
    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if agent_build.find(state_dir()) is None:
        pytest.skip("the compiled agent is not built (no C compiler); CI builds it")


def test_the_record_names_the_agent_and_its_walls_hold(init: str, audit_log: Path) -> None:
    """One VM per agent, many pairs: each harmless request works, its twin is refused."""
    with Sandbox(POLICY, audit_log=audit_log) as sb:
        assert sb.walls["init"] == init
        pid1 = sb.run(["cat", "/proc/1/cmdline"]).stdout
        assert ("guest-agent" in pid1) == (init == "compiled"), pid1
        r = sb.run(["sh", "-c", "echo hi; echo err >&2; id -u; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n1000\n", "err\n")
        # files: the workspace is the task's; /etc is not
        sb.files.write("/workspace/a.txt", b"data\n")
        assert sb.files.read("/workspace/a.txt") == b"data\n"
        names = {e.name for e in sb.files.list("/workspace")}
        assert "a.txt" in names
        w = sb.run(["sh", "-c", "echo x > /etc/evil"])
        assert w.exit_code != 0 and ("Read-only" in w.stderr or "denied" in w.stderr), w
        with pytest.raises(SandboxError):
            sb.files.write("/etc/evil", b"x")
        # a FIFO where a file op expects a file: refused, never a hang
        assert sb.run(["python3", "-c", "import os; os.mkfifo('/workspace/p')"]).exit_code == 0
        with pytest.raises(SandboxError) as info:
            sb.files.read("/workspace/p")
        assert "not a regular file" in str(info.value) or "ENXIO" in str(info.value).upper()
        # stdin streams in; a missing tool is an error, not a crash of the agent
        assert sb.run(["cat"], stdin=b"in\n").stdout == "in\n"
        r = sb.run(["/workspace/no-such-tool"])
        assert r.exit_code != 0
        # no capability over the guest: the kernel log and mounts are not the task's
        k = sb.run(["cat", "/dev/kmsg"])
        assert k.exit_code != 0 and "No such file" in k.stderr, k
        assert sb.run(["ls", "/dev"]).stdout.split() == [
            "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
            "tty", "urandom", "zero"]  # fmt: skip
        m = sb.run(["sh", "-c", "echo 1 > /proc/sys/kernel/dmesg_restrict"])
        assert m.exit_code != 0, m
        sid = sb.id
    created = created_details(audit_log, sid)
    assert created["walls"]["init"] == init
    if init == "python":
        assert created["walls"]["init_reason"] == "GLASSROOM_INIT=python"


def test_a_pty_and_a_signal_on_the_compiled_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLASSROOM_INIT", "compiled")
    with Sandbox(POLICY) as sb:
        p = sb.spawn(["sh", "-c", "test -t 0 && test -t 1 && echo on-a-tty"], pty=(30, 100))
        res = p.wait(60)
        assert res is not None and res.exit_code == 0, res
        out = b"".join(d for _s, d in p.events)
        assert b"on-a-tty" in out and {s for s, _d in p.events} == {"pty"}, p.events
        p = sb.spawn(["sleep", "60"])
        p.signal(9)
        res = p.wait(60)
        assert res is not None and res.signal == 9, res


def test_auto_boots_the_compiled_agent_also_for_a_file_audit(audit_log: Path) -> None:
    """It has a tracer too (tracer.c): auto boots it for every plan, and says so."""
    policy = {**POLICY, "audit": {"level": "files"}}
    with Sandbox(policy, audit_log=audit_log) as sb:
        assert sb.walls["init"] == "compiled" and "init_reason" not in sb.walls
        assert sb.walls["file_audit"]["level"] == "files"
        assert sb.run(["cat", "/workspace/none"]).exit_code == 1
        sid = sb.id
    recs = [r for r in records(audit_log) if r["sandbox"] == sid]
    miss = [r for r in recs if r["event"] == "file.open"
            and r["details"].get("path") == "/workspace/none"]  # fmt: skip
    assert miss and miss[0]["details"]["result"] == "ENOENT"
    assert miss[0]["details"]["untrusted"] is True


def test_an_unknown_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLASSROOM_INIT", "fast")
    with pytest.raises(WallError) as info:
        Sandbox(POLICY)
    assert info.value.rule == "init" and "'fast'" in str(info.value)
