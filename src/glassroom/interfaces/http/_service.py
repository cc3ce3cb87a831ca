"""The sandbox service behind ``glassroom serve`` and ``glassroom mcp``.

It owns every sandbox the server made, per tenant, and what the clients
rely on: the deadline (exact, extendable up to the policy's hard cap, reaped
with an audit record), the per-tenant cap, background processes, and the
teardown receipt.  The HTTP layers (own API, E2B) and the MCP server are
thin translations onto this.

**Who owns a sandbox.**  bubblewrap runs with ``--die-with-parent``, whose
PDEATHSIG fires when the *thread* that spawned it exits.  Request handlers
run on short-lived worker threads, so sandboxes are created on this
service's own pool of owner threads, which live as long as the service.
"""

from __future__ import annotations

import builtins
import contextlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ... import __version__
from ..._errors import (
    BackendUnavailable,
    GlassroomError,
    PlanError,
    PolicyError,
    SandboxClosed,
    SandboxError,
    SandboxPathError,
)
from ..._sandbox import RunResult, Sandbox
from ...audit import AuditLog, read_records
from ...backends.base import Process, Receipt
from ...lifecycle.supervisor import reap_orphans
from ...policy import Policy, parse_policy, validate_policy
from ._config import ServeConfig, Tenant
from ._models import Approval, BlockedAction, CommandResult, SandboxInfo

log = logging.getLogger("glassroom.serve")

#: How many destroyed sandbox ids are remembered (for "was not found" answers).
GONE_MEMORY = 10000
OWNER_THREADS = 32
#: A timeout beyond this (ten years) is a client's error, not a long deadline.
SANE_TIMEOUT_S = 10 * 365 * 86400.0
#: At most this many entries in a create's ``env`` or ``metadata``.
MAX_MAPPING_ITEMS = 1000


class ApiError(Exception):
    """An error with its HTTP status, a short code and (when one decided) the rule."""

    def __init__(self, status: int, code: str, message: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.rule = rule

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "rule": self.rule}}


def translate(exc: GlassroomError) -> ApiError:
    """glassroom's error tree -> HTTP: bad input is 4xx; only a host failure is 503."""
    rule = exc.rule
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, PolicyError | PlanError):
        return ApiError(400, "invalid_policy", msg, rule)
    if isinstance(exc, BackendUnavailable):
        return ApiError(400, "backend_unavailable", msg, rule)
    if isinstance(exc, SandboxPathError):
        errno_ = getattr(exc, "errno", None)
        return ApiError(
            404 if errno_ == 2 else 403, "not_found" if errno_ == 2 else "forbidden", msg, rule
        )
    if isinstance(exc, SandboxClosed):
        return ApiError(404, "not_found", f"{msg} (the sandbox was not found)", rule)
    if isinstance(exc, SandboxError):
        return ApiError(400, "sandbox_error", msg, rule)
    return ApiError(503, "unavailable", msg, rule)


def check_timeout(
    value: object, field: str, *, limit: float = SANE_TIMEOUT_S, allow_zero: bool = False
) -> float:
    """``value`` as seconds, or 400 naming ``field``: a number (not a bool),
    finite, above 0 and at most ``limit``.  NaN compares false with everything,
    so an unchecked NaN passed every ``>`` test and made a sandbox with no deadline.
    The policy's own cap (``resources.max_runtime_s``) is checked after this, with
    its rule named; ``limit`` only stops numbers no policy could mean.
    ``allow_zero``: E2B's ``POST /sandboxes/{id}/timeout`` takes 0 as "expire now"."""
    secs = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            secs = float(value)
    if not (math.isfinite(secs) and (secs > 0 or (allow_zero and secs == 0)) and secs <= limit):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        raise ApiError(
            400,
            "invalid",
            f"{field}: must be a finite number of seconds "
            f"{'from 0' if allow_zero else 'above 0'} and at most {limit:g}, "
            f"got {shown}",
            rule=field,
        )
    return secs


def check_mapping(value: object, field: str, *, env: bool = False) -> dict[str, str]:
    """``value`` as a ``{str: str}``, or 400 naming the entry: strings only, no
    lone surrogates (they cannot be written back as UTF-8, so one such string
    used to break every later listing of the tenant), and for an environment
    no ``=`` or NUL in a name and no NUL in a value."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ApiError(400, "invalid", f"{field}: must be an object of strings", rule=field)
    if len(value) > MAX_MAPPING_ITEMS:
        raise ApiError(
            400, "invalid", f"{field}: more than {MAX_MAPPING_ITEMS} entries", rule=field
        )
    out: dict[str, str] = {}
    for k, v in value.items():
        where = f"{field}[{ascii(k)[:60]}]"
        if not isinstance(k, str) or not isinstance(v, str):
            raise ApiError(400, "invalid", f"{where}: keys and values must be strings", rule=field)
        for text, what in ((k, "key"), (v, "value")):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(
                    400,
                    "invalid",
                    f"{where}: the {what} holds a lone UTF-16 surrogate at character "
                    f"{exc.start}; send valid Unicode",
                    rule=field,
                ) from None
        if env and (not k or "=" in k or "\0" in k or "\0" in v):
            raise ApiError(
                400,
                "invalid",
                f"{where}: an environment name must be non-empty without '=' or NUL, "
                "and a value without NUL",
                rule=field,
            )
        out[k] = v
    return out


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Entry:
    """One live sandbox and what the service keeps beside it."""

    sb: Sandbox
    tenant: str
    template: str | None
    metadata: dict[str, str]
    env: dict[str, str]
    created: float
    end_at: float
    max_runtime_s: float
    access_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    procs: dict[int, Process] = field(default_factory=dict)
    tags: dict[int, str] = field(default_factory=dict)
    #: per-service extensions (the code interpreter's kernels live here)
    extra: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.sb.id


class Approvals:
    """Pending human approvals, for the tenant's own sandboxes.

    Two sources: the egress proxy's ``network.ask`` holds (files under the
    state dir, shared with ``glassroom approvals``), and approvals requested
    in-process through :meth:`request` (for clients and future rules).
    """

    def __init__(self) -> None:
        self._items: dict[str, Approval] = {}
        self._cond = threading.Condition()

    def request(self, sandbox_id: str, action: str, target: str, rule: str) -> Approval:
        a = Approval(
            approval_id="ap-" + secrets.token_hex(6),
            sandbox_id=sandbox_id,
            action=action,
            target=target,
            rule=rule,
            requested_at=rfc3339(time.time()),
            state="pending",
        )
        with self._cond:
            self._items[a.approval_id] = a
        return a

    @staticmethod
    def _egress() -> builtins.list[Approval]:
        try:
            from ...egress import _approvals
        except ImportError:
            return []
        out = []
        for a in _approvals.pending():
            what = f"{a.method or 'CONNECT'} {a.host}:{a.port}{a.path or ''}"
            out.append(
                Approval(
                    approval_id=a.id,
                    sandbox_id=a.sandbox,
                    action="network",
                    target=what,
                    rule=a.rule,
                    requested_at=rfc3339(a.created),
                    state="pending",
                )
            )
        return out

    def list(self, sandbox_ids: set[str]) -> builtins.list[Approval]:
        with self._cond:
            mine = [a for a in self._items.values() if a.sandbox_id in sandbox_ids]
        return mine + [a for a in self._egress() if a.sandbox_id in sandbox_ids]

    def decide(self, approval_id: str, approve: bool, sandbox_ids: set[str]) -> Approval:
        with self._cond:
            a = self._items.get(approval_id)
            if a is not None and a.sandbox_id in sandbox_ids:
                if a.state != "pending":
                    raise ApiError(409, "conflict", f"approval {approval_id} is already {a.state}")
                a = a.model_copy(update={"state": "approved" if approve else "denied"})
                self._items[approval_id] = a
                self._cond.notify_all()
                return a
        held = next((x for x in self._egress() if x.approval_id == approval_id), None)
        if held is None or held.sandbox_id not in sandbox_ids:
            raise ApiError(404, "not_found", f"approval {approval_id} was not found")
        from ...egress import _approvals

        try:
            rec = _approvals.decide(
                approval_id, "allow" if approve else "deny", by="glassroom-serve"
            )
        except GlassroomError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        state = "approved" if rec.get("decision") == "allow" else "denied"
        return held.model_copy(update={"state": state})

    def wait(self, approval_id: str, timeout: float) -> Approval | None:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                a = self._items.get(approval_id)
                if a is None or a.state != "pending":
                    return a
                left = end - time.monotonic()
                if left <= 0:
                    return a
                self._cond.wait(left)


class SandboxService:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.audit = AuditLog(cfg.audit_log)
        self.version = __version__
        self.approvals = Approvals()
        self._owner = ThreadPoolExecutor(OWNER_THREADS, thread_name_prefix="glassroom-owner")
        self._entries: dict[str, Entry] = {}
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (tenant, why)
        self._reserved: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._on_destroy: list[Callable[[Entry], None]] = []
        self._stopping: builtins.list[threading.Thread] = []
        self._stop_began: float | None = None
        self._destroying = 0
        # A server killed by SIGKILL (or a power cut) left its sandboxes' cgroups,
        # mounts and records behind: clean them before serving anyone, not at the
        # first create, so a restarted server starts from a clean host.
        reap_orphans(self.audit)
        self._reaper = threading.Thread(
            target=self._reap_loop, name="glassroom-deadlines", daemon=True
        )
        self._reaper.start()

    # -- tenants -------------------------------------------------------------

    def authenticate(self, key: str | None) -> Tenant:
        tenant = self.cfg.tenant_for(key)
        if tenant is None:
            raise ApiError(401, "unauthenticated", "missing or unknown API key")
        return tenant

    def tenant(self, name: str) -> Tenant:
        t = self.cfg.tenants.get(name)
        if t is None:
            t = self.cfg.tenants.setdefault(name, Tenant(name))
        return t

    # -- create ----------------------------------------------------------------

    def _policy(self, template: str | None, policy: str | Mapping[str, Any] | None) -> Policy:
        if policy is not None:
            try:
                if isinstance(policy, str):
                    return parse_policy(policy, source="request.policy")
                return validate_policy(dict(policy))
            except PolicyError as exc:
                raise translate(exc) from None
        name = template or self.cfg.default_template
        tpl = self.cfg.templates.get(name)
        if tpl is None:
            known = ", ".join(sorted(self.cfg.templates))
            raise ApiError(
                404,
                "not_found",
                f"template {name!r} was not found (known: {known})",
                rule="template",
            )
        return tpl

    def create(
        self,
        tenant: Tenant,
        *,
        template: str | None = None,
        policy: str | Mapping[str, Any] | None = None,
        backend: str | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Entry:
        # Every argument is checked before anything is made: a create that fails
        # must leave nothing behind (no sandbox, no slot of the tenant's cap).
        if timeout_s is not None:
            timeout_s = check_timeout(timeout_s, "timeout_s")
        env = check_mapping(env, "env", env=True)
        metadata = check_mapping(metadata, "metadata")
        pol = self._policy(template, policy)
        cap = pol.resources.max_runtime_s
        timeout = timeout_s if timeout_s is not None else min(self.cfg.default_timeout_s, cap)
        if timeout > cap:
            raise ApiError(
                400,
                "limit",
                f"timeout {timeout:g}s exceeds the policy's max runtime ({cap:g}s)",
                rule="resources.max_runtime_s",
            )
        with self._cond:
            if self._closed:
                raise ApiError(503, "unavailable", "the server is shutting down")
            live = sum(1 for e in self._entries.values() if e.tenant == tenant.name)
            busy = live + self._reserved.get(tenant.name, 0)
            if busy >= tenant.max_sandboxes:
                raise ApiError(
                    429,
                    "limit",
                    f"tenant {tenant.name!r} already has {busy} sandboxes "
                    f"(max {tenant.max_sandboxes})",
                    rule="tenant.max_sandboxes",
                )
            self._reserved[tenant.name] = self._reserved.get(tenant.name, 0) + 1
        try:
            fut = self._owner.submit(Sandbox, pol, backend=backend, audit_log=self.cfg.audit_log)
            try:
                sb = fut.result()
            except GlassroomError as exc:
                raise translate(exc) from None
            except OSError as exc:  # the host, not the input: say so, without a 500
                log.exception("creating a sandbox failed")
                raise ApiError(503, "unavailable", f"cannot create a sandbox: {exc}") from None
            now = time.time()
            entry = Entry(
                sb=sb,
                tenant=tenant.name,
                template=None if policy is not None else (template or self.cfg.default_template),
                metadata=dict(metadata or {}),
                env=dict(env or {}),
                created=now,
                end_at=now + timeout,
                max_runtime_s=cap,
            )
            try:
                self.audit.append(
                    sb.id,
                    "service.created",
                    {
                        "tenant": tenant.name,
                        "template": entry.template,
                        "timeout_s": timeout,
                        "metadata": entry.metadata,
                    },
                    decision="allow",
                )
            except BaseException as exc:
                # Made but not listed: destroy it, or it would run outside the
                # tenant's cap with no deadline.
                with contextlib.suppress(Exception):
                    sb.destroy()
                if isinstance(exc, GlassroomError):
                    raise translate(exc) from None
                raise
            with self._cond:
                closed = self._closed
                if not closed:
                    self._entries[sb.id] = entry
                    self._cond.notify_all()
            if closed:  # stopping began while it was being made: it must not outlive us
                with contextlib.suppress(Exception):
                    sb.destroy()
                raise ApiError(503, "unavailable", "the server is shutting down")
            return entry
        finally:
            with self._cond:
                self._reserved[tenant.name] -= 1
                self._cond.notify_all()

    # -- lookup ----------------------------------------------------------------

    def get(self, tenant: Tenant, sandbox_id: str) -> Entry:
        with self._cond:
            e = self._entries.get(sandbox_id)
        if e is None or e.tenant != tenant.name:
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} was not found")
        return e

    def get_by_token(self, sandbox_id: str, token: str | None) -> Entry:
        """For envd-style calls, which carry the sandbox's access token, not an API key."""
        with self._cond:
            e = self._entries.get(sandbox_id)
        if e is None:
            raise ApiError(502, "not_found", f"The sandbox {sandbox_id} was not found")
        if not token or not hmac.compare_digest(token, e.access_token):
            raise ApiError(401, "unauthenticated", "missing or wrong sandbox access token")
        return e

    def list(self, tenant: Tenant) -> list[Entry]:
        with self._cond:
            return [e for e in self._entries.values() if e.tenant == tenant.name]

    def infos(self, tenant: Tenant) -> builtins.list[SandboxInfo]:
        """The tenant's listing.  One sandbox whose record cannot be shown must
        never break the listing of the others: it is left out and logged."""
        out = []
        for e in self.list(tenant):
            try:
                info = self.info(e)
                info.model_dump_json()  # it must be sendable, too
            except Exception as exc:  # said without a traceback: it is not a crash
                log.warning("sandbox %s left out of a listing: %r", e.id, exc)
                continue
            out.append(info)
        return out

    def owned_ids(self, tenant: Tenant) -> set[str]:
        with self._cond:
            ids = {i for i, e in self._entries.items() if e.tenant == tenant.name}
            ids |= {i for i, (t, _) in self._gone.items() if t == tenant.name}
        return ids

    def info(self, e: Entry) -> SandboxInfo:
        sb = e.sb
        alive = True
        try:
            walls = sb.walls
        except GlassroomError:
            walls, alive = {}, False
        return SandboxInfo(
            sandbox_id=e.id,
            tenant=e.tenant,
            template=e.template,
            backend=sb.backend,
            tier=sb.policy.risk,
            state="running" if alive else "destroyed",
            started_at=rfc3339(e.created),
            end_at=rfc3339(e.end_at),
            timeout_s=max(0.0, round(e.end_at - time.time(), 3)),
            max_runtime_s=e.max_runtime_s,
            metadata=e.metadata,
            walls=walls,
        )

    # -- lifecycle -------------------------------------------------------------

    def set_timeout(self, e: Entry, timeout_s: float, *, allow_zero: bool = False) -> None:
        """Move the deadline to now + ``timeout_s``; 0 (only if ``allow_zero``, for
        E2B's API) makes it now, so the reaper destroys the sandbox at once."""
        timeout_s = check_timeout(timeout_s, "timeout_s", allow_zero=allow_zero)
        now = time.time()
        hard = e.created + e.max_runtime_s
        if now + timeout_s > hard + 1e-3:
            raise ApiError(
                400,
                "limit",
                f"a timeout of {timeout_s:g}s would pass the policy's max "
                f"runtime ({e.max_runtime_s:g}s from creation; {hard - now:.0f}s left)",
                rule="resources.max_runtime_s",
            )
        with self._cond:
            e.end_at = now + timeout_s
            self._cond.notify_all()
        self.audit.append(
            e.id, "service.timeout_set", {"timeout_s": timeout_s, "end_at": rfc3339(e.end_at)}
        )

    def gone_reason(self, sandbox_id: str) -> str | None:
        """Why a sandbox that was live is gone ("client", "timeout", "server
        shutdown"...), or None: a stream that outlived its sandbox says which."""
        with self._cond:
            gone = self._gone.get(sandbox_id)
        return gone[1] if gone else None

    def on_destroy(self, callback: Callable[[Entry], None]) -> None:
        self._on_destroy.append(callback)

    def destroy(self, e: Entry, reason: str = "client") -> Receipt:
        with self._cond:
            if self._entries.get(e.id) is e:
                del self._entries[e.id]
                self._gone[e.id] = (e.tenant, reason)
                while len(self._gone) > GONE_MEMORY:
                    self._gone.popitem(last=False)
            # Counted until the teardown is done: close() must wait for a destroy
            # that another thread began (a session's end, a deadline), or the
            # process exits half-way through it.
            self._destroying += 1
        try:
            for cb in self._on_destroy:
                with contextlib.suppress(Exception):
                    cb(e)
            return e.sb.destroy()
        finally:
            with self._cond:
                self._destroying -= 1
                self._cond.notify_all()

    def _reap_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.time()
                due = [e for e in self._entries.values() if e.end_at <= now]
                if not due:
                    nxt = min((e.end_at for e in self._entries.values()), default=now + 60)
                    self._cond.wait(max(0.001, min(nxt - now, 60)))
                    continue
            for e in due:
                with contextlib.suppress(Exception):
                    self.audit.append(
                        e.id,
                        "sandbox.expired",
                        {"end_at": rfc3339(e.end_at), "tenant": e.tenant},
                        decision="deny",
                        rule="lifecycle.timeout",
                    )
                with contextlib.suppress(Exception):
                    self.destroy(e, reason="timeout")

    def begin_shutdown(self) -> None:
        """Refuse new sandboxes and start destroying every live one, in parallel.

        Called the moment the server is told to stop, *before* uvicorn waits
        for open connections: destroying a sandbox ends its processes, so every
        stream that follows one (E2B Connect, ``/v1`` NDJSON, ``/execute``)
        ends with its end event instead of holding the server up.  One thread
        per sandbox, because a sandbox's teardown waits on the kernel (cgroup
        kill, unmount) and a serial loop made the stop time grow with the count.
        Returns at once; :meth:`close` waits for the threads, bounded.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stop_began = time.monotonic()
            entries = list(self._entries.values())
            self._cond.notify_all()
        for e in entries:
            t = threading.Thread(
                target=self._destroy_quietly, args=(e,), name=f"stop-{e.id}", daemon=True
            )
            t.start()
            self._stopping.append(t)

    def _destroy_quietly(self, e: Entry) -> None:
        try:
            self.destroy(e, reason="server shutdown")
        except Exception:
            log.exception("destroying %s at shutdown failed", e.id)

    def close(self, timeout: float | None = None) -> builtins.list[str]:
        """Destroy every sandbox and stop; returns the ids not destroyed within ``timeout``
        (default: what is left of ``shutdown_timeout_s`` since stopping began, less
        a second for the process to exit).

        Creates and destroys still in flight finish first (a sandbox made after
        stopping began destroys itself, see :meth:`create`).  What is not gone by the
        bound is logged by id: the process is about to exit, ``--die-with-parent``
        kills its processes, and the reaper at the next start removes the rest.
        """
        self.begin_shutdown()
        if timeout is None:
            began = self._stop_began if self._stop_began is not None else time.monotonic()
            timeout = max(0.5, began + self.cfg.shutdown_timeout_s - 1.0 - time.monotonic())
        end = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, end - time.monotonic())

        with self._cond:
            while any(self._reserved.values()) or self._destroying:
                wait = left()
                if wait == 0.0:
                    break
                self._cond.wait(min(wait, 0.05))
        for t in self._stopping:
            t.join(left())
        stuck = [t.name.removeprefix("stop-") for t in self._stopping if t.is_alive()]
        self._owner.shutdown(wait=not stuck, cancel_futures=True)
        if stuck:
            log.error(
                "shutdown: %d sandbox(es) not destroyed within %.1f s: %s; the reaper "
                "removes what is left at the next start",
                len(stuck),
                timeout,
                ", ".join(stuck),
            )
        else:
            self.audit.close()
        return stuck

    # -- commands and files ------------------------------------------------------

    def run(
        self,
        e: Entry,
        argv: builtins.list[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
    ) -> CommandResult:
        full_env = {**e.env, **(env or {})}
        try:
            r = e.sb.run(argv, cwd=cwd, env=full_env, stdin=stdin, timeout_s=timeout_s)
        except GlassroomError as exc:
            raise translate(exc) from None
        return command_result(r)

    def spawn(
        self,
        e: Entry,
        argv: builtins.list[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        tag: str | None = None,
    ) -> Process:
        full_env = {**e.env, **(env or {})}
        try:
            p = e.sb.spawn(argv, cwd=cwd, env=full_env, timeout_s=timeout_s)
        except GlassroomError as exc:
            raise translate(exc) from None
        if p.pid:
            with e.lock:
                e.procs[p.pid] = p
                if tag:
                    e.tags[p.pid] = tag

            def gone(_res: Any) -> None:
                with e.lock:
                    e.procs.pop(p.pid, None)
                    e.tags.pop(p.pid, None)

            p.on_exit(gone)
        return p

    def file_op(self, e: Entry, op: str, *args: Any) -> Any:
        try:
            return getattr(e.sb.files, op)(*args)
        except GlassroomError as exc:
            raise translate(exc) from None

    def audit_records(
        self, tenant: Tenant, sandbox_id: str, blocked_only: bool = False
    ) -> Iterator[dict[str, Any]]:
        if sandbox_id not in self.owned_ids(tenant):
            raise ApiError(404, "not_found", f"sandbox {sandbox_id} was not found")
        path = Path(self.cfg.audit_log)
        for r in read_records(path):
            if r.get("sandbox") != sandbox_id:
                continue
            if blocked_only and r.get("decision") != "deny":
                continue
            yield r


def command_result(r: RunResult) -> CommandResult:
    return CommandResult(
        exit_code=r.exit_code,
        stdout=r.stdout,
        stderr=r.stderr,
        duration_ms=round(r.duration_ms, 3),
        truncated=r.truncated,
        timed_out=r.timed_out,
        signal=r.signal,
        blocked=[BlockedAction(**b.as_dict()) for b in r.blocked],
    )
