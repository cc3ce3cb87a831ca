"""Signed anchors of the audit chain's head: what a bare hash chain cannot prove.

Why: sha256 is unkeyed.  Whoever can write the log file can rewrite it from
any point on (or all of it) and recompute every ``hash`` and ``prev``; the
chain then checks out.  An *anchor* is a small statement signed by the
supervisor, "record seq N of log L has hash H", kept beside the log as
``<log>.anchor``.  A rewrite that changes any record up to seq N changes H
(every hash covers the previous one), and the rewriter cannot sign a new
anchor without the private key, so :func:`glassroom.audit.verify` catches it.

The key is Ed25519 (``cryptography``), created on first use:

* private: ``_config.audit_anchor_key_path()`` (default
  ``state_dir()/audit-anchor.key``), PKCS#8 PEM, mode 0600, created atomically
  (written to a temporary file, fsynced, then ``link``-ed into place so two
  processes racing to create it end up sharing the winner's key);
* public: beside it with the suffix ``.pub`` (``audit-anchor.pub``),
  SubjectPublicKeyInfo PEM, so ``openssl pkey -pubin -in audit-anchor.pub``
  reads it.

The key id is the first 16 hex digits of sha256 over the raw 32-byte public
key.  What an anchor cannot do: anyone holding the private key can sign
whatever they like, so it must live where sandboxed code cannot read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .. import _config
from .._errors import AuditError
from ._log import canonical_json, is_digest

ANCHOR_SUFFIX = ".anchor"
ANCHOR_VERSION = 1
#: The signed fields, in the order they are documented; ``sig`` signs their canonical JSON.
SIGNED_FIELDS = ("v", "log", "seq", "hash", "offset", "ts", "key_id")
_MAX_ANCHOR_BYTES = 4096
_MAX_KEY_BYTES = 16 * 1024
_HEX = frozenset("0123456789abcdef")

PublicKeySource = Ed25519PublicKey | bytes | str | os.PathLike[str]
"""What ``verify(path, pubkey=...)`` accepts: a key, a file's content (PEM, 32
raw bytes or 64 hex digits), or the path of such a file."""


def anchor_path(log_path: str | os.PathLike[str]) -> Path:
    """``audit.jsonl`` -> ``audit.jsonl.anchor`` (beside the log, same directory)."""
    return Path(os.fspath(log_path) + ANCHOR_SUFFIX)


def public_key_path(key_path: Path) -> Path:
    """``audit-anchor.key`` -> ``audit-anchor.pub``."""
    return key_path.with_suffix(".pub")


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw public key: short, stable, printable."""
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class AnchorKey:
    """The supervisor's signing key, with its public half and id."""

    def __init__(self, private: Ed25519PrivateKey, path: Path) -> None:
        self.private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)
        self.path = path

    def sign(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Return ``fields`` plus ``key_id`` and ``sig`` (hex) over their canonical JSON."""
        body = dict(fields, key_id=self.key_id)
        body["sig"] = self.private.sign(canonical_json(body)).hex()
        return body

    def __repr__(self) -> str:
        return f"AnchorKey({str(self.path)!r}, key_id={self.key_id!r})"


_cache_lock = threading.Lock()
_cache: dict[str, tuple[tuple[int, int, int], AnchorKey]] = {}


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _key_error(path: Path, what: str, exc: OSError | None = None) -> AuditError:
    reason = f": {exc.strerror or exc}" if exc is not None else ""
    return AuditError(
        f"audit anchor key {path}: {what}{reason} (set GLASSROOM_AUDIT_ANCHOR_KEY to a "
        "writable place for the key, or open the log with AuditLog(..., anchor=False))"
    )


def _read_private(path: Path) -> tuple[tuple[int, int, int], Ed25519PrivateKey] | None:
    """Load the key at ``path``; ``None`` if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _key_error(path, "cannot open", exc) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _key_error(path, "is not a regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            # ssh's rule: a signing key others can read is no longer a secret.
            raise AuditError(
                f"audit anchor key {path} is readable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        data = os.read(fd, _MAX_KEY_BYTES)
    except OSError as exc:
        raise _key_error(path, "cannot read", exc) from exc
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuditError(f"audit anchor key {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"audit anchor key {path} is not an Ed25519 key")
    return (st.st_dev, st.st_ino, st.st_mtime_ns), key


def _create_private(path: Path) -> None:
    """Create the key atomically; a concurrent creator's key wins and is kept."""
    try:
        # Default modes, like the other users of the state dir create it (the
        # namespaces tier opens it up to 0755 for its init script); the key's own
        # mode 0600 is what keeps it private.
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _key_error(path, "cannot create its directory", exc) from exc
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".audit-anchor.", suffix=".tmp")
    except OSError as exc:
        raise _key_error(path, "cannot create", exc) from exc
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link(), unlike rename(), never replaces: the first creator's key stays.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _key_error(path, "cannot create", exc) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_atomic(path: Path, data: bytes, mode: int, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``rename`` (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _ensure_public(key: AnchorKey) -> None:
    """Write ``audit-anchor.pub`` if missing; refuse one that belongs to another key."""
    pub = public_key_path(key.path)
    try:
        existing = load_public_key(pub)
    except FileNotFoundError:
        try:
            _write_atomic(pub, _public_pem(key.public), 0o644)
        except OSError as exc:
            raise _key_error(pub, "cannot write the public key", exc) from exc
        return
    if _raw(existing) != _raw(key.public):
        raise AuditError(
            f"audit anchor public key {pub} (key {key_id(existing)}) does not belong to the "
            f"private key {key.path} (key {key.key_id}); remove it to have it recreated"
        )


def load_or_create_key(path: Path | None = None) -> AnchorKey:
    """The signing key at ``path`` (default: the configured one), created if missing.

    Cached per path and file identity, so opening many logs costs one read.
    Every failure is an :class:`AuditError` naming the file and what to do.
    """
    path = path if path is not None else _config.audit_anchor_key_path()
    found = _read_private(path)
    if found is None:
        _create_private(path)
        found = _read_private(path)
        if found is None:
            raise _key_error(path, "vanished right after it was created")
    ident, private = found
    with _cache_lock:
        cached = _cache.get(str(path))
        if cached is not None and cached[0] == ident:
            return cached[1]
    key = AnchorKey(private, path)
    _ensure_public(key)
    with _cache_lock:
        _cache[str(path)] = (ident, key)
    return key


def _parse_public(data: bytes, where: str) -> Ed25519PublicKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise AuditError(f"{where} is not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise AuditError(f"{where} is not an Ed25519 public key")
        return key
    if len(text) == 64 and set(text.decode("ascii", "replace").lower()) <= _HEX:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode("ascii")))
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    raise AuditError(
        f"{where} is not an Ed25519 public key (expected PEM, 32 raw bytes or 64 hex digits)"
    )


def load_public_key(source: PublicKeySource) -> Ed25519PublicKey:
    """A public key from a key object, a file's bytes, or a file path.

    A missing file raises :class:`FileNotFoundError` (callers decide whether
    that is a problem); anything unreadable or malformed is an :class:`AuditError`.
    """
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, bytes):
        return _parse_public(source, "the given public key")
    path = Path(source)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_BYTES)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AuditError(f"cannot read public key {path}: {exc.strerror}") from exc
    return _parse_public(data, f"public key {path}")


def find_public_key(key_path: Path | None = None) -> tuple[Ed25519PublicKey, Path] | None:
    """The configured anchor public key and where it came from, or ``None`` if there is none.

    Falls back to deriving it from the private key when only that exists (the
    supervisor's own user running ``glassroom audit verify``).
    """
    key_path = key_path if key_path is not None else _config.audit_anchor_key_path()
    pub = public_key_path(key_path)
    try:
        return load_public_key(pub), pub
    except FileNotFoundError:
        pass
    found = _read_private(key_path)
    if found is None:
        return None
    return found[1].public_key(), key_path


def parse_anchor(data: bytes) -> dict[str, Any] | str:
    """An anchor's fields, or why ``data`` is not an anchor (the signature is not checked)."""
    if len(data) > _MAX_ANCHOR_BYTES:
        return f"larger than {_MAX_ANCHOR_BYTES} bytes"
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return "not a JSON object"
    missing = [f for f in (*SIGNED_FIELDS, "sig") if f not in obj]
    if missing:
        return "missing field(s) " + ", ".join(missing)
    if obj["v"] != ANCHOR_VERSION:
        return f"unknown anchor version {obj['v']!r}"
    for name, least in (("seq", 1), ("offset", 0)):
        value = obj[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"{name} is not an integer >= {least}"
    if not isinstance(obj["log"], str) or not isinstance(obj["ts"], str):
        return "log/ts is not a string"
    if not is_digest(obj["hash"]):
        return "hash is not a sha256 hex digest"
    kid, sig = obj["key_id"], obj["sig"]
    if not isinstance(kid, str) or len(kid) != 16 or not set(kid) <= _HEX:
        return "key_id is not 16 hex digits"
    if not isinstance(sig, str) or len(sig) != 128 or not set(sig) <= _HEX:
        return "sig is not 128 hex digits"
    return obj


def read_anchor(path: Path) -> dict[str, Any] | str | None:
    """The anchor at ``path``; ``None`` if there is none; a reason string if it is malformed."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_ANCHOR_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read audit anchor {path}: {exc.strerror}") from exc
    return parse_anchor(data)


def signature_problem(anchor: dict[str, Any], public: Ed25519PublicKey) -> str | None:
    """Why ``anchor`` does not verify with ``public``, or ``None`` if it does."""
    expected = key_id(public)
    if anchor["key_id"] != expected:
        return (
            f"anchor was signed by key {anchor['key_id']}, not by the anchor public key "
            f"{expected}: the anchor was forged, or the key was replaced"
        )
    body = {k: anchor[k] for k in SIGNED_FIELDS}
    try:
        public.verify(bytes.fromhex(anchor["sig"]), canonical_json(body))
    except InvalidSignature:
        return f"anchor signature does not verify with key {expected}: the anchor was changed"
    return None


def stage_anchor(path: Path, anchor: dict[str, Any], *, fsync: bool = True) -> str:
    """The first half of :func:`write_anchor`: the anchor in a temporary file
    next to ``path``, durable (fsync'd) but not yet in place; returns its path.
    The writer does this without holding the log's lock, then renames it in
    place under the lock (a rename, no fsync) and fsyncs the directory."""
    data = canonical_json(anchor) + b"\n"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise AuditError(f"cannot write audit anchor {path}: {exc.strerror}") from exc
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise AuditError(f"cannot write audit anchor {path}: {exc.strerror}") from exc
        raise
    return tmp


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort, as for every anchor)."""
    _fsync_dir(directory)


def write_anchor(path: Path, anchor: dict[str, Any], *, fsync: bool = True) -> None:
    """Replace the anchor file atomically (temporary file, fsync, rename, fsync dir)."""
    try:
        _write_atomic(path, canonical_json(anchor) + b"\n", 0o600, fsync=fsync)
    except OSError as exc:
        raise AuditError(f"cannot write audit anchor {path}: {exc.strerror}") from exc
