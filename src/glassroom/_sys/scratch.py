"""Scratch disks: a sandbox's ``/workspace`` and ``/tmp`` on storage accounted apart.

Why: tmpfs pages are charged to the memory cgroup of the process that
writes them, and they cannot be reclaimed (no swap).  With a tmpfs
workspace one cgroup cannot tell a task's files from its memory, so the
memory cap had to be ``memory_mib + disk_mib`` and a task could hold that
much memory by not writing files.  On a real filesystem the files' pages
are page cache: still charged to the writer, but *reclaimable* (written
back to the disk image and dropped), so ``memory.max = memory_mib`` holds
and the image's size (``disk_mib``) bounds the files: ENOSPC when full.

A scratch disk is a sparse file holding a fresh ext4 (no journal: it lives
for one task; no reserved blocks: all of ``disk_mib`` is the task's).  The
filesystem is made once per size (``mke2fs``, ~25 ms) as a read-only
template in the scratch dir; each sandbox gets a copy of the template's
few allocated blocks (``SEEK_DATA``), well under a millisecond.

* microVM: the image itself becomes the guest's second virtio-blk disk.
* namespaces / gVisor (glassroom as root): the image is attached to a loop
  device (``LOOP_CONFIGURE``: autoclear, direct I/O so the image's own page
  cache is not a second copy) and mounted ``nosuid,nodev`` on a per-sandbox
  host directory, with ``workspace`` and ``tmp`` inside, which the backend
  binds into the sandbox.  The image file is unlinked as soon as the loop
  device holds it, and the host mount is detached (``umount2(MNT_DETACH)``)
  once the sandbox holds its own mounts: from then on the filesystem exists
  only in the sandbox's mount namespace and goes (loop device and all) when
  the sandbox's last process does.  Nothing is left on the host for a
  crashed supervisor to leak.

Every failure raises ``WallError`` naming ``resources.disk_mib``: a sandbox
whose files cannot be kept apart from its memory does not start (there is
no fallback to a tmpfs counted as memory).

The backing directory must be a real disk: an image on tmpfs (``/run``) is
memory again, charged to the sandbox through the loop device, and is
refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

from .._errors import WallError

RULE = "resources.disk_mib"
#: Filesystems whose files are memory: never a place for a scratch image.
_MEMORY_FS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}
_MKFS_TIMEOUT_S = 30.0
#: The template's ``mke2fs`` options; a change must bump ``_TEMPLATE_VERSION``
#: (part of its file name), or the old templates are reused.
#: 4 KiB blocks at every size (``-T default``): below 512 MiB mke2fs would pick
#: 1 KiB blocks, which the loop device's 4 KiB logical blocks cannot mount.
#: ``-e continue``: the host kernel mounts this fs, and a full host disk makes
#: its writes fail; that must stay the sandbox's EIO/ENOSPC whatever the
#: host's /etc/mke2fs.conf says (``errors = panic`` there could panic the host).
MKFS_OPTIONS = ("-t", "ext4", "-T", "default", "-b", "4096", "-O", "^has_journal", "-m", "0",
                "-e", "continue", "-E", "lazy_itable_init=1,nodiscard")  # fmt: skip
_TEMPLATE_VERSION = "3"

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16
_MS_NOSUID, _MS_NODEV, _MS_NOATIME, _MS_PRIVATE = 2, 4, 1024, 1 << 18
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
#: One loop attach at a time in this process (see _attach_loop).
_ATTACH_LOCK = threading.Lock()


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 15)]


class _LoopInfo64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_char * 64),
        ("lo_crypt_name", ctypes.c_char * 64), ("lo_encrypt_key", ctypes.c_char * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]  # fmt: skip


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]  # fmt: skip


def _fail(what: str, err: int | None = None) -> WallError:
    detail = f": {os.strerror(err)}" if err else ""
    return WallError(f"resources.disk_mib: {what}{detail}", rule=RULE)


def fs_type(path: str | Path) -> int:
    """``statfs(2)``'s ``f_type`` of ``path`` (Python's ``os`` has no statfs)."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def check_backing(directory: Path) -> None:
    """Refuse a backing directory whose files would be memory (or not ours alone)."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
        st = os.lstat(directory)
        kind = _MEMORY_FS.get(fs_type(directory))
    except OSError as exc:
        raise _fail(f"cannot use the scratch dir {directory}", exc.errno) from exc
    if not os.path.isdir(directory) or os.path.islink(directory) \
            or st.st_uid != os.geteuid() or st.st_mode & 0o022:  # fmt: skip
        raise _fail(f"the scratch dir {directory} must be a directory of glassroom's "
                    "own uid that no one else may write")  # fmt: skip
    if kind is not None:
        raise _fail(f"the scratch dir {directory} is on {kind}, so the workspace would be "
                    "memory again; point GLASSROOM_SCRATCH_DIR at a disk")  # fmt: skip


def _template(directory: Path, size_bytes: int) -> Path:
    """The pristine ext4 of ``size_bytes`` (made once, read-only from then on)."""
    path = directory / f".template-v{_TEMPLATE_VERSION}-{size_bytes}.img"
    if path.exists():
        return path
    mkfs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise _fail("mke2fs (e2fsprogs) is not installed, so the workspace cannot be "
                    "kept apart from memory")  # fmt: skip
    tmp = directory / f".template-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.truncate(size_bytes)
        res = subprocess.run(
            [mkfs, "-q", "-F", *MKFS_OPTIONS, str(tmp)], capture_output=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=_MKFS_TIMEOUT_S, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise _fail(f"mke2fs failed: {res.stderr.decode(errors='replace').strip()[:200]}")
        os.chmod(tmp, 0o400)
        os.replace(tmp, path)  # atomic: a concurrent maker's copy is the same
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def make_image(path: Path, size_bytes: int) -> None:
    """A sparse file of ``size_bytes`` holding a fresh, empty ext4.

    Copies the template's allocated extents only (the rest stays holes)."""
    try:
        src = os.open(_template(path.parent, size_bytes), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail("cannot read the scratch template", exc.errno) from exc
    try:
        dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        os.close(src)
        raise _fail(f"cannot create {path}", exc.errno) from exc
    try:
        os.ftruncate(dst, size_bytes)
        pos = 0
        while pos < size_bytes:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past pos
                    break
                raise
            end = os.lseek(src, start, os.SEEK_HOLE)
            while start < end:
                n = os.copy_file_range(src, dst, end - start, start, start)
                if n <= 0:
                    raise OSError(errno.EIO, "short copy")
                start += n
            pos = end
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise _fail("cannot copy the scratch template", exc.errno) from exc
    finally:
        os.close(src)
        os.close(dst)


def _attach_loop(image: Path) -> tuple[str, int]:
    """Attach ``image`` to a free loop device (autoclear, direct I/O).

    Returns its path and an open fd of it, to be closed once it is mounted:
    with autoclear, the last close of an unmounted device detaches it."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        # EBUSY: another attach (this process's other threads are kept out by
        # the lock; other processes are not) took the free device first, or
        # the device is still being torn down by an autoclear detach, which
        # GET_FREE already reports as free.  Retry with a short backoff,
        # bounded (about 2 s in all), rather than fail a start under load.
        delay = 0.001
        for _ in range(40):
            with _ATTACH_LOCK:
                num = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{num}"
                fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
                cfg = _LoopConfig(fd=backing, block_size=4096)
                cfg.info.lo_flags = _LO_FLAGS_AUTOCLEAR | _LO_FLAGS_DIRECT_IO
                if _libc.ioctl(fd, _LOOP_CONFIGURE, ctypes.byref(cfg)) == 0:
                    return dev, fd
                err = ctypes.get_errno()
                os.close(fd)
            if err != errno.EBUSY:
                raise OSError(err, os.strerror(err), dev)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(backing)
        os.close(ctl)


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    src = source.encode() if source else None
    typ = fstype.encode() if fstype else None
    if _libc.mount(src, target.encode(), typ, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


class ScratchMount:
    """A scratch image mounted (loop, ``nosuid,nodev``) on a host dir of its own.

    ``dirs`` maps names made at the image's root to their mode; each belongs
    to ``owner`` (the host uid/gid the sandbox's files are to have).  The
    path to them is searchable but not listable (0711 dirs: bwrap, running
    as the sandbox uid, resolves it by name) and carries the sandbox's
    random id; it exists only until the sandbox holds its mounts.  ``root_only``
    (gVisor: runsc and its gofer, root, resolve the path) makes the disk's
    root 0700: ``owner`` there is host uid 1000, a real account, which would
    otherwise reach the dirs by the name /proc/self/mountinfo shows, and keep
    them (an open fd outlives the detach).
    """

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        #: The loop device (``/dev/loopN``): gVisor's checkpoint holds it open
        #: to copy the disk once the sandbox has let go of it.
        self.device = ""
        self.detached = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def create(cls, directory: Path, name: str, size_bytes: int, owner: tuple[int, int],
               dirs: dict[str, int], *, root_only: bool = False,
               source: Path | None = None) -> ScratchMount:  # fmt: skip
        """``source``: a raw image in ``directory`` to use instead of a fresh ext4 (a
        restored sandbox's saved disk); it is moved into place and its dirs are kept."""
        if os.geteuid() != 0:
            raise _fail("a loop-mounted workspace needs root")
        check_backing(directory)
        image = directory / f"{name}.img"
        mnt = directory / f"{name}.mnt"
        if source is not None:
            os.replace(source, image)
        else:
            make_image(image, size_bytes)
        try:
            try:
                dev, held = _attach_loop(image)
            except OSError as exc:
                raise _fail("cannot attach the workspace image to a loop device",
                            exc.errno) from exc  # fmt: skip
            try:
                mnt.mkdir(mode=0o700 if root_only else 0o711)
                _mount(dev, str(mnt), "ext4", _MS_NOSUID | _MS_NODEV | _MS_NOATIME)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    mnt.rmdir()
                raise _fail("cannot mount the workspace image", exc.errno) from exc
            finally:
                # The mount holds the device now; autoclear detaches it when
                # that (and every bind of it, in the sandbox) is gone.  Closed
                # on failure too: the device then detaches at once.
                os.close(held)
        finally:
            with contextlib.suppress(OSError):
                image.unlink()  # the loop device holds it open; no name left behind
        out = cls(mnt)
        out.device = dev
        try:
            _mount("", str(mnt), None, _MS_PRIVATE)  # no propagation to or from the host
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(mnt / "lost+found")
            os.chmod(mnt, 0o700 if root_only else 0o711)
            for d, mode in ({} if source is not None else dirs).items():
                p = mnt / d
                p.mkdir()
                os.chown(p, *owner)
                os.chmod(p, mode)
        except OSError as exc:
            out.detach()
            raise _fail("cannot prepare the workspace image", exc.errno) from exc
        return out

    def path(self, name: str) -> str:
        return str(self.mountpoint / name)

    def detach_soon(self) -> None:
        """``detach`` on a thread of its own: ``umount2`` waits out an RCU grace
        period (5-20 ms on a busy 2-vCPU host) that a sandbox's start need not."""
        self._thread = threading.Thread(target=self.detach, daemon=True,
                                        name="glassroom-scratch-detach")  # fmt: skip
        self._thread.start()

    def detach(self) -> None:
        """Drop the host's mount (lazily: the sandbox's own mounts keep the fs)."""
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()
        with self._lock:
            self._detach()

    def _detach(self) -> None:
        if not self.detached:
            self.detached = detach_path(self.mountpoint)


def detach_path(mountpoint: Path) -> bool:
    """Lazily unmount a scratch disk's host mount and remove its dir; True when gone.

    Also the reaper's, for a supervisor that died between making the disk and
    detaching it (the record's ``scratch`` list)."""
    # EINVAL: not mounted (any more); anything else: keep it for the receipt.
    if _libc.umount2(str(mountpoint).encode(), _MNT_DETACH) != 0 \
            and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):  # fmt: skip
        return False
    with contextlib.suppress(OSError):
        mountpoint.rmdir()
    return not mountpoint.exists()
