"""The files of E2B's template build API: uploads, and unpacking them safely.

The SDK uploads one tar (gzipped by default) per ``copy()`` step, keyed by a
hash of its files: ``GET /templates/{id}/files/{hash}`` says whether the
template already has it and hands out an upload URL; the SDK then PUTs the
tar there, without its API key.  So the URL carries the capability: a
random, single-use, expiring ticket bound to (tenant, template, hash),
served by this same server (``PUT /e2b-template-files/{ticket}``).  The
body is bounded by the server's ``max_request_bytes`` (the edge) and by
:data:`MAX_UPLOAD_BYTES`; a tenant's uploads together by
:data:`MAX_TENANT_BYTES`.

An upload is untrusted input.  :func:`unpack` takes only directories and
regular files: a symlink, a hard link, a device or a FIFO refuses the
build, as does an entry that is absolute, holds ``..`` or a NUL, goes
through anything but a real directory, or is too deep or too long; the
whole is bounded in bytes and entries (a decompression bomb).  Nothing is
ever followed, so nothing can be written outside the build's own context
directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import stat
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..._errors import TemplateError
from ..http._service import ApiError

#: One upload (a compressed tar) at most; the edge's ``max_request_bytes`` comes first.
MAX_UPLOAD_BYTES = 256 << 20
#: All of a tenant's uploads together (every template's).
MAX_TENANT_BYTES = 2 << 30
#: An upload unpacks to at most this much, and this many entries.
MAX_UNPACKED_BYTES = 1 << 30
MAX_ENTRIES = 100_000
MAX_DEPTH = 64
#: How long an upload URL is good for, and how many may be outstanding per tenant.
TICKET_TTL_S = 3600.0
MAX_TICKETS = 256
FILES_HASH = re.compile(r"^[0-9a-f]{64}$")
#: What the SDK must send with the upload (it applies the headers it is given):
#: a body that is data, not JSON, for the edge.
UPLOAD_HEADERS = {"Content-Type": "application/octet-stream"}


def tenant_slug(tenant: str) -> str:
    """A short name for a tenant, safe in paths and store names, unique by its hash."""
    plain = re.sub(r"[^a-z0-9]", "", tenant.lower())[:8]
    return plain + hashlib.sha256(tenant.encode()).hexdigest()[:6]


def check_hash(value: str) -> str:
    if not FILES_HASH.match(value):
        raise ApiError(400, "invalid", f"files hash {value[:80]!r}: 64 lowercase hex digits")
    return value


@dataclass
class _Ticket:
    tenant: str
    template_id: str
    files_hash: str
    expires: float


class Uploads:
    """Uploaded tars under ``root/<tenant>/<template id>/<hash>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tickets: dict[str, _Ticket] = {}
        self._lock = threading.Lock()

    def _dir(self, tenant: str, template_id: str) -> Path:
        return self.root / tenant_slug(tenant) / template_id

    def path(self, tenant: str, template_id: str, files_hash: str) -> Path | None:
        p = self._dir(tenant, template_id) / check_hash(files_hash)
        return p if p.is_file() else None

    def ticket(self, tenant: str, template_id: str, files_hash: str) -> str:
        """A single-use upload ticket for this tenant's template and hash."""
        now = time.monotonic()
        with self._lock:
            for k in [k for k, t in self._tickets.items() if t.expires < now]:
                del self._tickets[k]
            mine = [k for k, t in self._tickets.items() if t.tenant == tenant]
            if len(mine) >= MAX_TICKETS:  # the oldest goes: a client that asks again gets one
                del self._tickets[mine[0]]
            token = secrets.token_urlsafe(32)
            self._tickets[token] = _Ticket(tenant, template_id, files_hash, now + TICKET_TTL_S)
        return token

    def _bytes(self, tenant: str) -> int:
        total = 0
        base = self.root / tenant_slug(tenant)
        if base.is_dir():
            for d in base.iterdir():
                for f in d.iterdir() if d.is_dir() else ():
                    total += f.stat().st_size
        return total

    def put(self, token: str, body: bytes) -> tuple[str, str, str]:
        """Keep ``body`` for the ticket's (tenant, template, hash); the ticket is spent."""
        with self._lock:
            t = self._tickets.pop(token, None)
        if t is None or t.expires < time.monotonic():
            raise ApiError(
                404, "not_found", "upload URL unknown, used or expired: ask for the file link again"
            )
        if len(body) > MAX_UPLOAD_BYTES:
            raise ApiError(
                413, "too_large", f"an upload is at most {MAX_UPLOAD_BYTES} bytes",
                rule="template.upload",
            )  # fmt: skip
        if not body:
            raise ApiError(400, "invalid", "an upload is a tar (gzipped or not), not empty")
        if self._bytes(t.tenant) + len(body) > MAX_TENANT_BYTES:
            raise ApiError(
                429, "limit",
                f"the tenant's template uploads would exceed {MAX_TENANT_BYTES} bytes; "
                "delete templates it no longer needs", rule="template.upload",
            )  # fmt: skip
        d = self._dir(t.tenant, t.template_id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = d / f".{t.files_hash}.{secrets.token_hex(4)}"
        tmp.write_bytes(body)
        os.replace(tmp, d / t.files_hash)
        return t.tenant, t.template_id, t.files_hash

    def drop(self, tenant: str, template_id: str) -> None:
        """Every upload of the template, and its outstanding tickets."""
        with self._lock:
            for k in [k for k, t in self._tickets.items()
                      if (t.tenant, t.template_id) == (tenant, template_id)]:  # fmt: skip
                del self._tickets[k]
        shutil.rmtree(self._dir(tenant, template_id), ignore_errors=True)


# -- unpacking -----------------------------------------------------------------------


def _refuse(label: str, msg: str) -> TemplateError:
    return TemplateError(f"{label}: {msg}", rule="template.upload")


def _clean(name: str, label: str) -> str:
    if "\0" in name:
        raise _refuse(label, f"entry {name[:80]!r} holds a NUL")
    if name.startswith("/"):
        raise _refuse(label, f"entry {name[:80]!r} is absolute: refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(label, f"entry {name[:80]!r} leaves the upload's directory ('..'): refused")
    if len(parts) > MAX_DEPTH or len(name) > 4096:
        raise _refuse(label, f"entry {name[:80]!r}... is deeper than {MAX_DEPTH} levels "
                             "or longer than 4096 bytes")  # fmt: skip
    return "/".join(parts)


def _parent(root: Path, rel: str, label: str) -> Path:
    """``root/rel``'s parent, made if missing, real directories all the way down."""
    cur = root
    for p in rel.split("/")[:-1]:
        cur = cur / p
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _refuse(label, f"entry {rel!r} is under {p!r}, which is not a directory")
    return cur


def unpack(tar_path: Path, dest: Path, label: str, *, max_bytes: int = MAX_UNPACKED_BYTES,
           max_entries: int = MAX_ENTRIES) -> tuple[int, int]:  # fmt: skip
    """Unpack the upload at ``tar_path`` into ``dest`` (made here), or refuse it.
    Returns (bytes, entries) unpacked: a build's COPY steps share one budget."""
    dest.mkdir(mode=0o755)
    total = entries = 0
    try:
        with tarfile.open(tar_path, mode="r|*") as tf:
            for m in tf:
                entries += 1
                if entries > max_entries:
                    raise _refuse(label, f"more than {max_entries} entries")
                rel = _clean(m.name, label)
                if not rel:
                    continue
                if m.issym() or m.islnk():
                    kind = "a symlink" if m.issym() else "a hard link"
                    raise _refuse(label, f"entry {rel!r} is {kind} (to {m.linkname[:80]!r}); "
                                         "links are refused: copy what they point at "
                                         "(resolve_symlinks=True)")  # fmt: skip
                if not (m.isdir() or m.isreg()):
                    raise _refuse(
                        label, f"entry {rel!r} is a special file (a device or FIFO): refused"
                    )
                out = _parent(dest, rel, label) / rel.rsplit("/", 1)[-1]
                try:
                    st: os.stat_result | None = os.lstat(out)
                except FileNotFoundError:
                    st = None
                if m.isdir():
                    if st is None:
                        os.mkdir(out, 0o755)
                    elif not stat.S_ISDIR(st.st_mode):
                        raise _refuse(label, f"entry {rel!r} is twice, a file and a directory")
                    os.chmod(out, (m.mode & 0o755) | 0o700)
                    continue
                total += m.size
                if total > max_bytes:
                    raise _refuse(label, f"it unpacks to more than {max_bytes >> 20} MiB")
                if st is not None:
                    if stat.S_ISDIR(st.st_mode):
                        raise _refuse(label, f"entry {rel!r} is twice, a directory and a file")
                    os.unlink(out)
                src = tf.extractfile(m)
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    if src is not None:
                        shutil.copyfileobj(src, f, 1 << 20)
                os.chmod(out, (m.mode & 0o755) | 0o600)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise _refuse(label, f"not a readable tar or tar.gz ({exc})") from None
    except OSError as exc:
        raise _refuse(label, f"not a readable tar or tar.gz ({exc.strerror or exc})") from None
    return total, entries
