"""Small process helpers for the backend: prctl flags, pidfds, /proc lookups.

They live in ``_sys`` because this is the only place where raw syscalls (via
ctypes) are allowed.  The /proc readers return ``None``/empty instead of
raising when the process is gone, since that race is normal for a reaper.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "children",
    "mounts_under",
    "pidfd_open",
    "process_start_time",
    "set_dumpable",
    "set_no_new_privs",
]

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


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
