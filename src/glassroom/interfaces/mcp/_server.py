"""The MCP tools, over the same :class:`SandboxService` as ``glassroom serve``."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from ... import __version__
from ..http._config import ServeConfig, Tenant
from ..http._models import Approval, AuditRecord, FileEntryModel, ReceiptModel, SandboxInfo
from ..http._service import ApiError, Entry, SandboxService

log = logging.getLogger("glassroom.mcp")

MCP_TENANT = "mcp"
DEFAULT_MAX_OUTPUT = 64 * 1024
READ = ToolAnnotations(
    readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False
)
WRITE = ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False)
DESTRUCTIVE = ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=False)


class ExecOutput(BaseModel):
    sandbox_id: str
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration_ms: float
    truncation: str | None = Field(None, description="what was cut, when truncated")
    blocked: list[dict[str, str]] = Field(
        default_factory=list, description="actions the policy blocked, with the rule"
    )


class CodeOutput(BaseModel):
    sandbox_id: str | None = Field(description="None when a throwaway sandbox was used")
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool
    truncation: str | None = None


class FileContent(BaseModel):
    path: str
    content: str
    size: int
    truncated: bool
    truncation: str | None = None


class Written(BaseModel):
    path: str
    size: int


class FileList(BaseModel):
    path: str
    entries: list[FileEntryModel]


class AuditTrail(BaseModel):
    sandbox_id: str
    records: list[AuditRecord]


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class ApprovalList(BaseModel):
    approvals: list[Approval]


def _fail(
    message: str, rule: str | None = None, structured: dict[str, Any] | None = None
) -> CallToolResult:
    text = message + (f" (policy rule: {rule})" if rule else "")
    return CallToolResult(
        content=[TextContent(type="text", text=text)], is_error=True, structured_content=structured
    )


def _ok(model: BaseModel) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=model.model_dump_json())],
        structured_content=model.model_dump(mode="json"),
    )


def _cut(text: str, limit: int, name: str) -> tuple[str, str | None]:
    raw = text.encode()
    if len(raw) <= limit:
        return text, None
    return raw[:limit].decode(errors="ignore"), f"{name} cut from {len(raw)} to {limit} bytes"


class _Sessions:
    """Which sandboxes each MCP session made; destroyed when it ends."""

    def __init__(self, svc: SandboxService) -> None:
        self.svc = svc

    def own(self, ctx: Context, sandbox_id: str) -> Entry:
        ids = self._ids(ctx)
        if sandbox_id not in ids:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} was not found in this session")
        return self.svc.get(self.svc.tenant(MCP_TENANT), sandbox_id)

    def _ids(self, ctx: Context) -> set[str]:
        # The per-client Connection (its ``state`` and ``exit_stack``, unwound when the
        # session ends) is reached through the session in this SDK version.
        conn = ctx.request_context.session._connection
        ids: set[str] | None = conn.state.get("glassroom.sandboxes")
        if ids is None:
            ids = conn.state["glassroom.sandboxes"] = set()
            svc = self.svc

            async def cleanup() -> None:
                for sid in list(ids):
                    with contextlib.suppress(Exception):
                        e = svc.get(svc.tenant(MCP_TENANT), sid)
                        await anyio.to_thread.run_sync(svc.destroy, e, "session end")

            conn.exit_stack.push_async_callback(cleanup)
        return ids

    def add(self, ctx: Context, sandbox_id: str) -> None:
        self._ids(ctx).add(sandbox_id)

    def list(self, ctx: Context) -> list[Entry]:
        ids = self._ids(ctx)
        return [e for e in self.svc.list(self.svc.tenant(MCP_TENANT)) if e.id in ids]


def build_server(svc: SandboxService) -> MCPServer:
    tenant: Tenant = svc.tenant(MCP_TENANT)
    sessions = _Sessions(svc)
    mcp: MCPServer = MCPServer(
        "glassroom",
        version=__version__,
        instructions="Run code in disposable, policy-first, audited sandboxes. Create a "
        "sandbox, run commands and files in it, read its audit trail, kill it. Every sandbox "
        "of this session is destroyed when the session ends.",
    )

    async def call(fn: Any, *args: Any, **kw: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))

    @mcp.tool(
        annotations=WRITE,
        description="Create a sandbox from a template (default 'base') "
        "or a policy (TOML text). Returns its id, tier, walls and deadline.",
    )
    async def create_sandbox(
        ctx: Context,
        template: str | None = None,
        backend: str | None = None,
        policy: str | None = None,
        timeout_s: float | None = None,
    ) -> Annotated[CallToolResult, SandboxInfo]:
        try:
            e = await call(
                svc.create,
                tenant,
                template=template,
                policy=policy,
                backend=backend,
                timeout_s=timeout_s,
            )
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        sessions.add(ctx, e.id)
        info: SandboxInfo = await call(svc.info, e)
        return _ok(info)

    @mcp.tool(
        annotations=DESTRUCTIVE,
        description="Run a command in a sandbox: `command` "
        "(through sh -c) or `argv`. Returns exit code, output, and what was cut or blocked.",
    )
    async def execute_command(
        ctx: Context,
        sandbox_id: str,
        command: str | None = None,
        argv: list[str] | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float | None = None,
        stdin: str | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> Annotated[CallToolResult, ExecOutput]:
        if not argv and command is None:
            return _fail("give `command` or `argv`")
        try:
            e = sessions.own(ctx, sandbox_id)
            r = await call(
                svc.run,
                e,
                list(argv) if argv else ["sh", "-c", command or ""],
                cwd=cwd,
                env=env,
                stdin=stdin.encode() if stdin else None,
                timeout_s=timeout_s,
            )
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        limit = max(1, max_output_bytes)
        out, cut_o = _cut(r.stdout, limit, "stdout")
        err, cut_e = _cut(r.stderr, limit, "stderr")
        notes = [n for n in (cut_o, cut_e) if n]
        if r.truncated:
            notes.insert(0, "output stopped at the policy's resources.max_output_bytes")
        res = ExecOutput(
            sandbox_id=sandbox_id,
            exit_code=r.exit_code,
            stdout=out,
            stderr=err,
            timed_out=r.timed_out,
            truncated=r.truncated or bool(notes),
            duration_ms=r.duration_ms,
            truncation="; ".join(notes) or None,
            blocked=[b.model_dump() for b in r.blocked],
        )
        if r.blocked:
            b = r.blocked[0]
            return _fail(
                f"blocked: {b.action} {b.target} (exit {r.exit_code}); {err.strip()}",
                b.rule,
                res.model_dump(),
            )
        return _ok(res)

    @mcp.tool(
        annotations=DESTRUCTIVE,
        description="Run code (python) in a sandbox; without "
        "sandbox_id a throwaway sandbox is made and destroyed.",
    )
    async def run_code(
        ctx: Context, code: str, language: str = "python", sandbox_id: str | None = None
    ) -> Annotated[CallToolResult, CodeOutput]:
        if language != "python":
            return _fail(f"language {language!r} is not supported (supported: python)")
        throwaway: Entry | None = None
        try:
            if sandbox_id:
                e = sessions.own(ctx, sandbox_id)
            else:
                e = throwaway = await call(
                    svc.create, tenant, template="code-interpreter-v1", timeout_s=120.0
                )
            r = await call(svc.run, e, ["python3", "-"], stdin=code.encode())
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        finally:
            if throwaway is not None:
                await call(svc.destroy, throwaway, "throwaway")
        out, cut_o = _cut(r.stdout, DEFAULT_MAX_OUTPUT, "stdout")
        err, cut_e = _cut(r.stderr, DEFAULT_MAX_OUTPUT, "stderr")
        notes = [n for n in (cut_o, cut_e) if n]
        res = CodeOutput(
            sandbox_id=sandbox_id,
            exit_code=r.exit_code,
            stdout=out,
            stderr=err,
            truncated=r.truncated or bool(notes),
            truncation="; ".join(notes) or None,
        )
        if r.blocked:
            return _fail(
                f"blocked: {r.blocked[0].action} {r.blocked[0].target}",
                r.blocked[0].rule,
                res.model_dump(),
            )
        return _ok(res)

    @mcp.tool(annotations=WRITE, description="Write a text file in a sandbox.")
    async def write_file(
        ctx: Context, sandbox_id: str, path: str, content: str
    ) -> Annotated[CallToolResult, Written]:
        try:
            e = sessions.own(ctx, sandbox_id)
            await call(svc.file_op, e, "write", path, content.encode())
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(Written(path=path, size=len(content.encode())))

    @mcp.tool(annotations=READ, description="Read a text file from a sandbox.")
    async def read_file(
        ctx: Context, sandbox_id: str, path: str, max_bytes: int = DEFAULT_MAX_OUTPUT
    ) -> Annotated[CallToolResult, FileContent]:
        limit = max(1, max_bytes)
        try:
            e = sessions.own(ctx, sandbox_id)
            data: bytes = await call(svc.file_op, e, "read", path, limit + 1)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        cut = len(data) > limit
        return _ok(
            FileContent(
                path=path,
                content=data[:limit].decode(errors="replace"),
                size=min(len(data), limit),
                truncated=cut,
                truncation=f"cut at {limit} bytes (max_bytes)" if cut else None,
            )
        )

    @mcp.tool(annotations=READ, description="List a directory in a sandbox.")
    async def list_files(
        ctx: Context, sandbox_id: str, path: str = "/workspace"
    ) -> Annotated[CallToolResult, FileList]:
        try:
            e = sessions.own(ctx, sandbox_id)
            entries = await call(svc.file_op, e, "list", path)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(
            FileList(
                path=path,
                entries=[FileEntryModel(name=x.name, type=x.type, size=x.size) for x in entries],
            )
        )

    @mcp.tool(
        annotations=READ,
        description="A sandbox's audit trail: every command, file "
        "access and blocked action, each with the rule that decided it.",
    )
    async def get_audit(
        ctx: Context, sandbox_id: str, blocked_only: bool = False
    ) -> Annotated[CallToolResult, AuditTrail]:
        if sandbox_id not in sessions._ids(ctx):
            return _fail(f"sandbox {sandbox_id} was not found in this session")
        try:
            recs = await call(lambda: list(svc.audit_records(tenant, sandbox_id, blocked_only)))
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(
            AuditTrail(
                sandbox_id=sandbox_id, records=[AuditRecord(**r) for r in recs if "_error" not in r]
            )
        )

    @mcp.tool(annotations=READ, description="This session's live sandboxes.")
    async def list_sandboxes(ctx: Context) -> SandboxList:
        return SandboxList(sandboxes=[svc.info(e) for e in sessions.list(ctx)])

    @mcp.tool(
        annotations=WRITE,
        description="Set a sandbox's deadline to timeout_s from now "
        "(up to the policy's max runtime).",
    )
    async def set_timeout(
        ctx: Context, sandbox_id: str, timeout_s: float
    ) -> Annotated[CallToolResult, SandboxInfo]:
        try:
            e = sessions.own(ctx, sandbox_id)
            await call(svc.set_timeout, e, timeout_s)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(svc.info(e))

    @mcp.tool(
        annotations=DESTRUCTIVE,
        description="Destroy a sandbox; returns the teardown "
        "receipt (what was removed, and the check that nothing is left).",
    )
    async def kill_sandbox(
        ctx: Context, sandbox_id: str
    ) -> Annotated[CallToolResult, ReceiptModel]:
        try:
            e = sessions.own(ctx, sandbox_id)
            r = await call(svc.destroy, e, "mcp kill")
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(
            ReceiptModel(
                sandbox_id=r.sandbox_id, clean=r.clean, removed=r.removed, leftovers=r.leftovers
            )
        )

    @mcp.tool(annotations=READ, description="Pending approvals for this session's sandboxes.")
    async def list_approvals(ctx: Context) -> ApprovalList:
        return ApprovalList(approvals=svc.approvals.list(sessions._ids(ctx)))

    @mcp.tool(annotations=WRITE, description="Approve or deny a pending approval.")
    async def decide_approval(
        ctx: Context, approval_id: str, decision: str
    ) -> Annotated[CallToolResult, Approval]:
        if decision not in ("approve", "deny"):
            return _fail("decision must be 'approve' or 'deny'")
        try:
            return _ok(svc.approvals.decide(approval_id, decision == "approve", sessions._ids(ctx)))
        except ApiError as exc:
            return _fail(exc.message, exc.rule)

    return mcp


def _service(cfg: ServeConfig | None) -> SandboxService:
    cfg = cfg or ServeConfig()
    svc = SandboxService(cfg)
    svc.tenant(MCP_TENANT).max_sandboxes = 50
    return svc


def run_stdio(cfg: ServeConfig | None = None) -> None:
    svc = _service(cfg)
    try:
        build_server(svc).run("stdio")
    finally:
        svc.close()


def run_http(cfg: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8050) -> None:
    svc = _service(cfg)
    try:
        build_server(svc).run("streamable-http", host=host, port=port)
    finally:
        svc.close()
