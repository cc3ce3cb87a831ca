"""envd, E2B's in-sandbox daemon, answered by the server on the sandbox's behalf.

With ``E2B_SANDBOX_URL`` set, the E2B SDKs send every envd call to that one
URL, naming the sandbox in ``E2b-Sandbox-Id`` and the service in
``E2b-Sandbox-Port`` (49983 envd, 49999 code interpreter) and carrying the
sandbox's ``X-Access-Token`` (given out at create).  Here:

* ``GET /health``; ``GET``/``POST /files`` (multipart and octet-stream);
* Connect RPC with the JSON codec for ``process.Process`` (Start, Connect:
  server-streaming with the 5-byte envelope; List, SendInput, SendSignal,
  CloseStdin: unary) and ``filesystem.Filesystem`` (Stat, ListDir, MakeDir,
  Move, Remove).  Message shapes follow e2b-dev/infra
  ``packages/envd/spec/{process,filesystem}``.

A sandbox that was killed or expired answers 502 "The sandbox … was not
found", which the SDK turns into ``SandboxNotRunningException``.
"""

from __future__ import annotations

import base64
import json
import posixpath
import signal
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..._errors import GlassroomError
from ...backends.base import FileEntry, Process
from ..http._service import ApiError, Entry, SandboxService, translate

ENVD_PORT = 49983
JUPYTER_PORT = 49999
KEEPALIVE_S = 20.0
WORKSPACE = "/workspace"

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


def resolve(path: str) -> str:
    """E2B paths are relative to the user's home; the sandbox's home is /workspace."""
    if path in ("", "~"):
        return WORKSPACE
    if path.startswith("~/"):
        path = WORKSPACE + path[1:]
    if not path.startswith("/"):
        path = WORKSPACE + "/" + path
    return posixpath.normpath(path)


def api_error_response(exc: ApiError) -> JSONResponse:
    """envd-style error: ``{"code": status, "message": ...}`` (plain HTTP)."""
    msg = exc.message + (f" (rule {exc.rule})" if exc.rule else "")
    return JSONResponse({"code": exc.status, "message": msg}, status_code=exc.status)


# -- files over HTTP ------------------------------------------------------------


async def health(_request: Request) -> Response:
    return Response(status_code=204)


async def get_file(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
        path = resolve(request.query_params.get("path", ""))
        data = await anyio.to_thread.run_sync(svc.file_op, e, "read", path)
    except ApiError as exc:
        return api_error_response(exc)
    return Response(data, media_type="application/octet-stream")


async def post_file(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
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
                items.append((resolve(name), await up.read()))
        else:
            if not param:
                raise ApiError(400, "invalid", "missing path")
            body = await request.body()
            if request.headers.get("content-encoding") == "gzip":
                import gzip

                body = gzip.decompress(body)
            items.append((resolve(param), body))
        out = []
        for path, data in items:
            await anyio.to_thread.run_sync(svc.file_op, e, "write", path, data)
            out.append({"name": posixpath.basename(path), "type": "file", "path": path})
    except ApiError as exc:
        return api_error_response(exc)
    return JSONResponse(out)


# -- Connect RPC -------------------------------------------------------------------


def _envelope(payload: dict[str, Any], flags: int = 0) -> bytes:
    raw = json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(raw)) + raw


def _unenvelope(body: bytes) -> dict[str, Any]:
    if len(body) < 5:
        raise RpcError("invalid_argument", "missing message envelope")
    flags, n = struct.unpack(">BI", body[:5])
    if flags & 0x01:
        raise RpcError("unimplemented", "compressed messages are not supported")
    msg = json.loads(body[5 : 5 + n] or b"{}")
    if not isinstance(msg, dict):
        raise RpcError("invalid_argument", "message is not an object")
    return msg


def _unary_error(err: RpcError) -> JSONResponse:
    return JSONResponse(
        {"code": err.code, "message": err.message}, status_code=_CODE_STATUS.get(err.code, 400)
    )


def _stream_error(err: RpcError) -> Response:
    body = _envelope({"error": {"code": err.code, "message": err.message}}, flags=0x02)
    return Response(body, media_type="application/connect+json")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _selector(msg: dict[str, Any], e: Entry) -> Process:
    sel = msg.get("process") or {}
    with e.lock:
        if "pid" in sel:
            proc = e.procs.get(int(sel["pid"]))
        elif "tag" in sel:
            pid = next((p for p, t in e.tags.items() if t == sel["tag"]), None)
            proc = e.procs.get(pid) if pid is not None else None
        else:
            raise RpcError("invalid_argument", "process selector needs pid or tag")
    if proc is None:
        raise RpcError("not_found", f"process {sel} was not found")
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


async def _stream_process(
    proc: Process, start_index: int, with_start: bool, key: str
) -> AsyncIterator[bytes]:
    if with_start:
        yield _envelope({key: {"start": {"pid": proc.pid}}})
    idx = start_index
    last = time.monotonic()
    while True:
        new, idx, done = await anyio.to_thread.run_sync(proc.events_since, idx, 1.0)
        for stream, data in new:
            yield _envelope({key: {"data": {stream: _b64(data)}}})
            last = time.monotonic()
        if done:
            break
        if time.monotonic() - last > KEEPALIVE_S:
            yield _envelope({key: {"keepalive": {}}})
            last = time.monotonic()
    await anyio.to_thread.run_sync(proc.wait, 5.0)
    yield _envelope({key: _end_event(proc)})
    yield _envelope({}, flags=0x02)


def _entry_info(path: str, fe: FileEntry | None) -> dict[str, Any]:
    kind = fe.type if fe else "dir"
    ftype = {
        "file": "FILE_TYPE_FILE",
        "dir": "FILE_TYPE_DIRECTORY",
        "symlink": "FILE_TYPE_SYMLINK",
    }.get(kind, "FILE_TYPE_UNSPECIFIED")
    mode = 0o755 if kind == "dir" else 0o644
    perms = ("d" if kind == "dir" else "-") + ("rwxr-xr-x" if kind == "dir" else "rw-r--r--")
    return {
        "name": posixpath.basename(path) or "/",
        "type": ftype,
        "path": path,
        "size": str(fe.size if fe else 0),
        "mode": mode,
        "permissions": perms,
        "owner": "user",
        "group": "user",
        "modifiedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "isSymlink": kind == "symlink",
    }


def _stat(svc: SandboxService, e: Entry, path: str) -> dict[str, Any]:
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


def _list(svc: SandboxService, e: Entry, path: str, depth: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for fe in svc.file_op(e, "list", path):
        child = posixpath.join(path, fe.name)
        out.append(_entry_info(child, fe))
        if fe.type == "dir" and depth > 1:
            out += _list(svc, e, child, depth - 1)
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
        data = base64.b64decode((msg.get("input") or {}).get("stdin", "") or "")
        try:
            proc.write_stdin(data)
        except OSError as exc:
            raise RpcError("failed_precondition", f"stdin: {exc}") from None
        return {}
    if method == "process.Process/SendSignal":
        proc = _selector(msg, e)
        sig = msg.get("signal")
        num = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15}.get(str(sig), sig)
        if num not in (9, 15):
            raise RpcError("invalid_argument", f"unsupported signal {sig!r}")
        proc.signal(int(num))
        return {}
    if method == "process.Process/CloseStdin":
        _selector(msg, e).close_stdin()
        return {}
    if method == "filesystem.Filesystem/Stat":
        return {"entry": _stat(svc, e, resolve(str(msg.get("path", ""))))}
    if method == "filesystem.Filesystem/ListDir":
        path = resolve(str(msg.get("path", "")))
        try:
            return {"entries": _list(svc, e, path, max(1, int(msg.get("depth") or 1)))}
        except ApiError as exc:
            if exc.status == 404:
                raise RpcError("not_found", exc.message) from None
            raise
    if method == "filesystem.Filesystem/MakeDir":
        path = resolve(str(msg.get("path", "")))
        try:
            _stat(svc, e, path)
        except RpcError:
            svc.file_op(e, "make_dir", path)
            return {"entry": _entry_info(path, None)}
        raise RpcError("already_exists", f"path {path} already exists")
    if method == "filesystem.Filesystem/Remove":
        path = resolve(str(msg.get("path", "")))
        svc.file_op(e, "remove", path)
        return {}
    if method == "filesystem.Filesystem/Move":
        src = resolve(str(msg.get("source", "")))
        dst = resolve(str(msg.get("destination", "")))
        r = svc.run(e, ["mv", "-T", "--", src, dst])
        if r.exit_code != 0:
            raise RpcError(
                "permission_denied"
                if "denied" in r.stderr or "Read-only" in r.stderr
                else "not_found",
                r.stderr.strip() or f"move {src}: failed",
            )
        return {"entry": _stat(svc, e, dst)}
    raise RpcError("unimplemented", f"{method} is not implemented by glassroom")


async def rpc(request: Request) -> Response:
    """``POST /{service}/{method}``: Connect protocol, JSON codec."""
    svc: SandboxService = request.app.state.service
    method = request.url.path.lstrip("/")
    streaming = method in ("process.Process/Start", "process.Process/Connect")
    try:
        e = entry_for(svc, request)
    except ApiError as exc:
        if exc.status == 502:
            return api_error_response(exc)
        err = _rpc_from(exc)
        return _stream_error(err) if streaming else _unary_error(err)
    body = await request.body()
    try:
        if streaming:
            msg = _unenvelope(body)
            return await _start_stream(svc, e, method, msg)
        try:
            msg = json.loads(body or b"{}")
        except ValueError:
            raise RpcError("invalid_argument", "request body is not JSON") from None
        if not isinstance(msg, dict):
            raise RpcError("invalid_argument", "request is not an object")
        out = await anyio.to_thread.run_sync(_unary_call, svc, e, method, msg)
        return JSONResponse(out)
    except ApiError as exc:
        if exc.status == 404 and "sandbox" in exc.message and "was not found" in exc.message:
            return api_error_response(ApiError(502, "not_found", exc.message))
        err = _rpc_from(exc)
    except GlassroomError as exc:
        err = _rpc_from(translate(exc))
    except RpcError as exc:
        err = exc
    except (ValueError, TypeError, KeyError) as exc:
        err = RpcError("invalid_argument", f"bad request: {exc}")
    return _stream_error(err) if streaming else _unary_error(err)


async def _start_stream(
    svc: SandboxService, e: Entry, method: str, msg: dict[str, Any]
) -> Response:
    if method == "process.Process/Connect":
        proc = await anyio.to_thread.run_sync(_selector, msg, e)
        idx = len(getattr(proc, "events", []))
        gen = _stream_process(proc, idx, True, "event")
    else:
        if msg.get("pty"):
            raise RpcError("unimplemented", "pty is not supported by glassroom")
        cfg = msg.get("process") or {}
        cmd = str(cfg.get("cmd", ""))
        if not cmd:
            raise RpcError("invalid_argument", "process.cmd is required")
        argv = [cmd, *[str(a) for a in cfg.get("args") or []]]
        envs = {str(k): str(v) for k, v in (cfg.get("envs") or {}).items()}
        cwd = resolve(str(cfg["cwd"])) if cfg.get("cwd") else None
        tag = msg.get("tag")
        proc = await anyio.to_thread.run_sync(
            lambda: svc.spawn(e, argv, cwd=cwd, env=envs, tag=tag)
        )
        if not msg.get("stdin"):
            proc.close_stdin()
        gen = _stream_process(proc, 0, True, "event")
    return StreamingResponse(gen, media_type="application/connect+json")
