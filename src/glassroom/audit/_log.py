"""The append-only, hash-chained JSONL audit log writer.

Why a hash chain: every record carries ``prev`` (the previous record's
``hash``) and its own ``hash`` over its canonical JSON, so an edit, a
deletion, an insertion or a reordering anywhere before the last record
breaks a link that :func:`glassroom.audit.verify` can name.

Why ``flock`` + ``O_APPEND`` + one ``os.write``: several processes (the
supervisor, a reaper, the CLI) may append to the same file.  The exclusive
lock makes "read the tail, compute the next seq and hash, write" atomic
across processes; ``O_APPEND`` plus a single write keeps each line whole.
An append returns only after an ``fsync`` that covers its record, so a
crash loses at most the records being written, and the writer repairs a torn
last line before chaining on.  Concurrent writers of one file in a process
(a server's sandboxes) share that write and fsync: group commit, see
:class:`_Group`.  An anchor is made durable outside the ``flock`` and only
renamed in place under it, so appends never wait for the anchor's fsyncs.

Why :meth:`AuditLog.append_many`: a traced sandbox produces hundreds of file
events a second; one lock, one write and one fsync per *batch* keeps the log
off the critical path without weakening the chain.

After writing, and still in order, each record goes to the optional sinks
(:mod:`._sinks`; a queue, never a wait) and the chain head is signed into
``<log>.anchor`` (:mod:`._anchor`) after the first append, on
:meth:`AuditLog.anchor` and on :meth:`AuditLog.close`.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .. import _config
from .._errors import AuditError
from . import _sinks

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


def is_digest(value: object) -> bool:
    """Is ``value`` a lowercase sha256 hex digest?"""
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
    if not is_digest(obj["prev"]) or not is_digest(obj["hash"]):
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


def make_dirs(directory: Path) -> None:
    """Create missing directories with mode 0700 (existing ones keep their modes)."""
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


def find_head(fd: int, size: int) -> tuple[bool, int, str, int]:
    """Return ``(torn, last_seq, last_hash, end)`` by reading backwards from ``size``.

    ``torn`` is true when the file does not end in a newline (a crash mid-write).
    The last COMPLETE line that is a structurally valid record is the chain head;
    garbage lines are skipped so the chain never extends from them.  ``end`` is
    the byte offset just past that record's newline (0 if there is none): the
    anchor records it so a later anchor can find the record again in O(1).
    The window grows geometrically, so only the tail is read in the normal case.
    """
    if size == 0:
        return False, 0, GENESIS_HASH, 0
    torn = _pread_all(fd, 1, size - 1) != b"\n"
    window = _TAIL_CHUNK
    while True:
        start = max(0, size - window)
        data = _pread_all(fd, size - start, start)
        end = data.rfind(b"\n")  # after it: empty, or the torn fragment
        while end >= 0:
            begin = data.rfind(b"\n", 0, end)
            if begin < 0 and start > 0:
                break  # the window may begin mid-line: widen it
            rec = parse_record_line(data[begin + 1 : end])
            if isinstance(rec, dict):
                return torn, rec["seq"], rec["hash"], start + end + 1
            end = begin
        if start == 0:
            return torn, 0, GENESIS_HASH, 0
        window *= 4


def read_tail(fd: int, size: int) -> tuple[bool, int, str]:
    """Return ``(torn, last_seq, last_hash)``: :func:`find_head` without the offset."""
    torn, seq, head, _ = find_head(fd, size)
    return torn, seq, head


def line_ending_at(fd: int, end: int) -> bytes | None:
    """The line (without its newline) whose newline is the byte at ``end - 1``.

    ``None`` if that byte is not a newline or no line that long could be a record.
    """
    if end <= 0:
        return None
    window = _TAIL_CHUNK
    while True:
        start = max(0, end - window)
        data = _pread_all(fd, end - start, start)
        if len(data) != end - start or not data.endswith(b"\n"):
            return None
        begin = data.rfind(b"\n", 0, len(data) - 1)
        if begin >= 0:
            return data[begin + 1 : -1]
        if start == 0:
            return data[:-1]
        if window > 2 * MAX_RECORD_BYTES:
            return None
        window *= 4


_Item = tuple[str, dict[str, Any], str, str | None]
"""A checked ``(event, details, decision, rule)``, ready to be chained."""


def _check_item(event: str, details: Mapping[str, Any] | None, decision: str,
                rule: str | None) -> _Item:  # fmt: skip
    _check_name("event", event)
    if rule is not None:
        _check_name("rule", rule)
    if decision not in DECISIONS:
        raise AuditError(f"audit decision must be one of info/allow/deny, got {decision!r}")
    return event, _normalize_details(details, event), decision, rule


class _Request:
    """One caller's records, waiting for the batch that writes them."""

    __slots__ = ("done", "end", "error", "items", "lines", "records", "sandbox")

    def __init__(self, sandbox: str, items: list[_Item]) -> None:
        self.sandbox = sandbox
        self.items = items
        self.done = False
        self.end = 0  # the file's size after the batch that wrote these records
        self.records: list[dict[str, Any]] = []
        self.lines: list[bytes] = []
        self.error: AuditError | None = None


class _Group:
    """The writers of one log file in this process (group commit).

    Concurrent appends (a server's sandboxes all write to its one log) used to
    take the ``flock`` one after the other, each with its own ``fsync``: the
    lock was held for an fsync per record, and the log became the server's
    queue.  Now a writer queues its records here and takes ``lock``; whoever
    holds it writes *every* queued record in one ``write`` under the ``flock``
    and makes them durable with one ``fsync``, then marks them done.  A writer
    whose records a previous holder wrote finds them done and returns at once.
    Nobody returns before the fsync that covers its records, and the ``flock``
    is still held from reading the tail until after that fsync, so what other
    processes see, and what a crash can leave, is exactly as before: at most a
    torn last batch, which the next writer repairs.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the writer of the current batch
        self.queue_lock = threading.Lock()  # guards pending
        self.pending: list[_Request] = []
        #: (file size after the last batch, its seq, its hash), shared by the
        #: writers of this file: skips reading the tail when nobody else appended.
        self.cache: tuple[int, int, str] | None = None
        #: Held by a writer anchoring at close: the writers closing meanwhile
        #: wait, then find their records under that anchor (see ``AuditLog.close``).
        self.anchor_lock = threading.Lock()
        #: (offset just past the anchored record, key id, the anchor): the newest
        #: anchor this process wrote or found current.
        self.anchored: tuple[int, str, dict[str, Any]] | None = None
        #: Open writers using it; at 0 it is forgotten, so a later file that
        #: happens to get the same inode number starts with no stale cache.
        self.users = 0


_groups: dict[tuple[int, int, bool], _Group] = {}
_groups_lock = threading.Lock()


def _group_for(fd: int, fsync: bool) -> _Group:
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, fsync)
    with _groups_lock:
        group = _groups.get(key)
        if group is None:
            group = _groups[key] = _Group()
        group.users += 1
        return group


def _release_group(group: _Group) -> None:
    with _groups_lock:
        group.users -= 1
        if group.users <= 0:
            for key, g in list(_groups.items()):
                if g is group:
                    del _groups[key]


def _forget_groups() -> None:
    """In a forked child: the parent's groups (and their locks, maybe held by a
    thread that does not exist here) are not the child's."""
    global _groups_lock
    _groups_lock = threading.Lock()
    _groups.clear()


os.register_at_fork(after_in_child=_forget_groups)


class AuditLog:
    """Appends hash-chained records to one JSONL file; safe across threads and processes.

    ``anchor`` (default on): sign the chain head into ``<path>.anchor`` with
    the supervisor's key (see :mod:`glassroom.audit._anchor`) after the first
    append, on :meth:`anchor` and on :meth:`close`.  ``anchor_key`` overrides
    the key's path (default ``_config.audit_anchor_key_path()``).

    ``sinks``: syslog URLs each record is also sent to, best effort (see
    :mod:`glassroom.audit._sinks`); ``None`` means ``GLASSROOM_AUDIT_SINKS``,
    ``[]`` means none.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = True,
        anchor: bool = True,
        anchor_key: str | os.PathLike[str] | None = None,
        sinks: Sequence[str] | None = None,
    ) -> None:
        # Imported here, not at the top: _anchor builds on this module's helpers.
        from . import _anchor

        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._sink_urls = list(_config.audit_sinks() if sinks is None else sinks)
        for url in self._sink_urls:
            _sinks.parse_sink_url(url)  # a bad URL fails here, before anything is opened
        # A key problem (unwritable state dir, foreign .pub) fails here too, as an
        # AuditError, rather than at close() when the records are already written.
        self._key = _anchor.load_or_create_key(
            Path(anchor_key) if anchor_key is not None else None
        ) if anchor else None  # fmt: skip
        self._anchor_file = _anchor.anchor_path(self.path)
        # (file size when we last anchored or saw the anchor current, the anchor)
        self._anchored: tuple[int, dict[str, Any]] | None = None
        self._anchor_seen = False  # has an anchor file been seen since we opened?
        self._fd: int | None = self._open()
        self._group = _group_for(self._fd, fsync)
        #: The file's size after the batch that held this writer's last record.
        self._end: int | None = None
        self._sinks = _sinks.open_sinks(self._sink_urls)

    @property
    def _cache(self) -> tuple[int, int, str] | None:
        return self._group.cache

    def _open(self) -> int:
        make_dirs(self.path.parent)
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
        would not exclude the parent; give the child its own descriptor and lock.
        The parent's sink threads do not exist here: start the child's own."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._anchored = None
        if self._fd is not None:
            inherited, self._fd = self._fd, self._open()
            os.close(inherited)
            self._group = _group_for(self._fd, self._fsync)
            self._sinks = _sinks.open_sinks(self._sink_urls)
        else:
            self._sinks = []

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
        item = _check_item(event, details, decision, rule)
        return self._write(sandbox, [item])[0]

    def append_many(
        self,
        sandbox: str,
        items: Iterable[tuple[str, Mapping[str, Any] | None, str, str | None]],
    ) -> list[dict[str, Any]]:
        """Write a batch of ``(event, details, decision, rule)`` records for one sandbox.

        Same checks and chain as :meth:`append`, but one ``flock``, one
        ``os.write`` of all the lines and one ``fsync`` for the whole batch: a
        traced sandbox produces hundreds of file events a second, and an fsync
        per record would make the log the bottleneck.  Every item is checked
        before anything is written, so a bad item writes nothing.  The records
        are consecutive in the file (no other writer's record lands between
        them) and are returned as written.
        """
        _check_name("sandbox", sandbox)
        checked: list[_Item] = []
        for index, item in enumerate(items):
            try:
                event, details, decision, rule = item
            except (TypeError, ValueError):
                raise AuditError(
                    f"append_many item {index}: expected (event, details, decision, rule), "
                    f"got {item!r:.200}"
                ) from None
            try:
                checked.append(_check_item(event, details, decision, rule))
            except AuditError as exc:
                raise AuditError(f"append_many item {index}: {exc}") from None
        if not checked:
            return []
        return self._write(sandbox, checked)

    def _open_fd(self) -> int:
        """The log's fd, or AuditError once closed; call under ``_lock``."""
        fd = self._fd
        if fd is None:
            raise AuditError(f"audit log {self.path} is closed")
        return fd

    def _write(self, sandbox: str, items: list[_Item]) -> list[dict[str, Any]]:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            fd = self._open_fd()
            req = _Request(sandbox, items)
            group = self._group
            with group.queue_lock:
                group.pending.append(req)
            with group.lock:
                if not req.done:  # nobody wrote it while we waited: write the batch
                    with group.queue_lock:
                        batch, group.pending = group.pending, []
                    self._commit(fd, batch)
            if req.error is not None:
                raise req.error
            records, lines = req.records, req.lines
            self._end = req.end
            if self._key is not None and not self._anchor_seen:
                self._first_anchor(fd)
            # Still under self._lock, so every sink sees this writer's records in order.
            for sink in self._sinks:
                for record, line in zip(records, lines, strict=True):
                    sink.submit(line[:-1], record["event"], record["decision"], record["ts"])
            return records

    def _commit(self, fd: int, batch: list[_Request]) -> None:
        """Write ``batch`` (this process's queued records, in order) as one write
        and one fsync under the ``flock``; call holding ``self._group.lock``.
        Every request ends done, with its records or the error."""
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise AuditError(f"cannot lock audit log {self.path}: {exc.strerror}") from exc
            try:
                entries = [(r.sandbox, item) for r in batch for item in r.items]
                records, lines = self._append_locked(fd, entries)
            except OSError as exc:
                raise AuditError(f"cannot write audit log {self.path}: {exc.strerror}") from exc
            finally:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException as exc:
            error = exc if isinstance(exc, AuditError) else AuditError(
                f"cannot write audit log {self.path}: {exc!r}"
            )  # fmt: skip
            for r in batch:
                r.error, r.done = error, True
            if not isinstance(exc, AuditError | OSError):
                raise
            return
        at = 0
        end = self._group.cache[0] if self._group.cache is not None else 0
        for r in batch:
            n = len(r.items)
            r.records, r.lines = records[at : at + n], lines[at : at + n]
            r.end = end
            r.done = True
            at += n

    def _append_locked(
        self, fd: int, entries: list[tuple[str, _Item]]
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        group = self._group
        size = os.fstat(fd).st_size
        cache = group.cache
        if cache is not None and cache[0] == size:
            torn, seq, prev = False, cache[1], cache[2]
        else:
            torn, seq, prev = read_tail(fd, size)
        records: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for sandbox, (event, details, decision, rule) in entries:
            seq += 1
            base = {
                "seq": seq,
                "ts": _now(),
                "sandbox": sandbox,
                "event": event,
                "decision": decision,
                "rule": rule,
                "prev": prev,
            }
            record, line = _Builder(base).fit(details)
            records.append(record)
            lines.append(line)
            prev = record["hash"]
        # Terminate a torn line first, in the same write, so it stays one bad line.
        blob = b"".join([b"\n" if torn else b"", *lines])
        data = memoryview(blob)
        group.cache = None  # unknown until the write and fsync succeed
        while data:  # one write in practice; loop only on a short write
            written = os.write(fd, data)
            if written == 0:
                raise AuditError(f"cannot write audit log {self.path}: short write")
            data = data[written:]
        if self._fsync:
            os.fsync(fd)
        group.cache = (size + len(blob), seq, prev)
        return records, lines

    # -- anchoring -------------------------------------------------------------

    def _first_anchor(self, fd: int) -> None:
        """After this writer's first append: anchor now if the log has no anchor yet.

        So that a non-empty log always has an anchor once a key exists (the
        verifier treats a missing one as deleted).  One ``stat`` per writer
        (and the ``flock`` only when there is no anchor); a failure here is not
        the append's failure (the record is written) and is raised by the next
        :meth:`anchor` or :meth:`close` instead.  Call under ``self._lock``.
        """
        if self._key is None or self._anchor_seen:
            return
        try:
            if not self._anchor_file.exists():
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if not self._anchor_file.exists():
                        self._anchor_locked(fd)
                finally:
                    with contextlib.suppress(OSError):
                        fcntl.flock(fd, fcntl.LOCK_UN)
            self._anchor_seen = True
        except (AuditError, OSError):
            pass

    def anchor(self) -> dict[str, Any] | None:
        """Sign the current chain head into ``<path>.anchor`` and return the anchor.

        Cheap to call often: if the file has not grown since this writer last
        anchored, it returns at once (one ``fstat``, no lock, no signature).
        Otherwise, under the log's ``flock``: an anchor already at this seq is
        kept; a new one is written only for a higher seq, and only after
        checking that the record the old anchor names is still there with the
        same hash (the supervisor never signs over a rewritten log).  Returns
        ``None`` when anchoring is off or the log is empty.  Raises
        :class:`AuditError` when the existing anchor is malformed or the log no
        longer matches it.
        """
        if self._key is None:
            return None
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            return self._anchor_fd(self._open_fd())

    def _anchor_fd(self, fd: int) -> dict[str, Any] | None:
        """Anchor the head, holding the ``flock`` only to read the head and check
        the old anchor, and again for the rename: the fsyncs of the new anchor
        happen outside it, so appends (which need the lock) do not wait for them."""
        from . import _anchor

        try:
            if self._anchored is not None and os.fstat(fd).st_size == self._anchored[0]:
                return dict(self._anchored[1])
        except OSError as exc:
            raise AuditError(f"cannot lock audit log {self.path}: {exc.strerror}") from exc
        with self._flocked(fd, "anchor"):
            done, pending = self._prepare_anchor_locked(fd)
        if pending is None:
            return done
        new, size, end = pending
        tmp = _anchor.stage_anchor(self._anchor_file, new, fsync=self._fsync)
        try:
            with self._flocked(fd, "anchor"):
                existing = _anchor.read_anchor(self._anchor_file)
                if isinstance(existing, str):
                    raise AuditError(
                        f"audit anchor {self._anchor_file} is not a valid anchor ({existing}); "
                        "not replacing it: check the log with `glassroom audit verify`"
                    )
                if existing is not None and existing["seq"] >= new["seq"]:
                    # Another writer anchored at or past this head meanwhile (and
                    # checked the log to get there): keep it, never lower it.
                    os.unlink(tmp)
                    result = existing
                else:
                    os.rename(tmp, self._anchor_file)
                    result = new
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._fsync:
            _anchor.fsync_dir(self._anchor_file.parent)
        if result is new:
            assert self._key is not None
            self._anchored = (size, new)
            self._group.anchored = (end, self._key.key_id, new)
            self._anchor_seen = True
        return dict(result)

    @contextlib.contextmanager
    def _flocked(self, fd: int, what: str) -> Iterator[None]:
        """The log's ``flock``; an ``OSError`` inside is an :class:`AuditError`."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise AuditError(f"cannot lock audit log {self.path}: {exc.strerror}") from exc
        try:
            yield
        except OSError as exc:
            raise AuditError(f"cannot {what} audit log {self.path}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _anchor_locked(self, fd: int) -> dict[str, Any] | None:
        """Anchor the head, all under the ``flock`` the caller holds."""
        from . import _anchor

        done, pending = self._prepare_anchor_locked(fd)
        if pending is None:
            return done
        new, size, end = pending
        assert self._key is not None
        _anchor.write_anchor(self._anchor_file, new, fsync=self._fsync)
        self._anchored = (size, new)
        self._group.anchored = (end, self._key.key_id, new)
        self._anchor_seen = True
        return dict(new)

    def _prepare_anchor_locked(
        self, fd: int
    ) -> tuple[dict[str, Any] | None, tuple[dict[str, Any], int, int] | None]:
        """Under the ``flock``: ``(anchor, None)`` when there is nothing to sign (an
        empty log: ``None``; the anchor is current: it), else ``(None, (new
        anchor, log size, offset past the head))`` for the caller to write.
        Raises when the existing anchor is malformed or the log no longer matches it."""
        from . import _anchor

        key = self._key
        assert key is not None
        size = os.fstat(fd).st_size
        if self._cache is not None and self._cache[0] == size:
            seq, head, end = self._cache[1], self._cache[2], size
        else:
            _, seq, head, end = find_head(fd, size)
        if seq == 0:
            return None, None
        existing = _anchor.read_anchor(self._anchor_file)
        if isinstance(existing, str):
            raise AuditError(
                f"audit anchor {self._anchor_file} is not a valid anchor ({existing}); "
                "not replacing it: check the log with `glassroom audit verify`"
            )
        if existing is not None:
            problem = self._continuity(fd, size, seq, head, existing)
            if problem:
                raise AuditError(
                    f"audit log {self.path}: {problem}; not re-anchoring it: "
                    "check it with `glassroom audit verify`"
                )
            if existing["seq"] == seq and existing["key_id"] == key.key_id:
                self._anchored = (size, existing)
                self._group.anchored = (end, key.key_id, existing)
                return dict(existing), None
        new = key.sign(
            {"v": _anchor.ANCHOR_VERSION, "log": self.path.name, "seq": seq, "hash": head,
             "offset": end, "ts": _now()}
        )  # fmt: skip
        return None, (new, size, end)

    @staticmethod
    def _continuity(
        fd: int, size: int, seq: int, head: str, existing: dict[str, Any]
    ) -> str | None:
        """Is the record the existing anchor names still where it says, unchanged?"""
        old_seq, old_hash, offset = existing["seq"], existing["hash"], existing["offset"]
        says = f"its anchor says seq {old_seq} has hash {old_hash[:16]}…"
        if old_seq > seq:
            return f"it ends at seq {seq} but {says}: it was truncated or rewritten"
        if old_seq == seq:
            return None if old_hash == head else f"{says} but it is {head[:16]}…: rewritten"
        line = line_ending_at(fd, offset) if offset <= size else None
        rec = parse_record_line(line) if line is not None else "no record there"
        if isinstance(rec, str) or rec["seq"] != old_seq or rec["hash"] != old_hash:
            return f"{says} (line ending at byte {offset}), but that record is gone or changed"
        return None

    # -- sinks and closing -----------------------------------------------------

    def sink_stats(self) -> list[_sinks.SinkStats]:
        """Per sink: records sent, dropped (queue full), failed, still pending, last error."""
        return [sink.stats() for sink in self._sinks]

    def close(self) -> None:
        """Anchor the head (if anchoring), close the file, flush the sinks; idempotent.

        The sinks get at most ``CLOSE_TIMEOUT_S`` seconds in total to send what
        is queued; what is left is counted as failed in :meth:`sink_stats`.
        The file is closed even when anchoring fails; that failure is then
        raised as an :class:`AuditError`.
        """
        if self._fd is not None and self._pid != os.getpid():
            self._after_fork()
        error: AuditError | None = None
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if self._key is not None:
                    # Writers closing together (a server's sandboxes each close
                    # their log at destroy) queue here; the first anchors the head,
                    # and those whose records that anchor covers need no other.
                    with self._group.anchor_lock:
                        if not self._covered():
                            self._anchor_fd(fd)
            except AuditError as exc:
                error = exc
            finally:
                os.close(fd)
                _release_group(self._group)
                _sinks.close_sinks(self._sinks)
        if error is not None:
            raise error

    def _covered(self) -> bool:
        """Is every record this writer wrote under an anchor signed with its key
        that is still the anchor file's?  (Then closing need not sign again: the
        anchor covers the chain up to a record at or past this writer's last.)"""
        from . import _anchor

        got, key = self._group.anchored, self._key
        if self._end is None or got is None or key is None:
            return False
        end, key_id, anchor = got
        if key_id != key.key_id or end < self._end:
            return False
        try:
            return _anchor.read_anchor(self._anchor_file) == anchor
        except AuditError:
            return False

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
