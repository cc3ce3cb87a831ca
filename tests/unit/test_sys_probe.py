"""Host probes (doctor) and the small /proc + prctl helpers of ``_sys.proc``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glassroom._sys import probe, proc


def test_probes_return_plain_data() -> None:
    ok, detail = probe.userns()
    assert isinstance(ok, bool) and detail
    assert isinstance(probe.landlock_abi(), int)
    ok, detail = probe.seccomp()
    assert isinstance(ok, bool) and detail
    assert isinstance(probe.cgroups(), dict)
    for version in (probe.bwrap(), probe.runsc(), probe.qemu()):
        assert version is None or isinstance(version, str)


def test_probes_on_this_host() -> None:
    if os.geteuid() == 0:
        assert probe.userns()[0] is True
    ok, detail = probe.seccomp()
    assert ok and "libseccomp" in detail
    bw = probe.bwrap()
    if bw is not None:
        assert bw.startswith("bubblewrap ")


def test_kvm_kind_matches_host() -> None:
    kind, detail = probe.kvm()
    assert kind in ("real", "pvm", "none")
    if not os.path.exists("/dev/kvm"):
        assert kind == "none"
    elif os.path.isdir("/sys/module/kvm_pvm"):
        assert kind == "pvm" and "kvm_pvm" in detail


def test_missing_tool_is_none() -> None:
    assert probe._first_line(["glassroom-no-such-tool", "--version"]) is None


def _in_child(code: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    return res.stdout.strip()


def test_no_new_privs_and_dumpable_in_child() -> None:
    out = _in_child(
        "from glassroom._sys import proc\n"
        "proc.set_no_new_privs(); proc.set_dumpable(False)\n"
        "s = open('/proc/self/status').read()\n"
        "print([l.split()[1] for l in s.splitlines() if l.startswith('NoNewPrivs')][0])"
    )
    assert out == "1"


def test_pidfd_start_time_and_children() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        start = proc.process_start_time(child.pid)
        assert isinstance(start, int) and start > 0
        assert proc.process_start_time(child.pid) == start
        for _ in range(200):
            kids = proc.children(child.pid)
            if kids:
                break
            subprocess.run(["sleep", "0.01"], check=True)
        assert len(kids) == 1 and proc.process_start_time(kids[0]) is not None
        assert child.pid in proc.children(os.getpid())
        fd = proc.pidfd_open(child.pid)
        try:
            assert not os.get_inheritable(fd)
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()
        for pid in proc.children(os.getpid()):
            os.kill(pid, 9)
    assert proc.process_start_time(child.pid) is None or child.returncode is not None


def test_process_start_time_of_missing_pid() -> None:
    assert proc.process_start_time(2**22 + 1) is None


def test_mounts_under() -> None:
    assert "/proc" in proc.mounts_under("/proc")
    assert proc.mounts_under("/glassroom-definitely-not-mounted") == []
    assert "/" in proc.mounts_under("/")


@pytest.mark.parametrize("flag", [True, False])
def test_set_dumpable_roundtrip(flag: bool) -> None:
    out = _in_child(
        f"from glassroom._sys import proc; import ctypes\n"
        f"proc.set_dumpable({flag})\n"
        f"print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )
    assert out == str(int(flag))


def test_ptrace_probe_says_whether_the_file_audit_can_attach() -> None:
    from glassroom._sys import probe

    ok, detail = probe.ptrace()
    scope = "/proc/sys/kernel/yama/ptrace_scope"
    if not os.path.exists(scope):
        assert ok and "no Yama" in detail
    else:
        assert detail.startswith("kernel.yama.ptrace_scope=")
