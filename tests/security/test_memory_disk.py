"""resources.memory_mib and resources.disk_mib mean what they say, apart, on every tier.

Issue 13, item 3: with /workspace and /tmp on tmpfs, the memory cap had to
be memory + disk (tmpfs pages are charged as memory), so ``memory_mib =
256`` let a task hold 704 MiB.  The files now live on a scratch disk
accounted apart (``_sys/scratch.py``).  Each pair: the harmless twin
works, the attack fails with the exact outcome (SIGKILL by the OOM killer,
ENOSPC) and the audit log holds the deny record with its rule.

The disk is made much larger than memory on purpose: under the old cap
(memory + disk) every "killed" attack here would have survived.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_blocked, records
from glassroom import WallError
from glassroom.drill._attempts import py_hold

MEM = 128
DISK = 256
POLICY = {"resources": {"memory_mib": MEM, "disk_mib": DISK, "pids": 32},
          "tools": {"allow": ["python3", "sh", "head", "cat"]}}  # fmt: skip

FILL = r"""
import errno, sys
n = 0
try:
    with open(sys.argv[1], 'wb') as f:
        while True:
            f.write(b'd' * (1 << 20)); f.flush(); n += 1
except OSError as e:
    print('filled', n, errno.errorcode.get(e.errno, e.errno))
"""


@pytest.fixture(autouse=True)
def _disk_needs_root(request: pytest.FixtureRequest) -> None:
    """Unprivileged, the namespaces tier has no loop device: its files count in
    memory_mib by design (test_nonroot.py checks that layout)."""
    if os.geteuid() != 0 and "backend" in request.fixturenames \
            and request.getfixturevalue("backend") == "namespaces":  # fmt: skip
        pytest.skip("unprivileged namespaces tier: tmpfs counted in memory_mib")


def _killed_for_memory(res: Any) -> None:
    assert res.signal == 9, (res.exit_code, res.stdout, res.stderr[-200:])
    assert "held" not in res.stdout
    assert any(b.rule == "resources.memory_mib" for b in res.blocked), res.blocked


def test_memory_below_cap_works(make_sandbox: Callable[..., Any], audit_log: Path) -> None:
    sb = make_sandbox(POLICY)
    res = sb.run(py_hold(MEM - 48))
    assert res.exit_code == 0 and f"held {MEM - 48}" in res.stdout, res.stderr[-300:]
    assert not [r for r in records(audit_log, sb.id) if r.get("rule") == "resources.memory_mib"]


def test_memory_over_cap_is_killed(make_sandbox: Callable[..., Any], audit_log: Path) -> None:
    """memory_mib + 64 MiB, far below memory + disk: the OOM killer ends it."""
    sb = make_sandbox(POLICY)
    res = sb.run(py_hold(MEM + 64))
    _killed_for_memory(res)
    hits = assert_blocked(audit_log, sb.id, "resources.memory_mib")
    assert hits[0]["details"] == {"action": "limit", "target": "memory"}


def test_full_disk_leaves_memory_to_the_task(make_sandbox: Callable[..., Any]) -> None:
    """Harmless: disk_mib of files, then memory_mib - 48 MiB still fits (page cache
    of the files is reclaimed, it is not the task's memory)."""
    sb = make_sandbox(POLICY)
    res = sb.run(py_hold(MEM - 48, fill=True))
    assert res.exit_code == 0, (res.stdout, res.stderr[-300:])
    assert "ENOSPC" in res.stdout and f"held {MEM - 48}" in res.stdout


def test_full_disk_does_not_raise_the_memory_cap(
    make_sandbox: Callable[..., Any], audit_log: Path
) -> None:
    sb = make_sandbox(POLICY)
    res = sb.run(py_hold(MEM + 64, fill=True))
    assert "ENOSPC" in res.stdout, res.stdout
    _killed_for_memory(res)
    assert_blocked(audit_log, sb.id, "resources.memory_mib")


def test_files_up_to_disk_fit(make_sandbox: Callable[..., Any]) -> None:
    """Harmless: files much larger than memory_mib fit on the disk."""
    sb = make_sandbox(POLICY)
    res = sb.run(["sh", "-c", f"head -c {MEM + 64}M /dev/zero > /workspace/big && echo OK"])
    assert res.exit_code == 0 and "OK" in res.stdout, res.stderr[-300:]
    assert not any(b.rule == "resources.memory_mib" for b in res.blocked)


@pytest.mark.parametrize("where", ["/workspace", "/tmp"])
def test_writing_past_disk_is_enospc(
    where: str, make_sandbox: Callable[..., Any], audit_log: Path
) -> None:
    """/workspace and /tmp share one disk of disk_mib: ENOSPC, and the deny record."""
    sb = make_sandbox(POLICY)
    res = sb.run(["python3", "-c", FILL, f"{where}/fill"])
    assert "ENOSPC" in res.stdout, (res.stdout, res.stderr[-300:])
    filled = int(res.stdout.split()[1])
    assert MEM + 64 < filled <= DISK, filled  # files are bounded by the disk, not memory
    hits = assert_blocked(audit_log, sb.id, "resources.disk_mib")
    assert {"action": "limit", "target": "disk (workspace full)"} in [h["details"] for h in hits]
    other = "/tmp" if where == "/workspace" else "/workspace"
    more = sb.run(["python3", "-c", FILL, f"{other}/more"])
    assert "ENOSPC" in more.stdout and int(more.stdout.split()[1]) <= 1, more.stdout


def test_workspace_is_a_scratch_disk(make_sandbox: Callable[..., Any]) -> None:
    """The walls say where the files are; the memory cap is the policy's own."""
    sb = make_sandbox(POLICY)
    ws = sb.walls["workspace"]
    assert ws["disk_bytes"] == DISK << 20
    assert "ext4 scratch disk" in ws["kind"]
    if "guest_cgroup" in sb.walls:
        assert sb.walls["guest_cgroup"]["memory_bytes"] == MEM << 20
    elif sb.backend == "namespaces":
        assert sb.walls["cgroups"]["memory_bytes"] == MEM << 20
    else:  # gvisor: the sentry and gofer (~22 MiB) share the cgroup; at most 32 MiB of slack
        assert MEM << 20 < sb.walls["cgroups"]["memory_bytes"] <= (MEM + 48) << 20


def test_scratch_on_tmpfs_refused(
    make_sandbox: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: an image on tmpfs is memory again, so the sandbox does not start."""
    if os.geteuid() != 0:
        pytest.skip("as non-root the namespaces tier has no scratch disk (tmpfs in memory_mib)")
    shm = Path(tempfile.mkdtemp(prefix="gr-scratch-", dir="/dev/shm"))
    try:
        os.chmod(shm, 0o711)
        monkeypatch.setenv("GLASSROOM_SCRATCH_DIR", str(shm))
        with pytest.raises(WallError) as err:
            make_sandbox(POLICY)
        assert err.value.rule == "resources.disk_mib"
        assert "tmpfs" in str(err.value)
    finally:
        os.rmdir(shm)


def test_no_scratch_left_on_the_host(make_sandbox: Callable[..., Any]) -> None:
    """While it runs and after it is gone: no image file, no host mount of the disk."""
    from glassroom import _config

    sb = make_sandbox(POLICY)
    sb.run(["sh", "-c", "echo x > /workspace/x"])
    sid = sb.id
    left = [p.name for p in _config.scratch_dir().glob("*")] if _config.scratch_dir().exists() else []
    assert not [n for n in left if sid in n or n.startswith("vm-")], left
    mounts = Path("/proc/self/mountinfo").read_text()
    assert sid not in mounts
    sb.destroy()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    assert sid not in loops


def test_memory_cap_errno_for_files_in_dev_shm(make_sandbox: Callable[..., Any]) -> None:
    """/dev/shm is memory, and stays counted as memory: 64 MiB cap, ENOSPC past it."""
    sb = make_sandbox(POLICY)
    res = sb.run(["python3", "-c", FILL, "/dev/shm/fill"])
    assert "ENOSPC" in res.stdout and int(res.stdout.split()[1]) <= 64, res.stdout


@pytest.mark.parametrize("recorded", [True, False])
def test_reaper_detaches_a_scratch_disk_left_mounted(tmp_path: Path, recorded: bool) -> None:
    """A supervisor that died between making the disk and the sandbox taking it
    leaves a host mount; the reaper detaches it (and the loop device goes), also
    when it died before the record named the disk (found by its name)."""
    import json
    import secrets

    from glassroom import _config
    from glassroom._sys import scratch
    from glassroom.lifecycle.reaper import reap

    if os.geteuid() != 0:
        pytest.skip("the loop-mounted scratch disk needs root")
    sid = f"sb-reap{secrets.token_hex(5)}"
    disk = scratch.ScratchMount.create(_config.scratch_dir(), sid, 32 << 20, (65534, 65534),
                                       {"workspace": 0o755})  # fmt: skip
    assert sid in Path("/proc/self/mountinfo").read_text()
    state = tmp_path / "state"
    (state / "sandboxes").mkdir(parents=True)
    (state / "sandboxes" / f"{sid}.json").write_text(json.dumps({
        "sandbox_id": sid, "backend": "namespaces",
        "supervisor": {"pid": os.getpid(), "start": -1},  # not this process: an orphan
        "pids": [], "cgroup": None, "paths": [],
        "scratch": [str(disk.mountpoint)] if recorded else [],
    }))  # fmt: skip
    done = reap(state)
    assert [d["sandbox_id"] for d in done] == [sid] and "errors" not in done[0], done
    assert sid not in Path("/proc/self/mountinfo").read_text()
    assert not disk.mountpoint.exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    assert sid not in loops
    assert not (state / "sandboxes" / f"{sid}.json").exists()


_HOST_PEEK = r"""
import errno, os, sys
os.setgroups([]); os.setgid(1000); os.setuid(1000)
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    print('opened', sorted(os.listdir(fd)))
except OSError as e:
    print('refused', errno.errorcode[e.errno])
"""


@pytest.mark.parametrize("root_only", [False, True])
def test_gvisor_scratch_dirs_not_reachable_by_host_uid_1000(root_only: bool) -> None:
    """gVisor's scratch dirs belong to host uid 1000 (the task's uid, a real
    account on most hosts).  While the host mount exists (the start, until
    the gofer holds its binds) /proc/self/mountinfo names it to every user;
    a uid-1000 process that opened a dir there then kept read-write access
    to the sandbox's /workspace or /tmp after the detach.  The disk's root
    is 0700 for gVisor (root_only: runsc, as root, resolves it); the twin
    (0711, the namespaces tier's, whose bwrap runs as the sandbox uid) shows
    the path is otherwise open to that uid."""
    import secrets
    import sys

    from glassroom import _config
    from glassroom._sys import scratch

    if os.geteuid() != 0:
        pytest.skip("the loop-mounted scratch disk needs root")
    sid = f"sb-peek{secrets.token_hex(5)}"
    disk = scratch.ScratchMount.create(_config.scratch_dir(), sid, 32 << 20, (1000, 1000),
                                       {"workspace": 0o755}, root_only=root_only)  # fmt: skip
    try:
        assert str(disk.mountpoint) in Path("/proc/self/mountinfo").read_text()
        out = subprocess.run([sys.executable, "-c", _HOST_PEEK, disk.path("workspace")],
                             capture_output=True, text=True, timeout=30, check=False).stdout  # fmt: skip
    finally:
        disk.detach()
    assert out.strip() == ("refused EACCES" if root_only else "opened []"), out


def test_gvisor_asks_for_a_root_only_scratch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gVisor backend makes its disk with root_only (see the test above)."""
    from glassroom._sys import scratch

    seen: list[dict[str, Any]] = []

    def fake(*args: Any, **kw: Any) -> Any:
        seen.append(kw)
        raise WallError("resources.disk_mib: stop here", rule="resources.disk_mib")

    monkeypatch.setattr(scratch.ScratchMount, "create", fake)
    from glassroom import Sandbox

    with pytest.raises(WallError):
        Sandbox(POLICY, backend="gvisor")
    assert len(seen) == 1 and seen[0]["root_only"] is True, seen


def test_scratch_template_errors_continue(tmp_path: Path) -> None:
    """The host kernel mounts the scratch ext4; its error behaviour is fixed
    by glassroom (``-e continue``), not left to the host's /etc/mke2fs.conf
    (``errors = panic`` there could let a sandbox that fills a full host disk
    panic the host).  A full host disk is the sandbox's ENOSPC (shown above)."""
    import shutil as _shutil

    from glassroom._sys import scratch

    dumpe2fs = _shutil.which("dumpe2fs") or _shutil.which("dumpe2fs", path="/usr/sbin:/sbin")
    if dumpe2fs is None or scratch.fs_type(tmp_path) in (0x01021994, 0x858458F6):
        pytest.skip("needs dumpe2fs and a disk-backed tmp dir")
    img = tmp_path / "s.img"
    scratch.make_image(img, 32 << 20)
    out = subprocess.run([dumpe2fs, "-h", str(img)], capture_output=True, text=True,
                         timeout=30, check=False).stdout  # fmt: skip
    assert "Errors behavior:          Continue" in out, out[-500:]
