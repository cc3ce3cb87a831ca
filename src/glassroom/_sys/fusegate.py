"""The write gate: a FUSE pass-through over one writable host directory.

Why FUSE.  ``filesystem.write`` hands the sandbox a host directory, and some
names in it are run by the *host* later: ``.git/hooks/*``, ``.git/config``
(``core.fsmonitor``), ``.envrc``, ``.bashrc``, ``.vscode/``,
``.github/workflows/`` ...  They must stay readable but not writable, at any
depth (nested repositories), including names that do not exist yet.  The
kernel offers no name-based deny for an unprivileged sandbox: Landlock only
grants (a grant on a directory covers every name created in it), a
read-only bind covers only what exists at start (and a rename of its parent
carries the bind away), and a seccomp user-notification check of a path
reads memory the task can change after the check.  A FUSE file system gets
every operation *after* the kernel copied the name out of the task's
memory, as (parent node, name): the decision and the operation use the
same name, so there is nothing to race.

What runs where.  The supervisor opens ``/dev/fuse`` and mounts the gate on
a per-sandbox staging dir (root only: ``/dev/fuse`` is 0600), and a thread of
the supervisor serves it; the backend binds the staging dir into the
sandbox where the host directory would have been.  The thread performs
each operation on the host directory itself with the *sandbox's* host
uid/gid as its fs ids (``setfsuid``/``setfsgid`` and an empty group list,
per thread; the kernel drops the file capabilities of a thread whose fsuid
leaves 0), so host permissions are what they were with a plain bind, and
everything the sandbox creates is owned by the sandbox uid on every tier
(gVisor's gofer, which is root, asks to chown new files to the container's
uid 1000: that request is acknowledged and not carried out).

What it refuses (each refusal is reported to ``on_deny``):

* any change to a protected name (``plan.Protected``): create, open for
  writing, truncate, chmod/chown/utimes, unlink, rmdir, rename onto or away
  (also of a directory whose contents would complete or break a protected
  path: ``mv x .github`` with ``x/workflows``), link to or from, symlink at,
  and setxattr: EACCES, rule ``filesystem.protected``;
* setuid/setgid bits, by chmod or in the mode of a new file (EPERM), and
  ``security.*`` / ``trusted.*`` extended attributes (file capabilities,
  EPERM): rule ``filesystem.setuid``;
* device nodes (EPERM).

Names are compared after NFKC normalisation, case folding and removal of
zero-width characters, so ``.GIT/hooks`` on a case-insensitive (casefold)
directory is the same name as ``.git/hooks``.

Host paths are never resolved as strings: each operation walks from an
O_PATH fd of the dir, one component at a time with O_NOFOLLOW, and acts
with the ``*at`` calls on the last name (never following it).  A symlink
where the kernel still has a directory node (the task removed the name it
held open and put a link there; another gate over the same tree renamed
it) is refused (ELOOP, rule ``filesystem.protected``); a node whose name
was unlinked or replaced is never served by name again (ESTALE).  Opens
are non-blocking and of regular files only: no FIFO can hang the thread.

Not covered (see docs/threat-model.md): another name for a protected file
made *outside* the sandbox (a hard link the host created earlier); names
that are dangerous only through the host's own configuration (a
``core.hooksPath`` pointing at an ordinary directory).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import stat
import struct
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_SETGROUPS = 116  # x86_64; per-thread (glibc's wrapper would change every thread)
_SYS_SETGROUPS_ARM64 = 159
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
MAX_WRITE = 128 * 1024
ATTR_TTL_S = 1
FUSE_BIG_WRITES = 1 << 5
FUSE_GETATTR_FH = 1
#: Refusals reported one by one; past this, one last report says they go on
#: (every one is still refused): a task must not flood the audit log.
MAX_REPORTS = 10_000
#: Directory entries held for open dir handles, all handles of a gate together
#: (~150-400 bytes each, in the supervisor, outside the sandbox's memory
#: limit): a task holding many handles of a huge dir mid-listing gets ENOMEM.
#: One listing alone is never refused; a listing read to its end is dropped.
MAX_LISTED = 200_000

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN = 8, 9, 10, 11, 12, 13, 14
READ, WRITE, STATFS, RELEASE, FSYNC, SETXATTR = 15, 16, 17, 18, 20, 21
GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT = 27, 28, 29, 30, 34, 35, 36
DESTROY, BATCH_FORGET, RENAME2 = 38, 42, 45
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 64, 128, 256
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_IN_HDR = struct.Struct("=IIQQIIIHH")
_OUT_HDR = struct.Struct("=IiQ")
_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
_ENTRY_HEAD = struct.Struct("=QQQQII")
# Unicode's Default_Ignorable_Code_Point (zero-width and the like): a casefold
# dir's utf8 lookup (fs/unicode, nfdicf) ignores them, so ``.git\ufe0f`` there
# is ``.git``; dropped before and after NFKC (U+FFA0 becomes U+1160).
_ZERO_WIDTH = dict.fromkeys(
    [*range(0x200B, 0x2010), *range(0x202A, 0x202F), *range(0x2060, 0x2070), 0xFEFF, 0xAD,
     0x34F, 0x61C, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810), 0x3164, 0xFFA0,
     *range(0xFE00, 0xFE10), *range(0xFFF0, 0xFFF9), *range(0x1BCA0, 0x1BCA4),
     *range(0x1D173, 0x1D17B), *range(0xE0000, 0xE1000)]
)  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def norm(name: str) -> str:
    """The form names are compared in: NFKC, case-folded, zero-width characters dropped."""
    folded = unicodedata.normalize("NFKC", name.translate(_ZERO_WIDTH)).casefold()
    return folded.translate(_ZERO_WIDTH)


@dataclass(frozen=True)
class Rule:
    """One protected relative path (``.git/hooks``), matched at any depth."""

    parts: tuple[str, ...]  # normalised components
    tree: bool  # the entry and everything beneath it (else the entry alone)
    name: str  # as written in the list, for records
    reason: str


Deny = Callable[[str, dict[str, Any]], None]  # (rule, details)


class Protection:
    """Which relative paths of one writable dir are protected (pure: no I/O)."""

    def __init__(self, rules: Sequence[Rule], unprotected: Sequence[str]) -> None:
        self.rules = tuple(rules)
        # relative component tuples (normalised) whose protection is lifted
        self.unprotected = tuple(tuple(norm(p) for p in u.split("/") if p) for u in unprotected)

    def match(self, parts: Sequence[str]) -> Rule | None:
        """The rule protecting the relative path ``parts`` (raw names), or None."""
        n = [norm(p) for p in parts]
        for u in self.unprotected:
            if tuple(n[: len(u)]) == u:
                return None
        for rule in self.rules:
            k = len(rule.parts)
            for i in range(len(n) - k + 1):
                if tuple(n[i : i + k]) == rule.parts and (rule.tree or i + k == len(n)):
                    return rule
        return None

    def completes(self, parts: Sequence[str], host_dir: str,
                  dir_fd: int | None = None) -> Rule | None:  # fmt: skip
        """Would the tree at ``host_dir``, placed at ``parts``, hold a protected path?

        Only windows that start above ``parts`` and end inside the moved tree
        need a look (windows wholly inside it move with it, unchanged).
        """
        n = [norm(p) for p in parts]
        for rule in self.rules:
            for k in range(1, len(rule.parts)):
                if (tuple(n[-k:]) == rule.parts[:k] and _holds(host_dir, rule.parts[k:], dir_fd)
                        and self.match([*parts, *rule.parts[k:]]) is not None):  # fmt: skip
                    return rule
        return None


    def prefix(self, parts: Sequence[str]) -> Rule | None:
        """Does ``parts`` end in the first part of a protected path (``.github``)?

        A symlink placed there would let the host resolve the rest of that
        path (``.github/workflows``) wherever the link points.
        """
        n = [norm(p) for p in parts]
        for rule in self.rules:
            for k in range(1, len(rule.parts)):
                if (tuple(n[-k:]) == rule.parts[:k]
                        and self.match([*parts, *rule.parts[k:]]) is not None):  # fmt: skip
                    return rule
        return None


def _holds(host_dir: str, rest: Sequence[str], dir_fd: int | None = None) -> bool:
    """Does ``host_dir`` (relative to ``dir_fd``) contain the (normalised) relative path ``rest``?

    A symlink on the way counts as holding it: where it points is not known
    (and it is never followed: each level is opened with O_NOFOLLOW).
    """
    try:
        fd = os.open(host_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)  # fmt: skip
    except OSError:
        return False
    try:
        for name in os.listdir(fd):
            if norm(name) != rest[0]:
                continue
            with contextlib.suppress(OSError):
                if (len(rest) == 1 or stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
                        or _holds(name, rest[1:], fd)):  # fmt: skip
                    return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


class _Refused(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


def _cstr(data: bytes, off: int = 0) -> tuple[str, int]:
    end = data.index(b"\0", off)
    return os.fsdecode(data[off:end]), end + 1


class Gate:
    """Serves one FUSE mount over ``source`` (a host dir), seen inside at ``inside``."""

    def __init__(self, source: str, inside: str, protection: Protection, *,
                 uid: int, gid: int, on_deny: Deny,
                 id_map: tuple[int, int] | None = None,
                 chown_noop: tuple[int, int] | None = None) -> None:  # fmt: skip
        self.source = source.rstrip("/") or "/"
        self.inside = inside.rstrip("/")
        self.protection = protection
        self.uid, self.gid = uid, gid
        self.on_deny = on_deny
        #: gVisor: (inside uid, gid) the sandbox uid is shown as; others show as 65534.
        self.id_map = id_map
        #: gVisor's gofer chowns what it creates to the container's ids: acknowledged only.
        self.chown_noop = chown_noop
        self.fd = -1
        #: O_PATH fd of ``source``, opened once: every host path is resolved
        #: beneath it one component at a time, never through a symlink.
        self.root_fd = -1
        self.target: str | None = None
        self.nodes: dict[int, tuple[str, ...]] = {1: ()}
        self.by_path: dict[tuple[str, ...], int] = {(): 1}
        self.lookups: dict[int, int] = {1: 1}
        self.next_node = 2
        self.files: dict[int, int] = {}
        self.dirs: dict[int, list[tuple[str, int, int]] | None] = {}
        self.listed = 0  # entries held in ``dirs``
        self.dir_nodes: dict[int, int] = {}
        self.next_fh = 1
        self.denied = 0
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._fd_lock = threading.Lock()
        self._fail: str | None = None

    # -- life cycle ----------------------------------------------------------

    def mount(self, target: str) -> None:
        """Mount on ``target`` and start serving; raises OSError if it cannot."""
        self.root_fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            os.close(self.root_fd)
            self.root_fd = -1
            raise
        opts = (f"fd={self.fd},rootmode=40000,user_id={self.uid},group_id={self.gid},"
                "allow_other,default_permissions,max_read=131072")  # fmt: skip
        r = _libc.mount(b"glassroom-gate", os.fsencode(target), b"fuse",
                        MS_NOSUID | MS_NODEV, opts.encode())  # fmt: skip
        if r != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            os.close(self.root_fd)
            self.root_fd = -1
            raise OSError(err, f"mount fuse on {target}: {os.strerror(err)}")
        self.target = target
        self._thread = threading.Thread(target=self._serve, daemon=True, name="glassroom-gate")
        self._thread.start()  # the thread closes root_fd when it ends
        if not self._ready.wait(5.0):
            self._fail = "write gate: its thread did not start"
        if self._fail is not None:
            self.close()
            raise OSError(errno.EPERM, self._fail)

    def detach(self) -> None:
        """Drop the host-side mount; the sandbox's own bind of it keeps serving."""
        if self.target is not None:
            _libc.umount2(os.fsencode(self.target), MNT_DETACH)
            self.target = None

    def close(self) -> None:
        """Stop serving: closing /dev/fuse aborts the connection (ENOTCONN inside)."""
        self.detach()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        busy = self._thread is not None and self._thread.is_alive()
        with self._fd_lock:
            if self.fd >= 0 and busy:
                # Still in an operation: abort the connection by putting
                # /dev/null in the fd's place, never freeing the number (the
                # reply it is about to write, or a file's pwrite, must not land
                # in whatever the supervisor opens next).  The thread closes it.
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                os.dup2(null, self.fd, inheritable=False)
                os.close(null)
            elif self.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = -1
        if not busy:
            self._close_files()

    def _close_files(self) -> None:
        for fd in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.files.clear()

    def _drop_ids(self) -> None:
        """This thread's fs ids become the sandbox's (see the module docstring)."""
        nr = _SYS_SETGROUPS_ARM64 if os.uname().machine == "aarch64" else _SYS_SETGROUPS
        if os.geteuid() == 0 and _libc.syscall(nr, 0, None) != 0:
            raise OSError(ctypes.get_errno(), "setgroups")
        _libc.setfsgid(self.gid)
        _libc.setfsuid(self.uid)
        ask = -1 & 0xFFFFFFFF  # an invalid id: the call only reports the current one
        if _libc.setfsuid(ask) != self.uid or _libc.setfsgid(ask) != self.gid:
            raise OSError(errno.EPERM, "setfsuid/setfsgid did not take")

    def _serve(self) -> None:
        try:
            self._loop()
        finally:
            # Whatever ended the loop, nothing serves this mount any more: abort
            # the connection (every call inside gets ENOTCONN) rather than hang.
            with self._fd_lock:
                if self.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(self.fd)
                    self.fd = -1
            # closed only here: a thread still serving must never resolve
            # beneath (or write to) a reused fd number
            self._close_files()
            if self.root_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.root_fd)
                self.root_fd = -1

    def _loop(self) -> None:
        try:
            self._drop_ids()
        except OSError as exc:
            self._fail = f"write gate: cannot take the sandbox's ids: {exc}"
            self._ready.set()
            return
        self._ready.set()
        fd = self.fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(200):
                    continue
                data = os.read(fd, MAX_WRITE + 4096)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                return  # ENODEV: unmounted
            if not data:
                return
            self._one(fd, data)

    # -- dispatch ------------------------------------------------------------

    def _one(self, fd: int, data: bytes) -> None:
        _len, op, unique, node, _uid, _gid, _pid, _ext, _pad = _IN_HDR.unpack_from(data)
        body = data[_IN_HDR.size :]
        if op in (FORGET, BATCH_FORGET, INTERRUPT):
            self._forget(op, node, body)
            return
        handler = self._ops.get(op)
        try:
            if handler is None:
                raise _Refused(errno.ENOSYS)
            out = handler(self, node, body)
            err = 0
        except _Refused as exc:
            out, err = b"", exc.err
        except OSError as exc:
            out, err = b"", exc.errno or errno.EIO
        except Exception:  # a malformed request: refuse it, keep serving
            out, err = b"", errno.EIO
        if op == DESTROY:
            return
        reply = _OUT_HDR.pack(_OUT_HDR.size + len(out), -err, unique) + out
        with contextlib.suppress(OSError):
            os.write(fd, reply)

    def _forget(self, op: int, node: int, body: bytes) -> None:
        if op == FORGET:
            self._drop(node, struct.unpack_from("=Q", body)[0])
        elif op == BATCH_FORGET:
            count = struct.unpack_from("=I", body)[0]
            for i in range(count):
                nid, n = struct.unpack_from("=QQ", body, 8 + 16 * i)
                self._drop(nid, n)

    def _drop(self, node: int, n: int) -> None:
        if node == 1 or node not in self.lookups:
            return
        self.lookups[node] -= n
        if self.lookups[node] <= 0:
            del self.lookups[node]
            parts = self.nodes.pop(node, None)
            if parts is not None and self.by_path.get(parts) == node:
                del self.by_path[parts]

    # -- helpers -------------------------------------------------------------

    def _parts(self, node: int) -> tuple[str, ...]:
        try:
            return self.nodes[node]
        except KeyError:
            raise _Refused(errno.ESTALE) from None

    @contextlib.contextmanager
    def _at(self, parts: Sequence[str]) -> Iterator[tuple[int, str]]:
        """(dir fd, name) of ``parts`` on the host, for the ``*at`` calls.

        The parent is reached from ``root_fd`` one component at a time with
        O_NOFOLLOW: a symlink on the way (one that replaced a directory the
        kernel still has a node for) is refused, never followed out of the
        dir.  The root itself is ``(root_fd, ".")``.
        """
        if parts and parts[0].startswith("\0"):
            raise _Refused(errno.ESTALE)  # its name was unlinked or replaced
        fd = os.dup(self.root_fd)
        try:
            for i, p in enumerate(parts[:-1]):
                try:
                    nfd = os.open(p, _PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and self._is_link(fd, p):
                        self._deny("filesystem.protected", "resolve", parts[: i + 1], errno.ELOOP,
                                   reason="a symlink where the sandbox had a directory: "
                                          "the gate never follows one on the host")  # fmt: skip
                    raise
                os.close(fd)
                fd = nfd
            yield fd, (parts[-1] if parts else ".")
        finally:
            os.close(fd)

    @staticmethod
    def _is_link(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
        except OSError:
            return False

    def _lstat(self, parts: Sequence[str]) -> os.stat_result:
        with self._at(parts) as (d, n):
            return os.lstat(n, dir_fd=d)

    def _unlinked(self, parts: tuple[str, ...]) -> None:
        """``parts`` no longer names the node the kernel knows: never serve it again."""
        gone = self.by_path.pop(parts, None)
        if gone is not None:
            self.nodes[gone] = ("\0gone", str(gone))

    def _shown(self, parts: Sequence[str]) -> str:
        return "/".join([self.inside, *parts])

    def _deny(self, rule: str, action: str, parts: Sequence[str], err: int, **extra: Any) -> None:
        self.denied += 1
        details = {"action": action, "target": self._shown(parts), **extra}
        if self.denied == MAX_REPORTS:
            details["note"] = f"{MAX_REPORTS} refusals reported; further ones are not"
        if self.denied <= MAX_REPORTS:
            with contextlib.suppress(Exception):
                self.on_deny(rule, details)
        raise _Refused(err)

    def _guard(self, action: str, parts: Sequence[str]) -> None:
        rule = self.protection.match(parts)
        if rule is not None:
            self._deny("filesystem.protected", action, parts, errno.EACCES,
                       protected=rule.name, reason=rule.reason)  # fmt: skip

    def _no_link_prefix(self, action: str, parts: Sequence[str]) -> None:
        rule = self.protection.prefix(parts)
        if rule is not None:
            self._deny("filesystem.protected", action, parts, errno.EACCES, protected=rule.name,
                       reason="a symlink here would let the host resolve " + rule.name)  # fmt: skip

    def _no_setid(self, action: str, parts: Sequence[str], mode: int) -> None:
        if mode & (stat.S_ISUID | stat.S_ISGID):
            self._deny("filesystem.setuid", action, parts, errno.EPERM, mode=f"{mode & 0o7777:04o}",
                       reason="setuid/setgid files in a host directory")  # fmt: skip

    def _ids(self, uid: int, gid: int) -> tuple[int, int]:
        if self.id_map is None:
            return uid, gid
        return (self.id_map[0] if uid == self.uid else 65534,
                self.id_map[1] if gid == self.gid else 65534)  # fmt: skip

    def _attr(self, st: os.stat_result) -> bytes:
        uid, gid = self._ids(st.st_uid, st.st_gid)
        return _ATTR.pack(
            st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime),
            int(st.st_ctime), st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9,
            st.st_ctime_ns % 10**9, st.st_mode, st.st_nlink, uid, gid, st.st_rdev,
            st.st_blksize, 0,
        )  # fmt: skip

    def _entry(self, parts: tuple[str, ...]) -> bytes:
        st = self._lstat(parts)
        node = self.by_path.get(parts)
        if node is None:
            node = self.next_node
            self.next_node += 1
            self.nodes[node] = parts
            self.by_path[parts] = node
            self.lookups[node] = 0
        self.lookups[node] += 1
        return _ENTRY_HEAD.pack(node, 0, ATTR_TTL_S, ATTR_TTL_S, 0, 0) + self._attr(st)

    def _child(self, node: int, name: str) -> tuple[str, ...]:
        if not name or name in (".", "..") or "/" in name:
            raise _Refused(errno.EINVAL)
        return (*self._parts(node), name)

    def _moved(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """Re-key every known node at or beneath ``old`` to ``new``."""
        k = len(old)
        for nid, parts in list(self.nodes.items()):
            if parts[:k] == old:
                moved = new + parts[k:]
                if self.by_path.get(parts) == nid:
                    del self.by_path[parts]
                self.nodes[nid] = moved
                self.by_path[moved] = nid

    # -- operations ----------------------------------------------------------

    def op_init(self, _node: int, body: bytes) -> bytes:
        major, minor, readahead, _flags = struct.unpack_from("=IIII", body)
        if major != 7:
            raise _Refused(errno.EPROTO)
        return struct.pack("=IIIIHHIIHHII24x", 7, min(minor, 31), readahead, FUSE_BIG_WRITES,
                           16, 12, MAX_WRITE, 1, 0, 0, 0, 0)  # fmt: skip

    def op_destroy(self, _node: int, _body: bytes) -> bytes:
        return b""

    def op_lookup(self, node: int, body: bytes) -> bytes:
        name, _ = _cstr(body)
        return self._entry(self._child(node, name))

    def op_getattr(self, node: int, body: bytes) -> bytes:
        flags, _dummy, fh = struct.unpack_from("=IIQ", body) if len(body) >= 16 else (0, 0, 0)
        if flags & FUSE_GETATTR_FH and fh in self.files:  # an open file: its own fd
            st = os.fstat(self.files[fh])  # (unlinked, its name gone: a temp file)
        else:
            st = self._lstat(self._parts(node))
        return struct.pack("=QII", ATTR_TTL_S, 0, 0) + self._attr(st)

    def op_setattr(self, node: int, body: bytes) -> bytes:
        (valid, _pad, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctns, mode,
         _u4, uid, gid, _u5) = struct.unpack_from("=IIQQQQQQIIIIIIII", body)  # fmt: skip
        parts = self._parts(node)
        what = ("chmod" if valid & FATTR_MODE else "chown" if valid & (FATTR_UID | FATTR_GID)
                else "truncate" if valid & FATTR_SIZE else "utimes")  # fmt: skip
        self._guard(what, parts)
        if valid & FATTR_MODE:
            self._no_setid("chmod", parts, mode)
            with self._at(parts) as (d, n):
                pfd = os.open(n, _PATH_FLAGS, dir_fd=d)
            try:  # chmod through the O_PATH fd: never a symlink's target
                if not stat.S_ISLNK(os.fstat(pfd).st_mode):
                    os.chmod(f"/proc/self/fd/{pfd}", mode & 0o1777)
            finally:
                os.close(pfd)
        if valid & (FATTR_UID | FATTR_GID):
            want_u = uid if valid & FATTR_UID else -1
            want_g = gid if valid & FATTR_GID else -1
            noop = self.chown_noop
            if not (noop and want_u in (-1, noop[0]) and want_g in (-1, noop[1])):
                with self._at(parts) as (d, n):
                    os.chown(n, want_u, want_g, dir_fd=d, follow_symlinks=False)
        if valid & FATTR_SIZE:
            if valid & FATTR_FH and fh in self.files:
                os.ftruncate(self.files[fh], size)
            else:
                tfd = self._open_host(parts, os.O_WRONLY)
                try:
                    os.ftruncate(tfd, size)
                finally:
                    os.close(tfd)
        if valid & (FATTR_ATIME | FATTR_MTIME):
            st = self._lstat(parts)
            now = time.time_ns()
            a = (now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimens
                 if valid & FATTR_ATIME else st.st_atime_ns)  # fmt: skip
            m = (now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimens
                 if valid & FATTR_MTIME else st.st_mtime_ns)  # fmt: skip
            with self._at(parts) as (d, n):
                os.utime(n, ns=(a, m), dir_fd=d, follow_symlinks=False)
        return self.op_getattr(node, b"")

    def op_readlink(self, node: int, _body: bytes) -> bytes:
        with self._at(self._parts(node)) as (d, n):
            return os.fsencode(os.readlink(n, dir_fd=d))

    def op_symlink(self, node: int, body: bytes) -> bytes:
        name, off = _cstr(body)
        target, _ = _cstr(body, off)
        parts = self._child(node, name)
        self._guard("symlink", parts)
        self._no_link_prefix("symlink", parts)
        with self._at(parts) as (d, n):
            os.symlink(target, n, dir_fd=d)
        return self._entry(parts)

    def op_mknod(self, node: int, body: bytes) -> bytes:
        mode, _rdev, _umask, _pad = struct.unpack_from("=IIII", body)
        name, _ = _cstr(body, 16)
        parts = self._child(node, name)
        self._guard("mknod", parts)
        self._no_setid("mknod", parts, mode)
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            self._deny("filesystem.setuid", "mknod", parts, errno.EPERM,
                       reason="device nodes and sockets in a host directory")  # fmt: skip
        with self._at(parts) as (d, n):
            if stat.S_ISFIFO(mode):
                os.mkfifo(n, mode & 0o777, dir_fd=d)
            else:
                os.close(os.open(n, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, mode & 0o777, dir_fd=d))  # fmt: skip
        return self._entry(parts)

    def op_mkdir(self, node: int, body: bytes) -> bytes:
        mode, _umask = struct.unpack_from("=II", body)
        name, _ = _cstr(body, 8)
        parts = self._child(node, name)
        self._guard("mkdir", parts)
        self._no_setid("mkdir", parts, mode)
        with self._at(parts) as (d, n):
            os.mkdir(n, mode & 0o1777, dir_fd=d)
        return self._entry(parts)

    def op_unlink(self, node: int, body: bytes) -> bytes:
        parts = self._child(node, _cstr(body)[0])
        self._guard("unlink", parts)
        with self._at(parts) as (d, n):
            os.unlink(n, dir_fd=d)
        self._unlinked(parts)
        return b""

    def op_rmdir(self, node: int, body: bytes) -> bytes:
        parts = self._child(node, _cstr(body)[0])
        self._guard("rmdir", parts)
        with self._at(parts) as (d, n):
            os.rmdir(n, dir_fd=d)
        self._unlinked(parts)
        return b""

    def _rename(self, node: int, newdir: int, flags: int, names: bytes) -> bytes:
        oldname, off = _cstr(names)
        newname, _ = _cstr(names, off)
        old = self._child(node, oldname)
        new = self._child(newdir, newname)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _Refused(errno.EINVAL)
        self._guard("rename", old)
        self._guard("rename", new)
        with self._at(old) as (od, on), self._at(new) as (nd, nn):
            pairs = [(od, on, new, old)]  # (tree's dir fd, name, placed at, taken from)
            if flags & RENAME_EXCHANGE:
                pairs.append((nd, nn, old, new))
            for tree_fd, tree, placed, taken in pairs:
                try:
                    kind = stat.S_IFMT(os.lstat(tree, dir_fd=tree_fd).st_mode)
                except FileNotFoundError:
                    continue
                if kind == stat.S_IFLNK:
                    self._no_link_prefix("rename", placed)
                    continue
                if kind != stat.S_IFDIR:
                    continue
                for parts in (placed, taken):
                    rule = self.protection.completes(parts, tree, tree_fd)
                    if rule is not None:
                        self._deny("filesystem.protected", "rename",
                                   [*parts, *rule.parts[-1:]], errno.EACCES,
                                   protected=rule.name, reason=rule.reason)  # fmt: skip
            if flags & RENAME_EXCHANGE:
                if _libc.renameat2(od, os.fsencode(on), nd, os.fsencode(nn),
                                   RENAME_EXCHANGE) != 0:  # fmt: skip
                    raise OSError(ctypes.get_errno(), "renameat2")
                tmp = ("\0swap",)
                self._moved(old, tmp)
                self._moved(new, old)
                self._moved(tmp, new)
                return b""
            if flags & RENAME_NOREPLACE and self._exists(nd, nn):
                raise _Refused(errno.EEXIST)
            os.rename(on, nn, src_dir_fd=od, dst_dir_fd=nd)
        self._unlinked(new)
        self._moved(old, new)
        return b""

    def op_rename(self, node: int, body: bytes) -> bytes:
        (newdir,) = struct.unpack_from("=Q", body)
        return self._rename(node, newdir, 0, body[8:])

    def op_rename2(self, node: int, body: bytes) -> bytes:
        newdir, flags, _pad = struct.unpack_from("=QII", body)
        return self._rename(node, newdir, flags, body[16:])

    def op_link(self, node: int, body: bytes) -> bytes:
        (oldnode,) = struct.unpack_from("=Q", body)
        old = self._parts(oldnode)
        new = self._child(node, _cstr(body, 8)[0])
        self._guard("link", old)
        self._guard("link", new)
        with self._at(old) as (od, on), self._at(new) as (nd, nn):
            os.link(on, nn, src_dir_fd=od, dst_dir_fd=nd, follow_symlinks=False)
        return self._entry(new)

    def _open_host(self, parts: Sequence[str], flags: int, mode: int = 0) -> int:
        """Open a *regular* host file (never a symlink, FIFO or device: no open may block)."""
        flags &= ~(os.O_NOCTTY | getattr(os, "O_DIRECT", 0))
        with self._at(parts) as (d, n):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(n, dir_fd=d).st_mode):
                    raise _Refused(errno.ESTALE)  # the kernel opens only what it saw as a file
            fd = os.open(n, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode,
                         dir_fd=d)  # fmt: skip
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Refused(errno.ESTALE)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _exists(dir_fd: int, name: str) -> bool:
        try:
            os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        return True

    def _open_fd(self, parts: tuple[str, ...], flags: int, mode: int = 0) -> int:
        fd = self._open_host(parts, flags, mode)
        fh = self.next_fh
        self.next_fh += 1
        self.files[fh] = fd
        return fh

    def op_open(self, node: int, body: bytes) -> bytes:
        flags, _ = struct.unpack_from("=II", body)
        parts = self._parts(node)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._guard("open-write", parts)
        fh = self._open_fd(parts, flags & ~(os.O_CREAT | os.O_EXCL))
        return struct.pack("=QII", fh, 0, 0)

    def op_create(self, node: int, body: bytes) -> bytes:
        flags, mode, _umask, _oflags = struct.unpack_from("=IIII", body)
        parts = self._child(node, _cstr(body, 16)[0])
        self._guard("create", parts)
        self._no_setid("create", parts, mode)
        fh = self._open_fd(parts, flags | os.O_CREAT, mode & 0o777)
        return self._entry(parts) + struct.pack("=QII", fh, 0, 0)

    def op_read(self, _node: int, body: bytes) -> bytes:
        fh, offset, size = struct.unpack_from("=QQI", body)
        return os.pread(self._fd(fh), size, offset)

    def op_write(self, _node: int, body: bytes) -> bytes:
        fh, offset, size = struct.unpack_from("=QQI", body)
        data = memoryview(body)[40 : 40 + size]
        n = os.pwrite(self._fd(fh), data, offset)
        return struct.pack("=II", n, 0)

    def _fd(self, fh: int) -> int:
        try:
            return self.files[fh]
        except KeyError:
            raise _Refused(errno.EBADF) from None

    def op_release(self, _node: int, body: bytes) -> bytes:
        (fh,) = struct.unpack_from("=Q", body)
        fd = self.files.pop(fh, None)
        if fd is not None:
            os.close(fd)
        return b""

    def op_flush(self, _node: int, _body: bytes) -> bytes:
        return b""

    def op_fsync(self, _node: int, body: bytes) -> bytes:
        (fh,) = struct.unpack_from("=Q", body)
        os.fsync(self._fd(fh))
        return b""

    def op_statfs(self, _node: int, _body: bytes) -> bytes:
        s = os.statvfs(self.root_fd)
        return struct.pack("=QQQQQIII4x24x", s.f_blocks, s.f_bfree, s.f_bavail, s.f_files,
                           s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize)  # fmt: skip

    def _listing(self, parts: tuple[str, ...]) -> list[tuple[str, int, int]]:
        with self._at(parts) as (d, n):
            fd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
        try:
            entries = [(".", os.fstat(fd).st_ino, 4), ("..", 1, 4)]
            with os.scandir(fd) as it:
                for e in it:
                    st = e.stat(follow_symlinks=False)
                    entries.append((e.name, st.st_ino, stat.S_IFMT(st.st_mode) >> 12))
        finally:
            os.close(fd)
        return entries

    def _unlist(self, fh: int) -> None:
        entries = self.dirs.get(fh)
        if entries is not None:
            self.listed -= len(entries)
            self.dirs[fh] = None

    def op_opendir(self, node: int, _body: bytes) -> bytes:
        with self._at(self._parts(node)) as (d, n):  # fails here if it cannot be read
            os.close(os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=d))  # fmt: skip
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = None
        self.dir_nodes[fh] = node
        return struct.pack("=QII", fh, 0, 0)

    def op_readdir(self, _node: int, body: bytes) -> bytes:
        fh, offset, size = struct.unpack_from("=QQI", body)
        if fh not in self.dirs:
            raise _Refused(errno.EBADF)
        entries = self.dirs[fh]
        if offset == 0 or entries is None:  # a (re)start: list afresh (gVisor's gofer rewinds)
            self._unlist(fh)
            entries = self._listing(self._parts(self.dir_nodes[fh]))
            if self.listed and self.listed + len(entries) > MAX_LISTED:
                raise _Refused(errno.ENOMEM)
            self.dirs[fh] = entries
            self.listed += len(entries)
        if offset >= len(entries):  # read to its end: drop it (a seek back lists again)
            self._unlist(fh)
            return b""
        out = bytearray()
        for i in range(offset, len(entries)):
            name, ino, kind = entries[i]
            raw = os.fsencode(name)
            rec = struct.pack("=QQII", ino, i + 1, len(raw), kind) + raw
            rec += b"\0" * (-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return bytes(out)

    def op_releasedir(self, _node: int, body: bytes) -> bytes:
        fh = struct.unpack_from("=Q", body)[0]
        self._unlist(fh)
        self.dirs.pop(fh, None)
        self.dir_nodes.pop(fh, None)
        return b""

    def op_fsyncdir(self, _node: int, _body: bytes) -> bytes:
        return b""

    def op_setxattr(self, node: int, body: bytes) -> bytes:
        size, flags = struct.unpack_from("=II", body)
        name, off = _cstr(body, 8)
        parts = self._parts(node)
        if name.startswith(("security.", "trusted.")):
            why = "file capabilities and security labels in a host directory"
            self._deny("filesystem.setuid", "setxattr", parts, errno.EPERM, attribute=name,
                       reason=why)  # fmt: skip
        self._guard("setxattr", parts)
        with self._at(parts) as (d, n):  # /proc/self/fd/<dir fd>: no *at form of setxattr
            os.setxattr(f"/proc/self/fd/{d}/{n}", name, body[off : off + size], flags,
                        follow_symlinks=False)  # fmt: skip
        return b""

    def op_removexattr(self, node: int, body: bytes) -> bytes:
        parts = self._parts(node)
        self._guard("removexattr", parts)
        with self._at(parts) as (d, n):
            os.removexattr(f"/proc/self/fd/{d}/{n}", _cstr(body)[0], follow_symlinks=False)
        return b""

    _ops: dict[int, Callable[[Gate, int, bytes], bytes]] = {}


Gate._ops = {
    INIT: Gate.op_init, DESTROY: Gate.op_destroy, LOOKUP: Gate.op_lookup,
    GETATTR: Gate.op_getattr, SETATTR: Gate.op_setattr, READLINK: Gate.op_readlink,
    SYMLINK: Gate.op_symlink, MKNOD: Gate.op_mknod, MKDIR: Gate.op_mkdir,
    UNLINK: Gate.op_unlink, RMDIR: Gate.op_rmdir, RENAME: Gate.op_rename,
    RENAME2: Gate.op_rename2, LINK: Gate.op_link, OPEN: Gate.op_open, CREATE: Gate.op_create,
    READ: Gate.op_read, WRITE: Gate.op_write, RELEASE: Gate.op_release, FLUSH: Gate.op_flush,
    FSYNC: Gate.op_fsync, STATFS: Gate.op_statfs, OPENDIR: Gate.op_opendir,
    READDIR: Gate.op_readdir, RELEASEDIR: Gate.op_releasedir, FSYNCDIR: Gate.op_fsyncdir,
    SETXATTR: Gate.op_setxattr, REMOVEXATTR: Gate.op_removexattr,
}  # fmt: skip


def available() -> str | None:
    """None when gates can be mounted here, else why not."""
    if os.geteuid() != 0:
        return "needs glassroom to run as root (/dev/fuse and mount)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (modprobe fuse)"
    return None


def unmount(path: str) -> None:
    """Lazily detach whatever is mounted at ``path`` (nothing if nothing is)."""
    _libc.umount2(os.fsencode(path), MNT_DETACH)
