"""Can a given uid reach a host path?  Asked before handing the path to a
process that runs as that uid (bwrap as the sandbox uid, QEMU as its VMM uid).

Asking first turns a failure deep inside the helper (bwrap's ``Can't find
source path ...: Permission denied``, which can surface as an unrelated
cgroup error once bwrap has gone) into an error that names the directory in
the way and its mode.  Plain mode bits, no supplementary groups, no ACLs:
the helpers run with no supplementary groups, and glassroom sets no ACLs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _allowed(st: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def blocker(path: Path, uid: int, gid: int, *, write: bool = False,
            search: bool = False) -> str | None:  # fmt: skip
    """Why ``uid``/``gid`` cannot reach ``path`` (search on every directory
    above it, then read, or write with ``write``, or search with ``search``
    for a directory), or None if it can."""
    real = Path(os.path.realpath(path))
    try:
        for parent in reversed(real.parents):
            st = parent.stat()
            if not _allowed(st, uid, gid, 1):
                return (f"{parent} (mode {st.st_mode & 0o7777:04o}, owner {st.st_uid}:"
                        f"{st.st_gid}) cannot be searched by uid {uid}")  # fmt: skip
        st = real.stat()
    except OSError as exc:
        return f"{exc.filename or real}: {exc.strerror}"
    if not _allowed(st, uid, gid, 1 if search else 2 if write else 4):
        what = "searched" if search else "written" if write else "read"
        return (f"{real} (mode {st.st_mode & 0o7777:04o}, owner {st.st_uid}:{st.st_gid}) "
                f"cannot be {what} by uid {uid}")  # fmt: skip
    return None


def reachable_by(path: Path, uid: int, gid: int, *, write: bool) -> bool:
    """Whether ``uid``/``gid`` may reach ``path`` (see :func:`blocker`)."""
    return blocker(path, uid, gid, write=write) is None


def make_traversable(root: Path) -> None:
    """Let every uid *search* (not list) ``root`` and each of its ancestors
    that root owns: a sandbox's uid (bwrap, a template build step, gVisor's
    gofer) must reach what glassroom keeps there (templates, the compiled
    init).  The default dirs sit in the audit log's dir, which is 0700: it
    becomes 0711, and the log and its anchor stay 0600 files that no other
    uid can open.  Not run unprivileged: there the sandbox's uid is this
    user's own, and a home dir stays as it is."""
    if os.geteuid() != 0:
        return
    cur = root.resolve()
    while True:
        try:
            st = os.stat(cur)
        except FileNotFoundError:
            st = None
        if st is not None and st.st_uid == 0 and not st.st_mode & 0o001:
            os.chmod(cur, stat.S_IMODE(st.st_mode) | 0o011)
        if cur.parent == cur:
            return
        cur = cur.parent
