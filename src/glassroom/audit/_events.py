"""The one schema of what happens inside a sandbox, shared by every tier.

Each tier sees inside differently (namespaces: ptrace on seccomp-selected
syscalls; gVisor: runsc's ``--strace``; microVM: the guest agent's reports),
but all of them hand :func:`to_record` the same raw dict, so ``audit show``,
the tests and users read one format:

* event ``file.<op>`` - ``op`` is ``open``, ``unlink``, ``rename``, ``chmod``,
  ``link``, ``symlink``, ``mkdir``, ``rmdir``, ``truncate``, ``chown``,
  ``mknod``, ``utime``, ``xattr`` (the fd forms too: ``fchmod``,
  ``ftruncate``, ``fsetxattr``, ... name the file the fd points to); at
  level ``syscalls`` also ``stat``, ``access``, ``readlink``, ``chdir``.
* event ``exec`` - a process exec: ``path``, ``argv``, ``ppid``/``parent``.

Raw keys: ``syscall``, ``path`` (and ``path2`` for rename/link/symlink),
``flags`` (open), ``mode`` (octal string, when the call takes one),
``result`` ("ok" or an errno name), ``pid`` (as the sandbox sees it),
``source`` (who saw it).  The environment of an exec is never recorded.

Why the rule is derived here and not by the mechanism: the kernel only says
*that* a call failed (EACCES, EROFS).  Which policy section refused it
follows from the kind of access, and the same mapping must hold on every
tier.  The mapping is for the log only; enforcement stays with Landlock, the
mounts, gVisor's sentry or the guest kernel, never with these paths (they
were read from sandbox memory and could have changed since).
"""

from __future__ import annotations

from typing import Any

from .._sys.tracer import flags_text as open_flags

__all__ = ["classify", "op_of", "open_flags", "syscalls_for", "to_record", "writes"]

LEVELS = ("actions", "files", "syscalls")

#: Syscall -> file op, at level ``files``.
FILE_SYSCALLS: dict[str, str] = {
    "open": "open", "openat": "open", "openat2": "open", "creat": "open",
    "unlink": "unlink", "unlinkat": "unlink",
    "rename": "rename", "renameat": "rename", "renameat2": "rename",
    "chmod": "chmod", "fchmodat": "chmod", "fchmodat2": "chmod",
    "link": "link", "linkat": "link",
    "symlink": "symlink", "symlinkat": "symlink",
    "mkdir": "mkdir", "mkdirat": "mkdir",
    "rmdir": "rmdir",
    "truncate": "truncate",
    "chown": "chown", "lchown": "chown", "fchownat": "chown", "fchown": "chown",
    "fchmod": "chmod",
    "ftruncate": "truncate", "fallocate": "truncate",
    "mknod": "mknod", "mknodat": "mknod",
    "utime": "utime", "utimes": "utime", "futimesat": "utime", "utimensat": "utime",
    "setxattr": "xattr", "lsetxattr": "xattr", "fsetxattr": "xattr",
    "removexattr": "xattr", "lremovexattr": "xattr", "fremovexattr": "xattr",
}  # fmt: skip
EXEC_SYSCALLS = ("execve", "execveat")
#: Added at level ``syscalls``: metadata reads and moves.
META_SYSCALLS: dict[str, str] = {
    "stat": "stat", "lstat": "stat", "newfstatat": "stat", "statx": "stat",
    "access": "access", "faccessat": "access", "faccessat2": "access",
    "readlink": "readlink", "readlinkat": "readlink",
    "chdir": "chdir",
}  # fmt: skip

#: Ops that change the tree: a refusal of one is a ``filesystem.write`` refusal.
WRITE_OPS = frozenset({
    "unlink", "rename", "chmod", "link", "symlink", "mkdir", "rmdir", "truncate", "chown",
    "mknod", "utime", "xattr",
})  # fmt: skip
_OPEN_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
#: Errors that mean "a wall said no", as opposed to ENOENT, EEXIST, ...
DENIED = frozenset({"EACCES", "EPERM", "EROFS"})

MAX_PATH = 1024
MAX_ARGV = 256
MAX_ARG = 1024
MAX_ARGV_CHARS = 8192


def syscalls_for(level: str) -> tuple[str, ...]:
    """The syscall names a tier must watch at ``level`` (empty at ``actions``)."""
    if level == "actions":
        return ()
    names = [*FILE_SYSCALLS, *EXEC_SYSCALLS]
    if level == "syscalls":
        names += list(META_SYSCALLS)
    return tuple(names)


def op_of(syscall: str) -> str | None:
    """``"unlinkat"`` -> ``"unlink"``; exec calls -> ``"exec"``; unknown -> None."""
    if syscall in EXEC_SYSCALLS:
        return "exec"
    return FILE_SYSCALLS.get(syscall) or META_SYSCALLS.get(syscall)


def writes(op: str, flags: str = "") -> bool:
    """Does this access ask to change something (so a refusal is ``filesystem.write``)?"""
    if op == "open":
        return any(f in flags for f in _OPEN_WRITE_FLAGS)
    return op in WRITE_OPS


def classify(op: str, result: str, flags: str = "") -> tuple[str, str | None]:
    """``(decision, rule)`` of one access: allow if it worked, deny (with the
    policy section that refuses it) if a wall said no, info for other errors."""
    if result == "ok":
        return "allow", None
    if result not in DENIED:
        return "info", None
    if op == "exec":
        return "deny", "tools.allow"
    return "deny", "filesystem.write" if writes(op, flags) else "filesystem.read"


def _clip(text: Any, limit: int = MAX_PATH) -> str:
    """Bounded, keeping both ends: the file name at the end of a long path
    matters as much as where it starts."""
    s = str(text)
    half = limit // 2
    marked = f"{s[:half]}…({len(s) - 2 * half} chars)…{s[-half:]}"
    return s if len(s) <= max(limit, len(marked)) else marked


def _argv(argv: list[Any]) -> list[str]:
    """At most MAX_ARGV arguments and MAX_ARGV_CHARS characters in all, so
    one exec cannot make a 64 KiB record (or a thousand of them fill a disk)."""
    out: list[str] = []
    budget = MAX_ARGV_CHARS
    for i, a in enumerate(argv[:MAX_ARGV]):
        text = _clip(a, min(MAX_ARG, max(budget, 16)))
        if budget <= 0:
            out.append(f"…({len(argv) - i} more arguments)")
            break
        out.append(text)
        budget -= len(text)
    else:
        if len(argv) > MAX_ARGV:
            out.append(f"…({len(argv) - MAX_ARGV} more arguments)")
    return out


def to_record(raw: dict[str, Any], source: str) -> tuple[str, dict[str, Any], str, str | None]:
    """``(event, details, decision, rule)`` for the audit log from one raw observation.

    Every string is bounded; unknown keys are dropped (the raw dict may come
    from an untrusted guest).
    """
    syscall = _clip(raw.get("syscall", ""), 32)
    op = op_of(syscall) or "unknown"
    result = _clip(raw.get("result", "?"), 64)
    flags = _clip(raw.get("flags", ""), 128) if raw.get("flags") else ""
    details: dict[str, Any] = {"syscall": syscall, "path": _clip(raw.get("path", ""))}
    for key in ("path2", "mode", "parent", "exe", "path_arg", "path_at_exit", "path2_at_exit"):
        if raw.get(key) is not None:
            details[key] = _clip(raw[key])
    if raw.get("path_changed") is True:
        # Another thread rewrote the path while the call ran: which of the
        # two the kernel used is unknown, so both are kept.
        details["path_changed"] = True
    for key in ("path_unreadable", "path2_unreadable"):
        if raw.get(key) is True:  # a bad pointer: no name to log (the call got EFAULT)
            details[key] = True
    if flags:
        details["flags"] = flags
    for key in ("pid", "ppid"):
        value = raw.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            details[key] = value
    if op == "exec":
        for key in ("argv", "argv_arg"):
            argv = raw.get(key)
            if isinstance(argv, list):
                details[key] = _argv(argv)
    details["result"] = result
    details["source"] = source
    decision, rule = classify(op, result, flags)
    event = "exec" if op == "exec" else f"file.{op}"
    return event, details, decision, rule
