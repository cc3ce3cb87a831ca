"""The ASGI app of ``glassroom serve``: the own API under ``/v1`` plus the
E2B-compatible endpoints (control plane, envd, code interpreter).

Every error is JSON in its API family's envelope (the own API's is
``{"error": {"code", "message", "rule"}}``; ``_edge`` lists all five), for
every path: handlers, FastAPI's validation and Starlette's own 404/405.  Bad
input is always a 4xx, checked at the edge (``_edge.Edge``) before a handler
runs.  The OpenAPI spec of the own API is generated from the same pydantic
models (:func:`openapi_spec`) and checked in as ``docs/openapi.json``.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ..._errors import GlassroomError
from ...backends.base import Process
from ._config import ServeConfig, Tenant
from ._edge import HTTP_CODES, Edge, Family, error_payload, is_streaming, scope_family, shown
from ._models import (
    Approval,
    AuditRecord,
    AuditVerify,
    CommandResult,
    CreateSandbox,
    CreateSnapshot,
    Decide,
    ErrorResponse,
    FileEntryModel,
    FileWritten,
    ForkSandbox,
    Health,
    PauseSandbox,
    PolicyView,
    ReceiptModel,
    ResumeSandbox,
    RunCommand,
    SandboxInfo,
    SetTimeout,
    SnapshotModel,
    Usage,
)
from ._ports import PortRelay
from ._service import FILE_HEADERS, ApiError, Entry, SandboxService, snapshot_model, translate

log = logging.getLogger("glassroom.serve")
#: The interpreter's GIL switch interval while serving (see create_app).
GIL_SWITCH_INTERVAL_S = 0.001

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429)
}
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)
_PATH_Q = Query(min_length=1, max_length=4096, description="a path in the sandbox's view")


# The dependencies are ``async def`` on purpose: they only look things up in
# memory, and FastAPI runs a plain ``def`` dependency on a worker thread, so
# every request paid two extra thread handoffs (and their GIL switches) for
# two dictionary lookups before its handler even started.
async def _svc(request: Request) -> SandboxService:
    svc: SandboxService = request.app.state.service
    return svc


async def tenant_dep(
    request: Request,
    key: Annotated[str | None, Depends(_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Tenant:
    svc: SandboxService = request.app.state.service
    given = key or (bearer.credentials if bearer else None)
    if given is None:
        # The console's session cookie (checked for CSRF there).  Only here:
        # the port relay authenticates on its own and never looks at cookies.
        from ..console import session_tenant

        found = session_tenant(request, svc)
        if found is not None:
            return found
    return svc.authenticate(given)


TenantDep = Annotated[Tenant, Depends(tenant_dep)]
ServiceDep = Annotated[SandboxService, Depends(_svc)]


def _argv(cmd: RunCommand) -> list[str]:
    if cmd.argv:
        return list(cmd.argv)
    if cmd.command is not None:
        return ["sh", "-c", cmd.command]
    raise ApiError(422, "invalid", "give argv or command")


P = ParamSpec("P")
T = TypeVar("T")


def _in_thread(fn: Callable[P, T]) -> Callable[P, Awaitable[T]]:
    """A blocking handler as an ``async def`` that runs it on a worker thread.

    FastAPI runs a plain ``def`` handler on a worker thread and then, because
    the handler was not a coroutine, checks its return value against the
    response model on *another* worker-thread trip: two handoffs, and their GIL
    switches, per request.  Wrapped, the handler makes one trip and the check
    and the JSON encoding (pydantic's, in Rust, microseconds) run on the loop.
    FastAPI reads the parameters through ``functools.wraps``' ``__wrapped__``,
    so the signature, the dependencies and the OpenAPI document are unchanged.
    """

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    return run


router = APIRouter(prefix="/v1", responses=_ERRORS)


@router.get("/health", response_model=Health, tags=["service"])
async def health() -> Health:
    # On the event loop, not a worker thread: a health check must not queue
    # behind a pool that one busy tenant can fill.
    return Health(status="ok", version=__version__)


@router.post("/sandboxes", response_model=SandboxInfo, status_code=201, tags=["sandboxes"])
@_in_thread
def create_sandbox(body: CreateSandbox, tenant: TenantDep, svc: ServiceDep) -> SandboxInfo:
    e = svc.create(
        tenant,
        template=body.template,
        policy=body.policy,
        backend=body.backend,
        timeout_s=body.timeout_s,
        env=body.env,
        metadata=body.metadata,
        snapshot=body.snapshot,
        auto_pause=body.auto_pause,
        auto_pause_memory=body.auto_pause_memory,
    )
    return svc.info(e)


@router.get("/sandboxes", response_model=list[SandboxInfo], tags=["sandboxes"])
@_in_thread
def list_sandboxes(tenant: TenantDep, svc: ServiceDep) -> list[SandboxInfo]:
    return svc.infos(tenant)


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxInfo, tags=["sandboxes"])
@_in_thread
def get_sandbox(sandbox_id: str, tenant: TenantDep, svc: ServiceDep) -> SandboxInfo:
    return svc.info(svc.get(tenant, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", response_model=ReceiptModel, tags=["sandboxes"])
@_in_thread
def destroy_sandbox(sandbox_id: str, tenant: TenantDep, svc: ServiceDep) -> ReceiptModel:
    r = svc.destroy(svc.get(tenant, sandbox_id))
    return ReceiptModel(
        sandbox_id=r.sandbox_id, clean=r.clean, removed=r.removed, leftovers=r.leftovers
    )


@router.post("/sandboxes/{sandbox_id}/timeout", response_model=SandboxInfo, tags=["sandboxes"])
@_in_thread
def set_timeout(
    sandbox_id: str, body: SetTimeout, tenant: TenantDep, svc: ServiceDep
) -> SandboxInfo:
    e = svc.get(tenant, sandbox_id)
    svc.set_timeout(e, body.timeout_s)
    return svc.info(e)


@router.post("/sandboxes/{sandbox_id}/pause", response_model=SandboxInfo, tags=["snapshots"])
@_in_thread
def pause_sandbox(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, body: PauseSandbox | None = None
) -> SandboxInfo:
    """Pause: the deadline stops; ``memory: false`` keeps only the files.
    409 (rule ``snapshot.state``) if it is paused already."""
    e = svc.get(tenant, sandbox_id)
    svc.pause(e, memory=(body or PauseSandbox()).memory)
    return svc.info(e)


@router.post("/sandboxes/{sandbox_id}/resume", response_model=SandboxInfo, tags=["snapshots"])
@_in_thread
def resume_sandbox(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, body: ResumeSandbox | None = None
) -> SandboxInfo:
    """Resume a paused sandbox, same id; 409 if it is not paused."""
    e = svc.get(tenant, sandbox_id)
    svc.resume(e, (body or ResumeSandbox()).timeout_s)
    return svc.info(e)


@router.post(
    "/sandboxes/{sandbox_id}/snapshots",
    response_model=SnapshotModel,
    status_code=201,
    tags=["snapshots"],
)
@_in_thread
def create_snapshot(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, body: CreateSnapshot | None = None
) -> SnapshotModel:
    """Save the sandbox as a snapshot of the tenant; the sandbox keeps running."""
    req = body or CreateSnapshot()
    e = svc.get(tenant, sandbox_id)
    info = svc.snapshot(e, name=req.name, memory=req.memory, include_tmp=req.include_tmp)
    return snapshot_model(info)


@router.post(
    "/sandboxes/{sandbox_id}/fork",
    response_model=list[SandboxInfo],
    status_code=201,
    tags=["snapshots"],
)
@_in_thread
def fork_sandbox(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, body: ForkSandbox | None = None
) -> list[SandboxInfo]:
    """``count`` new sandboxes, each with the parent's files (and processes where
    the tier can), its own id and trail.  All or none: if one fork fails, the
    others are destroyed and the error is the answer."""
    req = body or ForkSandbox()
    results = svc.fork(svc.get(tenant, sandbox_id), req.count, timeout_s=req.timeout_s)
    made = [r for r in results if isinstance(r, Entry)]
    failed = [r for r in results if isinstance(r, ApiError)]
    if failed:
        for child in made:
            svc.destroy(child, reason="fork failed")
        raise failed[0]
    return [svc.info(child) for child in made]


@router.get("/snapshots", response_model=list[SnapshotModel], tags=["snapshots"])
@_in_thread
def list_snapshots(
    tenant: TenantDep,
    svc: ServiceDep,
    sandbox_id: Annotated[str | None, Query(max_length=200)] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
) -> list[SnapshotModel]:
    """The tenant's snapshots, newest first."""
    found = svc.list_snapshots(tenant, sandbox_id=sandbox_id, name=name)
    return [snapshot_model(i) for i in found]


@router.get("/snapshots/{snapshot_id}", response_model=SnapshotModel, tags=["snapshots"])
@_in_thread
def get_snapshot(snapshot_id: str, tenant: TenantDep, svc: ServiceDep) -> SnapshotModel:
    return snapshot_model(svc.get_snapshot(tenant, snapshot_id))


@router.delete(
    "/snapshots/{snapshot_id}", status_code=204, tags=["snapshots"], response_class=Response
)
def delete_snapshot(snapshot_id: str, tenant: TenantDep, svc: ServiceDep) -> Response:
    if not svc.delete_snapshot(tenant, snapshot_id):
        raise ApiError(404, "not_found", f"snapshot {snapshot_id} was not found")
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/commands", response_model=CommandResult, tags=["commands"])
@_in_thread
def run_command(
    sandbox_id: str, body: RunCommand, tenant: TenantDep, svc: ServiceDep
) -> CommandResult:
    e = svc.get(tenant, sandbox_id)
    stdin = body.stdin.encode() if body.stdin is not None else None
    return svc.run(
        e, _argv(body), cwd=body.cwd, env=body.env, stdin=stdin, timeout_s=body.timeout_s
    )


@router.post(
    "/sandboxes/{sandbox_id}/commands/stream",
    tags=["commands"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "NDJSON: start, stdout/stderr (data), then exit",
            "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
        }
    },
)
def run_command_stream(
    sandbox_id: str, body: RunCommand, tenant: TenantDep, svc: ServiceDep
) -> StreamingResponse:
    e = svc.get(tenant, sandbox_id)
    proc = svc.spawn(e, _argv(body), cwd=body.cwd, env=body.env, timeout_s=body.timeout_s)
    if body.stdin is not None:
        try:
            proc.write_stdin(body.stdin.encode())
        except OSError:
            pass
    proc.close_stdin()

    async def events() -> AsyncIterator[bytes]:
        yield (json.dumps({"type": "start", "pid": proc.pid}) + "\n").encode()
        idx = 0
        try:
            while True:
                chunk, idx, done = await anyio.to_thread.run_sync(_ndjson_step, proc, idx)
                if chunk:
                    yield chunk
                if done:
                    break
            res = proc.wait(5)
            if res is not None:
                yield (
                    json.dumps(
                        {
                            "type": "exit",
                            "exit_code": res.exit_code,
                            "signal": res.signal,
                            "truncated": res.truncated,
                            "timed_out": res.timed_out,
                            "duration_ms": round(res.duration_ms, 3),
                        }
                    )
                    + "\n"
                ).encode()
        finally:
            if proc.result is None:  # the client went away: do not leave it running
                proc.signal(9)

    return StreamingResponse(events(), media_type="application/x-ndjson")


#: Output chunks encoded per step of a stream (on a worker thread, not the event loop).
STREAM_EVENTS_PER_STEP = 64


def _ndjson_step(proc: Process, idx: int) -> tuple[bytes, int, bool]:
    """The NDJSON lines of up to STREAM_EVENTS_PER_STEP new output chunks, as one
    piece: decoding and JSON of a big output must not hold the event loop."""
    new, nxt, done = proc.events_since(idx, 1.0)
    if len(new) > STREAM_EVENTS_PER_STEP:
        new, nxt, done = new[:STREAM_EVENTS_PER_STEP], idx + STREAM_EVENTS_PER_STEP, False
    lines = [
        (json.dumps({"type": stream, "data": data.decode(errors="replace")}) + "\n").encode()
        for stream, data in new
    ]
    return b"".join(lines), nxt, done


@router.get(
    "/sandboxes/{sandbox_id}/files",
    tags=["files"],
    response_class=Response,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        }
    },
)
def read_file(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, path: Annotated[str, _PATH_Q]
) -> Response:
    data = svc.file_op(svc.get(tenant, sandbox_id), "read", path)
    return Response(content=data, media_type="application/octet-stream", headers=FILE_HEADERS)


@router.put(
    "/sandboxes/{sandbox_id}/files",
    response_model=FileWritten,
    tags=["files"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def write_file(
    sandbox_id: str,
    request: Request,
    tenant: TenantDep,
    svc: ServiceDep,
    path: Annotated[str, _PATH_Q],
) -> FileWritten:
    data = await request.body()
    e = svc.get(tenant, sandbox_id)
    await anyio.to_thread.run_sync(svc.file_op, e, "write", path, data)
    return FileWritten(path=path, size=len(data))


@router.delete(
    "/sandboxes/{sandbox_id}/files", status_code=204, tags=["files"], response_class=Response
)
def remove_file(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, path: Annotated[str, _PATH_Q]
) -> Response:
    svc.file_op(svc.get(tenant, sandbox_id), "remove", path)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/dir", response_model=list[FileEntryModel], tags=["files"])
@_in_thread
def list_dir(
    sandbox_id: str,
    tenant: TenantDep,
    svc: ServiceDep,
    path: Annotated[str, _PATH_Q] = "/workspace",
) -> list[FileEntryModel]:
    entries = svc.file_op(svc.get(tenant, sandbox_id), "list", path)
    # a name made inside the sandbox may be any bytes: shown() makes it sendable
    return [FileEntryModel(name=shown(x.name), type=x.type, size=x.size) for x in entries]


@router.post(
    "/sandboxes/{sandbox_id}/dir", status_code=204, tags=["files"], response_class=Response
)
def make_dir(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, path: Annotated[str, _PATH_Q]
) -> Response:
    svc.file_op(svc.get(tenant, sandbox_id), "make_dir", path)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/audit", response_model=list[AuditRecord], tags=["audit"])
@_in_thread
def get_audit(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, blocked_only: bool = False
) -> list[dict[str, Any]]:
    return [r for r in svc.audit_records(tenant, sandbox_id, blocked_only) if "_error" not in r]


@router.get("/sandboxes/{sandbox_id}/policy", response_model=PolicyView, tags=["sandboxes"])
@_in_thread
def get_policy(sandbox_id: str, tenant: TenantDep, svc: ServiceDep) -> PolicyView:
    """The sandbox's policy as written (TOML) and as compiled to walls."""
    return svc.policy_view(svc.get(tenant, sandbox_id))


@router.get("/sandboxes/{sandbox_id}/usage", response_model=Usage, tags=["sandboxes"])
@_in_thread
def get_usage(sandbox_id: str, tenant: TenantDep, svc: ServiceDep) -> Usage:
    """What the sandbox uses now (CPU, memory, pids, disk), read from the host."""
    return svc.usage(svc.get(tenant, sandbox_id))


@router.get("/audit/verify", response_model=AuditVerify, tags=["audit"])
@_in_thread
def verify_audit(tenant: TenantDep, svc: ServiceDep) -> AuditVerify:
    """``glassroom audit verify`` of the server's log: the chain and its anchor."""
    return svc.verify_audit()


@router.get("/approvals", response_model=list[Approval], tags=["approvals"])
@_in_thread
def list_approvals(tenant: TenantDep, svc: ServiceDep) -> list[Approval]:
    return svc.approvals.list(svc.owned_ids(tenant))


@router.post("/approvals/{approval_id}", response_model=Approval, tags=["approvals"])
@_in_thread
def decide_approval(approval_id: str, body: Decide, tenant: TenantDep, svc: ServiceDep) -> Approval:
    return svc.approvals.decide(approval_id, body.decision == "approve", svc.owned_ids(tenant))


def _error_json(request: Request, exc: ApiError) -> Response:
    """``exc`` in the envelope of the request's API family (see ``_edge``)."""
    status, body, ctype = error_payload(
        scope_family(request.scope), exc, streaming=is_streaming(request.scope)
    )
    return Response(body, status_code=status, media_type=ctype)


def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's and FastAPI's own errors (no route, wrong method, a body that
    cannot be parsed) in the family's envelope instead of ``{"detail": ...}``."""
    status = exc.status_code
    code = HTTP_CODES.get(status, "invalid" if status < 500 else "internal")
    where = f"{request.method} {request.url.path}"
    if status == 404 and exc.detail == "Not Found":
        message = f"{where}: no such endpoint"
        if scope_family(request.scope) is Family.CONNECT:
            code = "unimplemented"  # Connect's answer for an unknown procedure
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        message = f"{where}: method not allowed" + (f" (allowed: {allowed})" if allowed else "")
    else:
        message = f"{where}: {exc.detail}"
    resp = _error_json(request, ApiError(status, code, message))
    for k, v in (exc.headers or {}).items():
        resp.headers[k] = v
    return resp


def create_app(
    cfg: ServeConfig | None = None,
    service: SandboxService | None = None,
    *,
    own_service: bool = False,
) -> FastAPI:
    """The whole server.  ``service`` may be shared (e.g. with an MCP server);
    the app closes it at shutdown when it made it, or when ``own_service``."""
    cfg = cfg or (service.cfg if service else ServeConfig())
    svc = service or SandboxService(cfg)
    # The event loop shares the GIL with the worker threads that decode big
    # bodies and encode big outputs; at the default 5 ms switch interval every
    # handoff back to the loop can wait 5 ms per busy thread, and one request
    # needs several.  1 ms keeps other tenants served while one tenant is busy
    # (their p99 under abuse: ~55 ms instead of 70-180 ms on 2 cores).  Set
    # when the app starts serving (its lifespan), not when it is merely built:
    # it is process-wide, and a program that only builds the app keeps its own.

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        # Everything alive now (modules, the app, its models) lives as long as
        # the process: out of the collector's sight, so a full collection no
        # longer walks it while a create waits (and touches fewer pages that a
        # fork for bwrap then has to copy).
        gc.freeze()
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        try:
            yield
        finally:
            if service is None or own_service:
                await anyio.to_thread.run_sync(svc.close)

    app = FastAPI(
        title="glassroom",
        version=__version__,
        lifespan=lifespan,
        description="Disposable, policy-first, audited sandboxes for AI agents. "
        "Authenticate with `X-API-Key: <key>` or `Authorization: Bearer <key>`.",
    )
    app.state.service = svc
    app.include_router(router)
    from ..e2b import e2b_router

    app.include_router(e2b_router())
    from ..console import mount

    mount(app)

    @app.exception_handler(ApiError)
    async def api_error(req: Request, exc: ApiError) -> Response:
        return _error_json(req, exc)

    @app.exception_handler(GlassroomError)
    async def glassroom_error(req: Request, exc: GlassroomError) -> Response:
        return _error_json(req, translate(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(req: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _error_json(req, ApiError(422, "invalid", "; ".join(parts) or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, exc: StarletteHTTPException) -> Response:
        return _http_error(req, exc)

    @app.exception_handler(Exception)
    async def internal(req: Request, _exc: Exception) -> Response:
        # A bug, not the client's input: the envelope without a traceback (the
        # server log has it, since Starlette re-raises after this answer).
        return _error_json(
            req, ApiError(500, "internal", "internal error; the server log has the details")
        )

    # Inside the Edge (added first, so it runs after): port requests have a
    # body the Edge bounded but did not parse, and never reach a route.
    app.add_middleware(PortRelay)
    app.add_middleware(Edge, limit=cfg.max_request_bytes)
    return app


def openapi_spec() -> dict[str, Any]:
    """The own API's OpenAPI document, as checked in at ``docs/openapi.json``."""
    app = FastAPI(
        title="glassroom",
        version=__version__,
        description="Disposable, policy-first, audited sandboxes for AI agents. "
        "Authenticate with `X-API-Key: <key>` or `Authorization: Bearer <key>`.",
    )
    app.include_router(router)
    return app.openapi()
