"""Workspace in and out: copy a host directory into a sandbox, and its results back.

Both directions go through the sandbox's own file API (``sb.files``), so they
work the same on every tier and through ``Sandbox(url=...)``, and every file
moved is a file operation of that sandbox, checked against its walls.

What is refused, and why:

- **In:** a symlink or special file in the host directory.  Following a link
  would copy whatever it points at (a host key, ``/etc/shadow``) into a
  sandbox whose policy never named it; copying the link itself would hand the
  sandbox a path into the host's tree.  So the copy fails before anything is
  written, naming the path (fail closed: a half-copied workspace would run the
  task on inputs nobody chose).
- **Out:** a symlink or special file the sandbox made.  The agent controls
  ``/workspace``; a link it plants must never become a host path that a later
  step follows, and a FIFO would hang the reader.  Those entries are left
  behind and listed in the report (and the audit log); the regular files are
  still copied, because losing a task's results over one stray link helps
  nobody.  On the host, files are created with ``O_EXCL | O_NOFOLLOW`` in
  directories this copy made itself, in a destination that must not exist yet
  or be empty, so nothing already on the host is overwritten or followed.

Sizes are bounded: a copy stops with an error past ``max_bytes`` (default:
the policy's ``resources.disk_mib``) or ``max_files``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .._errors import SandboxError
from ..backends.base import FileEntry

#: The most entries one copy moves, either way.
MAX_FILES = 100_000


class _Files(Protocol):
    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None: ...
    def read(self, path: str, max_bytes: int = ...) -> bytes: ...
    def list(self, path: str = "/workspace") -> list[FileEntry]: ...
    def make_dir(self, path: str) -> None: ...


class _Box(Protocol):
    files: Any

    @property
    def id(self) -> str: ...


@dataclass
class CopyReport:
    """What a copy moved, and what it refused (``(path, why)`` pairs)."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "dirs": self.dirs, "bytes": self.bytes,
                "refused": [{"path": p, "why": w} for p, w in self.refused]}  # fmt: skip


def _limit(sb: _Box, max_bytes: int | None) -> int:
    if max_bytes is not None:
        return max_bytes
    pol = getattr(sb, "policy", None)
    mib = getattr(getattr(pol, "resources", None), "disk_mib", None)
    return int(mib) << 20 if isinstance(mib, int) else 256 << 20


def _audit(sb: _Box, event: str, src: str, dest: str, rep: CopyReport) -> None:
    """A local sandbox records the copy in its own audit trail; a remote one's
    server records each file operation it carried out."""
    sup = getattr(sb, "_sup", None)
    audit = getattr(sup, "audit", None)
    if audit is None:
        return
    decision = "deny" if rep.refused else "allow"
    rule = "workspace.special_files" if rep.refused else None
    audit.append(sb.id, event, {"from": src, "to": dest, **rep.as_dict()},
                 decision=decision, rule=rule)  # fmt: skip


def copy_in(
    sb: _Box, host_dir: str | Path, dest: str = "/workspace", *,
    max_bytes: int | None = None, max_files: int = MAX_FILES,
) -> CopyReport:  # fmt: skip
    """Copy ``host_dir``'s tree into the sandbox at ``dest`` (which exists).

    Regular files keep their permission bits (at most 0755: no setuid, no
    group/other write); directories are made.  Any symlink or special file
    refuses the whole copy before anything is written."""
    root = Path(host_dir)
    try:
        st = root.lstat()
    except OSError as exc:
        raise SandboxError(f"workspace: {root}: {exc.strerror}", rule="workspace.in") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxError(f"workspace: {root} is not a directory", rule="workspace.in")
    plan: list[tuple[str, Path, int, bool]] = []  # (inside, host, mode, is_dir)
    total = 0
    # One walk that decides everything first: the copy is all or nothing.
    for cur, dirs, names in os.walk(root, followlinks=False):
        base = Path(cur)
        for name in sorted(dirs) + sorted(names):
            p = base / name
            rel = p.relative_to(root).as_posix()
            m = p.lstat()
            if stat.S_ISLNK(m.st_mode) or not (stat.S_ISDIR(m.st_mode) or stat.S_ISREG(m.st_mode)):
                kind = "a symlink" if stat.S_ISLNK(m.st_mode) else "a special file"
                raise SandboxError(
                    f"workspace: {p} is {kind}: only regular files and directories are "
                    "copied in (a link would bring in what it points at)",
                    rule="workspace.in",
                )
            total += 0 if stat.S_ISDIR(m.st_mode) else m.st_size
            plan.append((rel, p, stat.S_IMODE(m.st_mode) & 0o755, stat.S_ISDIR(m.st_mode)))
            if len(plan) > max_files or total > _limit(sb, max_bytes):
                raise SandboxError(
                    f"workspace: {root} holds more than {max_files} entries or "
                    f"{_limit(sb, max_bytes) >> 20} MiB (resources.disk_mib)",
                    rule="resources.disk_mib",
                )
    rep = CopyReport()
    dest = dest.rstrip("/") or "/"
    for rel, p, mode, is_dir in plan:
        inside = f"{dest}/{rel}"
        if is_dir:
            sb.files.make_dir(inside)
            rep.dirs += 1
            continue
        data = p.read_bytes()
        sb.files.write(inside, data, mode or 0o644)
        rep.files += 1
        rep.bytes += len(data)
    _audit(sb, "workspace.copied_in", str(root), dest, rep)
    return rep


def _prepare_out(host_dir: Path) -> None:
    try:
        st = host_dir.lstat()
    except FileNotFoundError:
        host_dir.mkdir(mode=0o755, parents=True)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise SandboxError(f"out: {host_dir} exists and is not a directory", rule="workspace.out")
    if any(host_dir.iterdir()):
        raise SandboxError(
            f"out: {host_dir} is not empty: results are never written over host files",
            rule="workspace.out",
        )


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def copy_out(
    sb: _Box, host_dir: str | Path, paths: list[str] | None = None, *,
    src: str = "/workspace", max_bytes: int | None = None, max_files: int = MAX_FILES,
) -> CopyReport:  # fmt: skip
    """Copy ``src`` (or the listed ``paths`` under it) out to ``host_dir``.

    ``host_dir`` must not exist or be empty.  Symlinks and special files are
    not copied; they are listed in ``report.refused``."""
    out = Path(host_dir)
    _prepare_out(out)
    src = src.rstrip("/") or "/"
    limit = _limit(sb, max_bytes)
    rep = CopyReport()
    todo: list[tuple[str, Path, str]] = []  # (inside, host, type)
    if paths is None:
        todo.append((src, out, "dir"))
    else:
        for rel in paths:
            parts = [x for x in rel.strip("/").split("/") if x]
            if not parts or not all(_safe_name(x) for x in parts):
                raise SandboxError(f"out: {rel!r} is not a path under {src}", rule="workspace.out")
            parent = "/".join([src, *parts[:-1]])
            found = {e.name: e for e in sb.files.list(parent)}
            ent = found.get(parts[-1])
            if ent is None:
                raise SandboxError(f"out: {src}/{'/'.join(parts)} does not exist",
                                   rule="workspace.out")  # fmt: skip
            host = out.joinpath(*parts)
            for i in range(1, len(parts)):
                d = out.joinpath(*parts[:i])
                if not d.exists():
                    d.mkdir(mode=0o755)
            todo.append(("/".join([src, *parts]), host, ent.type))
    while todo:
        inside, host, kind = todo.pop()
        if kind == "dir":
            if host != out:
                host.mkdir(mode=0o755)
                rep.dirs += 1
            for ent in sorted(sb.files.list(inside), key=lambda e: e.name, reverse=True):
                if not _safe_name(ent.name):
                    rep.refused.append((f"{inside}/{ent.name!r}", "an unsafe name"))
                    continue
                todo.append((f"{inside}/{ent.name}", host / ent.name, ent.type))
        elif kind == "file":
            data = sb.files.read(inside, max_bytes=max(0, limit - rep.bytes) + 1)
            if rep.bytes + len(data) > limit:
                raise SandboxError(f"out: more than {limit >> 20} MiB to copy out",
                                   rule="resources.disk_mib")  # fmt: skip
            fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            rep.files += 1
            rep.bytes += len(data)
        else:
            why = "a symlink" if kind == "symlink" else "a special file"
            rep.refused.append((inside, f"{why}: not copied out"))
        if rep.files + rep.dirs > max_files:
            raise SandboxError(f"out: more than {max_files} entries", rule="workspace.out")
    _audit(sb, "workspace.copied_out", src if paths is None else ",".join(paths), str(out), rep)
    return rep
