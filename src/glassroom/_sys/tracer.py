"""Seeing every file access and exec inside a sandbox, with its result: ptrace.

Why ptrace and not only seccomp user notification (which ``netwatch`` uses
for network attempts): a notification shows the *attempt*; whether the
kernel then allowed it (Landlock, a read-only mount, a missing file) is
only known at syscall exit, and only a tracer sees that.  The cost is kept
to the calls that matter: the sandbox's init installs a seccomp filter that
returns ``SECCOMP_RET_TRACE`` only for the watched syscalls (file ops and
exec; see ``audit/_events.py``), so every other syscall runs at full speed
and each watched one costs two stops (seccomp entry, syscall exit).

Properties this gives, on purpose:

* **Observe only.**  The tracer never changes a syscall, its arguments or
  its result.  Paths and argv are copied from the tracee's memory FOR THE
  LOG; enforcement stays with Landlock and the mounts.
* **Fail closed.**  ``PTRACE_O_EXITKILL``: if the tracer dies, every tracee
  is killed.  A process that escaped tracing (``CLONE_UNTRACED``) still has
  the filter, and ``SECCOMP_RET_TRACE`` without a tracer fails the call with
  ENOSYS: it cannot touch a file unseen.
* **Outside.**  On ``namespaces`` it runs as its own host process (one per
  sandbox, beside the supervisor: a dedicated process may ``waitpid(-1)``
  without reaping the supervisor's other children, and its loop does not
  compete for the supervisor's GIL).  In a microVM guest the agent runs it,
  and its reports are marked untrusted by the host.

Stdlib only (ctypes), and no glassroom import: the guest image gets a copy.

Protocol when run as a program: the first stdin line is a JSON object
``{"pid": N, "syscalls": {"257": "openat", ...}}``; the tracer seizes N,
prints ``{"attached": N}`` (or ``{"error": ...}``) and then one JSON object
per observed call on stdout, until no tracee is left.  A later stdin line
``sync K`` is answered, after everything observed so far, by ``{"synced": K}``.  EOF on stdin (the
supervisor went away) ends it at once, and EXITKILL takes the tracees along.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PTRACE_CONT = 7
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E

O_TRACESYSGOOD = 1
O_TRACEFORK = 2
O_TRACEVFORK = 4
O_TRACECLONE = 8
O_TRACEEXEC = 0x10
O_TRACESECCOMP = 0x80
O_EXITKILL = 0x100000
OPTIONS = (
    O_TRACESYSGOOD | O_TRACEFORK | O_TRACEVFORK | O_TRACECLONE | O_TRACEEXEC
    | O_TRACESECCOMP | O_EXITKILL
)  # fmt: skip

EV_FORK, EV_VFORK, EV_CLONE, EV_EXEC, EV_SECCOMP, EV_STOP = 1, 2, 3, 4, 7, 128
SIGTRAP, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU = 5, 19, 20, 21, 22
_STOPS = (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU)
INFO_EXIT, INFO_SECCOMP = 2, 3
_WALL = 0x40000000
_AT_FDCWD = 0xFFFFFF9C  # -100 as an unsigned 32-bit int
_AT_REMOVEDIR = 0x200
_AT_EMPTY_PATH = 0x1000

MAX_PATH = 4096
FLUSH_S = 0.01
MAX_BATCH = 4096
MAX_ARGV = 256
MAX_ARG = 1024

#: Argument roles per syscall: which argument is a path, a dirfd, flags, a
#: mode, argv.  ``path2`` is the second path (rename/link target, or what a
#: symlink points to).
ROLES: dict[str, tuple[str, ...]] = {
    "open": ("path", "flags", "mode"),
    "openat": ("dirfd", "path", "flags", "mode"),
    "openat2": ("dirfd", "path", "how"),
    "creat": ("path", "mode"),
    "unlink": ("path",),
    "unlinkat": ("dirfd", "path", "atflags"),
    "rename": ("path", "path2"),
    "renameat": ("dirfd", "path", "dirfd2", "path2"),
    "renameat2": ("dirfd", "path", "dirfd2", "path2", "rflags"),
    "chmod": ("path", "mode"),
    "fchmodat": ("dirfd", "path", "mode"),
    "fchmodat2": ("dirfd", "path", "mode"),
    "link": ("path", "path2"),
    "linkat": ("dirfd", "path", "dirfd2", "path2"),
    "symlink": ("path2", "path"),
    "symlinkat": ("path2", "dirfd", "path"),
    "mkdir": ("path", "mode"),
    "mkdirat": ("dirfd", "path", "mode"),
    "rmdir": ("path",),
    "truncate": ("path",),
    "chown": ("path",),
    "lchown": ("path",),
    "fchownat": ("dirfd", "path"),
    "execve": ("path", "argv"),
    "execveat": ("dirfd", "path", "argv"),
    "stat": ("path",),
    "lstat": ("path",),
    "newfstatat": ("dirfd", "path"),
    "statx": ("dirfd", "path"),
    "access": ("path",),
    "faccessat": ("dirfd", "path"),
    "faccessat2": ("dirfd", "path"),
    "readlink": ("path",),
    "readlinkat": ("dirfd", "path"),
    "chdir": ("path",),
    "mknod": ("path", "mode"),
    "mknodat": ("dirfd", "path", "mode"),
    "utime": ("path",),
    "utimes": ("path",),
    "futimesat": ("dirfd", "path"),
    "utimensat": ("dirfd", "path"),
    "setxattr": ("path",),
    "lsetxattr": ("path",),
    "fsetxattr": ("fd",),
    "removexattr": ("path",),
    "lremovexattr": ("path",),
    "fremovexattr": ("fd",),
    "fchmod": ("fd", "mode"),
    "fchown": ("fd",),
    "ftruncate": ("fd",),
    "fallocate": ("fd",),
}
#: renameat2 flags, by name.
_RENAME_FLAGS = ((1, "RENAME_NOREPLACE"), (2, "RENAME_EXCHANGE"), (4, "RENAME_WHITEOUT"))
_OPENS = frozenset({"open", "openat", "openat2", "creat"})

_ERRNO = {
    1: "EPERM", 2: "ENOENT", 4: "EINTR", 5: "EIO", 9: "EBADF", 12: "ENOMEM", 13: "EACCES",
    14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 18: "EXDEV", 20: "ENOTDIR", 21: "EISDIR",
    22: "EINVAL", 24: "EMFILE", 26: "ETXTBSY", 27: "EFBIG", 28: "ENOSPC", 30: "EROFS",
    31: "EMLINK", 36: "ENAMETOOLONG", 38: "ENOSYS", 39: "ENOTEMPTY", 40: "ELOOP",
    95: "EOPNOTSUPP", 122: "EDQUOT", 512: "ERESTARTSYS", 513: "ERESTARTNOINTR",
    514: "ERESTARTNOHAND", 516: "ERESTART_RESTARTBLOCK",
}  # fmt: skip


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long
_readv = _libc.process_vm_readv
_readv.argtypes = (
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
    ctypes.c_ulong,
)  # fmt: skip
_readv.restype = ctypes.c_ssize_t


_FLAG_BITS = tuple(
    (getattr(os, name), name)
    for name in ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_DIRECTORY", "O_NOFOLLOW", "O_PATH")
)


def flags_text(flags: int) -> str:
    """``O_WRONLY|O_CREAT|O_TRUNC`` from an open's numeric flags.

    The values are this machine's (``os.O_*``): the tracer always runs on the
    tracee's own architecture, where O_DIRECTORY and friends differ (arm64).
    """
    names = [("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[flags & 3]]
    names += [name for bit, name in _FLAG_BITS if flags & bit]
    if flags & os.O_TMPFILE == os.O_TMPFILE:  # O_TMPFILE includes O_DIRECTORY's bit
        names = [n for n in names if n != "O_DIRECTORY"] + ["O_TMPFILE"]
    return "|".join(names)


def _text(raw: bytes) -> str:
    """One decoding for every name (memory, readlink, cmdline), so the same
    bytes compare equal and invalid UTF-8 stays visible as ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


def _readlink(path: str) -> str:
    return _text(os.readlink(os.fsencode(path)))


class Tracer:
    """Follows one process tree and reports each watched call with its result.

    All ptrace requests must come from the thread that attached, so
    :meth:`seize` and :meth:`run` are called from one thread.
    """

    def __init__(self, names: dict[int, str], emit: Callable[[dict[str, Any]], None]) -> None:
        self.names = names
        self.emit = emit
        self.pending: dict[int, dict[str, Any]] = {}
        self.known: set[int] = set()
        self.parent: dict[int, int] = {}
        self.nspid: dict[int, int] = {}
        self._info = ctypes.create_string_buffer(88)
        self._buf = ctypes.create_string_buffer(MAX_PATH)
        self._msg = ctypes.c_ulong()

    # -- attaching ---------------------------------------------------------

    def seize(self, pid: int) -> None:
        if _ptrace(PTRACE_SEIZE, pid, None, ctypes.c_void_p(OPTIONS)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace(SEIZE, {pid}): {os.strerror(err)}")
        self.known.add(pid)

    # -- memory of the tracee (for the log only) ----------------------------

    def _read(self, pid: int, addr: int, size: int) -> bytes:
        if not addr:
            return b""
        out = b""
        while size > 0:
            # Never cross a page boundary in one read: a string may end right
            # before an unmapped page, and a read spanning both would fail.
            chunk = min(size, 4096 - (addr % 4096), MAX_PATH)
            local = _Iovec(ctypes.addressof(self._buf), chunk)
            remote = _Iovec(addr, chunk)
            n = _readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if n <= 0:
                break
            out += self._buf.raw[:n]
            if n < chunk:
                break
            addr += n
            size -= n
        return out

    def _string(self, pid: int, addr: int, limit: int = MAX_PATH) -> str | None:
        """The NUL-terminated string at ``addr``, or None when not even its
        first byte can be read (a bad pointer: the call fails with EFAULT), so
        that no such path is mistaken for ``""`` or for the cwd."""
        raw = b""
        while len(raw) < limit:
            chunk = self._read(pid, addr + len(raw), min(256, limit - len(raw)))
            if not chunk:
                if not raw:
                    return None
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                raw += chunk[:nul]
                break
            raw += chunk
        return _text(raw)

    def _argv(self, pid: int, addr: int) -> list[str]:
        ptrs = self._read(pid, addr, 8 * MAX_ARGV)
        out = []
        for i in range(0, len(ptrs) - 7, 8):
            p = int.from_bytes(ptrs[i : i + 8], "little")
            if not p:
                break
            # cut to MAX_ARG characters of its text, as _exec_truth cuts /proc's
            out.append((self._string(pid, p, MAX_ARG) or "")[:MAX_ARG])
        return out

    def _base(self, pid: int, dirfd: int, is_fd: bool = False) -> str:
        """``is_fd``: an fd argument (fchmod...), where AT_FDCWD is only EBADF."""
        at_cwd = dirfd & 0xFFFFFFFF == _AT_FDCWD and not is_fd
        link = "cwd" if at_cwd else f"fd/{dirfd & 0xFFFFFFFF}"
        try:
            return _readlink(f"/proc/{pid}/{link}")
        except OSError:
            return f"<{link}>"

    def _ns(self, pid: int) -> int:
        """The pid as the sandbox sees it (last NSpid field)."""
        got = self.nspid.get(pid)
        if got is None:
            got = pid
            try:
                with open(f"/proc/{pid}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"NSpid:"):
                            got = int(line.split()[-1])
                            break
            except (OSError, ValueError):
                pass
            self.nspid[pid] = got
        return got

    # -- one call ---------------------------------------------------------

    def _entry(self, pid: int, nr: int, args: tuple[int, ...]) -> dict[str, Any] | None:
        name = self.names.get(nr)
        if name is None:
            return None
        roles = ROLES.get(name, ())
        ev: dict[str, Any] = {"syscall": name, "pid": self._ns(pid)}
        dirfd = dirfd2 = _AT_FDCWD
        addrs: list[tuple[str, int, str]] = []
        from_fd = False
        for i, role in enumerate(roles):
            a = args[i]
            if role == "dirfd":
                dirfd = a
            elif role == "dirfd2":
                dirfd2 = a
            elif role in ("path", "path2"):
                text = self._string(pid, a)
                if text is None:  # logged as such: "" and a flag, never a made-up name
                    ev[role + "_unreadable"] = True
                ev[role] = text or ""
                addrs.append((role, a, ev[role]))
            elif role == "fd":  # the file the fd names: already absolute (or <fd/N>)
                ev["path"] = self._base(pid, a, is_fd=True)
                from_fd = True
            elif role == "rflags":
                names = [n for bit, n in _RENAME_FLAGS if a & bit]
                if names:
                    ev["flags"] = "|".join(names)
            elif role == "flags":
                ev["flags"] = flags_text(a)
            elif role == "how":
                how = self._read(pid, a, 16)
                if len(how) == 16:
                    fl = int.from_bytes(how[:8], "little")
                    ev["flags"] = flags_text(fl)
                    if fl & 0o100:
                        ev["mode"] = oct(int.from_bytes(how[8:16], "little") & 0o7777)
            elif role == "mode":
                if name not in ("open", "openat") or args[i - 1] & 0o100:  # O_CREAT
                    ev["mode"] = oct(a & 0o7777)
            elif role == "atflags":
                if name == "unlinkat" and a & _AT_REMOVEDIR:
                    ev["flags"] = "AT_REMOVEDIR"
            elif role == "argv":
                ev["argv"] = self._argv(pid, a)
        if name == "creat":
            ev["flags"] = "O_WRONLY|O_CREAT|O_TRUNC"
        for key, fd in (("path", dirfd), ("path2", dirfd2)):
            p = ev.get(key)
            if p is None or p.startswith("/") or ev.get(key + "_unreadable"):
                continue
            if key == "path2" and name.startswith("symlink"):
                continue
            if key == "path" and from_fd:
                continue
            base = self._base(pid, fd)
            ev[key] = base if not p else (base.rstrip("/") + "/" + p)
        if addrs and not name.startswith("exec"):
            # Raw strings as read now, to compare at exit: another thread may
            # rewrite the buffer before the kernel copies it (see _on_exit).
            ev["_addrs"] = addrs
        if name.startswith("exec"):
            ppid = self.parent.get(pid)
            if ppid is not None:
                ev["ppid"] = self._ns(ppid)
                try:
                    with open(f"/proc/{ppid}/comm", "rb") as f:
                        ev["parent"] = f.read().strip().decode(errors="replace")
                except OSError:
                    pass
        return ev

    def _exec_truth(self, pid: int, ev: dict[str, Any]) -> None:
        """After a successful exec: what the kernel loaded and the argv it copied."""
        try:
            exe = _readlink(f"/proc/{pid}/exe")
            if exe != ev.get("path"):
                ev["exe"] = exe
        except OSError:
            pass
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read(MAX_ARG * 8)
        except OSError:
            return
        argv = [_text(a)[:MAX_ARG] for a in raw.split(b"\0")[:-1]]
        if argv and argv != ev.get("argv", [])[: len(argv)]:
            ev["argv_arg"] = ev.get("argv")
            ev["argv"] = argv

    def _info_op(self, pid: int) -> int:
        n = _ptrace(PTRACE_GET_SYSCALL_INFO, pid, ctypes.c_void_p(88), self._info)
        return self._info.raw[0] if n > 0 else 0

    def _on_seccomp(self, pid: int) -> int:
        """At the seccomp stop: copy the arguments; resume to the syscall's exit."""
        if self._info_op(pid) != INFO_SECCOMP:
            return PTRACE_CONT
        raw = self._info.raw
        nr = int.from_bytes(raw[24:32], "little")
        args = tuple(int.from_bytes(raw[32 + 8 * i : 40 + 8 * i], "little") for i in range(6))
        ev = self._entry(pid, nr, args)
        if ev is None:
            return PTRACE_CONT
        self.pending[pid] = ev
        return PTRACE_SYSCALL

    def _on_exit(self, pid: int) -> None:
        ev = self.pending.pop(pid, None)
        if ev is None:
            return
        if self._info_op(pid) != INFO_EXIT:  # killed at this very stop: say so
            ev.pop("_addrs", None)
            ev["result"] = "unknown (no exit state)"
            self.emit(ev)
            return
        raw = self._info.raw
        rval = int.from_bytes(raw[24:32], "little", signed=True)
        if raw[32]:  # is_error
            ev["result"] = _ERRNO.get(-rval, f"E{-rval}")
        else:
            ev["result"] = "ok"
        self._verify_paths(pid, ev, rval)
        self.emit(ev)

    def _verify_paths(self, pid: int, ev: dict[str, Any], rval: int) -> None:
        """Prefer the kernel's own view of what was touched over sandbox memory.

        The path was copied from the tracee at the seccomp stop; the kernel
        copies it again after we resume, and another thread may rewrite the
        buffer in between.  A successful open leaves an fd whose target is
        the kernel's view (``/proc/PID/fd/N``; best effort: another thread
        could ``dup2`` over that fd before we look): that becomes ``path``, and
        what memory said is kept as ``path_arg`` when it differs.  For calls
        without an fd, the buffer is read again at exit: if it changed, the
        record says ``path_changed`` and keeps both readings.
        """
        addrs = ev.pop("_addrs", ())
        if ev["syscall"] in _OPENS and ev["result"] == "ok" and rval >= 0:
            try:
                real = _readlink(f"/proc/{pid}/fd/{rval}")
            except OSError:
                real = None
            if real is not None and real != os.path.normpath(ev.get("path", "")):
                ev["path_arg"] = ev.get("path")
                ev["path"] = real
            return
        for key, addr, before in addrs:
            now = self._string(pid, addr) or ""
            if now != before:
                ev["path_changed"] = True
                ev[key + "_at_exit"] = now

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        """Follow every tracee until none is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, _WALL)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                ev = self.pending.pop(pid, None)
                if ev is not None:
                    ev.pop("_addrs", None)
                    ev["result"] = "unknown (process ended)"
                    self.emit(ev)
                self.known.discard(pid)
                self.parent.pop(pid, None)
                self.nspid.pop(pid, None)
                continue
            if os.WIFSTOPPED(status):
                self._stopped(pid, status)

    def _stopped(self, pid: int, status: int) -> None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        resume, inject = PTRACE_CONT, 0
        if pid not in self.known:  # a new child's first stop, maybe before its parent's event
            self.known.add(pid)
        if sig == SIGTRAP | 0x80:  # syscall-exit-stop, asked for at the seccomp stop
            self._on_exit(pid)
        elif sig == SIGTRAP and event == EV_SECCOMP:
            resume = self._on_seccomp(pid)
        elif sig == SIGTRAP and event in (EV_FORK, EV_VFORK, EV_CLONE):
            if _ptrace(PTRACE_GETEVENTMSG, pid, None, ctypes.byref(self._msg)) == 0:
                child = int(self._msg.value)
                self.parent[child] = pid
                self.known.add(child)
        elif sig == SIGTRAP and event == EV_EXEC:
            if _ptrace(PTRACE_GETEVENTMSG, pid, None, ctypes.byref(self._msg)) == 0:
                former = int(self._msg.value)
                if former != pid and former in self.pending:  # a thread ran exec
                    lost = self.pending.pop(pid, None)
                    if lost is not None:  # the leader's call never returns now
                        lost.pop("_addrs", None)
                        lost["result"] = "unknown (thread group exec)"
                        self.emit(lost)
                    self.pending[pid] = self.pending.pop(former)
                if former != pid:  # its id is gone without an exit, and may be reused
                    self.known.discard(former)
                    self.parent.pop(former, None)
                    self.nspid.pop(former, None)
            self.nspid.pop(pid, None)
            ev = self.pending.get(pid)
            if ev is not None:
                self._exec_truth(pid, ev)
                resume = PTRACE_SYSCALL  # still on the way to execve's exit
        elif event == EV_STOP:
            if sig in _STOPS:  # group-stop: stay stopped, but keep seeing events
                _ptrace(PTRACE_LISTEN, pid, None, None)
                return
        elif event == 0:
            inject = sig  # a signal for the tracee: deliver it unchanged
        _ptrace(resume, pid, None, ctypes.c_void_p(inject))


def main() -> None:
    first = sys.stdin.buffer.readline()
    out = sys.stdout.buffer
    try:
        cfg = json.loads(first)
        names = {int(k): str(v) for k, v in cfg["syscalls"].items()}
        pid = int(cfg["pid"])
    except (ValueError, KeyError, TypeError) as exc:
        out.write(json.dumps({"error": f"bad config: {exc}"}).encode() + b"\n")
        out.flush()
        sys.exit(2)
    batch: list[bytes] = []
    lock = threading.Lock()
    write_lock = threading.Lock()

    def take() -> list[bytes]:
        nonlocal batch
        with lock:
            taken, batch = batch, []
        return taken

    def emit(ev: dict[str, Any]) -> None:
        line = json.dumps(ev, separators=(",", ":")).encode()
        with lock:
            batch.append(line)
            full = len(batch) >= MAX_BATCH
        if full:
            # Backpressure: a slow reader blocks this write, and with it every
            # stopped tracee, instead of letting the buffer grow without bound.
            flush()

    def flush() -> None:
        with write_lock:  # one writer at a time keeps the batches in order
            taken = take()
            if taken:
                out.write(b"\n".join(taken) + b"\n")
            out.flush()

    def flusher() -> None:
        # Reports leave in batches every few milliseconds, not one write per
        # call: a write per call would wake the supervisor for each, and that
        # competes with the traced task for the CPU.
        while True:
            time.sleep(FLUSH_S)
            try:
                flush()
            except OSError:
                os._exit(4)

    tracer = Tracer(names, emit)
    try:
        tracer.seize(pid)
    except OSError as exc:
        out.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        out.flush()
        sys.exit(1)
    out.write(json.dumps({"attached": pid}).encode() + b"\n")
    out.flush()

    def watch_stdin() -> None:
        # "sync N": write out what is buffered, then {"synced": N}; the
        # supervisor asks after each command so its calls are logged before
        # the command's end is.  EOF: the supervisor is gone, and the sandbox
        # must not outlive it (EXITKILL kills every tracee with us).
        for line in sys.stdin.buffer:
            word, _, arg = line.strip().partition(b" ")
            if word == b"sync" and arg.isdigit():
                try:
                    with write_lock:  # after everything observed so far
                        for chunk in (take(), [b'{"synced":' + arg + b"}"]):
                            if chunk:
                                out.write(b"\n".join(chunk) + b"\n")
                        out.flush()
                except OSError:
                    break
        write_lock.acquire()  # no report is cut in half by the exit
        os._exit(3)

    threading.Thread(target=watch_stdin, daemon=True).start()
    threading.Thread(target=flusher, daemon=True).start()
    try:
        tracer.run()
        flush()
    except BrokenPipeError:
        os._exit(4)
    # Not a normal interpreter exit: the stdin thread holds stdin's lock in a
    # blocking read, and finalization would wait on it (about a second).
    os._exit(0)


if __name__ == "__main__":
    main()
