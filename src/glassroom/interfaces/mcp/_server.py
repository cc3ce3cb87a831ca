"""The MCP tools, over the same :class:`SandboxService` as ``glassroom serve``."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections import OrderedDict
from types import FrameType
from typing import Annotated, Any

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from ... import __version__
from ..http._config import (
    DEFAULT_MAX_HANDLE_SANDBOXES,
    DEFAULT_MAX_SANDBOXES_PER_SESSION,
    ServeConfig,
    Tenant,
)
from ..http._models import (
    Approval,
    AuditRecord,
    FileEntryModel,
    ReceiptModel,
    SandboxInfo,
    SnapshotModel,
)
from ..http._service import (
    GONE_MEMORY,
    ApiError,
    Entry,
    SandboxService,
    check_timeout,
    snapshot_model,
)

log = logging.getLogger("glassroom.mcp")

#: The service tenant of unauthenticated use (stdio, or HTTP without keys) ...
MCP_TENANT = "mcp"
#: ... and, apart from it, that of unauthenticated handle sandboxes: they outlive
#: their client for the idle TTL, so they must not be able to use up the sessions' cap.
MCP_HANDLE_TENANT = "mcp.handles"
MCP_TENANT_CAP = 50
#: Where :class:`_Auth` puts the authenticated tenant's name in the ASGI scope
#: (the SDK hands the tools the Starlette request, whose ``scope`` this is).
TENANT_SCOPE_KEY = "glassroom.tenant"
DEFAULT_MAX_OUTPUT = 64 * 1024
#: A sandbox no tool call has named for this long is destroyed (``--idle-ttl``).
DEFAULT_IDLE_TTL_S = 600.0
MAX_IDLE_TTL_S = 86400.0
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


class SnapshotList(BaseModel):
    snapshots: list[SnapshotModel]


class SnapshotDeleted(BaseModel):
    snapshot_id: str
    deleted: bool


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


class _Owner:
    """Who a sandbox belongs to: one MCP session, the stdio process, or a pool.

    A pool is every session-less (2026-07-28 handle) client of one tenant
    together: the protocol gives them no session to tell apart, so their
    cap (``max_handle_sandboxes``) is per tenant, and their sandboxes are
    reached only through a handle, never listed.
    """

    def __init__(self, name: str, tenant: Tenant, who: str | None, *, cap: int, pool: bool) -> None:
        self.name = name
        #: the service tenant its sandboxes are made under (and counted against)
        self.tenant = tenant
        #: the authenticated tenant of the requests (None: unauthenticated)
        self.who = who
        self.cap = cap
        self.pool = pool
        self.ids: set[str] = set()  # every id a session made (for its audit after a kill)
        self.live: set[str] = set()
        self.snaps: set[str] = set()  # snapshot ids it made (deleted when a session ends)
        self.reserved = 0  # creates under way, counted against ``cap``
        self.ended = False


def _who(ctx: Context) -> str | None:
    """The tenant the HTTP request authenticated as; None on stdio, in-process,
    or a server without keys (see :class:`_Auth`)."""
    request = getattr(ctx.request_context, "request", None)
    scope = getattr(request, "scope", None)
    who = scope.get(TENANT_SCOPE_KEY) if isinstance(scope, dict) else None
    return who if isinstance(who, str) else None


class _Sessions:
    """Who may use which sandbox, and when a sandbox's lifetime ends.

    The transport connection is *not* the session: on the 2026-07-28
    protocol the SDK builds a fresh ``Connection`` for every request and
    unwinds its exit stack when the request ends, so tying cleanup to it
    destroyed each sandbox as soon as ``create_sandbox`` returned.  The
    owner of a sandbox is instead, in this order:

    * a handshake-era session (``initialize``; stdio, or streamable HTTP with
      an ``Mcp-Session-Id``): the connection lives as long as the session, and
      its end (stdio EOF, HTTP DELETE or the SDK's session idle timeout)
      destroys the session's sandboxes;
    * the process, for a 2026-07-28 client over stdio: a stdio server has
      exactly one client, the one that started it, and its sandboxes go when
      the pipe closes and the process stops;
    * the tenant's handle pool, for a 2026-07-28 request over HTTP (or
      in-process): the protocol has no session, so ``create_sandbox`` returns
      the sandbox id with a secret (``sb-….<secret>``), a handle the client
      passes back as ``sandbox_id``.  A bare id never works there, and no
      listing shows it.

    Caps, checked before anything is made: a session (or the stdio process)
    holds at most ``per_session`` live sandboxes, a tenant's handle pool at
    most ``handle_cap``, and the service tenant's ``max_sandboxes`` still
    holds over all of them.  Without API keys the handle pool has a service
    tenant of its own, so handle sandboxes (which outlive their client for
    the idle TTL) cannot use up the sessions' share.

    With API keys (HTTP), every owner is bound to the tenant that made it: a
    session opened with one key is refused to another, and a handle works
    only for its own tenant.

    Whatever the owner, a sandbox also ends at its deadline (``timeout_s``),
    at ``kill_sandbox``, when the server stops, and after ``idle_ttl_s``
    seconds without a tool call naming it.  A sandbox a tool call is still
    working in (a long command, a file transfer) is busy, never idle: the
    TTL counts from the end of the last call.
    """

    def __init__(
        self,
        svc: SandboxService,
        *,
        process_session: bool,
        idle_ttl_s: float,
        per_session: int = DEFAULT_MAX_SANDBOXES_PER_SESSION,
        handle_cap: int = DEFAULT_MAX_HANDLE_SANDBOXES,
    ) -> None:
        self.svc = svc
        self.tenant = svc.tenant(MCP_TENANT)
        self.handle_tenant = svc.tenant(MCP_HANDLE_TENANT)
        self.idle_ttl_s = idle_ttl_s
        self.per_session = per_session
        self.handle_cap = handle_cap
        self._process = (
            _Owner("process", self.tenant, None, cap=per_session, pool=False)
            if process_session
            else None
        )
        self._pools: dict[str | None, _Owner] = {}  # authenticated tenant -> its handle pool
        self._lock = threading.Lock()
        self._handles: OrderedDict[str, tuple[str, _Owner]] = OrderedDict()  # id -> secret, pool
        self._snap_handles: dict[str, tuple[str, _Owner]] = {}  # snapshot id -> secret, pool
        self._owner_of: dict[str, _Owner] = {}  # live sandbox id -> its owner
        self._used: dict[str, float] = {}  # live sandbox id -> monotonic time of last use
        self._busy: dict[str, int] = {}  # sandbox id -> tool calls working in it now
        self._stop = threading.Event()
        svc.on_destroy(self._forget)
        self._idle = threading.Thread(target=self._idle_loop, name="mcp-idle-ttl", daemon=True)
        self._idle.start()

    # -- who is asking ---------------------------------------------------------

    def owner(self, ctx: Context) -> _Owner:
        """The session (or pool) this request belongs to."""
        who = _who(ctx)
        rc = ctx.request_context
        if rc.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            # The SDK exposes the per-session Connection (its ``state`` and the
            # ``exit_stack`` it unwinds when the session ends) only through the session.
            conn = rc.session._connection
            owner: _Owner | None = conn.state.get("glassroom.owner")
            if owner is None:
                tenant = self.tenant if who is None else self.svc.tenant(who)
                owner = _Owner(conn.session_id or "stdio", tenant, who, cap=self.per_session,
                               pool=False)  # fmt: skip
                conn.state["glassroom.owner"] = owner
                conn.exit_stack.push_async_callback(self._end, owner)
            elif owner.who != who:
                # A session id is a secret, but it is not a credential: the key is.
                raise ApiError(
                    403,
                    "forbidden",
                    "this MCP session was opened with another tenant's API key",
                    rule="mcp.auth",
                )
            return owner
        if self._process is not None:
            return self._process
        with self._lock:
            pool = self._pools.get(who)
            if pool is None:
                tenant = self.handle_tenant if who is None else self.svc.tenant(who)
                pool = self._pools[who] = _Owner(
                    f"handles of {who or 'unauthenticated clients'}",
                    tenant,
                    who,
                    cap=self.handle_cap,
                    pool=True,
                )
            return pool

    async def _end(self, owner: _Owner) -> None:
        # Bounded by the SDK (5 s for the whole exit stack): hand the teardown
        # to threads, one per sandbox, rather than wait here.
        with self._lock:
            owner.ended = True
            live = [i for i in owner.ids if i in self._used]
            snaps = list(owner.snaps)
            owner.snaps.clear()
        for sid in live:
            threading.Thread(
                target=self._destroy, args=(sid, owner.tenant, "mcp session end"), daemon=True
            ).start()
        if snaps:
            # No other session can name them, so kept they would only use up the
            # tenant's snapshot limits (snapshot.limit) until they expire.
            threading.Thread(
                target=self._delete_snapshots, args=(snaps, owner.tenant), daemon=True
            ).start()

    def _delete_snapshots(self, ids: list[str], tenant: Tenant) -> None:
        for snap in ids:
            try:
                self.svc.delete_snapshot(tenant, snap)
            except ApiError:
                pass  # already gone (deleted, expired)
            except Exception:
                log.exception("deleting snapshot %s at the session's end failed", snap)

    def _destroy(self, sid: str, tenant: Tenant, why: str) -> None:
        with contextlib.suppress(ApiError):
            e = self.svc.get(tenant, sid)
            try:
                self.svc.destroy(e, why)
            except Exception:
                log.exception("destroying %s (%s) failed", sid, why)

    # -- caps ------------------------------------------------------------------

    def reserve(self, ctx: Context, n: int = 1) -> _Owner:
        """``n`` slots of the asking owner's cap, held until :meth:`release`.

        Taken before the sandbox is made, under the lock: two creates racing
        for the last slot must not both get it (nor a fork of ``count`` more
        sandboxes than the cap has left)."""
        owner = self.owner(ctx)
        with self._lock:
            held = len(owner.live) + owner.reserved
            if held + n > owner.cap:
                if owner.pool:
                    who = f"tenant {owner.who!r}" if owner.who else "unauthenticated clients"
                    raise ApiError(
                        429,
                        "limit",
                        f"the session-less (handle) sandboxes of {who} already number {held} "
                        f"(max_handle_sandboxes = {owner.cap}): kill one, or use an MCP "
                        "session",
                        rule="mcp.max_handle_sandboxes",
                    )
                raise ApiError(
                    429,
                    "limit",
                    f"this MCP session already has {held} sandboxes "
                    f"(max_sandboxes_per_session = {owner.cap}): kill one first",
                    rule="mcp.max_sandboxes_per_session",
                )
            owner.reserved += n
        return owner

    def release(self, owner: _Owner, n: int = 1) -> None:
        with self._lock:
            owner.reserved -= n

    # -- ownership ---------------------------------------------------------------

    def add(self, ctx: Context, e: Entry, owner: _Owner | None = None) -> str:
        """Record a new sandbox; return the ``sandbox_id`` the client is to use."""
        owner = owner or self.owner(ctx)
        with self._lock:
            if not owner.ended:
                self._used[e.id] = time.monotonic()
                self._owner_of[e.id] = owner
                owner.live.add(e.id)
                if not owner.pool:
                    owner.ids.add(e.id)
                    return e.id
                secret = secrets.token_urlsafe(18)
                self._handles[e.id] = (secret, owner)
                if len(self._handles) > GONE_MEMORY:
                    # Forget the oldest handles of sandboxes already gone, never a live
                    # one's: a flood of create/kill must not lock another client out.
                    dead = [i for i in self._handles if i not in self._used]
                    for i in dead[: len(self._handles) - GONE_MEMORY]:
                        del self._handles[i]
                return f"{e.id}.{secret}"
        # The session ended while it was made: destroy it, off the event loop.
        threading.Thread(
            target=self._destroy_entry, args=(e, "mcp session end"), daemon=True
        ).start()
        raise ApiError(404, "not_found", "the MCP session has ended")

    def _destroy_entry(self, e: Entry, why: str) -> None:
        try:
            self.svc.destroy(e, why)
        except Exception:
            log.exception("destroying %s (%s) failed", e.id, why)

    def resolve(self, ctx: Context, sandbox_id: str) -> tuple[str, Tenant]:
        """The sandbox id behind what the client passed, and its service tenant,
        if this request may use it."""
        sid, dot, secret = sandbox_id.partition(".")
        if dot:
            who = _who(ctx)
            with self._lock:
                known = self._handles.get(sid)
            # compare_digest raises TypeError on non-ASCII str: compare bytes
            given = secret.encode("utf-8", "surrogatepass")
            if (
                known is not None
                and hmac.compare_digest(known[0].encode(), given)
                and known[1].who == who  # a handle is no use to another tenant
            ):
                return sid, known[1].tenant
        else:
            owner = self.owner(ctx)
            with self._lock:
                mine = sid in owner.ids
            if mine:
                return sid, owner.tenant
            if owner.pool:
                raise ApiError(
                    404,
                    "not_found",
                    f"sandbox {sandbox_id} was not found: this request has no MCP "
                    "session (2026-07-28 protocol), so pass the sandbox_id handle "
                    "create_sandbox returned",
                )
        raise ApiError(404, "not_found", f"sandbox {sandbox_id} was not found in this session")

    def own(self, ctx: Context, sandbox_id: str) -> Entry:
        """The live sandbox the client named; its use counts against the idle TTL."""
        sid, tenant = self.resolve(ctx, sandbox_id)
        e = self.svc.get(tenant, sid)
        with self._lock:
            if sid not in self._used:  # the idle TTL already took it
                raise ApiError(404, "not_found", f"sandbox {sandbox_id} was not found")
            self._used[sid] = time.monotonic()
        return e

    def busy(self, sid: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` (in a worker thread), with ``sid`` busy until it returns.

        Counted in the thread itself: a request cancelled (its client gone)
        while the command runs leaves the thread running, and the sandbox is
        still in use until the thread is done."""
        with self._lock:
            self._busy[sid] = self._busy.get(sid, 0) + 1
        try:
            return fn(*args, **kw)
        finally:
            with self._lock:
                n = self._busy.pop(sid, 0) - 1
                if n > 0:
                    self._busy[sid] = n
                if sid in self._used:
                    self._used[sid] = time.monotonic()

    def visible(self, ctx: Context, sandbox_id: str | None = None) -> set[str]:
        """The ids this request may see: its session's, or the one its handle names."""
        if sandbox_id:
            return {self.resolve(ctx, sandbox_id)[0]}
        owner = self.owner(ctx)
        if owner.pool:
            return set()
        with self._lock:
            return set(owner.ids)

    def list(self, ctx: Context) -> list[Entry]:
        owner = self.owner(ctx)
        ids = self.visible(ctx)
        return [e for e in self.svc.list(owner.tenant) if e.id in ids]

    # -- snapshots -------------------------------------------------------------------

    def add_snapshot(self, owner: _Owner, snapshot_id: str) -> str:
        """Record a snapshot ``owner`` made; return the id the client is to use.

        The same rules as for sandboxes: a session's snapshots are its own (a
        bare id), a handle pool's are reached by a handle only."""
        with self._lock:
            if not owner.pool:
                owner.snaps.add(snapshot_id)
                return snapshot_id
            secret = secrets.token_urlsafe(18)
            self._snap_handles[snapshot_id] = (secret, owner)
            return f"{snapshot_id}.{secret}"

    def snapshot_owned(self, ctx: Context, snapshot_id: str) -> tuple[str, Tenant, _Owner]:
        """The stored snapshot id behind what the client passed, its service
        tenant and its owner, if this request may use it; else 404."""
        snap, dot, secret = snapshot_id.partition(".")
        owner = self.owner(ctx)
        with self._lock:
            if dot:
                known = self._snap_handles.get(snap)
                given = secret.encode("utf-8", "surrogatepass")
                if (
                    known is not None
                    and hmac.compare_digest(known[0].encode(), given)
                    and known[1].who == owner.who  # a handle is no use to another tenant
                ):
                    return snap, known[1].tenant, known[1]
            elif snap in owner.snaps:
                return snap, owner.tenant, owner
        where = (
            "pass the snapshot id handle sandbox_snapshot returned"
            if owner.pool
            else "this MCP session did not make it"
        )
        raise ApiError(
            404, "not_found", f"snapshot {snapshot_id[:80]!r} was not found: {where}",
            rule="snapshot.not_found",
        )  # fmt: skip

    def forget_snapshot(self, snapshot_id: str, owner: _Owner) -> None:
        with self._lock:
            owner.snaps.discard(snapshot_id)
            self._snap_handles.pop(snapshot_id, None)

    def shown_snapshots(
        self, ctx: Context, sandbox_id: str | None
    ) -> tuple[_Owner, str | None, dict[str, str]]:
        """The snapshots this request may list: (owner, the sandbox id to filter
        on, {stored id: the id to show}).

        A session sees its own; a session-less client only those of the
        sandbox whose handle it passes, never a listing of the whole pool."""
        owner = self.owner(ctx)
        sid = self.resolve(ctx, sandbox_id)[0] if sandbox_id else None
        with self._lock:
            if not owner.pool:
                return owner, sid, {i: i for i in owner.snaps}
            if sid is None:
                return owner, None, {}
            return owner, sid, {
                i: f"{i}.{secret}" for i, (secret, o) in self._snap_handles.items() if o is owner
            }  # fmt: skip

    # -- the idle TTL --------------------------------------------------------------

    def _forget(self, e: Entry) -> None:
        with self._lock:
            self._used.pop(e.id, None)
            owner = self._owner_of.pop(e.id, None)
            if owner is not None:  # its slot of the owner's cap is free again
                owner.live.discard(e.id)

    def _idle_loop(self) -> None:
        step = min(5.0, max(0.1, self.idle_ttl_s / 10))
        while not self._stop.wait(step):
            now = time.monotonic()
            with self._lock:
                idle = [
                    i
                    for i, t in self._used.items()
                    if now - t > self.idle_ttl_s and not self._busy.get(i)
                ]
                for i in idle:  # claimed: a call from now on finds it gone
                    del self._used[i]
                tenants = {i: o.tenant for i in idle if (o := self._owner_of.get(i))}
            for sid in idle:
                with contextlib.suppress(Exception):
                    self.svc.audit.append(
                        sid,
                        "sandbox.idle",
                        {"idle_ttl_s": self.idle_ttl_s},
                        decision="deny",
                        rule="mcp.idle_ttl_s",
                    )
                # one thread each: a teardown that hangs must not stall the others
                threading.Thread(
                    target=self._destroy,
                    args=(sid, tenants.get(sid, self.tenant), "mcp idle ttl"),
                    daemon=True,
                ).start()

    def close(self) -> None:
        self._stop.set()


def check_idle_ttl(value: float) -> float:
    """Fail closed on an idle TTL that would mean "never" or "at once"."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"the idle TTL must be a finite number of seconds, not {value!r}")
    if not 1.0 <= value <= MAX_IDLE_TTL_S:
        raise ValueError(f"the idle TTL must be from 1 to {MAX_IDLE_TTL_S:g} s, not {value:g}")
    return float(value)


def build_server(
    svc: SandboxService,
    *,
    process_session: bool = False,
    idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
) -> MCPServer:
    """The MCP server over ``svc``.  ``process_session``: this process serves one
    client (stdio), so a 2026-07-28 client's sandboxes belong to the process.
    The caps come from ``svc.cfg`` (``max_sandboxes_per_session``,
    ``max_handle_sandboxes``)."""
    sessions = _Sessions(
        svc,
        process_session=process_session,
        idle_ttl_s=check_idle_ttl(idle_ttl_s),
        per_session=svc.cfg.max_sandboxes_per_session,
        handle_cap=svc.cfg.max_handle_sandboxes,
    )
    mcp: MCPServer = MCPServer(
        "glassroom",
        version=__version__,
        instructions="Run code in disposable, policy-first, audited sandboxes. Create a "
        "sandbox, run commands and files in it, read its audit trail, kill it; pause and "
        "resume it, save it as a snapshot (create_sandbox with `snapshot` starts a new one "
        "from it) or fork it. Every sandbox and snapshot of this session is gone when the "
        "session ends; without a session (the 2026-07-28 protocol over HTTP) create_sandbox "
        "and sandbox_snapshot return a handle to pass back, and the sandbox lives until "
        "kill_sandbox, its timeout or its idle TTL.",
    )

    async def call(fn: Any, *args: Any, **kw: Any) -> Any:
        # Not waited for when the request is cancelled (the session ended, the
        # client closed the request): a command running for an hour must not
        # hold up the end of the session, whose teardown is what ends it.
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kw), abandon_on_cancel=True)

    async def work(e: Entry, fn: Any, *args: Any, **kw: Any) -> Any:
        """``fn`` in a thread, with ``e`` busy (never idle) while it runs."""
        return await call(sessions.busy, e.id, fn, *args, **kw)

    @mcp.tool(
        annotations=WRITE,
        description="Create a sandbox from a template (default 'base'), "
        "a policy (TOML text), or a snapshot this session made (`snapshot`: the id "
        "sandbox_snapshot returned; the snapshot brings its own policy). Returns its id, "
        "tier, walls and deadline.",
    )
    async def create_sandbox(
        ctx: Context,
        template: str | None = None,
        backend: str | None = None,
        policy: str | None = None,
        timeout_s: float | None = None,
        snapshot: str | None = None,
    ) -> Annotated[CallToolResult, SandboxInfo]:
        try:
            if timeout_s is not None:  # NaN, Infinity, 1e300: refused before anything is made
                timeout_s = check_timeout(timeout_s, "timeout_s")
            snap: str | None = None
            if snapshot is not None:
                if template is not None or policy is not None:
                    raise ApiError(
                        400, "invalid", "snapshot: give a snapshot or a template/policy, not "
                        "both (a snapshot is restored under the policy it was made with)",
                        rule="snapshot",
                    )  # fmt: skip
                snap = sessions.snapshot_owned(ctx, snapshot)[0]
            owner = sessions.reserve(ctx)
            # Shielded: a sandbox made must be recorded (owned, idle TTL), even when
            # the request is cancelled meanwhile; add() destroys it if the session ended.
            try:
                with anyio.CancelScope(shield=True):
                    e = await anyio.to_thread.run_sync(
                        lambda: svc.create(
                            owner.tenant,
                            template=template,
                            policy=policy,
                            backend=backend,
                            timeout_s=timeout_s,
                            snapshot=snap,
                        )
                    )
                    handle = sessions.add(ctx, e, owner)
            finally:
                sessions.release(owner)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        info: SandboxInfo = await call(svc.info, e)
        return _ok(info.model_copy(update={"sandbox_id": handle}))

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
            r = await work(
                e,
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
        slot: _Owner | None = None
        try:
            if sandbox_id:
                e = sessions.own(ctx, sandbox_id)
                r = await work(e, svc.run, e, ["python3", "-"], stdin=code.encode())
            else:
                # A throwaway takes a slot of the caller's cap while it lives: many
                # concurrent run_code calls must not get round max_sandboxes_per_session.
                slot = owner = sessions.reserve(ctx)
                with anyio.CancelScope(shield=True):  # made, so destroyed below
                    e = throwaway = await anyio.to_thread.run_sync(
                        lambda: svc.create(
                            owner.tenant, template="code-interpreter-v1", timeout_s=120.0
                        )
                    )
                r = await call(svc.run, e, ["python3", "-"], stdin=code.encode())
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        finally:
            try:
                if throwaway is not None:
                    # Shielded: a cancelled request (client gone) still destroys it.
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(svc.destroy, throwaway, "throwaway")
            finally:
                if slot is not None:
                    sessions.release(slot)
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
            await work(e, svc.file_op, e, "write", path, content.encode())
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
            data: bytes = await work(e, svc.file_op, e, "read", path, limit + 1)
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
            entries = await work(e, svc.file_op, e, "list", path)
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
        try:
            sid, tenant = sessions.resolve(ctx, sandbox_id)
            recs = await call(lambda: list(svc.audit_records(tenant, sid, blocked_only)))
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(
            AuditTrail(
                sandbox_id=sandbox_id, records=[AuditRecord(**r) for r in recs if "_error" not in r]
            )
        )

    @mcp.tool(annotations=READ, description="This session's live sandboxes.")
    async def list_sandboxes(ctx: Context) -> Annotated[CallToolResult, SandboxList]:
        try:
            return _ok(SandboxList(sandboxes=[svc.info(e) for e in sessions.list(ctx)]))
        except ApiError as exc:
            return _fail(exc.message, exc.rule)

    def _shown_info(info: SandboxInfo, handle: str) -> SandboxInfo:
        return info.model_copy(update={"sandbox_id": handle})

    async def _act(ctx: Context, sandbox_id: str, fn: Any, **kw: Any) -> CallToolResult:
        """``fn(e, **kw)`` on this session's sandbox ``sandbox_id`` (busy while it
        runs); its info after, under the id the client used."""
        try:
            e = sessions.own(ctx, sandbox_id)
            await work(e, fn, e, **kw)
            info: SandboxInfo = await call(svc.info, e)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(_shown_info(info, sandbox_id))

    @mcp.tool(
        annotations=DESTRUCTIVE,
        description="Pause a sandbox. memory=true (default) keeps its processes where "
        "the tier can (namespaces: frozen in place, memory kept; gvisor/microvm: saved "
        "to disk); memory=false keeps the files only, and its processes end. A paused "
        "sandbox runs nothing until sandbox_resume; its idle TTL still counts.",
    )
    async def sandbox_pause(
        ctx: Context, sandbox_id: str, memory: bool = True
    ) -> Annotated[CallToolResult, SandboxInfo]:
        return await _act(ctx, sandbox_id, svc.pause, memory=memory)

    @mcp.tool(
        annotations=WRITE,
        description="Resume a paused sandbox (same id); timeout_s sets its new deadline. "
        "Its credentials are issued anew.",
    )
    async def sandbox_resume(
        ctx: Context, sandbox_id: str, timeout_s: float | None = None
    ) -> Annotated[CallToolResult, SandboxInfo]:
        try:
            if timeout_s is not None:
                timeout_s = check_timeout(timeout_s, "timeout_s")
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return await _act(ctx, sandbox_id, svc.resume, timeout_s=timeout_s)

    @mcp.tool(
        annotations=WRITE,
        description="Save a running sandbox as a snapshot (it goes on running): "
        "/workspace, and /tmp with include_tmp. memory=true asks for its processes too, "
        "which only gvisor and microvm can save (namespaces refuses, rule "
        "snapshot.memory); the default saves what the tier can and says so in "
        "`memory`/`memory_refused`. The snapshot is this session's: create_sandbox "
        "with `snapshot` starts a new sandbox from it.",
    )
    async def sandbox_snapshot(
        ctx: Context,
        sandbox_id: str,
        name: str | None = None,
        memory: bool | None = None,
        include_tmp: bool = False,
    ) -> Annotated[CallToolResult, SnapshotModel]:
        try:
            e = sessions.own(ctx, sandbox_id)
            owner = sessions.owner(ctx)
            info = await work(e, svc.snapshot, e, name=name, memory=memory, include_tmp=include_tmp)
            shown = sessions.add_snapshot(owner, info.id)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(snapshot_model(info, shown))

    @mcp.tool(
        annotations=WRITE,
        description="Fork a running sandbox into `count` (default 1) new running "
        "sandboxes of this session, each with its own id, audit trail and credentials. "
        "Each counts toward this session's sandbox cap.",
    )
    async def sandbox_fork(
        ctx: Context,
        sandbox_id: str,
        # strict: true is not 1, nor "2" two (the service checks the upper bound)
        count: Annotated[int, Field(ge=1, strict=True)] = 1,
    ) -> Annotated[CallToolResult, SandboxList]:
        try:
            e = sessions.own(ctx, sandbox_id)
            owner = sessions.reserve(ctx, count)
            try:
                # Shielded, like create_sandbox: forks made must be recorded (or destroyed).
                with anyio.CancelScope(shield=True):
                    results = await anyio.to_thread.run_sync(
                        lambda: sessions.busy(e.id, svc.fork, e, count)
                    )
                    handles = _adopt_all(ctx, results, owner)
            finally:
                sessions.release(owner, count)
            children = [r for r in results if isinstance(r, Entry)]
            infos = [_shown_info(svc.info(c), h) for c, h in zip(children, handles, strict=True)]
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(SandboxList(sandboxes=infos))

    def _adopt_all(ctx: Context, results: list[Entry | ApiError], owner: _Owner) -> list[str]:
        """Record every fork, all or none (as ``POST /v1/.../fork``): if one fork
        failed, the others are destroyed and its error is the answer; if the
        session ended meanwhile, ``add`` destroys each of them."""
        made = [r for r in results if isinstance(r, Entry)]
        failed = [r for r in results if isinstance(r, ApiError)]
        if failed:
            for c in made:
                sessions._destroy_entry(c, "fork failed")
            raise failed[0]
        handles, ended = [], None
        for c in made:
            try:
                handles.append(sessions.add(ctx, c, owner))
            except ApiError as exc:
                ended = exc
        if ended is not None:
            raise ended
        return handles

    @mcp.tool(
        annotations=READ,
        description="This session's snapshots, newest first; filter by sandbox_id and "
        "name. A session-less (2026-07-28) client passes the sandbox_id handle and sees "
        "that sandbox's snapshots.",
    )
    async def snapshot_list(
        ctx: Context, sandbox_id: str | None = None, name: str | None = None
    ) -> Annotated[CallToolResult, SnapshotList]:
        try:
            owner, sid, shown = sessions.shown_snapshots(ctx, sandbox_id)
            infos = await call(svc.list_snapshots, owner.tenant, sandbox_id=sid, name=name)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(
            SnapshotList(snapshots=[snapshot_model(i, shown[i.id]) for i in infos if i.id in shown])
        )

    @mcp.tool(
        annotations=DESTRUCTIVE,
        description="Delete one of this session's snapshots.",
    )
    async def snapshot_delete(
        ctx: Context, snapshot_id: str
    ) -> Annotated[CallToolResult, SnapshotDeleted]:
        try:
            snap, tenant, owner = sessions.snapshot_owned(ctx, snapshot_id)
            deleted = bool(await call(svc.delete_snapshot, tenant, snap))
            sessions.forget_snapshot(snap, owner)
        except ApiError as exc:
            return _fail(exc.message, exc.rule)
        return _ok(SnapshotDeleted(snapshot_id=snapshot_id, deleted=deleted))

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
        return _ok(svc.info(e).model_copy(update={"sandbox_id": sandbox_id}))

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

    @mcp.tool(
        annotations=READ,
        description="Pending approvals (network.ask) for this session's sandboxes, or, "
        "with sandbox_id (a bare id of this session, or a handle), for that sandbox.",
    )
    async def list_approvals(
        ctx: Context, sandbox_id: str | None = None
    ) -> Annotated[CallToolResult, ApprovalList]:
        try:
            ids = sessions.visible(ctx, sandbox_id)
            return _ok(ApprovalList(approvals=await call(svc.approvals.list, ids)))
        except ApiError as exc:
            return _fail(exc.message, exc.rule)

    @mcp.tool(
        annotations=WRITE,
        description="Approve or deny a pending approval. A session-less (2026-07-28) "
        "client passes the sandbox_id handle of the sandbox it belongs to.",
    )
    async def decide_approval(
        ctx: Context, approval_id: str, decision: str, sandbox_id: str | None = None
    ) -> Annotated[CallToolResult, Approval]:
        if decision not in ("approve", "deny"):
            return _fail("decision must be 'approve' or 'deny'")
        try:
            ids = sessions.visible(ctx, sandbox_id)
            return _ok(await call(svc.approvals.decide, approval_id, decision == "approve", ids))
        except ApiError as exc:
            return _fail(exc.message, exc.rule)

    return mcp


def _service(cfg: ServeConfig | None) -> SandboxService:
    cfg = cfg or ServeConfig()
    svc = SandboxService(cfg)
    svc.tenant(MCP_TENANT).max_sandboxes = MCP_TENANT_CAP
    svc.tenant(MCP_HANDLE_TENANT).max_sandboxes = cfg.max_handle_sandboxes
    return svc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: where it points is not ours to trust
        return False


def check_http_bind(cfg: ServeConfig, host: str) -> None:
    """Refuse to serve unauthenticated anywhere but loopback.

    Without API keys, any process that can reach the port can run code
    through the tools: tolerable on 127.0.0.1 of a single-user machine (and
    said so at startup), never on an address other machines reach."""
    if not cfg.key_hashes and not _is_loopback(host):
        raise ValueError(
            f"--host {host} is not a loopback address and no API keys are configured: "
            "add [tenants.NAME] api_keys_sha256 to --config (or set GLASSROOM_API_KEY), "
            "or bind --host 127.0.0.1"
        )


_AUTH_HELP = (
    "send the key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (a key of "
    "the --config's [tenants.NAME] api_keys_sha256, or GLASSROOM_API_KEY)"
)


class _Auth:
    """The API-key check in front of the MCP app: the same keys as ``glassroom serve``.

    Every HTTP request must carry a configured tenant's key, as
    ``X-API-Key`` or ``Authorization: Bearer`` (``serve``'s order); the key's
    hash is compared with every configured hash in constant time
    (:meth:`ServeConfig.tenant_for`).  The tenant's name goes into the ASGI
    scope, where the tools read it (:func:`_who`); a request without a
    valid key is answered 401 before the SDK sees it.  With no keys
    configured, requests pass unauthenticated (loopback only, see
    :func:`check_http_bind`).
    """

    def __init__(self, app: ASGIApp, cfg: ServeConfig) -> None:
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.cfg.key_hashes:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
        if not key:
            scheme, _, cred = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            key = cred.strip() if scheme.lower() == "bearer" else ""
        tenant = self.cfg.tenant_for(key) if key else None
        if tenant is None:
            why = "unknown API key" if key else "no API key"
            await _reply_401(send, f"{why}: {_AUTH_HELP}")
            return
        scope[TENANT_SCOPE_KEY] = tenant.name
        await self.app(scope, receive, send)


async def _reply_401(send: Send, message: str) -> None:
    body = json.dumps({"error": "unauthenticated", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="glassroom"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def http_app(
    svc: SandboxService, *, host: str = "127.0.0.1", idle_ttl_s: float = DEFAULT_IDLE_TTL_S
) -> ASGIApp:
    """The streamable-HTTP ASGI app (``/mcp``) over ``svc``, behind the key check."""
    server = build_server(svc, idle_ttl_s=idle_ttl_s)
    return _Auth(server.streamable_http_app(host=host), svc.cfg)


def run_stdio(cfg: ServeConfig | None = None, *, idle_ttl_s: float = DEFAULT_IDLE_TTL_S) -> None:
    """Serve the one client on stdin/stdout; its sandboxes go when the pipe closes.

    SIGTERM (what the SDK's stdio client sends when the pipe close was not
    enough, and what a supervisor sends) and SIGINT are turned into an orderly stop once:
    Python's default action would end the process without destroying anything.
    After that teardown the process exits at once: the SDK's thread that reads
    stdin cannot be interrupted, and would keep it alive until the pipe closed.
    """
    svc = _service(cfg)
    stopping = False
    terminated = 0

    def on_term(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping, terminated
        if not stopping:  # a second signal must not cut the teardown short
            stopping, terminated = True, sig
            raise KeyboardInterrupt

    # SIGINT too: Python's own KeyboardInterrupt waited for the running commands,
    # then for the stdin thread, so a Ctrl-C'd server stayed until the pipe closed.
    previous = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        build_server(svc, process_session=True, idle_ttl_s=idle_ttl_s).run("stdio")
    finally:
        stopping = True
        try:
            svc.close()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if terminated:
                logging.shutdown()
                os._exit(128 + terminated)


def run_http(
    cfg: ServeConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8050,
    *,
    idle_ttl_s: float = DEFAULT_IDLE_TTL_S,
) -> None:
    """Streamable HTTP at ``/mcp``: sessions for handshake clients, handles for 2026-07-28.

    Run by the same bounded server as ``glassroom serve``: a handshake client's
    open GET stream would otherwise hold a SIGTERM up for as long as it stays.
    With API keys in ``cfg`` every request needs one (:class:`_Auth`); without,
    only a loopback ``host`` is served (:func:`check_http_bind` raises
    ``ValueError`` otherwise), and a startup line says it is unauthenticated.
    """
    import uvicorn

    from ..http._serve import BoundedServer, grace_for

    cfg = cfg or ServeConfig()
    check_http_bind(cfg, host)  # before anything is made (the service reaps at start)
    svc = _service(cfg)
    try:
        app = http_app(svc, host=host, idle_ttl_s=idle_ttl_s)
        bound = svc.cfg.shutdown_timeout_s
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(grace_for(bound))),
        )
        # uvicorn's logger: configured (to stderr) by uvicorn.Config just above.
        ulog = logging.getLogger("uvicorn.error")
        if cfg.key_hashes:
            ulog.info(
                "MCP over HTTP: API keys required (%d tenant(s)); max_sandboxes_per_session "
                "= %d, max_handle_sandboxes = %d",
                len(set(cfg.key_hashes.values())),
                cfg.max_sandboxes_per_session,
                cfg.max_handle_sandboxes,
            )
        else:
            ulog.warning(
                "MCP over HTTP without authentication: no API keys are configured, so any "
                "local process that can reach %s:%d can use these tools (loopback only; add "
                "[tenants.NAME] api_keys_sha256 to --config or set GLASSROOM_API_KEY to "
                "require a key)",
                host,
                port,
            )
        BoundedServer(config, svc, bound).run()
    finally:
        svc.close()
