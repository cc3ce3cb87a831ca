"""Small process helpers for the backend: prctl flags, pidfds, /proc lookups.

They live in ``_sys`` because this is the only place where raw syscalls (via
ctypes) are allowed.  The /proc readers return ``None``/empty instead of
raising when the process is gone, since that race is normal for a reaper.
"""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
from typing import Any

__all__ = [
    "as_user",
    "children",
    "mounts_under",
    "pidfd_open",
    "process_start_time",
    "set_dumpable",
    "set_no_new_privs",
    "wait_exit",
]

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


#: util-linux's setpriv, which sets the ids and then execs its argument.
SETPRIV = "/usr/bin/setpriv"


def as_user(argv: list[str], ids: tuple[int, int] | None) -> tuple[list[str], dict[str, Any]]:
    """``argv`` and the ``Popen`` keywords that run it as ``ids`` (uid, gid) with
    no supplementary groups; ``None``: as this process.

    Why setpriv rather than ``Popen(user=, group=, extra_groups=)``: with
    those keywords CPython cannot use ``vfork`` and copies the whole
    supervisor (a large ``glassroom serve`` with many threads) with ``fork``
    for every sandbox: about 3 ms of CPU per spawn against 1.7 ms, measured
    at 8 concurrent clients.  setpriv drops to the ids (``setresuid`` /
    ``setresgid`` / ``setgroups(0)``: saved ids and capabilities go too) and
    replaces itself with the program, so the pid, and what the program's
    ``--die-with-parent`` watches, are the same.  Without setpriv the
    keywords are used: the same ids, just a slower start."""
    if ids is None:
        return argv, {}
    uid, gid = ids
    if os.access(SETPRIV, os.X_OK):
        return [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv], {}
    return argv, {"user": uid, "group": gid, "extra_groups": []}


def wait_exit(p: subprocess.Popen[bytes], timeout: float) -> None:
    """``p.wait(timeout)`` woken by the kernel, not by polling.

    ``Popen.wait`` with a timeout polls with sleeps that double up to 50 ms,
    so a child that exits 5 ms in is seen 7.5 ms in, on every sandbox's
    destroy.  A pidfd becomes readable the moment the child exits.  The pid
    is still ours while unreaped; if another thread reaped it first, the
    final ``poll`` says so.  Raises ``subprocess.TimeoutExpired`` as
    ``wait`` does."""
    if p.poll() is not None:
        return
    try:
        fd = os.pidfd_open(p.pid)
    except OSError:
        p.wait(timeout=timeout)
        return
    try:
        select.select([fd], [], [], max(timeout, 0.0))
    finally:
        os.close(fd)
    if p.poll() is None:
        raise subprocess.TimeoutExpired(p.args, timeout)


def _prctl(option: int, value: int, what: str) -> None:
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({what}, {value}): {os.strerror(err)}")


def set_no_new_privs() -> None:
    """Forbid gaining privileges through execve (setuid bits, file caps); irreversible."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def set_dumpable(flag: bool) -> None:
    """Non-dumpable processes cannot be ptraced or have /proc/PID/mem read by peers."""
    _prctl(_PR_SET_DUMPABLE, int(flag), "PR_SET_DUMPABLE")


def pidfd_open(pid: int) -> int:
    """A pidfd (O_CLOEXEC by default) for signalling ``pid`` without pid-reuse races."""
    return os.pidfd_open(pid)


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone.

    Together with the pid it identifies a process across pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and ')': fields resume after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])  # rest[0] is field 3
    except (IndexError, ValueError):
        return None


def real_uid(pid: int) -> int | None:
    """The real uid of ``pid`` (``/proc/PID/status``), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (depth-first), from /proc/PID/task/*/children."""
    found: list[int] = []
    stack = [pid]
    seen = {pid}
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children", encoding="ascii") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            for kid in kids:
                if kid not in seen:
                    seen.add(kid)
                    found.append(kid)
                    stack.append(kid)
    return found


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or beneath ``prefix`` (this process's mount namespace)."""
    base = prefix.rstrip("/") or "/"
    result: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return result
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if base == "/" or point == base or point.startswith(base + "/"):
            result.append(point)
    return result
