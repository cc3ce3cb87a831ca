"""The template store: content-addressed, read-only root filesystems.

A template is a directory tree (``objects/<digest>/rootfs``) plus its
metadata (``objects/<digest>/meta.json``: env, workdir, user, entrypoint,
where it came from).  Its digest is the sha256 of a canonical listing of the
tree (every path, type, permission bits less the write bits, and a file's sha256 or a link's
target), so two imports of the same content are one object, and
:meth:`TemplateStore.verify` can tell a tree that changed on disk.

Names (``names/<name>``, one file holding a digest) point at objects, the way
tags point at images.  Every write is a rename into place, so a crash leaves
either the old state or the new one, never half of a template.

Why a tree and not a tarball or a disk image: namespaces and gVisor bind it
read-only as the sandbox's ``/`` as it is, and the microVM tier makes its
ext4 root image from the same tree (``mke2fs -d``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import _reach
from .._config import template_dir
from .._errors import TemplateError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class TemplateMeta:
    """What a sandbox made from the template starts with, and where it came from."""

    digest: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    #: {"kind": "oci", "image": ..., "config_digest": ...} or {"kind": "recipe", ...}
    source: dict[str, Any] = field(default_factory=dict)
    files: int = 0
    size_bytes: int = 0
    #: What the import left out or changed, and how often (e.g. setuid bits, devices).
    dropped: dict[str, int] = field(default_factory=dict)
    created: float = 0.0
    #: The tree's own digest (:func:`tree_digest`); ``digest`` also covers the
    #: runtime metadata, so two templates of one tree and another env are two.
    tree: str = ""


def object_digest(tree: str, meta: TemplateMeta) -> str:
    """The template's id: its tree's digest and what a sandbox starts with
    (env, workdir, user, entrypoint, cmd), canonically."""
    run = {"env": meta.env, "workdir": meta.workdir, "user": meta.user,
           "entrypoint": meta.entrypoint, "cmd": meta.cmd}  # fmt: skip
    h = hashlib.sha256(b"glassroom-template-object-v1\n" + tree.encode() + b"\n")
    h.update(json.dumps(run, sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


@dataclass
class Template:
    name: str | None
    meta: TemplateMeta
    rootfs: Path

    @property
    def digest(self) -> str:
        return self.meta.digest


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise TemplateError(
            f"template name {name!r} must match [a-z0-9][a-z0-9._-]{{0,62}}", rule="template"
        )
    return name


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root`` (not followed), sorted, as (relative path, lstat)."""
    stack = [""]
    while stack:
        rel = stack.pop()
        base = root / rel if rel else root
        names = sorted(os.listdir(base), reverse=True)
        for name in names:
            sub = f"{rel}/{name}" if rel else name
            st = os.lstat(root / sub)
            yield sub, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)


def tree_digest(root: Path) -> tuple[str, int, int]:
    """(``sha256:...``, file count, bytes) of the tree's canonical listing.

    One JSON array per entry: names and link targets may hold any byte but
    NUL and "/", newlines and " -> " included, so a listing made of plain
    separators could be spelt by a link's target (two trees, one digest)."""
    h = hashlib.sha256(b"glassroom-template-v2\n")
    files = size = 0
    try:
        for rel, st in sorted(_walk(root)):
            mode = stat.S_IMODE(st.st_mode) & ~0o222  # the store drops write bits
            name = os.fsencode(rel).hex()
            entry: list[object]
            if stat.S_ISDIR(st.st_mode):
                entry = ["d", mode, name]
            elif stat.S_ISLNK(st.st_mode):
                entry = ["l", name, os.fsencode(os.readlink(root / rel)).hex()]
            elif stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                with open(root / rel, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                entry = ["f", mode, st.st_size, fh.hexdigest(), name]
                files += 1
                size += st.st_size
            else:  # importers never make one; a tree that holds one is not a template
                raise TemplateError(f"{rel}: a special file has no place in a template",
                                    rule="template")  # fmt: skip
            h.update(json.dumps(entry).encode() + b"\n")
    except OSError as exc:
        raise TemplateError(f"template tree {root}: {exc.strerror}: {exc.filename}",
                            rule="template") from None  # fmt: skip
    return "sha256:" + h.hexdigest(), files, size


#: Files the host's dynamic loader reads by fixed path whatever the root: the
#: in-sandbox init (the host's python, started by the host's loader) would
#: load a template's ``/etc/ld.so.preload`` before any wall is up.  No
#: template keeps one (counted in ``dropped``).
LOADER_FILES = ("/etc/ld.so.preload",)


def strip_loader_files(root: Path) -> int:
    """Remove LOADER_FILES from the tree, found through its own links."""
    from ..policy._template import resolve

    gone = 0
    for path in LOADER_FILES:
        for follow in (False, True):  # the link itself, and what it names
            inside = resolve(root, path, follow_last=follow)
            host = root / inside.lstrip("/") if inside else None
            if host is not None and os.path.lexists(host) and not host.is_dir():
                os.unlink(host)
                gone += 1
    return gone


def _read_only(root: Path) -> None:
    """Drop every write bit: the store's copy is never changed in place (a
    sandbox sees it through a read-only mount anyway)."""
    for rel, st in _walk(root):
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(root / rel, stat.S_IMODE(st.st_mode) & ~0o222)
    os.chmod(root, 0o555)


def _writable(root: Path) -> None:
    os.chmod(root, 0o755)
    for rel, st in _walk(root):
        if stat.S_ISDIR(st.st_mode):
            os.chmod(root / rel, stat.S_IMODE(st.st_mode) | 0o700)


class TemplateStore:
    """Templates on disk under ``root`` (default: :func:`glassroom._config.template_dir`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else template_dir()

    # -- paths ------------------------------------------------------------------

    def _objects(self) -> Path:
        return self.root / "objects"

    def _names(self) -> Path:
        return self.root / "names"

    def staging(self) -> Path:
        """A fresh directory on the store's file system for an import to fill
        (so the final move is a rename)."""
        base = self.root / "staging"
        base.mkdir(parents=True, exist_ok=True)
        _reach.make_traversable(self.root)
        # 0711: a build step's sandbox uid must reach its tree here (not list others)
        os.chmod(base, 0o711)
        return Path(tempfile.mkdtemp(dir=base))

    # -- write --------------------------------------------------------------------

    def commit(self, staged: Path, meta: TemplateMeta, name: str | None) -> Template:
        """Seal ``staged`` (a rootfs an importer filled) as a template object and
        point ``name`` at it.  ``staged`` is consumed."""
        if name is not None:
            check_name(name)
        try:
            stripped = strip_loader_files(staged)
            if stripped:
                meta.dropped["/etc/ld.so.preload"] = stripped
            tree, files, size = tree_digest(staged)
        except BaseException:
            self._discard(staged)
            raise
        meta.tree, meta.files, meta.size_bytes = tree, files, size
        digest = meta.digest = object_digest(tree, meta)
        meta.created = meta.created or time.time()
        obj = self._objects() / digest.split(":", 1)[1]
        if obj.exists():  # the same content again: one object
            self._discard(staged)
        else:
            _read_only(staged)
            self._objects().mkdir(parents=True, exist_ok=True)
            os.chmod(self._objects(), 0o711)  # sandboxes reach a tree, list none
            tmp = self._objects() / f".tmp-{os.getpid()}-{obj.name}"
            tmp.mkdir(mode=0o755)
            os.rename(staged, tmp / "rootfs")
            (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=1, sort_keys=True))
            os.chmod(tmp, 0o755)
            os.rename(tmp, obj)
        if name is not None:
            self._point(name, digest)
        return self.get(name or digest)

    def _point(self, name: str, digest: str) -> None:
        d = self._names()
        d.mkdir(parents=True, exist_ok=True, mode=0o711)
        # Listed by nobody else (tenants' names are among them), read by a
        # glassroom that runs unprivileged on a store root made.
        os.chmod(d, 0o711)
        tmp = d / f".{name}.{os.getpid()}"
        tmp.write_text(digest + "\n")
        os.replace(tmp, d / name)

    def tag(self, digest_or_name: str, name: str) -> Template:
        check_name(name)
        t = self.get(digest_or_name)
        self._point(name, t.digest)
        return self.get(name)

    def _discard(self, path: Path) -> None:
        if path.exists():
            _writable(path)
            shutil.rmtree(path, ignore_errors=True)

    def remove(self, name: str) -> bool:
        """Drop the name; the object goes too once no name points at it."""
        link = self._names() / check_name(name)
        try:
            digest = link.read_text().strip()
        except FileNotFoundError:
            return False
        link.unlink()
        if digest not in {t.digest for t in self.list()}:
            obj = self._objects() / digest.split(":", 1)[1]
            gone = obj.with_name(f".gone-{obj.name}")
            if obj.exists():
                os.rename(obj, gone)  # out of sight first: never half a template
                self._discard(gone)
        return True

    # -- read -----------------------------------------------------------------------

    def get(self, ref: str) -> Template:
        """By name or by ``sha256:...`` digest; TemplateError if unknown."""
        name: str | None = None
        if DIGEST.match(ref):
            digest = ref
        else:
            name = check_name(ref)
            try:
                digest = (self._names() / name).read_text().strip()
            except FileNotFoundError:
                known = ", ".join(sorted(n for n, _ in self._named())) or "none"
                raise TemplateError(f"template {ref!r} was not found (known: {known})",
                                    rule="template") from None  # fmt: skip
        obj = self._objects() / digest.split(":", 1)[1]
        try:
            raw = json.loads((obj / "meta.json").read_text())
        except (FileNotFoundError, ValueError):
            raise TemplateError(f"template {ref!r}: object {digest} is missing or damaged",
                                rule="template") from None  # fmt: skip
        return Template(name, TemplateMeta(**raw), obj / "rootfs")

    def _named(self) -> list[tuple[str, str]]:
        d = self._names()
        if not d.is_dir():
            return []
        return sorted(
            (p.name, p.read_text().strip()) for p in d.iterdir() if not p.name.startswith(".")
        )

    def list(self) -> list[Template]:
        out = []
        for name, _digest in self._named():
            try:
                out.append(self.get(name))
            except TemplateError:
                continue
        return out

    def verify(self, ref: str) -> Template:
        """Recompute the tree's digest; TemplateIntegrity... as TemplateError if it changed."""
        t = self.get(ref)
        tree, _, _ = tree_digest(t.rootfs)
        if tree != t.meta.tree:
            raise TemplateError(
                f"template {ref!r} changed on disk: its tree hashes to {tree}, "
                f"not {t.meta.tree}", rule="template.integrity",
            )  # fmt: skip
        obj = object_digest(tree, t.meta)
        if obj != t.digest or t.rootfs.parent.name != obj.split(":", 1)[1]:
            raise TemplateError(f"template {ref!r}: its metadata does not match its id "
                                f"{t.digest}", rule="template.integrity")  # fmt: skip
        return t
