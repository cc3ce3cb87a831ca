"""The microvm tier's own guarantees: accel refusal, plan refusals, the audit's
"emulated" mark, teardown, and the reaper after a crashed supervisor.

Few VMs on purpose (each is a TCG VM here): the integration and drill tests
already run the tier through the common suites.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom import BackendUnavailable, PlanError, Sandbox, WallError
from glassroom._sys import proc
from glassroom.backends.microvm import qemu
from glassroom.policy import compile as compile_policy
from glassroom.policy import validate_policy


def _skip_without_qemu() -> None:
    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")


def test_emulation_must_be_allowed(monkeypatch: pytest.MonkeyPatch, audit_log: Path) -> None:
    from glassroom._sys import probe

    if probe.kvm()[0] == "real":
        pytest.skip("real KVM here: no emulation involved")
    monkeypatch.delenv(qemu.ALLOW_TCG_ENV, raising=False)
    with pytest.raises(BackendUnavailable) as exc:
        Sandbox({"risk": "high"}, audit_log=audit_log)
    assert exc.value.rule == "backend.microvm" and "test" in str(exc.value)
    assert "unavailable" in qemu.status()


def test_cli_refusal_is_exit_125(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from glassroom._sys import probe

    if probe.kvm()[0] == "real":
        pytest.skip("real KVM here: no emulation involved")
    env = {k: v for k, v in os.environ.items() if k != qemu.ALLOW_TCG_ENV}
    env["GLASSROOM_AUDIT_LOG"] = str(tmp_path / "a.jsonl")
    r = subprocess.run([sys.executable, "-m", "glassroom.interfaces.cli", "run", "--backend",
                        "microvm", "--", "true"], env=env, capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 125, r
    assert "GLASSROOM_MICROVM_ALLOW_TCG" in r.stderr and len(r.stderr.splitlines()) == 1


def test_plan_refuses_what_a_vm_cannot_honour() -> None:
    """No host directory is shared with a VM: refused at compile, naming the rule."""
    tmp_path = Path(tempfile.mkdtemp(prefix="glassroom-mvm-", dir="/var/tmp"))
    for policy, rule in (
        ({"risk": "high", "filesystem": {"write": [str(tmp_path)]}}, "filesystem.write[0]"),
        ({"risk": "high", "filesystem": {"read": ["/usr", str(tmp_path)]}}, "filesystem.read[1]"),
    ):
        with pytest.raises(PlanError) as exc:
            compile_policy(validate_policy(policy), "microvm")
        assert exc.value.rule == rule
    # The same policy compiles for namespaces: the refusal is the tier's.
    try:
        compile_policy(validate_policy({"filesystem": {"write": [str(tmp_path)]}}), "namespaces")
    finally:
        tmp_path.rmdir()


def test_a_vm_sandbox_end_to_end(audit_log: Path) -> None:
    """Walls in the audit, fresh state, teardown leaves nothing."""
    _skip_without_qemu()
    with Sandbox({"risk": "maximum"}, audit_log=audit_log) as sb:
        r = sb.run(["sh", "-c", "uname -r; id -u; ls /sys/class/net; echo x > /workspace/a"])
        assert r.exit_code == 0, r
        kernel, uid, nets = r.stdout.split("\n")[:3]
        assert kernel != os.uname().release  # its own kernel
        assert uid == "1000" and nets == "lo"  # no network device at all
        inst: Any = sb._sup.instance
        qemu_pid, vmdir = inst.proc.pid, inst.vmdir
        sid = sb.id
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{qemu_pid}/status").read_text().splitlines())  # fmt: skip
    # Root outside, nobody inside: QEMU itself holds nothing over the host.
    want_uid = _vmm_uid_ok(int(status["Uid"].split()[0]))
    assert status["Uid"].split() == [str(want_uid)] * 4
    for cap in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert status[cap].strip() == "0000000000000000", cap
    assert status["NoNewPrivs"].strip() == "1" and status["Groups"].strip() == ""
    created = next(r for r in records(audit_log, sid) if r["event"] == "sandbox.created")
    walls = created["details"]["walls"]
    assert created["details"]["backend"] == "microvm"
    assert walls["network"] == "no network device"
    assert walls["vmm_uid"] == want_uid
    if walls["emulated"]:
        assert "emulated — test only" in walls["accel"]
    destroyed = next(r for r in records(audit_log, sid) if r["event"] == "sandbox.destroyed")
    assert destroyed["details"]["clean"] is True
    assert not vmdir.exists()
    assert not Path(f"/proc/{qemu_pid}").exists() or _zombie_or_gone(qemu_pid)


def _vmm_uid_ok(uid: int) -> int:
    """As root, QEMU's uid is one of the VMM range (never 65534, never root);
    as a user, it is that user."""
    from glassroom import _config

    if os.geteuid() != 0:
        assert uid == os.geteuid()
        return uid
    first, count = _config.vmm_uid_range()
    assert first <= uid < first + count and uid != 65534, uid
    return uid


def test_each_vm_has_its_own_uid() -> None:
    """Two VMs at once never share QEMU's uid (one could ptrace the other)."""
    _skip_without_qemu()
    with Sandbox({"risk": "maximum"}) as a, Sandbox({"risk": "maximum"}) as b:
        uids = [proc.real_uid(sb._sup.instance.proc.pid) for sb in (a, b)]
        assert a.run(["true"]).exit_code == 0 and b.run(["true"]).exit_code == 0
    assert uids[0] != uids[1] or os.geteuid() != 0
    for uid in uids:
        assert uid is not None
        _vmm_uid_ok(uid)


def test_a_nic_vm_refuses_a_root_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: where QEMU's uid cannot reach the egress socket (a state dir
    only root may enter), the VM does not start; it never falls back to root."""
    _skip_without_qemu()
    if os.geteuid() != 0:
        pytest.skip("as a normal user QEMU is that user: no uid to drop to")
    shut = Path(tempfile.mkdtemp(prefix="glassroom-shut-", dir="/tmp"))  # 0700
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(shut))
    try:
        with pytest.raises(WallError) as exc:
            Sandbox({"risk": "high", "network": {"allow": ["api.test"]}},
                    audit_log=shut / "a.jsonl")  # fmt: skip
        assert exc.value.rule == "vmm" and "cannot reach" in str(exc.value)
        assert not list((shut / "microvm").glob("sb-*"))  # nothing left behind
    finally:
        subprocess.run(["rm", "-rf", str(shut)], check=False)


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (OSError, IndexError):
        return True


CRASHER = """
import os, sys, time
from glassroom import Sandbox
sb = Sandbox({"risk": "high"}, audit_log=sys.argv[1])
inst = sb._sup.instance
print(inst.proc.pid, inst.vmdir, sb.id, flush=True)
time.sleep(600)
"""


def test_reaper_cleans_after_a_crashed_supervisor(tmp_path: Path) -> None:
    _skip_without_qemu()
    from glassroom.lifecycle import reaper

    p = subprocess.Popen([sys.executable, "-c", CRASHER, str(tmp_path / "a.jsonl")],
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ))  # fmt: skip
    try:
        assert p.stdout is not None
        line = p.stdout.readline().split()
        assert line, "the crasher did not start its sandbox"
        qemu_pid, vmdir, sid = int(line[0]), Path(line[1]), line[2]
        assert vmdir.exists() and Path(f"/proc/{qemu_pid}").exists()
    finally:
        p.send_signal(signal.SIGKILL)  # the supervisor dies without destroying anything
        p.wait()
    # QEMU dies with its supervisor (PR_SET_PDEATHSIG), as bwrap does...
    deadline = time.monotonic() + 10
    while not _zombie_or_gone(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _zombie_or_gone(qemu_pid)
    # ...and the reaper removes what it left: the VM's dir, its cgroups, the record.
    assert vmdir.exists()
    cleaned = [c for c in reaper.reap() if c["sandbox_id"] == sid]
    assert cleaned and not cleaned[0].get("errors"), cleaned
    assert cleaned[0].get("cgroups"), cleaned
    assert not vmdir.exists()


def test_the_purpose_built_kernel_is_what_boots(audit_log: Path) -> None:
    """`microvm prepare` builds the guest kernel; a VM boots it, with its walls.

    The pair: a harmless read of the kernel's identity works; loading code
    into that kernel does not (it has no module support at all, and the
    guest's seccomp filter refuses the call before that)."""
    _skip_without_qemu()
    from glassroom.backends.microvm import image, kernel

    if image.kernel_choice() == "stock" or kernel.find(image.cache_dir()) is None:
        pytest.skip("no purpose-built kernel here (GLASSROOM_MICROVM_KERNEL=stock, or "
                    "`glassroom microvm prepare` has not built it)")  # fmt: skip
    probe = (
        "import ctypes, os\n"
        "print(os.uname().release)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.syscall(313, -1, b'', 0)\n"  # finit_module(-1, "", 0)
        "print(r, ctypes.get_errno())\n"
    )
    with Sandbox({"risk": "maximum"}, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", probe])
        sid = sb.id
    assert r.exit_code == 0, r
    release, result = r.stdout.splitlines()
    assert release.endswith("-glassroom")
    assert result == "-1 1"  # EPERM from the guest's seccomp filter
    created = next(x for x in records(audit_log, sid) if x["event"] == "sandbox.created")
    walls = created["details"]["walls"]
    assert walls["guest_kernel"] == release
    assert walls["landlock"]["abi"] >= 6  # 6.12: signal and abstract-socket scoping


def test_the_stock_kernel_still_boots(
    audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GLASSROOM_MICROVM_KERNEL=stock``: Debian's cloud kernel through the
    initramfs, with the same walls (its Landlock is ABI 2)."""
    _skip_without_qemu()
    from glassroom.backends.microvm import image

    if image.stock_kernel(image.cache_dir()) is None:
        pytest.skip("Debian's stock kernel is not fetched (`glassroom microvm prepare` does it)")
    monkeypatch.setenv(image.KERNEL_ENV, "stock")
    monkeypatch.setenv("GLASSROOM_MICROVM_SNAPSHOT", "0")
    with Sandbox({"risk": "maximum"}, audit_log=audit_log) as sb:
        ok = sb.run(["sh", "-c", "uname -r; echo x > /workspace/a && cat /workspace/a"])
        bad = sb.run(["sh", "-c", "echo x > /usr/evil"])
        sid = sb.id
    assert ok.exit_code == 0, ok
    release, content = ok.stdout.splitlines()
    assert not release.endswith("-glassroom") and content == "x"
    assert bad.exit_code != 0 and "Read-only file system" in bad.stderr
    created = next(x for x in records(audit_log, sid) if x["event"] == "sandbox.created")
    walls = created["details"]["walls"]
    assert walls["guest_kernel"] == release and walls["landlock"]["abi"] >= 1


def test_the_template_vm_drops_root_too(tmp_path: Path) -> None:
    """The VM booted once to make a snapshot runs like a task's: its own uid.
    The snapshot it writes (through an fd glassroom opened) still restores."""
    _skip_without_qemu()
    import threading

    from glassroom.backends.microvm import image

    img, accel = image.prepare(), qemu.choose_accel()
    # A shape no policy here uses, and no snapshot of it left over: a template boots.
    qemu.snapshot_path(img, 192, 1, accel).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="glassroom-tmpl-", dir="/tmp"))
    os.chmod(work, 0o755)
    made: dict[str, Path] = {}
    t = threading.Thread(target=lambda: made.update(
        path=qemu.ensure_snapshot(img, accel, 192, 1, work / "microvm")))  # fmt: skip
    t.start()
    uids: set[int] = set()
    end = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < end:
        for d in Path("/proc").iterdir():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"qemu-system-x86_64") and b"192M" in argv:
                    uids.add(d.stat().st_uid)
            except (OSError, IndexError):
                continue
        time.sleep(0.02)
    t.join(timeout=60)
    try:
        assert made.get("path") is not None and made["path"].stat().st_size > 1 << 20
        assert uids, "the template QEMU was never seen"
        for uid in uids:
            _vmm_uid_ok(uid)
    finally:
        if made.get("path"):
            made["path"].unlink()
        subprocess.run(["rm", "-rf", str(work)], check=False)
