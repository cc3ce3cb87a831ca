"""The ASGI app of ``glassroom serve``: the own API under ``/v1`` plus the
E2B-compatible endpoints (control plane, envd, code interpreter).

Every error is JSON ``{"error": {"code", "message", "rule"}}``; bad input is
always a 4xx.  The OpenAPI spec of the own API is generated from the same
pydantic models (:func:`openapi_spec`) and checked in as ``docs/openapi.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ... import __version__
from ..._errors import GlassroomError
from ._config import ServeConfig, Tenant
from ._models import (
    Approval,
    AuditRecord,
    CommandResult,
    CreateSandbox,
    Decide,
    ErrorResponse,
    FileEntryModel,
    FileWritten,
    Health,
    ReceiptModel,
    RunCommand,
    SandboxInfo,
    SetTimeout,
)
from ._service import ApiError, SandboxService, translate

log = logging.getLogger("glassroom.serve")

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


def _svc(request: Request) -> SandboxService:
    svc: SandboxService = request.app.state.service
    return svc


def tenant_dep(
    request: Request,
    key: Annotated[str | None, Depends(_key_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Tenant:
    return _svc(request).authenticate(key or (bearer.credentials if bearer else None))


TenantDep = Annotated[Tenant, Depends(tenant_dep)]
ServiceDep = Annotated[SandboxService, Depends(_svc)]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before they are buffered."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(send)
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "code": "too_large",
                    "rule": "serve.max_request_bytes",
                    "message": f"request body exceeds {self.limit} bytes",
                }
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


def _argv(cmd: RunCommand) -> list[str]:
    if cmd.argv:
        return list(cmd.argv)
    if cmd.command is not None:
        return ["sh", "-c", cmd.command]
    raise ApiError(422, "invalid", "give argv or command")


router = APIRouter(prefix="/v1", responses=_ERRORS)


@router.get("/health", response_model=Health, tags=["service"])
def health() -> Health:
    return Health(status="ok", version=__version__)


@router.post("/sandboxes", response_model=SandboxInfo, status_code=201, tags=["sandboxes"])
def create_sandbox(body: CreateSandbox, tenant: TenantDep, svc: ServiceDep) -> SandboxInfo:
    e = svc.create(
        tenant,
        template=body.template,
        policy=body.policy,
        backend=body.backend,
        timeout_s=body.timeout_s,
        env=body.env,
        metadata=body.metadata,
    )
    return svc.info(e)


@router.get("/sandboxes", response_model=list[SandboxInfo], tags=["sandboxes"])
def list_sandboxes(tenant: TenantDep, svc: ServiceDep) -> list[SandboxInfo]:
    return [svc.info(e) for e in svc.list(tenant)]


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxInfo, tags=["sandboxes"])
def get_sandbox(sandbox_id: str, tenant: TenantDep, svc: ServiceDep) -> SandboxInfo:
    return svc.info(svc.get(tenant, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", response_model=ReceiptModel, tags=["sandboxes"])
def destroy_sandbox(sandbox_id: str, tenant: TenantDep, svc: ServiceDep) -> ReceiptModel:
    r = svc.destroy(svc.get(tenant, sandbox_id))
    return ReceiptModel(
        sandbox_id=r.sandbox_id, clean=r.clean, removed=r.removed, leftovers=r.leftovers
    )


@router.post("/sandboxes/{sandbox_id}/timeout", response_model=SandboxInfo, tags=["sandboxes"])
def set_timeout(
    sandbox_id: str, body: SetTimeout, tenant: TenantDep, svc: ServiceDep
) -> SandboxInfo:
    e = svc.get(tenant, sandbox_id)
    svc.set_timeout(e, body.timeout_s)
    return svc.info(e)


@router.post("/sandboxes/{sandbox_id}/commands", response_model=CommandResult, tags=["commands"])
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
                new, idx, done = await anyio.to_thread.run_sync(proc.events_since, idx, 1.0)
                for stream, data in new:
                    line = {"type": stream, "data": data.decode(errors="replace")}
                    yield (json.dumps(line) + "\n").encode()
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
    return Response(content=data, media_type="application/octet-stream")


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
def list_dir(
    sandbox_id: str,
    tenant: TenantDep,
    svc: ServiceDep,
    path: Annotated[str, _PATH_Q] = "/workspace",
) -> list[FileEntryModel]:
    entries = svc.file_op(svc.get(tenant, sandbox_id), "list", path)
    return [FileEntryModel(name=x.name, type=x.type, size=x.size) for x in entries]


@router.post(
    "/sandboxes/{sandbox_id}/dir", status_code=204, tags=["files"], response_class=Response
)
def make_dir(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, path: Annotated[str, _PATH_Q]
) -> Response:
    svc.file_op(svc.get(tenant, sandbox_id), "make_dir", path)
    return Response(status_code=204)


@router.get("/sandboxes/{sandbox_id}/audit", response_model=list[AuditRecord], tags=["audit"])
def get_audit(
    sandbox_id: str, tenant: TenantDep, svc: ServiceDep, blocked_only: bool = False
) -> list[dict[str, Any]]:
    return [r for r in svc.audit_records(tenant, sandbox_id, blocked_only) if "_error" not in r]


@router.get("/approvals", response_model=list[Approval], tags=["approvals"])
def list_approvals(tenant: TenantDep, svc: ServiceDep) -> list[Approval]:
    return svc.approvals.list(svc.owned_ids(tenant))


@router.post("/approvals/{approval_id}", response_model=Approval, tags=["approvals"])
def decide_approval(approval_id: str, body: Decide, tenant: TenantDep, svc: ServiceDep) -> Approval:
    return svc.approvals.decide(approval_id, body.decision == "approve", svc.owned_ids(tenant))


def _error_json(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(cfg: ServeConfig | None = None, service: SandboxService | None = None) -> FastAPI:
    """The whole server.  ``service`` may be shared (e.g. with an MCP server)."""
    cfg = cfg or (service.cfg if service else ServeConfig())
    svc = service or SandboxService(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 200
        try:
            yield
        finally:
            if service is None:
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

    @app.exception_handler(ApiError)
    async def api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _error_json(exc)

    @app.exception_handler(GlassroomError)
    async def glassroom_error(_req: Request, exc: GlassroomError) -> JSONResponse:
        return _error_json(translate(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _error_json(ApiError(422, "invalid", "; ".join(parts) or "invalid request"))

    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
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
