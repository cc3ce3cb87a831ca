"""The file API every backend shares, on top of its own ``_file_op``.

Each backend moves bytes its own way (pipes over SCM_RIGHTS, stream frames,
virtio-serial); what the file API means, and how a directory listing from
inside the sandbox is checked, is the same everywhere, so it lives here.
A listing is untrusted input: entries must be plain names (no ``/``, no
``..``), of a known type, with a sane size; anything else is an anomaly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from .._errors import SandboxError
from .base import FileEntry

ENTRY_TYPES = ("file", "dir", "symlink")


def parse_listing(raw: bytes, path: str) -> list[FileEntry]:
    """Validate a listing sent by the sandbox; ValueError says what was wrong."""
    try:
        items = json.loads(raw or b"[]")
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("not a list")
    out = []
    for i in items:
        if not isinstance(i, dict):
            raise ValueError("entry is not an object")
        name, kind, size = i.get("name"), i.get("type"), i.get("size")
        if (not isinstance(name, str) or not name or len(name) > 255 or "/" in name
                or "\0" in name or name in (".", "..")):  # fmt: skip
            raise ValueError(f"entry name {str(name)[:60]!r} is not a name in {path}")
        if kind not in ENTRY_TYPES:
            raise ValueError(f"entry type {str(kind)[:20]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 62:
            raise ValueError("entry size")
        out.append(FileEntry(name, kind, size))
    return out


class FileOps:
    """read/write/list/remove/mkdir over ``self._file_op``; anomalies to ``self._anomaly``."""

    # Provided by each backend: move the bytes; report an anomaly.
    _file_op: Callable[..., bytes]
    _anomaly: Callable[[str], None]

    #: Passed to ``_file_op("list", ...)`` by backends that bound the listing size.
    _listing_kw: ClassVar[dict[str, Any]] = {}

    def read_file(self, path: str, max_bytes: int) -> bytes:
        return self._file_op("read", path, max_bytes=max_bytes)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._file_op("write", path, data=data, mode=mode)

    def list_dir(self, path: str) -> list[FileEntry]:
        raw = self._file_op("list", path, **self._listing_kw)
        try:
            return parse_listing(raw, path)
        except ValueError as exc:
            self._anomaly(f"malformed directory listing of {path}: {exc}")
            raise SandboxError(f"list {path}: malformed reply from the sandbox") from None

    def remove(self, path: str) -> None:
        self._file_op("remove", path)

    def make_dir(self, path: str) -> None:
        self._file_op("mkdir", path)
