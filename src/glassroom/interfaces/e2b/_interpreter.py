"""The code interpreter (``E2b-Sandbox-Port: 49999``): ``/execute`` and ``/contexts``.

A context is one persistent Python process inside the sandbox (``_kernel.py``
run by the sandbox's own ``python3``, under all of its walls), so state is
kept across ``run_code`` calls.  ``/execute`` streams NDJSON events:
``stdout``, ``stderr``, ``result``, ``error``, ``number_of_executions``,
``end_of_execution``.  Executions in one context run one at a time.
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...backends.base import Process
from ..http._service import ApiError, Entry, SandboxService
from ._envd import WORKSPACE, api_error_response, entry_for, resolve

KERNEL_SRC = (Path(__file__).with_name("_kernel.py")).read_text()
LANGUAGES = ("python",)


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    proc: Process
    nonce: str
    index: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    pending: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


def _contexts(e: Entry) -> dict[str, Context]:
    ctxs: dict[str, Context] = e.extra.setdefault("contexts", {})
    return ctxs


def _new_context(
    svc: SandboxService, e: Entry, language: str, cwd: str, cid: str | None = None
) -> Context:
    if language not in LANGUAGES:
        raise ApiError(
            400,
            "invalid",
            f"language {language!r} is not supported (supported: {', '.join(LANGUAGES)})",
        )
    nonce = secrets.token_hex(8)
    proc = svc.spawn(e, ["python3", "-u", "-I", "-c", KERNEL_SRC, nonce], cwd=cwd)
    if proc.result is not None:
        raise ApiError(
            400,
            "forbidden",
            "the code interpreter's python3 cannot run: "
            + proc.result.stderr.decode(errors="replace").strip(),
            rule="tools.allow",
        )
    ctx = Context(
        id=cid or secrets.token_hex(8), language=language, cwd=cwd, proc=proc, nonce=nonce
    )
    with e.lock:
        _contexts(e)[ctx.id] = ctx
    return ctx


def _default(svc: SandboxService, e: Entry, language: str) -> Context:
    cid = f"default-{language}"
    with e.lock:
        ctx = _contexts(e).get(cid)
    if ctx is not None and ctx.proc.result is None:
        return ctx
    return _new_context(svc, e, language, WORKSPACE, cid)


def _ts() -> int:
    return time.time_ns()


async def execute(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "invalid", "body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            raise ApiError(400, "invalid", "code is required")
        cid = body.get("context_id")
        language = body.get("language") or "python"
        if cid:
            with e.lock:
                ctx = _contexts(e).get(str(cid))
            if ctx is None:
                raise ApiError(404, "not_found", f"context {cid} was not found")
        else:
            ctx = await anyio.to_thread.run_sync(_default, svc, e, str(language))
        env = body.get("env_vars") or {}
    except ApiError as exc:
        return api_error_response(exc)
    req = json.dumps({"code": body["code"], "env": env}) + "\n"
    return StreamingResponse(_run(ctx, req), media_type="application/x-ndjson")


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


async def _run(ctx: Context, req: str) -> AsyncIterator[bytes]:
    prefix = "\x1e" + ctx.nonce
    async with ctx.lock:
        if ctx.proc.result is not None:
            yield _line(
                {
                    "type": "error",
                    "name": "KernelDied",
                    "value": "the context's kernel has exited; create a new context",
                    "traceback": "",
                }
            )
            yield _line({"type": "end_of_execution"})
            return
        try:
            await anyio.to_thread.run_sync(ctx.proc.write_stdin, req.encode())
        except OSError as exc:
            yield _line({"type": "error", "name": "KernelDied", "value": str(exc), "traceback": ""})
            yield _line({"type": "end_of_execution"})
            return
        finished = False
        try:
            while not finished:
                new, ctx.index, done = await anyio.to_thread.run_sync(
                    ctx.proc.events_since, ctx.index, 1.0
                )
                for stream, data in new:
                    text = data.decode(errors="replace")
                    if stream == "stderr":
                        yield _line({"type": "stderr", "text": text, "timestamp": _ts()})
                        continue
                    ctx.pending += text
                    while "\n" in ctx.pending:
                        line, ctx.pending = ctx.pending.split("\n", 1)
                        if not line.startswith(prefix):
                            yield _line({"type": "stdout", "text": line + "\n", "timestamp": _ts()})
                            continue
                        try:
                            frame = json.loads(line[len(prefix) :])
                        except ValueError:
                            continue
                        kind = frame.pop("type", "")
                        if kind in ("stdout", "stderr"):
                            yield _line(
                                {
                                    "type": kind,
                                    "text": str(frame.get("text", "")),
                                    "timestamp": _ts(),
                                }
                            )
                        elif kind == "result":
                            yield _line(
                                {
                                    "type": "result",
                                    "text": str(frame.get("text", "")),
                                    "is_main_result": True,
                                }
                            )
                        elif kind == "error":
                            yield _line(
                                {
                                    "type": "error",
                                    "name": str(frame.get("name", "")),
                                    "value": str(frame.get("value", "")),
                                    "traceback": str(frame.get("traceback", "")),
                                }
                            )
                        elif kind == "end":
                            yield _line(
                                {
                                    "type": "number_of_executions",
                                    "execution_count": int(frame.get("execution_count", 0)),
                                }
                            )
                            finished = True
                if done and not finished:
                    res = ctx.proc.result
                    why = "the kernel exited"
                    if res is not None and res.truncated:
                        why += " (output cap: resources.max_output_bytes)"
                    elif res is not None and res.signal:
                        why += f" (signal {res.signal})"
                    yield _line(
                        {"type": "error", "name": "KernelDied", "value": why, "traceback": ""}
                    )
                    finished = True
        finally:
            if not finished:  # the client went away mid-cell: interrupt it
                ctx.proc.signal(int(signal.SIGINT))
        yield _line({"type": "end_of_execution"})


async def create_context(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
        try:
            body = await request.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        language = str(body.get("language") or "python")
        cwd = resolve(str(body.get("cwd") or WORKSPACE))
        ctx = await anyio.to_thread.run_sync(_new_context, svc, e, language, cwd)
    except ApiError as exc:
        return api_error_response(exc)
    return JSONResponse(ctx.as_dict())


async def list_contexts(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
    except ApiError as exc:
        return api_error_response(exc)
    with e.lock:
        items = [c.as_dict() for c in _contexts(e).values() if c.proc.result is None]
    return JSONResponse(items)


async def delete_context(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
        with e.lock:
            ctx = _contexts(e).pop(request.path_params["context_id"], None)
        if ctx is None:
            raise ApiError(404, "not_found", "context was not found")
    except ApiError as exc:
        return api_error_response(exc)
    ctx.proc.signal(int(signal.SIGKILL))
    return Response(status_code=204)


async def restart_context(request: Request) -> Response:
    svc: SandboxService = request.app.state.service
    try:
        e = entry_for(svc, request)
        cid = request.path_params["context_id"]
        with e.lock:
            old = _contexts(e).get(cid)
        if old is None:
            raise ApiError(404, "not_found", f"context {cid} was not found")
        old.proc.signal(int(signal.SIGKILL))
        await anyio.to_thread.run_sync(_new_context, svc, e, old.language, old.cwd, cid)
    except ApiError as exc:
        return api_error_response(exc)
    return Response(status_code=204)
