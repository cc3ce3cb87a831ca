"""The append-only, hash-chained JSONL audit log writer.

Why a hash chain: every record carries ``prev`` (the previous record's
``hash``) and its own ``hash`` over its canonical JSON, so an edit, a
deletion, an insertion or a reordering anywhere before the last record
breaks a link that :func:`glassroom.audit.verify` can name.

Why ``flock`` + ``O_APPEND`` + one ``os.write``: several processes (the
supervisor, a reaper, the CLI) may append to the same file.  The exclusive
lock makes "read the tail, compute the next seq and hash, write" atomic
across processes; ``O_APPEND`` plus a single write keeps each line whole.
``fsync`` after every record means a crash loses at most the record being
written, and the writer repairs a torn last line before chaining on.

The record schema and canonical serialization live here too, because the
writer, the verifier and the reader must agree on them byte for byte.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .._errors import AuditError

GENESIS_HASH = "0" * 64
"""``prev`` of the first record: there is nothing before it."""

DECISIONS = frozenset({"info", "allow", "deny"})
MAX_RECORD_BYTES = 64 * 1024
"""Upper bound of one line (newline included); larger details are truncated."""

MAX_NAME_BYTES = 4096
"""Bound on ``sandbox``, ``event`` and ``rule`` so any record can be made to fit."""

FIELDS = ("seq", "ts", "sandbox", "event", "details", "decision", "rule", "prev", "hash")
_HEX = frozenset("0123456789abcdef")
_TAIL_CHUNK = 4096
_MARKER = "…(truncated {} bytes)"


def canonical_json(obj: Any) -> bytes:
    """The one serialization used for lines and for hashing (ASCII, sorted, compact)."""
    return json.dumps(
        obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), allow_nan=False
    ).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of the record's canonical JSON without its ``hash`` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def parse_record_line(raw: bytes) -> dict[str, Any] | str:
    """Parse one line (without its newline) into a record, or return why it is not one.

    Only the structure is checked here; whether the hash and the chain hold is
    the verifier's job.  Extra fields are tolerated (the hash covers them).
    """
    if not raw.strip():
        return "empty line"
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return "not a JSON object"
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        return "missing field(s) " + ", ".join(missing)
    seq = obj["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "seq is not a positive integer"
    for name in ("ts", "sandbox", "event"):
        if not isinstance(obj[name], str):
            return f"{name} is not a string"
    if not isinstance(obj["details"], dict):
        return "details is not an object"
    if obj["decision"] not in DECISIONS:
        return "decision is not one of info/allow/deny"
    if obj["rule"] is not None and not isinstance(obj["rule"], str):
        return "rule is not a string or null"
    if not _is_digest(obj["prev"]) or not _is_digest(obj["hash"]):
        return "prev/hash is not a sha256 hex digest"
    return obj


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise AuditError(f"audit {field} must be a non-empty string, got {value!r}")
    if len(canonical_json(value)) > MAX_NAME_BYTES:
        raise AuditError(f"audit {field} is longer than {MAX_NAME_BYTES} bytes")
    return value


def _normalize_details(details: Mapping[str, Any] | None, event: str) -> dict[str, Any]:
    """Round-trip through JSON so the stored value re-serializes to the same bytes.

    Without this, ``{10: 1, 9: 2}`` would be sorted as ints when written but as
    strings when verified, and tuples/int keys would hash differently on reread.
    """
    if details is None:
        return {}
    if not isinstance(details, Mapping):
        raise AuditError(f"audit details for {event!r} must be a mapping, got {type(details)}")
    try:
        text = json.dumps(dict(details), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AuditError(f"audit details for {event!r} are not JSON-serializable: {exc}") from None
    result: dict[str, Any] = json.loads(text)
    return result


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _cap_strings(value: Any, cap: int) -> Any:
    """Cut every string longer than ``cap`` characters, saying how much was cut."""
    if isinstance(value, str):
        if len(value) <= cap:
            return value
        kept = value[:cap]
        return kept + _MARKER.format(_utf8_len(value) - _utf8_len(kept))
    if isinstance(value, dict):
        return {k: _cap_strings(v, cap) for k, v in value.items()}
    if isinstance(value, list):
        return [_cap_strings(v, cap) for v in value]
    return value


def _longest_string(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return max((_longest_string(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return max((_longest_string(v) for v in value), default=0)
    return 0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Builder:
    """Builds one record and its line, shrinking details until the line fits."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.base = base

    def build(self, details: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        record = dict(self.base, details=details)
        record["hash"] = record_hash(record)
        return record, canonical_json(record) + b"\n"

    def fit(self, details: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        record, line = self.build(details)
        if len(line) <= MAX_RECORD_BYTES:
            return record, line
        # Binary-search the largest per-string cap that fits: the largest strings
        # are cut first, and evenly, so no single field is silently dropped.
        lo, hi, best = 0, min(_longest_string(details), MAX_RECORD_BYTES), None
        while lo <= hi:
            cap = (lo + hi) // 2
            candidate = self.build(dict(_cap_strings(details, cap), _truncated=True))
            if len(candidate[1]) <= MAX_RECORD_BYTES:
                best, lo = candidate, cap + 1
            else:
                hi = cap - 1
        if best is not None:
            return best
        # Too many keys or numbers for truncating strings to help: keep the event.
        fallback = {
            "_truncated": True,
            "_error": f"details too large to record ({len(line)} bytes, {len(details)} keys)",
        }
        return self.build(fallback)


def _make_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise AuditError(f"cannot create audit directory {d}: {exc.strerror}") from exc


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_tail(fd: int, size: int) -> tuple[bool, int, str]:
    """Return ``(torn, last_seq, last_hash)`` by reading backwards from ``size``.

    ``torn`` is true when the file does not end in a newline (a crash mid-write).
    The last COMPLETE line that is a structurally valid record is the chain head;
    garbage lines are skipped so the chain never extends from them.  The window
    grows geometrically, so only the tail is read in the normal case.
    """
    if size == 0:
        return False, 0, GENESIS_HASH
    torn = _pread_all(fd, 1, size - 1) != b"\n"
    window = _TAIL_CHUNK
    while True:
        start = max(0, size - window)
        lines = _pread_all(fd, size - start, start).split(b"\n")
        lines.pop()  # after the last newline: empty, or the torn fragment
        if start > 0:
            lines = lines[1:]  # the window may begin mid-line
        for raw in reversed(lines):
            rec = parse_record_line(raw)
            if isinstance(rec, dict):
                return torn, rec["seq"], rec["hash"]
        if start == 0:
            return torn, 0, GENESIS_HASH
        window *= 4


class AuditLog:
    """Appends hash-chained records to one JSONL file; safe across threads and processes."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # (file size after our last write, its seq, its hash): lets us skip reading
        # the tail when nobody else appended since.
        self._cache: tuple[int, int, str] | None = None
        self._fd: int | None = self._open()

    def _open(self) -> int:
        _make_dirs(self.path.parent)
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        created = False
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
        except OSError as exc:
            raise AuditError(f"cannot open audit log {self.path}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AuditError(f"audit log {self.path} is not a regular file")
        if created and self._fsync:
            # Make the new directory entry durable too, not just the file's data.
            with contextlib.suppress(OSError):
                dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return fd

    def _after_fork(self) -> None:
        """A forked child shares the parent's open file description, so ``flock``
        would not exclude the parent; give the child its own descriptor and lock."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cache = None
        if self._fd is not None:
            inherited, self._fd = self._fd, self._open()
            os.close(inherited)

    def append(
        self,
        sandbox: str,
        event: str,
        details: Mapping[str, Any] | None = None,
        *,
        decision: str = "info",
        rule: str | None = None,
    ) -> dict[str, Any]:
        """Write one record durably and return it (as written, after any truncation)."""
        _check_name("sandbox", sandbox)
        _check_name("event", event)
        if rule is not None:
            _check_name("rule", rule)
        if decision not in DECISIONS:
            raise AuditError(f"audit decision must be one of info/allow/deny, got {decision!r}")
        clean = _normalize_details(details, event)
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            fd = self._fd
            if fd is None:
                raise AuditError(f"audit log {self.path} is closed")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditError(f"cannot lock audit log {self.path}: {exc.strerror}") from exc
            try:
                return self._append_locked(fd, sandbox, event, clean, decision, rule)
            except OSError as exc:
                raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from exc
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _append_locked(
        self,
        fd: int,
        sandbox: str,
        event: str,
        details: dict[str, Any],
        decision: str,
        rule: str | None,
    ) -> dict[str, Any]:
        size = os.fstat(fd).st_size
        if self._cache is not None and self._cache[0] == size:
            torn, seq, prev = False, self._cache[1], self._cache[2]
        else:
            torn, seq, prev = read_tail(fd, size)
        base = {
            "seq": seq + 1,
            "ts": _now(),
            "sandbox": sandbox,
            "event": event,
            "decision": decision,
            "rule": rule,
            "prev": prev,
        }
        record, line = _Builder(base).fit(details)
        # Terminate a torn line first, in the same write, so it stays one bad line.
        data = memoryview(b"\n" + line if torn else line)
        self._cache = None  # unknown until the write and fsync succeed
        while data:  # one write in practice; loop only on a short write
            written = os.write(fd, data)
            if written == 0:
                raise AuditError(f"cannot write audit log {self.path}: short write")
            data = data[written:]
        if self._fsync:
            os.fsync(fd)
        self._cache = (size + len(line) + int(torn), record["seq"], record["hash"])
        return record

    def close(self) -> None:
        """Close the file; safe to call more than once."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else "open"
        return f"AuditLog({str(self.path)!r}, {state})"
