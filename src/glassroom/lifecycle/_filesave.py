"""Files-only snapshots: a sandbox's ``/workspace`` (and ``/tmp``) into a tar, and back.

Why through the instance's own file calls (list, read, write, mkdir) and not
``tar`` inside the sandbox: a policy's ``tools.allow`` need not list ``tar``,
and those calls work on every tier, as the sandbox uid, in the sandbox's own
view, under its walls.  The host writes the archive itself from bytes the
sandbox handed over, so it never unpacks an archive a sandbox made: putting
the files back is again one ``make_dir`` or ``write_file`` call per entry,
checked by the new sandbox's walls.

What is kept: directories and regular files with their bytes.  Not kept:
symlinks, FIFOs, sockets and devices (``other`` in a listing), file modes
(every file comes back 0644, every dir as ``make_dir`` makes it) and
owners; each skipped entry is counted in the result.  Bounded:
``max_bytes`` of file data and ``MAX_ENTRIES`` entries, past which the
snapshot is refused (``snapshot.limit``) rather than cut short.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time
from pathlib import Path
from typing import Any

from .._errors import SandboxError, SnapshotError
from ..backends.base import Instance

ARCHIVE = "files.tar"
MAX_ENTRIES = 100_000
MAX_DEPTH = 64


def save(inst: Instance, dest: Path, roots: list[str], max_bytes: int) -> dict[str, Any]:
    """Walk ``roots`` in the sandbox and write every dir and file into ``dest``."""
    t0 = time.monotonic()
    counts: dict[str, Any] = {"dirs": 0, "files": 0, "bytes": 0, "skipped_symlinks": 0,
                              "skipped_special": 0}  # fmt: skip
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        stack: list[tuple[str, int]] = [(r.rstrip("/") or "/", 0) for r in reversed(roots)]
        while stack:
            path, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise SnapshotError(f"files snapshot: {path} is nested deeper than {MAX_DEPTH}",
                                    rule="snapshot.limit")  # fmt: skip
            try:
                entries = inst.list_dir(path)
            except SandboxError as exc:
                if depth == 0 and "(ENOENT)" in str(exc):
                    continue  # a root the policy has not got (no /tmp): nothing to keep
                raise SnapshotError(f"files snapshot: cannot list {path}: {exc}",
                                    rule="snapshot.files") from None  # fmt: skip
            for e in sorted(entries, key=lambda e: e.name, reverse=True):
                if (counts["dirs"] + counts["files"] + counts["skipped_symlinks"]
                        + counts["skipped_special"]) > MAX_ENTRIES:  # fmt: skip
                    raise SnapshotError(f"files snapshot: more than {MAX_ENTRIES} entries",
                                        rule="snapshot.limit")  # fmt: skip
                full = posixpath.join(path, e.name)
                if e.type == "dir":
                    info = tarfile.TarInfo(full.lstrip("/"))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    counts["dirs"] += 1
                    stack.append((full, depth + 1))
                elif e.type == "file":
                    left = max_bytes - counts["bytes"]
                    try:
                        data = inst.read_file(full, left + 1)
                    except SandboxError as exc:
                        # Gone, or swapped for a FIFO, since the listing: the
                        # sandbox changed it while it was saved; skipped, counted.
                        if "(ENOENT)" in str(exc) or "(ENXIO)" in str(exc):
                            counts["skipped_changed"] = counts.get("skipped_changed", 0) + 1
                            continue
                        raise
                    if len(data) > left:
                        raise SnapshotError(f"files snapshot: the files pass {max_bytes} bytes",
                                            rule="snapshot.limit")  # fmt: skip
                    info = tarfile.TarInfo(full.lstrip("/"))
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                    counts["files"] += 1
                    counts["bytes"] += len(data)
                elif e.type == "other":  # a FIFO, socket or device: never read
                    counts["skipped_special"] += 1
                else:
                    counts["skipped_symlinks"] += 1
                if tar.offset > max_bytes:  # headers count too: names can be most of it
                    raise SnapshotError(f"files snapshot: the archive passes {max_bytes} bytes",
                                        rule="snapshot.limit")  # fmt: skip
    counts["ms"] = round((time.monotonic() - t0) * 1000, 1)
    return counts


def load(inst: Instance, src: Path) -> dict[str, Any]:
    """Put an archive made by :func:`save` (and verified by the store) back in."""
    t0 = time.monotonic()
    counts: dict[str, Any] = {"dirs": 0, "files": 0, "bytes": 0}
    with tarfile.open(src, "r") as tar:
        for m in tar:
            path = "/" + m.name.lstrip("/")
            if m.isdir():
                try:
                    inst.make_dir(path)
                except SandboxError:
                    # It may exist already (the new sandbox's own /workspace layout).
                    if not _is_dir(inst, path):
                        raise
                counts["dirs"] += 1
            elif m.isfile():
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                inst.write_file(path, data, 0o644)
                counts["files"] += 1
                counts["bytes"] += len(data)
    counts["ms"] = round((time.monotonic() - t0) * 1000, 1)
    return counts


def _is_dir(inst: Instance, path: str) -> bool:
    parent, name = posixpath.split(path)
    try:
        return any(e.name == name and e.type == "dir" for e in inst.list_dir(parent or "/"))
    except SandboxError:
        return False
