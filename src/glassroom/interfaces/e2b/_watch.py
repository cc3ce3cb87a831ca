"""envd's directory watch (``filesystem.Filesystem/WatchDir``, ``CreateWatcher``,
``GetWatcherEvents``, ``RemoveWatcher``), answered by polling the watched tree.

Why a poll and not inotify: the watched tree lives in the sandbox's own view,
and on the gVisor and microVM tiers the host kernel never sees those writes
(runsc's gofer and the guest's own disk).  One design that works on every tier
is to list the tree the way ListDir does, with ``find -printf`` run in the
sandbox as its user and through its walls (each scan is an exec in the audit
log, like any command), and diff the listing against the last one.

What a diff can say, and how it is said in envd's terms (fsnotify's events):

* a new entry: ``CREATE``, ``CHMOD``, then ``WRITE`` if it is a file with
  content: the sequence envd reports for a file its files API writes (open
  with O_CREAT, chown, write), which is how E2B clients mostly make files;
* a file whose size or mtime changed: ``WRITE``; mode or owner: ``CHMOD``;
* an entry gone: ``REMOVE``; gone from one path and present at another with
  the same inode, kind, size and mtime: ``RENAME`` (old name) and ``CREATE``
  (new name), once for a moved directory, not for what it carries along.

Several changes to one file between two scans are one event; a file made and
removed between two scans is not seen.  A directory's own mtime is not an
event (inotify does not report it either: its children's events say it).

Latency: a scan takes ~5 ms on namespaces (more on gVisor and microVM).  A
watcher scans every ``POLL_MIN_S`` after a change, backing off to
``POLL_MAX_S`` while nothing changes; a change made through this server's
files API or filesystem RPC on that sandbox wakes its watchers at once, and
``GetWatcherEvents`` scans before it answers, so what the client itself did
is always in the answer.

Bounds: ``MAX_WATCHERS_PER_SANDBOX``, ``MAX_WATCHERS_PER_TENANT`` and
``MAX_WATCHERS`` watchers (one left unread for ``UNARY_IDLE_S`` is ended);
``MAX_TREE_ENTRIES`` entries per tree (a bigger tree is refused at start and
ends a watch that grows past it); ``MAX_BUFFERED`` events waiting per watcher:
past it the watch ends with ``resource_exhausted`` after the events it holds
are delivered, so memory never grows without bound.  A watcher ends with its
sandbox, at ``RemoveWatcher``, when its stream ends, or when a stream's reader
has been gone for ``ORPHAN_S``.
"""

from __future__ import annotations

import posixpath
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import anyio.to_thread
from fastapi.responses import Response, StreamingResponse

from ..http._service import ApiError, Entry, SandboxService
from ._envd import (
    KEEPALIVE_S,
    RpcError,
    _envelope,
    _infos,
    client_path,
    resolve,
)

POLL_MIN_S = 0.2
POLL_MAX_S = 2.0
POLL_BACKOFF = 1.5
#: A scan waits at least this many times its own duration before the next one:
#: a big tree on a slow tier cannot keep the sandbox busy listing itself.
SCAN_COST_FACTOR = 5.0
MAX_WATCHERS_PER_SANDBOX = 8
#: One tenant cannot hold the whole server's watchers.
MAX_WATCHERS_PER_TENANT = 64
MAX_WATCHERS = 512
MAX_TREE_ENTRIES = 10_000
MAX_BUFFERED = 4096
#: A stream whose generator has not looked for events this long is gone.
ORPHAN_S = 30.0
#: A sync-SDK watcher (CreateWatcher) nobody asked for events this long is gone.
UNARY_IDLE_S = 600.0
#: How often an open stream looks for new events (no thread is held meanwhile).
STREAM_TICK_S = 0.05

UNARY = (
    "filesystem.Filesystem/CreateWatcher",
    "filesystem.Filesystem/GetWatcherEvents",
    "filesystem.Filesystem/RemoveWatcher",
)
STREAM = "filesystem.Filesystem/WatchDir"

#: find's record: the ListDir fields, then device:inode (for renames), then the path.
_FMT = "%y\\t%s\\t%m\\t%T@\\t%u\\t%U\\t%g\\t%G\\t%D:%i\\t%p\\0"


class _Rec(NamedTuple):
    """One entry as a scan saw it; ``info`` is ListDir's record (for EntryInfo)."""

    kind: str
    size: str
    mode: str
    mtime: str
    owner: str
    inode: str
    info: tuple[str, ...]


class _Ended(Exception):
    """The watch cannot go on; ``code`` and the message are what the client gets."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class Watcher:
    id: str
    entry: Entry
    root: str  # the sandbox path
    asked: str  # the client's path, for EntryInfo paths in its form
    recursive: bool
    include_entry: bool
    streaming: bool
    tree: dict[str, _Rec] = field(default_factory=dict)
    events: deque[dict[str, Any]] = field(default_factory=deque)
    #: Why the watch ended ((code, message); code "" for a clean end), once it has.
    ended: tuple[str, str] | None = None
    interval: float = POLL_MIN_S
    due: float = 0.0
    seen: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    scanning: threading.Lock = field(default_factory=threading.Lock)

    def end(self, code: str, message: str) -> None:
        with self.lock:
            if self.ended is None:
                self.ended = (code, message)

    def take(self) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        """The events waiting, and why the watch ended once none are left."""
        with self.lock:
            self.seen = time.monotonic()
            out = list(self.events)
            self.events.clear()
            return out, (self.ended if not out else None)


def _scan(svc: SandboxService, w: Watcher) -> dict[str, _Rec]:
    """The tree under ``w.root`` now, keyed by path relative to it."""
    # -H: a watched path that is a link to a directory is watched through it
    args = ["-H", w.root, "-mindepth", "1"] + ([] if w.recursive else ["-maxdepth", "1"])
    r = svc.run(w.entry, ["find", *args, "-printf", _FMT])
    if r.exit_code in (126, 127):
        return _scan_plain(svc, w)
    if r.truncated:
        raise _Ended(
            "resource_exhausted",
            f"the tree under {w.asked} is larger than a command may print: too big to watch",
        )
    out: dict[str, _Rec] = {}
    prefix = w.root.rstrip("/") + "/"
    for raw in r.stdout.split("\0"):
        rec = raw.split("\t", 9)
        if len(rec) != 10 or not rec[9].startswith(prefix):
            continue
        kind, size, mode, mtime, uname, uid, gname, gid, inode, path = rec
        out[path[len(prefix) :]] = _Rec(
            kind, size, mode, mtime, f"{uid}:{gid}", inode,
            (kind, size, mode, mtime, uname, uid, gname, gid, path),
        )  # fmt: skip
        if len(out) > MAX_TREE_ENTRIES:
            raise _Ended(
                "resource_exhausted",
                f"the tree under {w.asked} has more than {MAX_TREE_ENTRIES} entries: "
                "too big to watch",
            )
    if r.exit_code != 0 and not out:
        # no entry and an error: the directory itself is gone or unreadable (an
        # error deeper in the tree still lists the rest, and is not the end)
        if "No such file" in r.stderr or "Not a directory" in r.stderr:
            raise _Ended("not_found", f"the watched directory {w.asked} is gone")
        code = "permission_denied" if "denied" in r.stderr else "internal"
        raise _Ended(code, f"{w.asked}: {r.stderr.strip()[:300] or 'cannot be listed'}")
    return out


def _scan_plain(svc: SandboxService, w: Watcher) -> dict[str, _Rec]:
    """The policy does not let the sandbox run ``find``: the files API's listing
    (names, kinds and sizes only, so a write that keeps the size is not seen)."""
    out: dict[str, _Rec] = {}
    todo = [""]
    kinds = {"file": "f", "dir": "d", "symlink": "l"}
    while todo:
        rel = todo.pop()
        try:
            entries = svc.file_op(w.entry, "list", posixpath.join(w.root, rel) if rel else w.root)
        except ApiError as exc:
            if not rel:
                raise _Ended("not_found", f"the watched directory {w.asked} is gone") from None
            if exc.status in (403, 404):
                continue
            raise
        for fe in entries:
            child = posixpath.join(rel, fe.name) if rel else fe.name
            kind = kinds.get(fe.type, "p")
            out[child] = _Rec(kind, str(fe.size), "", "", "", "", ())
            if len(out) > MAX_TREE_ENTRIES:
                raise _Ended(
                    "resource_exhausted",
                    f"the tree under {w.asked} has more than {MAX_TREE_ENTRIES} entries",
                )
            if kind == "d" and w.recursive:
                todo.append(child)
    return out


def _diff(old: dict[str, _Rec], new: dict[str, _Rec]) -> list[tuple[str, str]]:
    """(event type, relative path) for what changed from ``old`` to ``new``."""
    gone = [p for p in old if p not in new]
    made = [p for p in new if p not in old]
    # another file now at a path (an editor's save: written aside, renamed over)
    replaced = [p for p in new if p in old and new[p].inode and new[p].inode != old[p].inode]
    # a rename: the same inode, kind, size and mtime left one path and is at another
    by_id: dict[tuple[str, ...], str] = {}
    for p in made + replaced:
        r = new[p]
        if r.inode:
            by_id[(r.inode, r.kind, r.size, r.mtime)] = p
    moved: dict[str, str] = {}
    for p in gone:
        r = old[p]
        dest = by_id.pop((r.inode, r.kind, r.size, r.mtime), None) if r.inode else None
        if dest is not None:
            moved[p] = dest
    out: list[tuple[str, str]] = []
    for src in sorted(moved, key=lambda p: p.split("/")):
        dst = moved[src]
        parent = posixpath.dirname(src)
        if parent and moved.get(parent) == posixpath.dirname(dst):
            continue  # carried along by its directory's rename
        out += [("EVENT_TYPE_RENAME", src), ("EVENT_TYPE_CREATE", dst)]
    for p in sorted((p for p in gone if p not in moved), key=lambda p: p.split("/"), reverse=True):
        out.append(("EVENT_TYPE_REMOVE", p))
    dests = set(moved.values())
    for p in sorted((p for p in made if p not in dests), key=lambda p: p.split("/")):
        out += [("EVENT_TYPE_CREATE", p), ("EVENT_TYPE_CHMOD", p)]
        if new[p].kind != "d" and new[p].size not in ("", "0"):
            out.append(("EVENT_TYPE_WRITE", p))
    for p in sorted((p for p in new if p in old and p not in dests), key=lambda p: p.split("/")):
        a, b = old[p], new[p]
        if a.kind != b.kind or (a.inode and a.inode != b.inode):
            out += [("EVENT_TYPE_REMOVE", p), ("EVENT_TYPE_CREATE", p)]
            continue
        if b.kind != "d" and (a.size, a.mtime) != (b.size, b.mtime):
            out.append(("EVENT_TYPE_WRITE", p))
        if (a.mode, a.owner) != (b.mode, b.owner):
            out.append(("EVENT_TYPE_CHMOD", p))
    return out


def _poll(svc: SandboxService, w: Watcher) -> None:
    """One scan of ``w`` and its events queued (never more than MAX_BUFFERED)."""
    with w.scanning:
        if w.ended is not None:
            return
        t0 = time.monotonic()
        try:
            new = _scan(svc, w)
        except _Ended as exc:
            if exc.code == "not_found":  # what it held is gone with it; then the end
                _queue(w, _diff(w.tree, {}), {})
                w.tree = {}
            w.end(exc.code, exc.message)
            return
        except ApiError as exc:
            if exc.rule == "snapshot.state":
                return  # paused under the scan: the watch goes on after the resume
            w.end("unavailable" if exc.status == 404 else "internal", exc.message)
            return
        changes = _diff(w.tree, new)
        w.tree = new
        infos: dict[str, dict[str, Any]] = {}
        if w.include_entry and changes:
            wanted = sorted(
                {p for t, p in changes if t not in _NO_ENTRY and p in new and new[p].info}
            )
            recs = [list(new[p].info) for p in wanted]
            try:
                for p, info in zip(wanted, _infos(svc, w.entry, recs, w.asked), strict=False):
                    infos[p] = info
            except (ApiError, RpcError):
                pass  # best effort, as envd: an entry that cannot be read has none
        _queue(w, changes, infos)
        took = time.monotonic() - t0
        with w.lock:
            w.interval = POLL_MIN_S if changes else min(POLL_MAX_S, w.interval * POLL_BACKOFF)
            w.due = time.monotonic() + max(w.interval, took * SCAN_COST_FACTOR)


def _queue(w: Watcher, changes: list[tuple[str, str]], infos: dict[str, dict[str, Any]]) -> None:
    """``changes`` as events waiting for the client, at most MAX_BUFFERED: past
    that the watch ends (reported once the events held are delivered)."""
    with w.lock:
        for kind, path in changes:
            if len(w.events) >= MAX_BUFFERED:
                w.ended = w.ended or (
                    "resource_exhausted",
                    f"more than {MAX_BUFFERED} events were waiting unread: the watch "
                    f"of {w.asked} ended (events after that were not kept)",
                )
                break
            ev: dict[str, Any] = {"name": path, "type": kind}
            if path in infos and kind not in _NO_ENTRY:
                ev["entry"] = infos[path]
            w.events.append(ev)


_NO_ENTRY = ("EVENT_TYPE_REMOVE", "EVENT_TYPE_RENAME")


class _Hub:
    """The watchers of one service and the one thread that polls them.  The
    thread runs only while there are watchers (it ends with the last one)."""

    def __init__(self, svc: SandboxService) -> None:
        self._svc = weakref.ref(svc)
        self._cond = threading.Condition()
        self._by_id: dict[str, Watcher] = {}
        self._thread: threading.Thread | None = None
        svc.on_destroy(self._sandbox_ended)

    def add(self, w: Watcher) -> None:
        with self._cond:
            mine = sum(1 for x in self._by_id.values() if x.entry is w.entry)
            if mine >= MAX_WATCHERS_PER_SANDBOX:
                raise RpcError(
                    "resource_exhausted",
                    f"a sandbox may have at most {MAX_WATCHERS_PER_SANDBOX} watchers",
                )
            tenant = sum(1 for x in self._by_id.values() if x.entry.tenant == w.entry.tenant)
            if tenant >= MAX_WATCHERS_PER_TENANT:
                raise RpcError(
                    "resource_exhausted",
                    f"a tenant may have at most {MAX_WATCHERS_PER_TENANT} watchers",
                )
            if len(self._by_id) >= MAX_WATCHERS:
                raise RpcError("resource_exhausted", f"the server holds {MAX_WATCHERS} watchers")
            self._by_id[w.id] = w
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="glassroom-watch", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def get(self, e: Entry, watcher_id: str) -> Watcher:
        with self._cond:
            w = self._by_id.get(watcher_id)
        if w is None or w.entry is not e or w.streaming:
            raise RpcError("not_found", f"watcher with id {watcher_id[:80]} not found")
        return w

    def remove(self, w: Watcher, why: str = "stopped") -> None:
        w.end("", why)
        with self._cond:
            if self._by_id.get(w.id) is w:
                del self._by_id[w.id]
            self._cond.notify_all()

    def poke(self, e: Entry) -> None:
        """Something changed the sandbox's files through this server: scan now."""
        with self._cond:
            for w in self._by_id.values():
                if w.entry is e:
                    w.due = 0.0
            self._cond.notify_all()

    def _sandbox_ended(self, e: Entry) -> None:
        with self._cond:
            for w in [w for w in self._by_id.values() if w.entry is e]:
                w.end("unavailable", f"the sandbox {e.id} was killed")
                del self._by_id[w.id]
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                for w in list(self._by_id.values()):
                    if now - w.seen > (ORPHAN_S if w.streaming else UNARY_IDLE_S):
                        w.end("", "the watcher's reader is gone")
                        del self._by_id[w.id]
                if not self._by_id:
                    self._thread = None
                    return
                for w in self._by_id.values():
                    if w.entry.paused and w.due <= now:
                        w.due = now + POLL_MAX_S  # a paused sandbox runs nothing
                due = [w for w in self._by_id.values() if w.due <= now]
                if not due:
                    nxt = min(w.due for w in self._by_id.values())
                    self._cond.wait(max(0.01, min(1.0, nxt - now)))
                    continue
            svc = self._svc()
            if svc is None:
                return
            for w in due:
                try:
                    _poll(svc, w)
                except Exception as exc:  # a scan must never kill the thread
                    w.end("internal", f"the watch failed: {type(exc).__name__}")
                if w.ended is not None and not w.streaming:
                    w.due = time.monotonic() + 3600.0  # kept until read or removed
                elif w.due <= time.monotonic():
                    w.due = time.monotonic() + POLL_MIN_S
            del svc


_HUBS: weakref.WeakKeyDictionary[SandboxService, _Hub] = weakref.WeakKeyDictionary()
_HUBS_LOCK = threading.Lock()


def _hub(svc: SandboxService) -> _Hub:
    with _HUBS_LOCK:
        hub = _HUBS.get(svc)
        if hub is None:
            hub = _HUBS[svc] = _Hub(svc)
        return hub


def touched(svc: SandboxService, e: Entry) -> None:
    """Called after this server changed ``e``'s files: its watchers scan now."""
    with _HUBS_LOCK:
        hub = _HUBS.get(svc)
    if hub is not None:
        hub.poke(e)


def _start(svc: SandboxService, e: Entry, msg: dict[str, Any], streaming: bool) -> Watcher:
    """A new watcher of ``msg["path"]``, its first scan done (the baseline).

    The path is first listed through the files API: the same policy check and
    audit record (``file.list``, or ``blocked`` with its rule) as any read.  A
    missing or hidden path is envd's ``not_found``, a file ``invalid_argument``."""
    asked = client_path(msg.get("path", ""))
    root = resolve(asked)
    for name in ("recursive", "includeEntry", "allowNetworkMounts"):
        if not isinstance(msg.get(name, False), bool):
            raise RpcError("invalid_argument", f"{name}: must be a boolean")
    try:
        svc.file_op(e, "list", root)
    except ApiError as exc:
        rule = f" (rule {exc.rule})" if exc.rule else ""
        if "ENOTDIR" in exc.message:
            raise RpcError("invalid_argument", f"path {asked} not a directory{rule}") from None
        if "ENOENT" in exc.message:
            raise RpcError("not_found", f"path {asked} not found{rule}") from None
        raise
    w = Watcher(
        id="w-" + secrets.token_hex(8),
        entry=e,
        root=root,
        asked=asked,
        recursive=bool(msg.get("recursive", False)),
        include_entry=bool(msg.get("includeEntry", False)),
        streaming=streaming,
    )
    try:
        w.tree = _scan(svc, w)
    except _Ended as exc:
        raise RpcError(exc.code, exc.message) from None
    w.due = time.monotonic() + POLL_MIN_S
    _hub(svc).add(w)
    return w


def unary(svc: SandboxService, e: Entry, method: str, msg: dict[str, Any]) -> dict[str, Any]:
    """The sync SDK's watch: CreateWatcher, GetWatcherEvents, RemoveWatcher."""
    if method == "filesystem.Filesystem/CreateWatcher":
        return {"watcherId": _start(svc, e, msg, streaming=False).id}
    wid = msg.get("watcherId", "")
    if not isinstance(wid, str):
        raise RpcError("invalid_argument", "watcherId: must be a string")
    hub = _hub(svc)
    w = hub.get(e, wid)
    if method == "filesystem.Filesystem/RemoveWatcher":
        hub.remove(w)
        return {}
    _poll(svc, w)  # what happened up to this call is in its answer
    events, ended = w.take()
    if ended is not None:
        hub.remove(w, ended[1])
        raise RpcError(ended[0] or "not_found", ended[1])
    return {"events": events}


async def stream(
    svc: SandboxService, e: Entry, msg: dict[str, Any], deadline: float | None
) -> Response:
    """WatchDir: a start event once the baseline is taken, then the events."""
    w = await anyio.to_thread.run_sync(_start, svc, e, msg, True)
    return StreamingResponse(_frames(svc, w, deadline), media_type="application/connect+json")


async def _frames(svc: SandboxService, w: Watcher, deadline: float | None) -> AsyncIterator[bytes]:
    hub = _hub(svc)
    try:
        yield _envelope({"start": {}})
        last = time.monotonic()
        while True:
            events, ended = w.take()
            if events:
                yield b"".join(_envelope({"filesystem": ev}) for ev in events)
                last = time.monotonic()
                continue
            if ended is not None:
                code, message = ended
                if code:
                    err = {"error": {"code": code, "message": message}}
                    yield _envelope(err, flags=0x02)
                else:
                    yield _envelope({}, flags=0x02)
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                why = f"the watch of {w.asked} reached its timeout (connect-timeout-ms)"
                yield _envelope({"error": {"code": "deadline_exceeded", "message": why}}, 0x02)
                return
            if now - last > KEEPALIVE_S:
                yield _envelope({"keepalive": {}})
                last = now
            await anyio.sleep(STREAM_TICK_S)
    finally:
        hub.remove(w)
