"""Import an OCI image (an image layout directory or tar, or a ``docker save``
tar) as a template.

The image is untrusted input, so the import is written to refuse rather than
guess:

- every blob is checked against its digest (OCI layout) or its layer's
  ``diff_id`` (``docker save``) before its files count;
- a layer entry must stay inside the root: no absolute path after stripping
  ``/``, no ``..``, and no parent directory that is a symlink (a layer that
  makes ``etc`` a link to ``/`` and then writes ``etc/passwd`` would
  otherwise write on the host).  A hard link must name a regular file the
  image already holds;
- setuid and setgid bits are dropped, and device nodes and FIFOs are left
  out; both are counted in the template's ``dropped``.  (A sandbox runs with
  no_new_privs and a nosuid mount anyway: this keeps the tree itself honest.)
- the unpacked size and entry count are bounded (a decompression bomb stops
  with an error, and the staging tree is removed).

Whiteouts follow the OCI layer spec: ``.wh.NAME`` removes ``NAME`` of the
lower layers, ``.wh..wh..opq`` empties its directory of lower-layer entries
(entries of the same layer stay, whatever their order in the tar).

Why Python's tarfile and not ``tar`` or umoci: extraction needs the checks
above on every entry, and a tar binary's options for them differ across
versions; no registry client is used because none is reachable here (pulling
is a documented ``skopeo copy`` to a layout directory first).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._errors import TemplateError
from ._store import Template, TemplateMeta, TemplateStore

MAX_BYTES = 16 << 30
MAX_ENTRIES = 2_000_000
#: Deeper paths are refused: removal and copies of the tree stay bounded.
MAX_DEPTH = 128
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")  # fmt: skip


def _err(msg: str) -> TemplateError:
    return TemplateError(msg, rule="template.import")


@dataclass
class _Layer:
    open: Callable[[], IO[bytes]]
    #: digest of the blob as stored (OCI layout) or None
    blob_digest: str | None
    #: digest of the uncompressed tar (the config's diff_ids), or None
    diff_id: str | None
    label: str


class _Source:
    """Blobs of an image by path, from a directory or a tar file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
            except (tarfile.TarError, OSError) as exc:
                raise _err(f"{path}: not a tar file: {exc}") from None
        elif not path.is_dir():
            raise _err(f"{path}: no such image (an OCI layout directory or an image tar)")

    def has(self, name: str) -> bool:
        if self.tar is None:
            return (self.path / name).is_file()
        try:
            self.tar.getmember(name)
            return True
        except KeyError:
            return False

    def open(self, name: str) -> IO[bytes]:
        if ".." in Path(name).parts or name.startswith("/"):
            raise _err(f"the image names the blob {name!r}, outside the image")
        if self.tar is None:
            try:
                return open(self.path / name, "rb")
            except OSError as exc:
                raise _err(f"{self.path / name}: {exc.strerror}") from None
        try:
            f = self.tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise _err(f"{self.path}: the image has no {name}")
        return f

    def json(self, name: str, digest: str | None = None) -> Any:
        with self.open(name) as f:
            raw = f.read(16 << 20)
        if digest is not None:
            _check_digest(raw, digest, name)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _err(f"{name}: not JSON: {exc}") from None

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _check_digest(raw: bytes, digest: str, what: str) -> None:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256":
        raise _err(f"{what}: digest {digest!r}: only sha256 is supported")
    got = hashlib.sha256(raw).hexdigest()
    if got != hexd:
        raise _err(f"{what}: content does not match its digest {digest} (sha256:{got})")


def _blob(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise _err(f"digest {digest!r} is not a sha256 digest")
    return f"blobs/sha256/{hexd}"


def _pick_manifest(src: _Source, index: Any, ref: str | None) -> Any:
    """The manifest of ``ref`` (a ref name annotation) or the only / linux-amd64 one."""
    for _ in range(4):  # an index may point at an index, a few levels deep at most
        entries = index.get("manifests") or []
        if ref is not None:
            named = [m for m in entries
                     if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
                     == ref]  # fmt: skip
            if not named:
                raise _err(f"the image has no manifest named {ref!r}")
            entries = named
        linux = [m for m in entries
                 if (m.get("platform") or {}).get("os", "linux") == "linux"
                 and (m.get("platform") or {}).get("architecture", "amd64") == "amd64"]  # fmt: skip
        if not linux:
            raise _err("the image has no linux/amd64 manifest")
        if len(linux) > 1 and ref is None:
            raise _err("the image holds several manifests: name one (--ref)")
        m = linux[0]
        doc = src.json(_blob(m["digest"]), m["digest"])
        if m.get("mediaType") in _INDEX_TYPES or doc.get("manifests") is not None:
            index, ref = doc, None
            continue
        return doc
    raise _err("the image's indexes nest too deeply")


def _layers(src: _Source, ref: str | None) -> tuple[list[_Layer], Any, str]:
    """The layers (bottom first), the image config, and the config's digest."""
    if src.has("oci-layout") and src.has("index.json"):
        manifest = _pick_manifest(src, src.json("index.json"), ref)
        cfg_digest = manifest["config"]["digest"]
        config = src.json(_blob(cfg_digest), cfg_digest)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layers = []
        for i, layer in enumerate(manifest.get("layers") or []):
            name = _blob(layer["digest"])
            diff = diff_ids[i] if i < len(diff_ids) else None
            layers.append(_Layer(functools.partial(src.open, name), layer["digest"], diff,
                                 f"layer {i}"))  # fmt: skip
        return layers, config, cfg_digest
    if src.has("manifest.json"):  # docker save
        entries = src.json("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise _err("manifest.json lists no image")
        if ref is not None:
            entries = [e for e in entries if ref in (e.get("RepoTags") or [])]
            if not entries:
                raise _err(f"the image tar has no image tagged {ref!r}")
        if len(entries) > 1:
            raise _err("the image tar holds several images: name one (--ref REPO:TAG)")
        entry = entries[0]
        with src.open(entry["Config"]) as f:
            raw = f.read(16 << 20)
        cfg_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        config = json.loads(raw)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        names = entry.get("Layers") or []
        if len(diff_ids) != len(names):
            raise _err(f"manifest.json lists {len(names)} layers, the config {len(diff_ids)}")
        return ([_Layer(functools.partial(src.open, n), None, diff_ids[i], f"layer {i} ({n})")
                 for i, n in enumerate(names)], config, cfg_digest)  # fmt: skip
    raise _err(f"{src.path}: neither an OCI image layout (oci-layout, index.json) "
               "nor a docker save tar (manifest.json)")  # fmt: skip


class _Hashing(io.RawIOBase):
    """Counts and hashes what a reader pulls through it (a blob, or a layer's
    tar), up to ``cap`` bytes: past it the import stops (a layer whose tar
    ends early and then inflates on and on is a bomb too)."""

    def __init__(self, inner: IO[bytes], cap: int = 1 << 62) -> None:
        self.inner, self.h, self.n, self.cap = inner, hashlib.sha256(), 0, cap

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.inner.read(len(b))
        self._count(data)
        b[: len(data)] = data
        return len(data)

    def _count(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)
        if self.n > self.cap:
            raise _err(f"a layer unpacks to more than {self.cap >> 20} MiB")

    def digest(self) -> str:
        while True:  # whatever tarfile did not read (padding at the end) counts too
            data = self.inner.read(1 << 20)
            if not data:
                break
            self._count(data)
        return "sha256:" + self.h.hexdigest()


@contextmanager
def _layer_tar(layer: _Layer, cap: int) -> Iterator[tuple[tarfile.TarFile, _Hashing, _Hashing]]:
    raw = layer.open()
    blob = _Hashing(raw, cap)
    buffered = io.BufferedReader(blob, 1 << 16)
    head = buffered.peek(4)[:4]
    if head[:2] == b"\x1f\x8b":
        plain: IO[bytes] = gzip.GzipFile(fileobj=buffered)  # type: ignore[assignment]
    elif head == b"\x28\xb5\x2f\xfd":
        raise _err(f"{layer.label}: zstd-compressed layers are not supported; "
                   "re-save the image with gzip layers")  # fmt: skip
    else:
        plain = buffered
    tarred = _Hashing(plain, cap)
    try:
        with tarfile.open(fileobj=io.BufferedReader(tarred, 1 << 16), mode="r|") as tf:
            yield tf, blob, tarred
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise _err(f"{layer.label}: not a readable tar: {exc}") from None
    except OSError as exc:
        raise _err(f"{layer.label}: {exc}") from None
    finally:
        raw.close()


def _clean(name: str, label: str) -> str:
    rel = name.lstrip("/")
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.rstrip("/")
    parts = rel.split("/") if rel else []
    if any(p in ("..",) for p in parts) or "\0" in rel:
        raise _err(f"{label}: entry {name!r} leaves the image's root")
    if len(parts) > MAX_DEPTH or len(rel) > 4096:
        raise _err(f"{label}: entry {name[:80]!r}... is deeper than {MAX_DEPTH} levels "
                   "or longer than 4096 bytes")  # fmt: skip
    return "/".join(p for p in parts if p not in ("", "."))


def _parent_ok(root: Path, rel: str, label: str) -> Path:
    """``root/rel``'s parent, made if missing, checked to be real directories
    all the way down (no symlink to step through)."""
    cur = root
    parts = rel.split("/")[:-1]
    for p in parts:
        cur = cur / p
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise _err(f"{label}: entry {rel!r} goes through the symlink "
                       f"{cur.relative_to(root).as_posix()!r}")  # fmt: skip
        if not stat.S_ISDIR(st.st_mode):
            raise _err(f"{label}: entry {rel!r} is under {cur.relative_to(root).as_posix()!r}, "
                       "which is not a directory")  # fmt: skip
    return cur


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class _Applier:
    def __init__(self, root: Path, max_bytes: int, max_entries: int) -> None:
        self.root, self.max_bytes, self.max_entries = root, max_bytes, max_entries
        self.bytes = self.entries = 0
        self.dropped: dict[str, int] = {}

    def _drop(self, why: str) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + 1

    def _hide_lower(self, dpath: Path, d: str, kept: set[str]) -> None:
        """Everything under the opaque dir ``d`` that this layer did not put
        there goes, at any depth (a kept subdir keeps only this layer's part)."""
        todo = [(dpath, d)]
        while todo:  # iterative: depth is bounded, recursion need not be
            cur, rel = todo.pop()
            for name in os.listdir(cur):
                sub = f"{rel}/{name}" if rel else name
                p = cur / name
                if sub not in kept:
                    _remove(p)
                elif p.is_dir() and not p.is_symlink():
                    todo.append((p, sub))

    def apply(self, tf: tarfile.TarFile, label: str) -> None:
        added: set[str] = set()
        opaque: list[str] = []
        for m in tf:
            self.entries += 1
            if self.entries > self.max_entries:
                raise _err(f"{label}: the image has more than {self.max_entries} entries")
            rel = _clean(m.name, label)
            if not rel:
                continue  # the root itself
            base = rel.rsplit("/", 1)[-1]
            if base == ".wh..wh..opq":
                opaque.append(rel.rpartition("/")[0])
                continue
            if base.startswith(".wh."):
                if base[4:] in ("", ".", "..") or base[4:].startswith(".wh."):
                    raise _err(f"{label}: {rel!r} is not a whiteout of an entry")
                gone = rel[: -len(base)] + base[4:]
                if gone in added:
                    raise _err(f"{label}: {rel!r} whites out an entry of its own layer")
                parent = _parent_ok(self.root, gone, label)
                _remove(parent / base[4:])
                continue
            parent = _parent_ok(self.root, rel, label)
            dest = parent / base
            added.add(rel)
            mode = m.mode & 0o7777
            if mode & 0o6000:
                self._drop("setuid/setgid bits")
                mode &= ~0o6000
            if m.isdir():
                if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                    _remove(dest)
                if not dest.exists():
                    os.mkdir(dest, 0o755)
                os.chmod(dest, (mode & 0o1777) | 0o700)
            elif m.isreg():
                self.bytes += m.size
                if self.bytes > self.max_bytes:
                    raise _err(f"{label}: the image unpacks to more than "
                               f"{self.max_bytes >> 20} MiB")  # fmt: skip
                _remove(dest)
                src = tf.extractfile(m)
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    if src is not None:
                        shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(dest, mode & 0o1777)
            elif m.issym():
                if "\0" in m.linkname:
                    raise _err(f"{label}: {rel!r} links to a name with a NUL")
                _remove(dest)
                os.symlink(m.linkname, dest)  # resolved in the sandbox's root, not here
            elif m.islnk():
                target = _clean(m.linkname, label)
                tparent = _parent_ok(self.root, target, label)
                tpath = tparent / target.rsplit("/", 1)[-1]
                if not target or not tpath.is_file() or tpath.is_symlink():
                    raise _err(f"{label}: {rel!r} hard-links to {m.linkname!r}, "
                               "which is not a regular file of the image")  # fmt: skip
                _remove(dest)
                os.link(tpath, dest, follow_symlinks=False)
            else:
                self._drop("devices and FIFOs")
        if opaque:  # lower layers' entries go; this layer's (and their parents) stay
            kept = set(added)
            for a in added:
                while "/" in a:
                    a = a.rpartition("/")[0]
                    kept.add(a)
            for d in opaque:
                dpath = _parent_ok(self.root, f"{d}/x", label) if d else self.root
                self._hide_lower(dpath, d, kept)


def _config_meta(config: Any) -> TemplateMeta:
    if not isinstance(config, dict) or not isinstance(config.get("config") or {}, dict):
        raise _err("the image config is not a JSON object")
    c = config.get("config") or {}
    for key, kind in (("Env", list), ("Entrypoint", list), ("Cmd", list),
                      ("WorkingDir", str), ("User", str)):  # fmt: skip
        v = c.get(key)
        bad = not isinstance(v, kind) or (kind is list and not all(isinstance(x, str) for x in v))
        if v is not None and bad:
            shape = "list of strings" if kind is list else "string"
            raise _err(f"the image config's {key} is not a {shape}")
    env: dict[str, str] = {}
    for item in c.get("Env") or []:
        k, sep, v = str(item).partition("=")
        if sep and k:
            env[k] = v
    return TemplateMeta(
        digest="", env=env, workdir=c.get("WorkingDir") or "/", user=c.get("User") or "",
        entrypoint=list(c.get("Entrypoint") or []), cmd=list(c.get("Cmd") or []),
    )  # fmt: skip


def import_oci(
    path: str | Path, store: TemplateStore, name: str | None = None, *, ref: str | None = None,
    max_bytes: int = MAX_BYTES, max_entries: int = MAX_ENTRIES,
    progress: Callable[[str], None] | None = None,
) -> Template:  # fmt: skip
    """Unpack the image at ``path`` into ``store`` as a template named ``name``."""
    src = _Source(Path(path))
    staged = store.staging()
    try:
        try:
            layers, config, cfg_digest = _layers(src, ref)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
            raise _err(f"{path}: malformed image metadata ({type(exc).__name__}: {exc})") from None
        if (config.get("os") or "linux") != "linux":
            raise _err(f"the image is for {config.get('os')!r}, not linux")
        applier = _Applier(staged, max_bytes, max_entries)
        for layer in layers:
            if progress is not None:
                progress(layer.label)
            # the tar's own bytes: its files, plus headers and padding (bounded)
            with _layer_tar(layer, max_bytes + (64 << 20)) as (tf, blob, tarred):
                applier.apply(tf, layer.label)
                diff = tarred.digest()
                got = blob.digest()
            if layer.blob_digest is not None and got != layer.blob_digest:
                raise _err(f"{layer.label}: blob does not match its digest "
                           f"{layer.blob_digest} ({got})")  # fmt: skip
            if layer.diff_id is not None and diff != layer.diff_id:
                raise _err(f"{layer.label}: layer does not match the config's diff_id "
                           f"{layer.diff_id} ({diff})")  # fmt: skip
        try:
            meta = _config_meta(config)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise _err(f"{path}: malformed image config ({type(exc).__name__}: {exc})") from None
        meta.source = {"kind": "oci", "image": str(path), "config_digest": cfg_digest,
                       "layers": len(layers)}  # fmt: skip
        meta.dropped = applier.dropped
    except BaseException:
        store._discard(staged)
        raise
    finally:
        src.close()
    return store.commit(staged, meta, name)
