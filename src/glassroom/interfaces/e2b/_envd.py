"""envd, E2B's in-sandbox daemon, answered by the server on the sandbox's behalf.

With ``E2B_SANDBOX_URL`` set, the E2B SDKs send every envd call to that one
URL, naming the sandbox in ``E2b-Sandbox-Id`` and the service in
``E2b-Sandbox-Port`` (49983 envd, 49999 code interpreter) and carrying the
sandbox's ``X-Access-Token`` (given out at create).  Here:

* ``GET /health``; ``GET``/``POST /files`` (multipart and octet-stream);
* Connect RPC with the JSON codec for ``process.Process`` (Start, Connect:
  server-streaming with the 5-byte envelope; List, SendInput, SendSignal,
  CloseStdin, Update: unary; PTYs in ``_pty``) and ``filesystem.Filesystem``
  (Stat, ListDir, MakeDir, Move, Remove; WatchDir and the unary watcher calls are ``_watch``'s).
  Message shapes follow e2b-dev/infra ``packages/envd/spec/{process,filesystem}``.

A sandbox that was killed or expired answers 502 "The sandbox … was not
found", which the SDK turns into ``SandboxNotRunningException``; so does a
paused one ("… was not found running: it is paused"), as E2B's proxy does.

E2B's home is ``/home/user``; here it is a link to the sandbox's ``/workspace``
(``plan.HOME_LINK``, on every tier).  File calls under it are done on
``/workspace`` and answered in the form the client used.
"""

from __future__ import annotations

import base64
import json
import posixpath
import signal
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..._config import INSIDE_GID, INSIDE_UID
from ..._errors import GlassroomError
from ...backends.base import FileEntry, Process
from ...plan import HOME_LINK
from ..http._edge import (
    CONNECT_STREAMING,
    Family,
    check_text,
    connect_message,
    error_payload,
    shown,
    strict_json,
)
from ..http._service import (
    FILE_HEADERS,
    ApiError,
    Entry,
    SandboxService,
    check_mapping,
    translate,
)
from . import _metadata, _pty, _signing

ENVD_PORT = 49983
JUPYTER_PORT = 49999
KEEPALIVE_S = 20.0
MAX_PATH = 4096
#: ListDir walks at most this deep, and a stream sends at most this many
#: output chunks per step (encoded on a worker thread, not on the event loop).
MAX_LIST_DEPTH = 32
MAX_EVENTS_PER_STEP = 256
WORKSPACE = "/workspace"
HOME = HOME_LINK
#: ``connect-timeout-ms`` above this (a day) is refused: no stream lives that long.
MAX_CONNECT_TIMEOUT_MS = 86_400_000

_CONNECT_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "already_exists",
    413: "resource_exhausted",
    429: "resource_exhausted",
    501: "unimplemented",
    503: "unavailable",
}
_CODE_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "failed_precondition": 400,
    "deadline_exceeded": 408,
    "resource_exhausted": 429,
    "unimplemented": 501,
    "unavailable": 503,
    "internal": 500,
}


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _rpc_from(exc: ApiError) -> RpcError:
    return RpcError(
        _CONNECT_CODES.get(exc.status, "invalid_argument"),
        exc.message + (f" (rule {exc.rule})" if exc.rule else ""),
    )


def entry_for(svc: SandboxService, request: Request) -> Entry:
    sid = request.headers.get("e2b-sandbox-id", "")
    if not sid:
        raise ApiError(400, "invalid", "missing E2b-Sandbox-Id header")
    token = request.headers.get("x-access-token") or request.headers.get("e2b-traffic-access-token")
    return svc.get_by_token(sid, token)


def client_path(path: object, field: str = "path") -> str:
    """``path`` as the client means it, absolute: E2B paths are relative to the
    user's home, /home/user.  Anything but a sane string is a 400 naming ``field``."""
    if not isinstance(path, str):
        raise ApiError(400, "invalid", f"{field}: must be a string")
    if "\0" in path or len(path) > MAX_PATH:
        raise ApiError(
            400, "invalid", f"{field}: must be at most {MAX_PATH} characters without NUL"
        )
    check_text(path, field)
    if path in ("", "~"):
        return HOME
    if path.startswith("~/"):
        path = HOME + path[1:]
    if not path.startswith("/"):
        path = HOME + "/" + path
    return posixpath.normpath(path)


def _swap(path: str, old: str, new: str) -> str:
    if path == old or path.startswith(old + "/"):
        return new + path[len(old) :]
    return path


def resolve(path: object, field: str = "path") -> str:
    """The sandbox path for the client's ``path``: /home/user is a link to
    /workspace, and the file API works on the workspace itself (its walls)."""
    return _swap(client_path(path, field), HOME, WORKSPACE)


def shown_as(path: str, asked: str) -> str:
    """A sandbox path in the client's form: under /home/user if it asked there."""
    under_home = asked == HOME or asked.startswith(HOME + "/")
    return _swap(path, WORKSPACE, HOME) if under_home else path


def api_error_response(exc: ApiError) -> Response:
    """envd-style error: ``{"code": status, "message": ...}`` (plain HTTP).  A
    call that met a sandbox paused meanwhile is E2B's 502 for a paused one."""
    if exc.rule == "snapshot.state" and exc.status == 409:
        exc = ApiError(502, "not_found", f"The sandbox was not found running: {exc.message}")
    status, body, ctype = error_payload(Family.ENVD, exc)
    return Response(body, status_code=status, media_type=ctype)


# -- files over HTTP ------------------------------------------------------------


async def health(request: Request) -> Response:
    """204 only for a live sandbox: a killed, expired or unknown one is E2B's 502
    (``is_running()`` is False, and the SDK's probe after a dropped stream says so)."""
    try:
        entry_for(request.app.state.service, request)
    except ApiError as exc:
        return api_error_response(exc)
    return Response(status_code=204)


def _file_entry(svc: SandboxService, request: Request, operation: str) -> Entry:
    """The sandbox of a files call: by its access token, or by the signature of
    a signed URL (``download_url``/``upload_url``, _signing)."""
    if _signing.is_signed(request):
        return _signing.entry_for_signed(svc, request, operation)
    return entry_for(svc, request)


async def get_file(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = _file_entry(svc, request, "read")
        path = resolve(request.query_params.get("path", ""))
        data = await anyio.to_thread.run_sync(svc.file_op, e, "read", path)
    except ApiError as exc:
        return api_error_response(exc)
    return Response(data, media_type="application/octet-stream", headers=FILE_HEADERS)


async def post_file(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = _file_entry(svc, request, "write")
        meta = _metadata.from_headers(request.headers)  # user.e2b.* xattrs (_metadata)
        ctype = request.headers.get("content-type", "")
        param = request.query_params.get("path")
        items: list[tuple[str, bytes]] = []
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            uploads = [v for _k, v in form.multi_items() if not isinstance(v, str)]
            for up in uploads:
                name = param if param and len(uploads) == 1 else (up.filename or "")
                if not name:
                    raise ApiError(400, "invalid", "a multipart file needs a path")
                items.append((client_path(name), await up.read()))
        else:
            if not param:
                raise ApiError(400, "invalid", "missing path")
            # A Content-Encoding (gzip) was decoded, bounded, by the edge (_edge.Edge).
            body = await request.body()
            items.append((client_path(param), body))
        out: list[dict[str, Any]] = []
        for asked, data in items:
            await anyio.to_thread.run_sync(_write, svc, e, resolve(asked), data)
            out.append({"name": posixpath.basename(asked), "type": "file", "path": asked})
            if meta:
                out[-1]["metadata"] = meta
        await anyio.to_thread.run_sync(_set_metadata, svc, e, [resolve(a) for a, _ in items], meta)
    except ApiError as exc:
        return api_error_response(exc)
    finally:
        _watched(svc, request)
    return JSONResponse(out)


def _set_metadata(svc: SandboxService, e: Entry, paths: list[str], meta: dict[str, str]) -> None:
    """The written files' metadata replaced by ``meta``; where the sandbox cannot
    store it, the files are removed (never kept without it) and the 501 raised."""
    try:
        _metadata.apply(svc, e, paths, meta)
    except ApiError:
        for path in paths:
            try:
                svc.file_op(e, "remove", path)
            except ApiError:
                pass
        raise


def _watched(svc: SandboxService, request: Request) -> None:
    """This server changed (or tried to change) the sandbox's files: its
    directory watchers scan now instead of at their next poll (_watch)."""
    from . import _watch  # _watch builds on this module

    try:
        _watch.touched(svc, entry_for(svc, request))
    except ApiError:
        pass


def _write(svc: SandboxService, e: Entry, path: str, data: bytes) -> None:
    """envd creates the missing parents of a file it writes; so do we (as the
    sandbox's user, through the same walls: a denied parent stays denied)."""
    try:
        svc.file_op(e, "write", path, data)
    except ApiError as exc:
        parent = posixpath.dirname(path)
        if exc.status != 404 or parent in ("", "/"):
            raise
        svc.file_op(e, "make_dir", parent)
        svc.file_op(e, "write", path, data)


# -- Connect RPC -------------------------------------------------------------------


def _envelope(payload: dict[str, Any], flags: int = 0) -> bytes:
    raw = json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(raw)) + raw


def _message(request: Request, body: bytes, streaming: bool) -> dict[str, Any]:
    """The request message, strictly parsed (by the edge, or here if it did not)."""
    box = request.scope.get("glassroom.json")
    msg = box[0] if box is not None else connect_message(body) if streaming else strict_json(body)
    if not isinstance(msg, dict):
        raise RpcError("invalid_argument", "the request message is not a JSON object")
    return msg


def _obj(msg: dict[str, Any], name: str, where: str = "") -> dict[str, Any]:
    """Field ``name`` of ``msg`` as an object (absent: empty), or invalid_argument."""
    value = msg.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RpcError("invalid_argument", f"{where}{name}: must be an object")
    return value


def _str(msg: dict[str, Any], name: str, where: str = "", default: str = "") -> str:
    value = msg.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RpcError("invalid_argument", f"{where}{name}: must be a string")
    return value


def _int(msg: dict[str, Any], name: str, lo: int, hi: int, default: int) -> int:
    value = msg.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and len(value) <= 20 and value.lstrip("-").isdigit():
        # protobuf's JSON mapping may send an integer as a string
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RpcError("invalid_argument", f"{name}: must be an integer from {lo} to {hi}")
    return value


def _unary_error(err: RpcError) -> Response:
    return Response(
        json.dumps({"code": err.code, "message": err.message}).encode(),
        status_code=_CODE_STATUS.get(err.code, 400),
        media_type="application/json",
    )


def _stream_error(err: RpcError) -> Response:
    body = _envelope({"error": {"code": err.code, "message": err.message}}, flags=0x02)
    return Response(body, media_type="application/connect+json")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _selector(msg: dict[str, Any], e: Entry) -> Process:
    sel = _obj(msg, "process")
    pid = _int(sel, "pid", 0, 2**31 - 1, 0) if "pid" in sel else None
    tag = _str(sel, "tag", "process.") if "tag" in sel else None
    with e.lock:
        if pid is not None:
            proc = e.procs.get(pid)
        elif tag is not None:
            pid = next((p for p, t in e.tags.items() if t == tag), None)
            proc = e.procs.get(pid) if pid is not None else None
        else:
            raise RpcError("invalid_argument", "process selector needs pid or tag")
    if proc is None:
        raise RpcError("not_found", f"process {ascii(sel)[:200]} was not found")
    return proc


def _end_event(proc: Process) -> dict[str, Any]:
    res = proc.result
    if res is None:
        return {"end": {"exitCode": -1, "exited": False, "status": "unknown"}}
    if res.signal:
        name = signal.Signals(res.signal).name[3:].lower() if res.signal < 65 else res.signal
        end: dict[str, Any] = {"exitCode": -1, "exited": False, "status": f"signal: {name}"}
    else:
        end = {"exitCode": res.exit_code, "exited": True, "status": f"exit status {res.exit_code}"}
    notes = []
    if res.exec_error:
        notes.append(res.exec_error)
    if res.truncated:
        notes.append("output cut at the policy's resources.max_output_bytes")
    if res.timed_out:
        notes.append("killed at its timeout")
    if notes:
        end["error"] = "; ".join(notes)
    return {"end": end}


def _next_frames(
    proc: Process, idx: int, key: str, wait: float = 1.0
) -> tuple[list[bytes], int, bool]:
    """Up to MAX_EVENTS_PER_STEP output chunks, already framed (run on a worker
    thread: base64 and JSON of a lot of output must not hold the event loop)."""
    new, nxt, done = proc.events_since(idx, wait)
    if len(new) > MAX_EVENTS_PER_STEP:
        new, nxt, done = new[:MAX_EVENTS_PER_STEP], idx + MAX_EVENTS_PER_STEP, False
    frames = [_envelope({key: {"data": {stream: _b64(data)}}}) for stream, data in new]
    return batched(frames), nxt, done


def batched(parts: list[bytes], cap: int = 1 << 20) -> list[bytes]:
    """``parts`` joined into pieces of about ``cap`` bytes: one send per piece,
    not per message, keeps the event loop's share of a big output small."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for p in parts:
        group.append(p)
        size += len(p)
        if size >= cap:
            out.append(b"".join(group))
            group, size = [], 0
    if group:
        out.append(b"".join(group))
    return out


async def _stream_process(
    proc: Process,
    start_index: int,
    with_start: bool,
    key: str,
    *,
    deadline: float | None = None,
    owns: bool = False,
    gone: Callable[[], str | None] = lambda: None,
) -> AsyncIterator[bytes]:
    """A process's events as Connect frames, then its end.

    ``deadline`` (monotonic; from ``connect-timeout-ms``): past it the stream
    ends with ``deadline_exceeded``, which the SDK raises as a timeout, and a
    process this stream started (``owns``) is killed, as envd's context does.
    ``gone``: why the sandbox is gone, if it is; a sandbox killed or expired
    under the command ends the stream with ``unavailable`` instead of an end
    event, so the SDK probes ``/health``, gets 502 and says the sandbox was
    killed (``SandboxNotRunningException``).  At server shutdown the end event
    stays (docs/service.md, "Stopping")."""
    if with_start:
        yield _envelope({key: {"start": {"pid": proc.pid}}})
    idx = start_index
    last = time.monotonic()
    while True:
        wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        frames, idx, done = await anyio.to_thread.run_sync(_next_frames, proc, idx, key, wait)
        for frame in frames:
            yield frame
            last = time.monotonic()
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            if owns:
                proc.signal(signal.SIGKILL)
            msg = f"the command did not end within its timeout (connect-timeout-ms); pid {proc.pid}"
            yield _envelope({"error": {"code": "deadline_exceeded", "message": msg}}, flags=0x02)
            return
        if time.monotonic() - last > KEEPALIVE_S:
            yield _envelope({key: {"keepalive": {}}})
            last = time.monotonic()
    await anyio.to_thread.run_sync(proc.wait, 5.0)
    why = gone()
    if why is not None and why != "server shutdown":
        msg = f"the sandbox was killed ({why}) before the command ended; pid {proc.pid}"
        yield _envelope({"error": {"code": "unavailable", "message": msg}}, flags=0x02)
        return
    yield _envelope({key: _end_event(proc)})
    yield _envelope({}, flags=0x02)


def _deadline(request: Request) -> float | None:
    """``connect-timeout-ms`` (Connect's per-call timeout) as a monotonic deadline."""
    raw = request.headers.get("connect-timeout-ms")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and 0 < len(raw) <= 10):
        raise RpcError("invalid_argument", "connect-timeout-ms: must be a positive integer")
    ms = int(raw)
    if not 0 < ms <= MAX_CONNECT_TIMEOUT_MS:
        raise RpcError(
            "invalid_argument", f"connect-timeout-ms: must be from 1 to {MAX_CONNECT_TIMEOUT_MS}"
        )
    return time.monotonic() + ms / 1000


_FTYPES = {"f": "FILE_TYPE_FILE", "d": "FILE_TYPE_DIRECTORY", "l": "FILE_TYPE_SYMLINK"}
#: find's record per entry: type, size, mode, mtime, owner, group (name, number),
#: then the path last (a name may hold a tab; never a NUL).
_FIND_FMT = "%y\\t%s\\t%m\\t%T@\\t%u\\t%U\\t%g\\t%G\\t%p\\0"


def _entry_info(path: str, fe: FileEntry | None) -> dict[str, Any]:
    """An entry from the file API's listing (name, type, size only): used when the
    sandbox's ``find`` cannot answer (its output passed the policy's cap)."""
    kind = fe.type if fe else "dir"
    ftype = {
        "file": "FILE_TYPE_FILE",
        "dir": "FILE_TYPE_DIRECTORY",
        "symlink": "FILE_TYPE_SYMLINK",
        "other": "FILE_TYPE_UNSPECIFIED",  # a FIFO, socket or device, as envd says
    }.get(kind, "FILE_TYPE_UNSPECIFIED")
    mode = 0o755 if kind == "dir" else 0o644
    return {
        "name": shown(posixpath.basename(path)) or "/",
        "type": ftype,
        "path": shown(path),
        "size": str(fe.size if fe else 0),
        "mode": mode,
        "permissions": _permissions("d" if kind == "dir" else "-", mode),
        "owner": "user",
        "group": "user",
        "isSymlink": kind == "symlink",
    }


def _permissions(kind: str, mode: int) -> str:
    """``ls -l``'s form, as envd gives it: ``drwxr-xr-x``."""
    bits = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate("rwxrwxrwx"))
    return kind + bits


def _owner(name: str, number: str, inside: int) -> str:
    """The sandbox's own user is E2B's ``user`` (the SDK and its tests expect it)."""
    return "user" if name == "agent" or number == str(inside) else name


def _timestamp(raw: str) -> str:
    """find's ``%T@`` (seconds.fraction) as protobuf JSON's Timestamp (RFC 3339, UTC)."""
    secs, _, frac = raw.partition(".")
    whole = int(secs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac[:9]:0<9}Z"


class _NoFind(Exception):
    """The policy does not let the sandbox run ``find``: use the file API's listing."""


def _find(
    svc: SandboxService, e: Entry, args: list[str], what: str
) -> tuple[list[list[str]], bool]:
    """Run ``find ARGS -printf`` in the sandbox, as its user and through its walls:
    the file's real metadata (mode, owner, mtime) is what the sandbox sees.
    Returns (records, truncated); ``what`` names the path in errors."""
    r = svc.run(e, ["find", *args, "-printf", _FIND_FMT])
    recs = [rec.split("\t", 8) for rec in r.stdout.split("\0") if rec]
    recs = [rec for rec in recs if len(rec) == 9]
    if r.exit_code != 0 and not recs:
        if r.exit_code in (126, 127):
            raise _NoFind
        err = r.stderr.strip()
        if "No such file" in err or "Not a directory" in err:
            raise RpcError("not_found", f"path {what} was not found")
        code = "permission_denied" if "denied" in err else "failed_precondition"
        raise RpcError(code, f"{what}: {err[:300] or 'cannot be read'}")
    return recs, r.truncated


def _infos(
    svc: SandboxService, e: Entry, recs: list[list[str]], asked: str
) -> list[dict[str, Any]]:
    """Entries as envd gives them; a symlink is followed (type, size, mode and
    mtime of its target) and names the target's absolute path in ``symlinkTarget``."""
    links = [rec[8] for rec in recs if rec[0] == "l"]
    followed: dict[str, list[str]] = {}
    targets: dict[str, str] = {}
    if links:
        for rec in _find(svc, e, ["-L", *links, "-maxdepth", "0"], links[0])[0]:
            if rec[0] != "l":  # "l" under -L: a dangling link, kept as a link
                followed[rec[8]] = rec
        r = svc.run(e, ["realpath", "-m", "-z", "--", *links])
        if r.exit_code == 0:
            targets = dict(zip(links, [t for t in r.stdout.split("\0") if t], strict=False))
    out = []
    for rec in recs:
        path = rec[8]
        kind, size, mode, mtime, uname, uid, gname, gid, _ = followed.get(path, rec)
        perm = int(mode, 8) & 0o7777
        info: dict[str, Any] = {
            "name": shown(posixpath.basename(path)) or "/",
            "type": _FTYPES.get(kind, "FILE_TYPE_UNSPECIFIED"),
            "path": shown(shown_as(path, asked)),
            "size": size,
            "mode": perm,
            "permissions": _permissions("-" if kind == "f" else kind, perm),
            "owner": _owner(uname, uid, INSIDE_UID),
            "group": _owner(gname, gid, INSIDE_GID),
            "modifiedTime": _timestamp(mtime),
            "isSymlink": rec[0] == "l",
        }
        if path in targets:
            info["symlinkTarget"] = shown(shown_as(targets[path], asked))
        out.append(info)
    files = [rec[8] for rec in recs if followed.get(rec[8], rec)[0] == "f"]
    by_path = {rec[8]: info for rec, info in zip(recs, out, strict=True)}
    for path, meta in _metadata.read(svc, e, files).items():  # user.e2b.* xattrs
        if path in by_path:
            by_path[path]["metadata"] = meta
    return out


def _stat(svc: SandboxService, e: Entry, path: str, asked: str = "") -> dict[str, Any]:
    try:
        recs, _cut = _find(svc, e, [path, "-maxdepth", "0"], asked or path)
    except _NoFind:
        return _plain_stat(svc, e, path)
    return _infos(svc, e, recs[:1], asked or path)[0]


def _plain_stat(svc: SandboxService, e: Entry, path: str) -> dict[str, Any]:
    if path == "/":
        return _entry_info("/", None)
    parent, name = posixpath.split(path)
    try:
        entries = svc.file_op(e, "list", parent or "/")
    except ApiError as exc:
        if exc.status in (403, 404):
            raise RpcError("not_found", f"path {path} was not found") from None
        raise
    for fe in entries:
        if fe.name == name:
            return _entry_info(path, fe)
    raise RpcError("not_found", f"path {path} was not found")


def _list(
    svc: SandboxService, e: Entry, path: str, depth: int, asked: str = ""
) -> list[dict[str, Any]]:
    """ListDir, ``depth`` levels, in envd's order (lexical, a directory before
    what is in it)."""
    try:
        recs, cut = _find(svc, e, [path, "-mindepth", "1", "-maxdepth", str(depth)], asked or path)
    except _NoFind:
        cut = True
    if cut:  # more than the policy lets a command print: the file API's plain listing
        return _plain_list(svc, e, path, depth)
    recs.sort(key=lambda rec: rec[8].split("/"))
    return _infos(svc, e, recs, asked or path)


def _plain_list(svc: SandboxService, e: Entry, path: str, depth: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for fe in svc.file_op(e, "list", path):
        child = posixpath.join(path, fe.name)
        out.append(_entry_info(child, fe))
        if fe.type == "dir" and depth > 1:
            out += _plain_list(svc, e, child, depth - 1)
    return out


def _unary_call(svc: SandboxService, e: Entry, method: str, msg: dict[str, Any]) -> dict[str, Any]:
    if method == "process.Process/List":
        with e.lock:
            procs = [(pid, p, e.tags.get(pid)) for pid, p in e.procs.items()]
        items = []
        for pid, p, tag in procs:
            argv = list(p.req.argv) if hasattr(p, "req") else []
            info: dict[str, Any] = {
                "pid": pid,
                "config": {"cmd": argv[0] if argv else "", "args": argv[1:], "envs": {}},
            }
            if tag:
                info["tag"] = tag
            items.append(info)
        return {"processes": items}
    if method == "process.Process/SendInput":
        proc = _selector(msg, e)
        inp = _obj(msg, "input")
        if "pty" in inp:
            _pty.send_input(proc, inp["pty"])
            return {}
        try:
            data = base64.b64decode(_str(inp, "stdin", "input."), validate=True)
        except ValueError:
            raise RpcError("invalid_argument", "input.stdin: must be base64") from None
        try:
            proc.write_stdin(data)
        except OSError as exc:
            raise RpcError("failed_precondition", f"stdin: {exc}") from None
        return {}
    if method == "process.Process/SendSignal":
        proc = _selector(msg, e)
        sig = msg.get("signal")
        num = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, 9: 9, 15: 15}.get(
            sig if isinstance(sig, str | int) and not isinstance(sig, bool) else "", 0
        )
        if num not in (9, 15):
            raise RpcError("invalid_argument", f"unsupported signal {ascii(sig)[:60]}")
        proc.signal(num)
        return {}
    if method == "process.Process/Update":
        return _pty.update(_selector(msg, e), msg)
    if method == "process.Process/CloseStdin":
        _selector(msg, e).close_stdin()
        return {}
    if method == "filesystem.Filesystem/Stat":
        asked = client_path(msg.get("path", ""))
        return {"entry": _stat(svc, e, resolve(asked), asked)}
    if method == "filesystem.Filesystem/ListDir":
        asked = client_path(msg.get("path", ""))
        depth = max(1, _int(msg, "depth", 0, MAX_LIST_DEPTH, 1))
        try:
            return {"entries": _list(svc, e, resolve(asked), depth, asked)}
        except ApiError as exc:
            if exc.status == 404:
                raise RpcError("not_found", exc.message) from None
            raise
    if method == "filesystem.Filesystem/MakeDir":
        asked = client_path(msg.get("path", ""))
        path = resolve(asked)
        try:
            _plain_stat(svc, e, path)
        except RpcError:
            svc.file_op(e, "make_dir", path)
            return {"entry": _stat(svc, e, path, asked)}
        raise RpcError("already_exists", f"path {asked} already exists")
    if method == "filesystem.Filesystem/Remove":
        path = resolve(msg.get("path", ""))
        try:
            svc.file_op(e, "remove", path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            # envd: removing what is not there is done, not an error
        return {}
    if method == "filesystem.Filesystem/Move":
        asked = client_path(msg.get("destination", ""), "destination")
        src = resolve(msg.get("source", ""), "source")
        dst = resolve(asked, "destination")
        r = svc.run(e, ["mv", "-T", "--", src, dst])
        if r.exit_code != 0:
            raise RpcError(
                "permission_denied"
                if "denied" in r.stderr or "Read-only" in r.stderr
                else "not_found",
                r.stderr.strip() or f"move {src}: failed",
            )
        return {"entry": _stat(svc, e, dst, asked)}
    if method.endswith("Watcher") or method.endswith("WatcherEvents"):
        from . import _watch  # _watch builds on this module

        if method in _watch.UNARY:
            return _watch.unary(svc, e, method, msg)
    raise RpcError("unimplemented", f"{method} is not implemented by glassroom")


async def rpc(request: Request) -> Response:
    """``POST /{service}/{method}``: Connect protocol, JSON codec."""
    svc: SandboxService = request.app.state.service
    method = request.url.path.lstrip("/")
    streaming = method in CONNECT_STREAMING
    try:
        e = entry_for(svc, request)
    except ApiError as exc:
        if exc.status == 502:
            return api_error_response(exc)
        err = _rpc_from(exc)
        return _stream_error(err) if streaming else _unary_error(err)
    body = await request.body()
    try:
        msg = _message(request, body, streaming)
        if streaming:
            return await _start_stream(svc, e, method, msg, _deadline(request))
        out = await anyio.to_thread.run_sync(_unary_call, svc, e, method, msg)
        if method in ("filesystem.Filesystem/MakeDir", "filesystem.Filesystem/Remove",
                      "filesystem.Filesystem/Move"):  # fmt: skip
            _watched(svc, request)
        # ensure_ascii: a name from the sandbox may hold anything; escaped, it is still JSON
        return Response(json.dumps(out).encode(), media_type="application/json")
    except ApiError as exc:
        if exc.status == 404 and "sandbox" in exc.message and "was not found" in exc.message:
            return api_error_response(ApiError(502, "not_found", exc.message))
        if exc.rule == "snapshot.state" and exc.status == 409:
            return api_error_response(exc)  # paused meanwhile: E2B's 502
        err = _rpc_from(exc)
    except GlassroomError as exc:
        err = _rpc_from(translate(exc))
    except RpcError as exc:
        err = exc
    except (ValueError, TypeError, KeyError) as exc:
        err = RpcError("invalid_argument", f"bad request: {exc}")
    return _stream_error(err) if streaming else _unary_error(err)


async def _start_stream(
    svc: SandboxService, e: Entry, method: str, msg: dict[str, Any], deadline: float | None
) -> Response:
    def gone() -> str | None:
        return svc.gone_reason(e.id)

    if method == "filesystem.Filesystem/WatchDir":
        from . import _watch  # _watch builds on this module

        return await _watch.stream(svc, e, msg, deadline)
    if method == "process.Process/Connect":
        proc = await anyio.to_thread.run_sync(_selector, msg, e)
        idx = len(getattr(proc, "events", []))
        gen = _stream_process(proc, idx, True, "event", deadline=deadline, gone=gone)
    else:
        pty = _pty.pty_size(msg)
        cfg = _obj(msg, "process")
        cmd = _str(cfg, "cmd", "process.")
        if not cmd or "\0" in cmd:
            raise RpcError("invalid_argument", "process.cmd: a command without NUL is required")
        args = cfg.get("args") or []
        if not isinstance(args, list) or not all(
            isinstance(a, str) and "\0" not in a for a in args
        ):
            raise RpcError("invalid_argument", "process.args: must be a list of strings")
        argv = [cmd, *args]
        envs = check_mapping(cfg.get("envs"), "process.envs", env=True)
        # E2B's default workdir and HOME are /home/user (a link to /workspace): the
        # process starts in the real directory, and PWD tells the shell its E2B name.
        asked = client_path(cfg["cwd"], "process.cwd") if cfg.get("cwd") else HOME
        cwd = resolve(asked, "process.cwd")
        envs = {**({} if "HOME" in e.env else {"HOME": HOME}), "PWD": asked, **envs}
        tag = _str(msg, "tag") or None
        proc = await anyio.to_thread.run_sync(
            lambda: svc.spawn(e, argv, cwd=cwd, env=envs, tag=tag, pty=pty)
        )
        if not msg.get("stdin") and pty is None:  # a terminal is typed into while it runs
            proc.close_stdin()
        from . import _watch  # _watch builds on this module

        # what a command changed is seen when it ends, not at the watchers' next poll
        proc.on_exit(lambda _res: _watch.touched(svc, e))
        gen = _stream_process(proc, 0, True, "event", deadline=deadline, owns=True, gone=gone)
    return StreamingResponse(gen, media_type="application/connect+json")
