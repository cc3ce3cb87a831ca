"""The snapshot store: paused images and named snapshots, signed, hashed, bounded.

Layout, one directory per entry under the store's root (``docs/snapshots.md``)::

    <root>/.key                  HMAC-SHA256 key, 0600, made once
    <root>/<id>/manifest.json    what was saved: tier, policy, parent, every file's hash
    <root>/<id>/manifest.sig     HMAC of manifest.json under .key
    <root>/<id>/data/...         what the backend wrote (``Checkpoint.files``)
    <root>/<id>/files.tar        a files-only snapshot (made here, from the sandbox's files)

Why signed and not just hashed: anyone who can change a file in the data dir
can also rewrite a hash beside it; the key is the one thing a snapshot dir
does not hold.  A restore verifies the signature, then that the directory
holds exactly the listed files with their sizes and hashes, before the
backend reads a byte of it (``SnapshotIntegrityError``, rule
``snapshot.integrity``).

An entry is written under ``<root>/.tmp-<id>`` and renamed into place once
its manifest is signed, so a crash mid-save leaves no half snapshot that
``list`` would show; ``prune`` removes such leftovers.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import _config
from .._errors import SnapshotError, SnapshotIntegrityError

MANIFEST, SIGNATURE, KEY = "manifest.json", "manifest.sig", ".key"
#: Ids the store makes and accepts: never a path, never a dot name.
_ID = re.compile(r"^(snap|sb)-[0-9a-f]{6,32}$")
#: Snapshot names: what a user types; kept printable and short.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_DIGEST_CHUNK = 1 << 16


@dataclass(frozen=True)
class SnapshotLimits:
    """Per tenant: how many snapshots, how many bytes in all, how old."""

    max_count: int = 20
    max_bytes: int = 8 << 30
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    names: list[str]
    #: "snapshot" (named, listed) or "pause" (a paused sandbox's image).
    kind: str
    tenant: str
    #: The sandbox it was taken from.
    sandbox_id: str
    tier: str
    #: True when processes and memory were saved.
    memory: bool
    #: Why process state was not saved (a files-only snapshot), or None.
    memory_refused: str | None
    size_bytes: int
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Staging:
    """An entry being written: the backend fills ``data``; ``commit`` signs it."""

    id: str
    kind: str
    tenant: str
    dir: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def data(self) -> Path:
        return self.dir / "data"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SnapshotError(
            f"snapshot name {str(name)[:80]!r} is not valid: 1-128 characters of "
            "letters, digits and . _ : @ / -, starting with a letter or digit",
            rule="snapshot.name",
        )
    return name


def _sha256(path: Path) -> str:
    """The content digest of a file (see :func:`_digest_fd`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _digest_fd(fd)
    finally:
        os.close(fd)


def _digest_fd(fd: int, copy_to: int | None = None) -> str:
    """A content digest that skips a sparse file's holes without reading them;
    with ``copy_to``, the very bytes hashed are also written there (holes kept).

    Why not plain SHA-256: a microVM's scratch disk is a 512 MiB sparse file
    with well under 1 MiB written, and hashing its zeros cost more than the
    checkpoint itself.  The digest is over fixed 64 KiB chunks, each either
    ``Z`` (all zero, hole or not) or ``D`` + its bytes, after the size: it
    depends only on the content, never on how the filesystem laid it out, so
    a copy of a snapshot verifies the same, and any changed byte changes it.
    """
    h = hashlib.sha256(b"glassroom-sparse-v2\0")
    zero = bytes(_DIGEST_CHUNK)
    size = os.fstat(fd).st_size
    h.update(size.to_bytes(8, "big"))
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = size  # nothing but hole to the end
        if data >= size:  # hole to the end: every chunk left, the last partial one too
            h.update(b"Z" * (-(-size // _DIGEST_CHUNK) - pos // _DIGEST_CHUNK))
            break
        first_data_chunk = data // _DIGEST_CHUNK
        h.update(b"Z" * (first_data_chunk - pos // _DIGEST_CHUNK))
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        pos = first_data_chunk * _DIGEST_CHUNK
        end = min(size, -(-hole // _DIGEST_CHUNK) * _DIGEST_CHUNK)
        while pos < end:
            chunk = os.pread(fd, min(_DIGEST_CHUNK, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "the file is shorter than its size")
            if chunk == zero[: len(chunk)]:
                h.update(b"Z")
            else:
                h.update(b"D" + chunk)
                if copy_to is not None:
                    os.pwrite(copy_to, chunk, pos)
            pos += len(chunk)
    if copy_to is not None:
        os.ftruncate(copy_to, size)
    return h.hexdigest()


def _is_real_dir(p: Path) -> bool:
    return os.path.isdir(p) and not os.path.islink(p)


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``top`` (relative path, lstat), symlinks not followed."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            yield str(p.relative_to(top)), p.lstat()


@dataclass
class _Root:
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: staging id -> (tenant, kind) of saves in progress.
    inflight: dict[str, tuple[str, str]] = field(default_factory=dict)


_ROOTS: dict[str, _Root] = {}
_ROOTS_LOCK = threading.Lock()


class SnapshotStore:
    """Signed snapshot entries under one root directory (mode 0700)."""

    def __init__(self, root: str | Path, limits: SnapshotLimits | None = None) -> None:
        self.root = Path(root)
        self.limits = limits or SnapshotLimits()
        self._key_cache: bytes | None = None
        # One lock and one set of entries being written per root, whichever store
        # object names it: the limits are checked and taken under it (two saves
        # at once must not both fit into the last slot).
        with _ROOTS_LOCK:
            self._shared = _ROOTS.setdefault(str(self.root.resolve()), _Root())

    # -- the key -----------------------------------------------------------------

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.root.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise SnapshotError(
                f"snapshot dir {self.root} must be owned by uid {os.geteuid()} with mode "
                f"0700 (it is uid {st.st_uid}, mode {st.st_mode & 0o777:o}): snapshots hold "
                "sandbox memory", rule="snapshot.store")  # fmt: skip

    def _key(self) -> bytes:
        """The store's HMAC key, made once; refused unless it is exactly what we made.

        A key that is a link, has another owner, is readable by others or has
        a second name is not ours (a swapped key would sign a forged snapshot),
        and every snapshot is refused until an operator looks."""
        if self._key_cache is None:
            self._ensure_root()
            path = self.root / KEY
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise SnapshotIntegrityError(
                    f"{path}: the snapshot key cannot be read ({exc.strerror})",
                    rule="snapshot.integrity") from None  # fmt: skip
            try:
                st = os.fstat(fd)
                key = os.read(fd, 64)
            finally:
                os.close(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_mode & 0o077 or st.st_nlink != 1 or len(key) != 32):  # fmt: skip
                raise SnapshotIntegrityError(
                    f"{path}: the snapshot key is not the one this store made (it must be "
                    "a 32-byte regular file, mode 0600, owned by this uid, with one link)",
                    rule="snapshot.integrity")  # fmt: skip
            self._key_cache = key
        return self._key_cache

    def _sign(self, manifest: bytes) -> str:
        return hmac.new(self._key(), manifest, hashlib.sha256).hexdigest()

    # -- writing -----------------------------------------------------------------

    def begin(self, kind: str, tenant: str, entry_id: str | None = None) -> Staging:
        """A staging dir for a new entry, after the tenant's count limit is checked
        (saves still in progress count: the slot is taken here)."""
        self._ensure_root()
        sid = entry_id or "snap-" + secrets.token_hex(8)
        if not _ID.match(sid):
            raise SnapshotError(f"bad snapshot id {sid!r}", rule="snapshot.not_found")
        with self._shared.lock:
            if kind == "snapshot":
                mine = len(self.list(tenant=tenant)) + sum(
                    1 for t, k in self._shared.inflight.values() if t == tenant and k == kind)
                if mine >= self.limits.max_count:
                    raise SnapshotError(
                        f"tenant {tenant!r} already has {mine} snapshots "
                        f"(max {self.limits.max_count}): delete one first",
                        rule="snapshot.limit",
                    )
            self._shared.inflight[sid] = (tenant, kind)
        tmp = self.root / f".tmp-{sid}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o700)
            (tmp / "data").mkdir(mode=0o700)
        except BaseException:
            with self._shared.lock:
                self._shared.inflight.pop(sid, None)
            raise
        return Staging(sid, kind, tenant, tmp)

    def check_room(self, tenant: str, estimate: int, *, replacing: str | None = None) -> None:
        """Refuse up front a save that cannot fit (a pause that would stop the sandbox
        before the store could say no)."""
        with self._shared.lock:
            used = sum(i.size_bytes for i in self.list(tenant=tenant, kind=None)
                       if i.id != replacing)  # fmt: skip
        if used + estimate > self.limits.max_bytes:
            raise SnapshotError(
                f"tenant {tenant!r}: a pause may need up to {estimate} bytes and its snapshots "
                f"and paused sandboxes hold {used} (max {self.limits.max_bytes}); it is still "
                "running", rule="snapshot.limit")  # fmt: skip

    def abort(self, st: Staging) -> None:
        shutil.rmtree(st.dir, ignore_errors=True)
        with self._shared.lock:
            self._shared.inflight.pop(st.id, None)

    def used_bytes(self, tenant: str) -> int:
        """What the tenant's entries of every kind (snapshots, paused images) hold."""
        return sum(i.size_bytes for i in self.list(tenant=tenant, kind=None))

    def commit(
        self, st: Staging, *, names: list[str], sandbox_id: str, tier: str, memory: bool,
        memory_refused: str | None, extra: dict[str, Any],
    ) -> SnapshotInfo:  # fmt: skip
        """Hash every file, check the byte limit, sign, and move the entry into place."""
        files: dict[str, dict[str, Any]] = {}
        total = 0
        for rel, lst in _walk(st.dir):
            if _is_real_dir(st.dir / rel):
                continue
            if not os.path.isfile(st.dir / rel) or os.path.islink(st.dir / rel):
                self.abort(st)
                raise SnapshotError(f"snapshot {st.id}: {rel} is not a regular file",
                                    rule="snapshot.integrity")  # fmt: skip
            files[rel] = {"size": lst.st_size, "sha256": _sha256(st.dir / rel)}
            total += lst.st_blocks * 512  # on disk: a sparse disk image counts what it holds
        with self._shared.lock:
            used = sum(i.size_bytes for i in self.list(tenant=st.tenant, kind=None)
                       if i.id != st.id)  # an older image of the same id is replaced  # fmt: skip
            if used + total > self.limits.max_bytes:
                self._shared.inflight.pop(st.id, None)
                shutil.rmtree(st.dir, ignore_errors=True)
                raise SnapshotError(
                    f"tenant {st.tenant!r}: this image ({total} bytes) would bring its "
                    f"snapshots and paused sandboxes to {used + total} bytes "
                    f"(max {self.limits.max_bytes})", rule="snapshot.limit")  # fmt: skip
            info = SnapshotInfo(id=st.id, names=names, kind=st.kind, tenant=st.tenant,
                                sandbox_id=sandbox_id, tier=tier, memory=memory,
                                memory_refused=memory_refused, size_bytes=total,
                                created_at=time.time())  # fmt: skip
            manifest = {"version": 1, "info": info.as_dict(), "files": files, **extra}
            raw = json.dumps(manifest, sort_keys=True, indent=1).encode()
            (st.dir / MANIFEST).write_bytes(raw)
            (st.dir / SIGNATURE).write_text(self._sign(raw) + "\n")
            dest = self.root / st.id
            if dest.exists():  # a pause image of the same sandbox: the new one wins
                shutil.rmtree(dest)
            os.rename(st.dir, dest)
            self._shared.inflight.pop(st.id, None)
        return info

    # -- reading -----------------------------------------------------------------

    def _dir(self, entry_id: str) -> Path:
        if not isinstance(entry_id, str) or not _ID.match(entry_id):
            raise SnapshotError(f"snapshot {str(entry_id)[:80]!r} was not found",
                                rule="snapshot.not_found")  # fmt: skip
        return self.root / entry_id

    def _read_info(self, d: Path) -> SnapshotInfo | None:
        try:
            raw = json.loads((d / MANIFEST).read_bytes())["info"]
            return SnapshotInfo(**raw)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get(self, entry_id: str, *, tenant: str | None = None,
            kind: str = "snapshot") -> SnapshotInfo:  # fmt: skip
        info = self._read_info(self._dir(entry_id))
        if info is None or info.kind != kind or (tenant is not None and info.tenant != tenant):
            raise SnapshotError(f"snapshot {entry_id!r} was not found", rule="snapshot.not_found")
        return info

    def open(self, entry_id: str, *, tenant: str | None = None, kind: str = "snapshot",
             into: Path | None = None) -> tuple[SnapshotInfo, dict[str, Any], Path]:  # fmt: skip
        """Verify an entry into a private copy: (info, manifest, the copy's dir).

        Why a copy: a check by path and a later use by path can be told apart
        by whoever can write in the store (swap a file in between, or link one
        in).  Every listed file is opened once (no links followed, one name
        only), hashed and copied from that one open file into ``into`` (a new
        0700 dir; by default in the state dir, outside the store), so what the
        backend reads is exactly what was verified.  The tenant and kind are
        checked against the signed manifest, not a first unsigned read.  The
        caller removes the copy (:func:`discard`) once the sandbox is running.
        """
        self.get(entry_id, tenant=tenant, kind=kind)  # not found: no work, no record
        d = self._dir(entry_id)
        parent = into or _config.state_dir() / "restore"
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        work = Path(tempfile.mkdtemp(prefix=f"{entry_id}-", dir=parent))
        try:
            manifest = self._verify_into(d, work)
            info = SnapshotInfo(**manifest["info"])
            if info.id != entry_id or info.kind != kind or (
                tenant is not None and info.tenant != tenant
            ):
                raise SnapshotIntegrityError(
                    f"snapshot {entry_id}: its signed manifest names {info.id} "
                    f"({info.kind}, tenant {info.tenant!r})",
                    rule="snapshot.integrity")  # fmt: skip
        except BaseException:
            discard(work)
            raise
        return info, manifest, work

    def verify(self, entry_id: str, *, kind: str = "snapshot") -> SnapshotInfo:
        info, _, work = self.open(entry_id, kind=kind)
        discard(work)
        return info

    def _verify_into(self, d: Path, work: Path) -> dict[str, Any]:
        """Signature, then exactly the listed files with their sizes and hashes."""
        def bad(problem: str) -> SnapshotIntegrityError:
            return SnapshotIntegrityError(f"snapshot {d.name} was changed since it was saved: "
                                          f"{problem}; it is refused", rule="snapshot.integrity")

        try:
            raw = _read_once(d / MANIFEST, 16 << 20)
            sig = _read_once(d / SIGNATURE, 256).decode(errors="replace").strip()
        except OSError as exc:
            raise bad(f"cannot read its manifest ({exc.strerror})") from None
        if not hmac.compare_digest(sig, self._sign(raw)):
            raise bad("the manifest's signature does not match")
        manifest: dict[str, Any] = json.loads(raw)
        listed: dict[str, dict[str, Any]] = manifest["files"]
        for rel, _ in _walk(d):
            if rel in (MANIFEST, SIGNATURE) or _is_real_dir(d / rel):
                continue
            if rel not in listed:
                raise bad(f"{rel} was added")
        for rel, want in listed.items():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise bad(f"{rel!r} is not a name inside the snapshot")
            try:
                src = os.open(d / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                raise bad(f"{rel} is missing") from None
            except OSError as exc:
                raise bad(f"{rel} cannot be opened ({exc.strerror})") from None
            try:
                st = os.fstat(src)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise bad(f"{rel} is not a regular file with one name")
                if st.st_size != want["size"]:
                    raise bad(f"{rel} has {st.st_size} bytes, not {want['size']}")
                (work / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                dst = os.open(work / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o600)  # fmt: skip
                try:
                    digest = _digest_fd(src, copy_to=dst)
                except OSError as exc:
                    raise bad(f"{rel} cannot be read whole ({exc.strerror})") from None
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            if digest != want["sha256"]:
                raise bad(f"{rel} does not match its hash")
        return manifest

    def list(
        self, *, tenant: str | None = None, sandbox_id: str | None = None,
        name: str | None = None, kind: str | None = "snapshot",
    ) -> builtins.list[SnapshotInfo]:  # fmt: skip
        """Entries of one kind, newest first (manifests read, not verified: see ``open``)."""
        if not self.root.is_dir():
            return []
        out = []
        for d in self.root.iterdir():
            if not _ID.match(d.name):
                continue
            info = self._read_info(d)
            if info is None or (kind is not None and info.kind != kind):
                continue
            if tenant is not None and info.tenant != tenant:
                continue
            if sandbox_id is not None and info.sandbox_id != sandbox_id:
                continue
            if name is not None and name not in info.names:
                continue
            out.append(info)
        return sorted(out, key=lambda i: i.created_at, reverse=True)

    # -- removing ----------------------------------------------------------------

    def delete(self, entry_id: str, *, tenant: str | None = None, kind: str = "snapshot",
               why: str = "client") -> bool:  # fmt: skip
        """Remove an entry; False when there was none (of this tenant).  ``why`` is
        for the caller's audit record (the store keeps no log of its own)."""
        try:
            self.get(entry_id, tenant=tenant, kind=kind)
        except SnapshotError:
            return False
        shutil.rmtree(self._dir(entry_id), ignore_errors=True)
        return True

    def prune(self) -> builtins.list[str]:
        """Remove entries past ``max_age_s`` and staging dirs of crashed saves."""
        gone: builtins.list[str] = []
        if not self.root.is_dir():
            return gone
        now = time.time()
        for d in self.root.iterdir():
            if d.name.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    if now - d.stat().st_mtime > 3600:
                        shutil.rmtree(d, ignore_errors=True)
                continue
            if not _ID.match(d.name):
                continue
            info = self._read_info(d)
            if info is not None and now - info.created_at > self.limits.max_age_s:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(info.id)
        return gone


def _read_once(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def discard(work: Path) -> None:
    """Remove a verified copy made by :meth:`SnapshotStore.open`."""
    shutil.rmtree(work, ignore_errors=True)


def default_store() -> SnapshotStore:
    return SnapshotStore(_config.snapshot_dir())
