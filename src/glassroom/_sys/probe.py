"""Host probes for ``glassroom doctor``: what isolation this machine can offer.

Every probe returns plain data and never raises: doctor must report a
broken host, not crash on it.  Probes try the real operation where that is
cheap (creating a user namespace in a throwaway child) because sysctls and
config files do not tell the whole story (LSMs, container runtimes).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess

from glassroom._sys import cgroups as _cgroups

__all__ = ["bwrap", "cgroups", "kvm", "landlock_abi", "qemu", "runsc", "seccomp", "userns"]

_CLONE_NEWUSER = 0x10000000


def _first_line(argv: list[str]) -> str | None:
    """First non-empty output line of ``argv`` (3 s timeout), None if unavailable."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        res = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=3,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (res.stdout + "\n" + res.stderr).splitlines():
        if line.strip():
            return line.strip()
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def userns() -> tuple[bool, str]:
    """Can this user create a user namespace?  Tried for real in a forked child."""
    limit = (_read("/proc/sys/user/max_user_namespaces") or "?").strip()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe work, then _exit
            code = 0 if libc.unshare(_CLONE_NEWUSER) == 0 else (ctypes.get_errno() or 1)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    except OSError as exc:
        return False, f"cannot test: {exc}"
    if code == 0:
        return True, f"unshare(CLONE_NEWUSER) works (max_user_namespaces={limit})"
    reason = os.strerror(code) if code > 0 else f"child killed by signal {-code}"
    return False, f"unshare(CLONE_NEWUSER) failed: {reason} (max_user_namespaces={limit})"


def landlock_abi() -> int:
    """Landlock ABI version, 0 when absent or disabled (``lsm=`` boot parameter)."""
    try:
        from glassroom._sys import landlock

        return landlock.abi_version()
    except Exception:
        return 0


def seccomp() -> tuple[bool, str]:
    """Kernel seccomp filter support (``Seccomp:`` in /proc/self/status) + libseccomp."""
    status = _read("/proc/self/status") or ""
    if "\nSeccomp:" not in status:
        return False, "kernel built without CONFIG_SECCOMP (no Seccomp: in /proc/self/status)"
    try:
        from glassroom._sys import seccomp as _seccomp

        lib = f"libseccomp {_seccomp.libseccomp_version()}"
    except Exception as exc:
        return False, f"kernel supports seccomp but libseccomp is unusable: {exc}"
    return True, f"kernel filter mode; {lib}"


def cgroups() -> dict[str, tuple[str, str]]:
    """controller -> ("v1" | "v2", mount point)."""
    try:
        return _cgroups.layout()
    except Exception:
        return {}


def ptrace() -> tuple[bool, str]:
    """Can the file audit's tracer attach to a sandbox (``audit.level = "files"``)?

    Yama's ``ptrace_scope`` 3 forbids every attach; 2 needs CAP_SYS_PTRACE
    (root).  Without Yama, the tracer may attach to processes of its own uid.
    """
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    if scope is None:
        return True, "no Yama: the tracer attaches as the sandbox's uid"
    scope = scope.strip()
    if scope == "3":
        return False, "kernel.yama.ptrace_scope=3 forbids every attach"
    if scope == "2" and os.geteuid() != 0:
        return False, "kernel.yama.ptrace_scope=2 allows attach only as root"
    return True, f"kernel.yama.ptrace_scope={scope}"


def bwrap() -> str | None:
    """``bubblewrap X.Y.Z`` or None when bwrap is not installed."""
    return _first_line(["bwrap", "--version"])


def kvm() -> tuple[str, str]:
    """("real" | "pvm" | "none", detail).

    PVM (pagetable-based virtual machines) provides /dev/kvm inside a guest
    without hardware virtualization; it is slower and has different nested
    behaviour, so doctor reports it apart from real KVM.
    """
    if not os.path.exists("/dev/kvm"):
        return "none", "/dev/kvm not present"
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    modules = _read("/proc/modules") or ""
    pvm = os.path.isdir("/sys/module/kvm_pvm") or any(
        line.split(" ", 1)[0] == "kvm_pvm" for line in modules.splitlines()
    )
    flags: set[str] = set()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    hw = sorted(flags & {"vmx", "svm"})
    access = "" if usable else "; /dev/kvm not read-writable by this user"
    if pvm or not hw:
        why = "kvm_pvm module loaded" if pvm else "no vmx/svm CPU flag"
        return "pvm", f"/dev/kvm present, {why}{access}"
    return "real", f"/dev/kvm present, CPU flag {hw[0]}{access}"


def runsc() -> str | None:
    """gVisor's ``runsc --version`` first line, or None."""
    return _first_line(["runsc", "--version"])


def qemu() -> str | None:
    """``qemu-system-x86_64 --version`` first line, or None."""
    with contextlib.suppress(Exception):
        return _first_line([f"qemu-system-{os.uname().machine}", "--version"])
    return None
