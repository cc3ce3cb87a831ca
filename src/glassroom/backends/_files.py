"""The file API every backend shares, on top of its own ``_file_op``.

Each backend moves bytes its own way (pipes over SCM_RIGHTS, stream frames,
virtio-serial); what the file API means, and how a directory listing from
inside the sandbox is checked, is the same everywhere, so it lives here.
A listing is untrusted input: entries must be plain names (no ``/``, no
``..``), of a known type, with a sane size; anything else is an anomaly.
"""

from __future__ import annotations

import json
import queue
import select
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn, TypeVar

from .._errors import SandboxError
from .base import FileEntry

#: A listing entry's ``type``: a regular file, a directory, a symlink (never
#: followed), or ``other`` (a FIFO, socket or device: never read or written
#: by the file API, which refuses anything but a regular file with ENXIO).
ENTRY_TYPES = ("file", "dir", "symlink", "other")
#: How long a file op waits for the sandbox's next word (its start, a chunk,
#: its end) before it gives up: generous, since the in-sandbox side never
#: blocks on what the sandbox controls (it refuses FIFOs, sockets and devices);
#: a reply this late means the init or agent is stuck or lying.
FILE_OP_TIMEOUT_S = 60.0

_T = TypeVar("_T")


class FileOpStalled(SandboxError):
    """A file op got no word from the sandbox within ``FILE_OP_TIMEOUT_S``."""


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

    def _file_stalled(self, kind: str, path: str) -> NoReturn:
        """A file op got no word from the sandbox in time: an anomaly, and SandboxError."""
        self._anomaly(f"{kind} {path}: no reply from the sandbox in {FILE_OP_TIMEOUT_S:g}s")
        raise FileOpStalled(f"{kind} {path}: the sandbox did not answer within "
                            f"{FILE_OP_TIMEOUT_S:g}s; the operation was abandoned")  # fmt: skip

    def _file_reply(self, q: queue.Queue[_T], kind: str, path: str, *,
                    progress: Callable[[], int] | None = None, size: int = 0) -> _T:  # fmt: skip
        """The next reply to a file op, waited for at most ``FILE_OP_TIMEOUT_S``
        without news: ``progress`` (bytes moved so far, where the data does not
        come through ``q``) restarts the wait while it grows; ``size`` bytes the
        sandbox must still write before it can answer add a second per MiB."""
        timeout = FILE_OP_TIMEOUT_S + size / (1 << 20)
        while True:
            seen = progress() if progress is not None else 0
            try:
                return q.get(timeout=timeout)
            except queue.Empty:
                if progress is None or progress() == seen:
                    self._file_stalled(kind, path)

    def _file_ready(self, fd: int, kind: str, path: str, *, write: bool) -> None:
        """Wait, at most ``FILE_OP_TIMEOUT_S``, until a file op's pipe can move bytes."""
        want = ([], [fd]) if write else ([fd], [])
        if not any(select.select(*want, [], FILE_OP_TIMEOUT_S)):
            self._file_stalled(kind, path)

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
