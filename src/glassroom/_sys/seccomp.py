"""Seccomp profiles: a TOML deny-list compiled to a BPF program for ``bwrap --seccomp``.

The profile lives in data (``seccomp_<name>.toml``) so that every denied
syscall carries the reason it is denied, and reviewers read one table rather
than code.  Compilation goes through libseccomp (``pyseccomp``) because it
knows the syscall numbers, the arch check and the argument comparisons; we
export the program and hand it to bubblewrap, which loads it just before it
execs the sandbox's init (after it has built the namespaces it needs).

Compiling costs milliseconds and happens on every sandbox start, so the
program is cached per profile name for the life of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp

from glassroom._errors import BackendUnavailable, WallError

__all__ = [
    "ArgCheck",
    "DenyEntry",
    "bpf_memfd",
    "compile_bpf",
    "libseccomp_version",
    "load_profile",
    "notify_entries",
    "skipped_syscalls",
]

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ERRNOS = {"EPERM": _errno.EPERM, "ENOSYS": _errno.ENOSYS}
_OPS = {
    "eq": pyseccomp.EQ,
    "ne": pyseccomp.NE,
    "lt": pyseccomp.LT,
    "le": pyseccomp.LE,
    "gt": pyseccomp.GT,
    "ge": pyseccomp.GE,
    "masked_eq": pyseccomp.MASKED_EQ,
}
_ENTRY_KEYS = {"syscalls", "errno", "args", "reason", "notify", "rule"}
_ARG_KEYS = {"index", "op", "value", "mask"}
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class ArgCheck:
    """One comparison on a syscall argument (all checks of an entry must match)."""

    index: int
    op: str
    value: int
    mask: int | None = None  # only for op == "masked_eq"


@dataclass(frozen=True)
class DenyEntry:
    """Syscalls that fail with ``errno`` (when every ``args`` check matches), and why."""

    syscalls: tuple[str, ...]
    errno: str
    reason: str
    args: tuple[ArgCheck, ...] = ()
    #: Answered by the supervisor (seccomp user notification, same errno, a
    #: ``deny`` record with ``rule``) on a tier that holds a listener; see
    #: :func:`notify_entries`.  Decided on register values only, never memory.
    notify: bool = False
    rule: str | None = None


@dataclass(frozen=True)
class _Compiled:
    bpf: bytes
    skipped: tuple[str, ...]


_cache: dict[tuple[str, bool], _Compiled] = {}


def _profile_path(name: str) -> Path:
    if not _NAME_RE.match(name):
        raise WallError(f"seccomp: invalid profile name {name!r}", rule="seccomp")
    path = _HERE / f"seccomp_{name}.toml"
    if not path.is_file():
        raise WallError(f"seccomp: no profile {name!r} ({path} not found)", rule="seccomp")
    return path


def _int(where: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
        raise WallError(f"seccomp: {where}: {key} must be an unsigned 64-bit integer")
    return value


def _parse_arg(where: str, raw: Any) -> ArgCheck:
    if not isinstance(raw, dict):
        raise WallError(f"seccomp: {where}: must be a table")
    unknown = set(raw) - _ARG_KEYS
    if unknown:
        raise WallError(f"seccomp: {where}: unknown key(s) {sorted(unknown)}")
    op = raw.get("op")
    if op not in _OPS:
        raise WallError(f"seccomp: {where}: op must be one of {sorted(_OPS)}, not {op!r}")
    index = _int(where, "index", raw.get("index"))
    if index > 5:
        raise WallError(f"seccomp: {where}: index must be 0..5")
    value = _int(where, "value", raw.get("value"))
    mask = raw.get("mask")
    if (op == "masked_eq") != (mask is not None):
        raise WallError(f"seccomp: {where}: mask is required for masked_eq and only for it")
    return ArgCheck(index, op, value, None if mask is None else _int(where, "mask", mask))


def _parse_entry(where: str, raw: Any) -> DenyEntry:
    if not isinstance(raw, dict):
        raise WallError(f"seccomp: {where}: must be a table")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise WallError(f"seccomp: {where}: unknown key(s) {sorted(unknown)}")
    reason = raw.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise WallError(f"seccomp: {where}: a non-empty 'reason' is mandatory")
    names = raw.get("syscalls")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and _NAME_RE.match(n.lstrip("_")) for n in names)
    ):
        raise WallError(f"seccomp: {where}: 'syscalls' must be a non-empty list of names")
    err = raw.get("errno")
    if err not in _ERRNOS:
        raise WallError(f"seccomp: {where}: errno must be one of {sorted(_ERRNOS)}, not {err!r}")
    args_raw = raw.get("args", [])
    if not isinstance(args_raw, list):
        raise WallError(f"seccomp: {where}: 'args' must be a list")
    args = tuple(_parse_arg(f"{where}.args[{i}]", a) for i, a in enumerate(args_raw))
    if len({a.index for a in args}) != len(args):
        # libseccomp rejects two comparisons on one argument with EINVAL.
        raise WallError(f"seccomp: {where}: at most one check per argument index")
    notify = raw.get("notify", False)
    rule = raw.get("rule")
    if not isinstance(notify, bool) or (rule is not None and not isinstance(rule, str)):
        raise WallError(f"seccomp: {where}: notify must be a boolean and rule a string")
    if notify and not rule:
        raise WallError(f"seccomp: {where}: a notify entry names the rule its records carry")
    return DenyEntry(tuple(names), err, reason.strip(), args, notify, rule)


#: (path, mtime_ns, size) -> the entries read from it.  A sandbox's start reads
#: its profile three times (the filter, the notify entries, the walls' count),
#: and parsing the TOML is about 7 ms each time; an edited file is read again.
_loaded: dict[tuple[str, int, int], tuple[DenyEntry, ...]] = {}


def load_profile(name: str = "default") -> list[DenyEntry]:
    """Read and validate ``seccomp_<name>.toml``; any defect raises :class:`WallError`."""
    path = _profile_path(name)
    try:
        st = path.stat()
    except OSError as exc:
        raise WallError(f"seccomp: cannot read profile {path}: {exc}", rule="seccomp") from exc
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _loaded:
        _loaded[key] = tuple(_read_profile(path))
    return list(_loaded[key])


def _read_profile(path: Path) -> list[DenyEntry]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise WallError(f"seccomp: cannot read profile {path}: {exc}", rule="seccomp") from exc
    unknown = set(data) - {"deny"}
    if unknown:
        raise WallError(f"seccomp: {path.name}: unknown key(s) {sorted(unknown)}")
    entries = data.get("deny")
    if not isinstance(entries, list) or not entries:
        raise WallError(f"seccomp: {path.name}: needs at least one [[deny]] entry")
    return [_parse_entry(f"{path.name}: deny[{i}]", e) for i, e in enumerate(entries)]


def _arg(check: ArgCheck) -> Any:
    if check.mask is not None:  # libseccomp: datum_a = mask, datum_b = value
        return pyseccomp.Arg(check.index, _OPS[check.op], check.mask, check.value)
    return pyseccomp.Arg(check.index, _OPS[check.op], check.value)


def _compile(name: str, notify_apart: bool = False) -> _Compiled:
    entries = [e for e in load_profile(name) if not (notify_apart and e.notify)]
    filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    # No add_arch(): the filter only covers the native arch, and libseccomp's
    # default bad-arch action (KILL) stops foreign-ABI syscalls.
    skipped: list[str] = []
    for entry in entries:
        action = pyseccomp.ERRNO(_ERRNOS[entry.errno])
        for sc in entry.syscalls:
            # -1: unknown name; below -1: a pseudo number for a syscall that
            # does not exist on this arch (libseccomp would silently drop it).
            nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, sc)
            if nr < 0:
                skipped.append(sc)
                continue
            try:
                filt.add_rule(action, nr, *(_arg(a) for a in entry.args))
            except OSError as exc:
                raise WallError(f"seccomp: cannot add rule for {sc}: {exc.strerror}") from exc
    if skipped:
        log.info("seccomp profile %s: not on this arch, skipped: %s", name, ", ".join(skipped))
    try:
        bpf = export_bpf(filt, name)
    except OSError as exc:
        raise WallError(f"seccomp: cannot export BPF program: {exc}") from exc
    if not bpf or len(bpf) % 8:
        raise WallError(f"seccomp: libseccomp exported a malformed program ({len(bpf)} bytes)")
    return _Compiled(bpf, tuple(skipped))


def export_bpf(filt: Any, name: str) -> bytes:
    """A libseccomp filter as classic-BPF bytes (``struct sock_filter[]``).

    libseccomp only writes to a file descriptor, so it writes to a memfd
    that is then read back.  Shared by the profile, the network watch and
    the file-audit filter.
    """
    fd = os.memfd_create(f"glassroom-bpf-{name}", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "rb", closefd=True) as wrapper:
            filt.export_bpf(wrapper)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _compiled(name: str, notify_apart: bool = False) -> _Compiled:
    hit = _cache.get((name, notify_apart))
    if hit is None:
        hit = _cache[name, notify_apart] = _compile(name, notify_apart)
    return hit


def compile_bpf(name: str = "default", *, notify_apart: bool = False) -> bytes:
    """The profile as a classic-BPF program (``struct sock_filter[]``), cached per name.

    ``notify_apart``: leave out the ``notify`` entries, because the caller
    enforces them another way (a user-notification filter whose listener the
    supervisor holds).  They must not stay in this program too: a filter's
    ERRNO outranks another's USER_NOTIF, so the supervisor would never see them.
    """
    return _compiled(name, notify_apart).bpf


def notify_entries(name: str = "default") -> list[DenyEntry]:
    """The profile's entries a supervisor answers itself (``notify = true``)."""
    return [e for e in load_profile(name) if e.notify]


def add_notify_rules(filt: Any, entries: list[DenyEntry]) -> dict[int, list[DenyEntry]]:
    """Add ``entries`` to ``filt`` as SECCOMP_RET_USER_NOTIF; returns them by syscall number."""
    by_nr: dict[int, list[DenyEntry]] = {}
    for entry in entries:
        for sc in entry.syscalls:
            nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, sc)
            if nr < 0:
                continue
            filt.add_rule(pyseccomp.NOTIFY, nr, *(_arg(a) for a in entry.args))
            by_nr.setdefault(nr, []).append(entry)
    return by_nr


def syscall_number(name: str) -> int:
    """The native syscall number of ``name`` (negative if this arch has none)."""
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


def entry_matches(entry: DenyEntry, args: tuple[int, ...]) -> bool:
    """Do the register values ``args`` meet every check of ``entry`` (as the BPF does)?"""
    import operator

    ops = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
           "gt": operator.gt, "ge": operator.ge}  # fmt: skip
    for a in entry.args:
        v = args[a.index]
        if a.op == "masked_eq":
            if v & (a.mask or 0) != a.value:
                return False
        elif not ops[a.op](v, a.value):
            return False
    return True


def skipped_syscalls(name: str = "default") -> tuple[str, ...]:
    """Syscall names of the profile that this arch/libseccomp does not know (not filtered)."""
    return _compiled(name).skipped


def bpf_memfd(name: str = "default", *, notify_apart: bool = False) -> int:
    """A fresh memfd holding the program, offset 0, for ``bwrap --seccomp FD``.

    The fd is O_CLOEXEC: the caller hands it to bwrap with ``pass_fds`` (which
    clears the flag in the child only) and closes it afterwards, so it never
    leaks into anything else we spawn.  bwrap reads from the current offset to
    EOF, hence the seek.
    """
    bpf = compile_bpf(name, notify_apart=notify_apart)
    fd = os.memfd_create(f"glassroom-seccomp-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(bpf)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise WallError(f"seccomp: cannot write BPF memfd: {exc}") from exc
    return fd


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def libseccomp_version() -> str:
    """``major.minor.micro`` of the loaded libseccomp (pyseccomp does not expose it)."""
    path = ctypes.util.find_library("seccomp")
    if path is None:
        raise BackendUnavailable("seccomp: libseccomp not found")
    lib = ctypes.CDLL(path)
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    lib.seccomp_version.argtypes = ()
    ver = lib.seccomp_version().contents
    return f"{ver.major}.{ver.minor}.{ver.micro}"
