"""The default seccomp profile, applied for real through ``bwrap --seccomp``.

Security checks come in pairs: the harmless twin must still work (or the
filter is too broad), the dangerous call must fail with the exact errno.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from glassroom._errors import WallError
from glassroom._sys import seccomp

BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bwrap not installed")

# Runs inside the sandbox with the system python (3.11.2: no os.unshare).
PRELUDE = textwrap.dedent(
    """
    import ctypes, errno, json, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    def sc(nr, *args):
        ctypes.set_errno(0)
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a) for a in args])
        return [r, ctypes.get_errno() if r == -1 else 0]
    out = {}
    """
)


def run_filtered(body: str, *, profile: str = "default") -> dict[str, list[int]]:
    assert BWRAP is not None
    fd = seccomp.bpf_memfd(profile)
    try:
        # fmt: off
        argv = [
            BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--unshare-user", "--seccomp", str(fd), "--",
            "/usr/bin/python3", "-I", "-c",
            PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))",
        ]
        # fmt: on
        res = subprocess.run(
            argv, pass_fds=(fd,), capture_output=True, text=True, timeout=30, check=False
        )
    finally:
        os.close(fd)
    assert res.returncode == 0, res.stderr
    result: dict[str, list[int]] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def test_profile_loads_with_reasons() -> None:
    entries = seccomp.load_profile()
    names = {n for e in entries for n in e.syscalls}
    for required in [
        "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
        "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig",
        "fsmount", "fspick", "mount_setattr", "bpf", "keyctl", "add_key", "request_key",
        "userfaultfd", "perf_event_open", "kexec_load", "kexec_file_load", "init_module",
        "finit_module", "delete_module", "setns", "unshare", "clone", "clone3",
        "clock_settime", "clock_adjtime", "settimeofday", "adjtimex", "reboot", "ioctl",
        "swapon", "swapoff", "acct", "quotactl", "open_by_handle_at", "name_to_handle_at",
        "iopl", "ioperm", "syslog", "io_uring_setup", "io_uring_enter", "io_uring_register",
        "lookup_dcookie", "uselib", "vhangup", "nfsservctl",
    ]:  # fmt: skip
        assert required in names, required
    assert all(e.reason for e in entries)
    clone3 = next(e for e in entries if "clone3" in e.syscalls)
    assert clone3.errno == "ENOSYS"


def test_compile_is_cached_and_well_formed() -> None:
    bpf = seccomp.compile_bpf()
    assert bpf and len(bpf) % 8 == 0
    assert seccomp.compile_bpf() is bpf
    assert seccomp.skipped_syscalls() == ()  # x86_64 knows every name in the profile
    assert seccomp.libseccomp_version().count(".") == 2


def test_memfd_is_cloexec_and_at_offset_zero() -> None:
    fd = seccomp.bpf_memfd()
    try:
        assert not os.get_inheritable(fd)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        assert os.read(fd, 1 << 20) == seccomp.compile_bpf()
    finally:
        os.close(fd)


def _write_profile(tmp: Path, name: str, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp / f"seccomp_{name}.toml").write_text(text)
    monkeypatch.setattr(seccomp, "_HERE", tmp)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[deny]]\nsyscalls = ["bpf"]\nerrno = "EPERM"\n', "reason"),
        ('[[deny]]\nsyscalls = ["bpf"]\nerrno = "EPERM"\nreason = "x"\nwhy = 1\n', "unknown"),
        ('[[deny]]\nsyscalls = ["bpf"]\nerrno = "EACCES"\nreason = "x"\n', "errno"),
        (
            '[[deny]]\nsyscalls = ["ioctl"]\nerrno = "EPERM"\nreason = "x"\n'
            'args = [{index = 1, op = "masked_eq", value = 1}]\n',
            "mask",
        ),
        ("deny = []\nextra = 1\n", "unknown"),
    ],
)
def test_invalid_profiles_are_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    _write_profile(tmp_path, "bad", text, monkeypatch)
    with pytest.raises(WallError, match=message):
        seccomp.load_profile("bad")


def test_unknown_syscall_names_are_collected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '[[deny]]\nsyscalls = ["bpf", "vm86", "no_such_call"]\nerrno = "EPERM"\nreason = "x"\n'
    _write_profile(tmp_path, "odd", text, monkeypatch)
    monkeypatch.setattr(seccomp, "_cache", {})
    assert seccomp.skipped_syscalls("odd") == ("vm86", "no_such_call")


@needs_bwrap
def test_ptrace_denied_getpid_allowed() -> None:
    out = run_filtered(
        """
        out["getpid"] = sc(39)
        out["ptrace"] = sc(101, 0x4206, os.getppid(), 0, 0)  # PTRACE_SEIZE parent
        out["process_vm_readv"] = sc(310, os.getppid(), 0, 0, 0, 0, 0)
        """
    )
    assert out["getpid"][1] == 0
    assert out["ptrace"] == [-1, 1]
    assert out["process_vm_readv"] == [-1, 1]


@needs_bwrap
def test_new_user_namespace_denied_fork_allowed() -> None:
    out = run_filtered(
        """
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        out["fork"] = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), 0]
        out["unshare_user"] = sc(272, 0x10000000)
        out["unshare_nothing"] = sc(272, 0)
        out["clone_newuser"] = sc(56, 0x10000000 | 17, 0, 0, 0, 0)
        out["clone3"] = sc(435, 0, 0)
        out["setns"] = sc(308, 0, 0)
        out["mount"] = sc(165, 0, 0, 0, 0, 0)
        """
    )
    assert out["fork"] == [7, 0]
    assert out["unshare_user"] == [-1, 1]
    assert out["unshare_nothing"] == [-1, 1]
    assert out["clone_newuser"] == [-1, 1]
    assert out["clone3"] == [-1, 38]  # ENOSYS: libc falls back to the filtered clone
    assert out["setns"] == [-1, 1]
    assert out["mount"] == [-1, 1]


@needs_bwrap
def test_tiocsti_denied_tiocgwinsz_allowed() -> None:
    out = run_filtered(
        """
        import termios
        master, slave = os.openpty()
        buf = ctypes.create_string_buffer(8)
        out["winsz"] = sc(16, slave, termios.TIOCGWINSZ, ctypes.addressof(buf))
        c = ctypes.c_char(b"x")
        out["sti"] = sc(16, slave, 0x5412, ctypes.addressof(c))
        # High bits set: the kernel truncates cmd to 32 bits, the filter must too.
        out["sti_high"] = sc(16, slave, 0xFFFFFFFF00005412, ctypes.addressof(c))
        out["linux"] = sc(16, slave, 0x541C, ctypes.addressof(c))
        """
    )
    assert out["winsz"] == [0, 0]
    assert out["sti"] == [-1, 1]
    assert out["sti_high"] == [-1, 1]
    assert out["linux"] == [-1, 1]


@needs_bwrap
def test_kernel_surface_denied_ordinary_io_allowed() -> None:
    out = run_filtered(
        """
        fd = os.open("/etc/hostname", os.O_RDONLY)
        out["read"] = [len(os.read(fd, 10)) > 0, 0]
        out["bpf"] = sc(321, 0, 0, 0)
        out["keyctl"] = sc(250, 0, 0, 0)
        out["userfaultfd"] = sc(323, 0)
        out["io_uring_setup"] = sc(425, 1, 0)
        out["open_by_handle_at"] = sc(304, 0, 0, 0)
        out["perf_event_open"] = sc(298, 0, 0, 0, 0, 0)
        """
    )
    assert out["read"] == [True, 0]
    for name in ("bpf", "keyctl", "userfaultfd", "io_uring_setup", "open_by_handle_at"):
        assert out[name] == [-1, 1], name
    assert out["perf_event_open"] == [-1, 1]
