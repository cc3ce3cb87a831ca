"""The code interpreter (``E2b-Sandbox-Port: 49999``): ``/execute`` and ``/contexts``.

A context is one persistent Python process inside the sandbox (``_kernel.py``
run by the sandbox's own ``python3``, under all of its walls), so state is
kept across ``run_code`` calls.  ``/execute`` streams NDJSON events:
``stdout``, ``stderr``, ``result``, ``error``, ``number_of_executions``,
``end_of_execution``.  Executions in one context run one at a time.
"""

from __future__ import annotations

import codecs
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
from ..http._edge import read_json
from ..http._service import ApiError, Entry, SandboxService, check_mapping
from ._envd import WORKSPACE, api_error_response, batched, entry_for, resolve

KERNEL_SRC = (Path(__file__).with_name("_kernel.py")).read_text()
LANGUAGES = ("python",)
#: A kernel stdout line longer than this is output, never a frame (the kernel
#: cuts its own frames far below it; see _kernel.py).  It bounds what one
#: context holds besides the process's own output buffer.
MAX_FRAME_BYTES = 4 << 20
#: A partial line of plain output is sent on once this much is waiting.
FLUSH_BYTES = 64 * 1024
MAX_EVENTS_PER_STEP = 256
#: The display formats a ``result`` may carry besides text (the kernel's FORMATS).
RESULT_FORMATS = frozenset({"html", "markdown", "svg", "png", "jpeg", "latex"})


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    proc: Process
    nonce: str
    index: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    reader: _Reader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = _Reader(self.nonce)

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
            f"language {ascii(language)[:60]} is not supported (supported: {', '.join(LANGUAGES)})",
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
        body = await read_json(request)  # strict: no NaN/Infinity, surrogates, deep nesting
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            raise ApiError(400, "invalid", "code: a string is required")
        cid = body.get("context_id")
        language = body.get("language") or "python"
        if not isinstance(cid, str | None) or not isinstance(language, str):
            raise ApiError(400, "invalid", "context_id and language must be strings")
        env = check_mapping(body.get("env_vars"), "env_vars", env=True)
        if cid:
            with e.lock:
                ctx = _contexts(e).get(cid)
            if ctx is None:
                raise ApiError(404, "not_found", f"context {ascii(cid)[:80]} was not found")
        else:
            ctx = await anyio.to_thread.run_sync(_default, svc, e, language)
    except ApiError as exc:
        return api_error_response(exc)
    req = json.dumps({"code": body["code"], "env": env}) + "\n"
    return StreamingResponse(_run(ctx, req), media_type="application/x-ndjson")


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _clean(text: str) -> str:
    """Text from the kernel as valid Unicode (a lone surrogate becomes ``?``)."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


class _Reader:
    """The kernel's output -> ``/execute`` events.  Everything from the sandbox
    is untrusted: its code can print lines that look like frames (the nonce is
    in the kernel's argv, readable from inside).  So a line is a frame only if
    it parses and matches a frame's schema exactly; anything else, including a
    line longer than MAX_FRAME_BYTES, is plain stdout.  Memory is bounded by
    MAX_FRAME_BYTES, and the work is linear in the output (it runs on a worker
    thread, never on the event loop)."""

    def __init__(self, nonce: str) -> None:
        self.prefix = ("\x1e" + nonce).encode()
        self.pending = bytearray()
        self.out = codecs.getincrementaldecoder("utf-8")("replace")
        self.err = codecs.getincrementaldecoder("utf-8")("replace")
        self.finished = False

    def feed(self, stream: str, data: bytes) -> list[bytes]:
        if stream == "stderr":
            text = self.err.decode(data)
            return [_line({"type": "stderr", "text": text, "timestamp": _ts()})] if text else []
        events: list[bytes] = []
        if b"\n" not in data:
            self.pending += data
        else:
            parts = data.split(b"\n")
            lines = [bytes(self.pending) + parts[0], *parts[1:-1]]
            self.pending = bytearray(parts[-1])
            for line in lines:
                events += self._line(line)
        if len(self.pending) > FLUSH_BYTES:
            # A partial line goes out as output now, in bounded pieces, except
            # what may still be a frame: from the last prefix on (raw writes to
            # fd 1 without a newline are followed by the kernel's next frame on
            # the same line), unless that is too long to be one.
            at = self.pending.rfind(self.prefix)
            if at < 0 or len(self.pending) - at > MAX_FRAME_BYTES:
                at = len(self.pending) - len(self.prefix) + 1
            if at > 0:
                events += self._stdout(bytes(self.pending[:at]), final=False)
                del self.pending[:at]
        return events

    def flush(self) -> list[bytes]:
        """What is left when the kernel exits."""
        events = self._stdout(bytes(self.pending), final=True)
        self.pending.clear()
        return events

    def _stdout(self, raw: bytes, *, final: bool) -> list[bytes]:
        text = self.out.decode(raw, final=final)
        return [_line({"type": "stdout", "text": text, "timestamp": _ts()})] if text else []

    def _line(self, line: bytes) -> list[bytes]:
        # A frame may follow output that had no newline: look for the last prefix.
        at = line.rfind(self.prefix)
        if at >= 0:
            event = self._frame(line[at + len(self.prefix) :])
            if event is not None:
                return [*self._stdout(line[:at], final=False), event]
        return self._stdout(line + b"\n", final=False)

    def _frame(self, raw: bytes) -> bytes | None:
        """The event of a well-formed frame, or None (then the line is output)."""
        try:
            f = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(f, dict):
            return None
        kind = f.get("type")
        texts = {k: f.get(k, "") for k in ("text", "name", "value", "traceback")}
        if not all(isinstance(v, str) for v in texts.values()):
            return None
        t = {k: _clean(v) for k, v in texts.items()}
        if kind in ("stdout", "stderr"):
            return _line({"type": kind, "text": t["text"], "timestamp": _ts()})
        if kind == "result":
            return self._result(f, t["text"])
        if kind == "error":
            return _line(
                {
                    "type": "error",
                    "name": t["name"],
                    "value": t["value"],
                    "traceback": t["traceback"],
                }
            )
        count = f.get("execution_count")
        if kind == "end" and type(count) is int and 0 <= count < 2**53:
            self.finished = True
            return _line({"type": "number_of_executions", "execution_count": count})
        return None

    @staticmethod
    def _result(f: dict[str, Any], text: str) -> bytes | None:
        """A ``result`` event: its text, and the display formats the kernel
        made (``formats``: png/jpeg base64, html, svg, ... as E2B's Result has
        them), each a string; ``is_main_result`` false for ``display()``."""
        rich = f.get("formats", {})
        main = f.get("is_main_result", True)
        if not isinstance(rich, dict) or type(main) is not bool:
            return None
        if not all(k in RESULT_FORMATS and isinstance(v, str) for k, v in rich.items()):
            return None
        event: dict[str, Any] = {"type": "result", "text": text}
        event.update({k: _clean(v) for k, v in rich.items()})
        event["is_main_result"] = main
        return _line(event)

    def step(self, proc: Process, index: int) -> tuple[list[bytes], int, bool]:
        """Read and translate up to MAX_EVENTS_PER_STEP chunks (on a worker thread)."""
        new, nxt, done = proc.events_since(index, 1.0)
        if len(new) > MAX_EVENTS_PER_STEP:
            new, nxt, done = new[:MAX_EVENTS_PER_STEP], index + MAX_EVENTS_PER_STEP, False
        events: list[bytes] = []
        for stream, data in new:
            events += self.feed(stream, data)
        if done and not self.finished:
            events += self.flush()
        return batched(events), nxt, done


async def _run(ctx: Context, req: str) -> AsyncIterator[bytes]:
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
        reader = ctx.reader
        reader.finished = False
        finished = False
        try:
            while not finished:
                events, ctx.index, done = await anyio.to_thread.run_sync(
                    reader.step, ctx.proc, ctx.index
                )
                for event in events:
                    yield event
                finished = reader.finished
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
        body = await read_json(request) if await request.body() else {}
        if not isinstance(body, dict):
            raise ApiError(400, "invalid", "the body must be a JSON object")
        language = body.get("language") or "python"
        if not isinstance(language, str):
            raise ApiError(400, "invalid", "language: must be a string")
        cwd = resolve(body.get("cwd") or WORKSPACE, "cwd")
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
