"""Landlock: restrict the calling thread's file-system access (and signals) by path.

This module is imported INSIDE the sandbox by ``/usr/bin/python3 -I -S``
before anything untrusted runs, so it imports only ``ctypes``, ``os`` and
``struct`` (nothing from glassroom, nothing slow) and its import costs well
under a few milliseconds beyond ctypes.

Landlock is applied after bubblewrap built the mounts because a restricted
process may no longer change its mount topology.  The domain binds the
calling thread and every process it later creates; other threads that
already exist are NOT restricted, so call :func:`restrict` while the process
is single-threaded.

Rules attach to inodes, not path strings: each path is opened with O_PATH and
the rule covers that file, or everything beneath that directory.  A file's
rule may only carry file rights (execute, read, write, truncate, ioctl),
otherwise the kernel refuses it with EINVAL.
"""

import ctypes
import os
import stat  # already imported by os: free
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["abi_version", "restrict"]

_SYS_CREATE_RULESET = 444  # x86_64 (same on every arch using the generic table)
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_ENOSYS = 38
_EOPNOTSUPP = 95

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
_WRITE_RIGHTS = (
    READ_FILE
    | READ_DIR
    | WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_SYM
    | REFER
    | TRUNCATE
)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _fail(step: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"landlock: {step}: {os.strerror(err)}")


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    ret = _syscall(
        ctypes.c_long(_SYS_CREATE_RULESET),
        ctypes.c_void_p(None),
        ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )
    if ret < 0:
        if ctypes.get_errno() in (_ENOSYS, _EOPNOTSUPP):
            return 0
        raise _fail("query ABI version")
    return int(ret)


def _handled_fs(abi: int) -> int:
    handled = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        handled |= REFER
    if abi >= 3:
        handled |= TRUNCATE
    if abi >= 5:
        handled |= IOCTL_DEV
    return handled


def _add_rules(ruleset: int, paths: "Sequence[str]", what: str, rights: int, handled: int) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"landlock: {what} path {path!r}: {exc.strerror}") from None
        try:
            access = rights & handled
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= _FILE_RIGHTS
            attr = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr (packed)
            ret = _syscall(
                ctypes.c_long(_SYS_ADD_RULE),
                ctypes.c_int(ruleset),
                ctypes.c_int(_RULE_PATH_BENEATH),
                ctypes.c_char_p(attr),
                ctypes.c_uint32(0),
            )
            if ret < 0:
                raise _fail(f"add rule for {what} path {path!r}")
        finally:
            os.close(fd)


def restrict(
    *,
    read: "Sequence[str]",
    write: "Sequence[str]",
    execute: "Sequence[str]",
    devices: "Sequence[str]" = ("/dev",),
    listable: "Sequence[str]" = (),
    scope: bool = True,
) -> int:
    """Confine this thread and its future children; return the ABI version used.

    Every file-system right the running kernel knows is handled, so anything
    not granted below is denied (EACCES): ``read`` paths get read rights,
    ``write`` directories everything except execute and device creation,
    ``execute`` files execute+read, ``devices`` read/write/ioctl,
    ``listable`` directories only READ_DIR (so
    ``ls /`` works without granting reads of the files beneath).  With ABI >= 6
    and ``scope``, signals and abstract unix sockets cannot reach processes
    outside the domain.  Raises OSError naming the failed step; it never
    continues half-restricted.
    """
    abi = abi_version()
    if abi < 1:
        raise OSError(_ENOSYS, "landlock: not supported by this kernel (ABI 0)")
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
    handled = _handled_fs(abi)
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if (abi >= 6 and scope) else 0
    # struct landlock_ruleset_attr grows with the ABI: fs (1), net (4), scoped (6).
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = struct.pack("=QQQ", handled, 0, scoped)[:size]
    ruleset = _syscall(
        ctypes.c_long(_SYS_CREATE_RULESET),
        ctypes.c_char_p(attr),
        ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        raise _fail("create ruleset")
    try:
        _add_rules(ruleset, read, "read", READ_FILE | READ_DIR, handled)
        _add_rules(ruleset, write, "write", _WRITE_RIGHTS, handled)
        _add_rules(ruleset, execute, "execute", EXECUTE | READ_FILE, handled)
        _add_rules(
            ruleset, devices, "devices", READ_FILE | WRITE_FILE | READ_DIR | IOCTL_DEV, handled
        )
        _add_rules(ruleset, listable, "listable", READ_DIR, handled)
        if _syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)):
            raise _fail("restrict self")
    finally:
        os.close(ruleset)
    return abi
