"""The sandbox service behind ``glassroom serve`` and ``glassroom mcp``.

It owns every sandbox the server made, per tenant, and what the clients
rely on: the deadline (exact, extendable up to the policy's hard cap, reaped
with an audit record), the per-tenant cap, background processes, and the
teardown receipt.  The HTTP layers (own API, E2B) and the MCP server are
thin translations onto this.

**Pause, resume, snapshot, fork** (docs/snapshots.md).  The core does the
work and writes the audit records; the service keeps the clock.  A paused
sandbox has no running deadline: what was left of it is recorded and given
back at resume (unless the client names a new one), the time spent paused
does not count against the policy's max runtime, and the paused sandbox is
kept at most ``[snapshots] max_age_s`` before it is destroyed.  With
``auto_pause`` the deadline pauses the sandbox instead of destroying it.
The snapshot store is one per service, under ``data_dir/snapshots``, with
per-tenant limits.

**Who owns a sandbox.**  bubblewrap runs with ``--die-with-parent``, whose
PDEATHSIG fires when the *thread* that spawned it exits.  Request handlers
run on short-lived worker threads, so sandboxes are created on this
service's own pool of owner threads, which live as long as the service.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
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
from typing import Any, Literal

from ... import __version__
from ..._errors import (
    BackendUnavailable,
    GlassroomError,
    PlanError,
    PolicyError,
    SandboxClosed,
    SandboxError,
    SandboxPathError,
    SnapshotError,
    SnapshotIntegrityError,
)
from ..._sandbox import RunResult, Sandbox
from ...audit import AuditLog, read_records
from ...backends.base import Process, Receipt
from ...egress import NetworkOptions
from ...lifecycle import snapshots as _snapshots
from ...lifecycle.snapshots import SnapshotInfo, SnapshotStore
from ...lifecycle.supervisor import reap_orphans
from ...policy import Policy, parse_policy, validate_policy
from ._config import ServeConfig, Tenant
from ._models import (
    Approval,
    AuditVerify,
    BlockedAction,
    CommandResult,
    PolicyView,
    SandboxInfo,
    SnapshotModel,
    Usage,
)

log = logging.getLogger("glassroom.serve")

#: How many destroyed sandbox ids are remembered (for "was not found" answers).
GONE_MEMORY = 10000
OWNER_THREADS = 32
#: A timeout beyond this (ten years) is a client's error, not a long deadline.
SANE_TIMEOUT_S = 10 * 365 * 86400.0
#: At most this many entries in a create's ``env`` or ``metadata``.
MAX_MAPPING_ITEMS = 1000
#: At most this many sandboxes from one fork call (E2B's SDK allows 20).
MAX_FORK_COUNT = 20
#: How often the reaper prunes expired snapshots (they also go when the store is used).
PRUNE_EVERY_S = 300.0
#: What a snapshot error's rule means over HTTP: (status, code).
SNAPSHOT_STATUS = {
    "snapshot.not_found": (404, "not_found"),
    "snapshot.state": (409, "conflict"),
    "snapshot.limit": (429, "limit"),
    "snapshot.memory": (400, "unsupported"),
    "snapshot.integrity": (409, "integrity"),
    "snapshot.name": (400, "invalid"),
}


#: On every answer that carries a sandbox's file bytes: they are the sandbox's
#: data, served from the service's (and the console's) origin, so a browser
#: must never sniff, render or cache them as the service's own page.
FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox",
    "Content-Disposition": "attachment",
    "Cache-Control": "private, no-store",
}


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
    if isinstance(exc, SnapshotError):
        if isinstance(exc, SnapshotIntegrityError):
            rule = rule or "snapshot.integrity"
        status, code = SNAPSHOT_STATUS.get(rule or "", (400, "sandbox_error"))
        return ApiError(status, code, msg, rule)
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


def check_bool(value: object, field: str) -> bool:
    """``value`` as a JSON boolean, or 400 naming ``field`` (``"false"`` and 0 are not)."""
    if not isinstance(value, bool):
        raise ApiError(400, "invalid", f"{field}: must be true or false", rule=field)
    return value


def check_count(value: object, field: str = "count", limit: int = MAX_FORK_COUNT) -> int:
    """``value`` as a whole number from 1 to ``limit``, or 400 naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ApiError(
            400, "invalid", f"{field}: must be a whole number from 1 to {limit}", rule=field
        )
    return value


def check_name(value: object, field: str = "name") -> str:
    """A snapshot's name as the store takes it (letters, digits and ``._:@/-``,
    at most 128), or 400 naming ``field``: refused before the sandbox is touched."""
    try:
        return _snapshots.check_name(value)  # type: ignore[arg-type]
    except SnapshotError as exc:
        raise ApiError(400, "invalid", f"{field}: {exc}", rule=field) from None


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def snapshot_model(info: SnapshotInfo, shown_id: str | None = None) -> SnapshotModel:
    """A core ``SnapshotInfo`` as the API (``/v1/snapshots``) and the MCP tools
    show it; ``shown_id``: the id the client is to use, if not the snapshot's
    own (an MCP handle for a session-less client)."""
    return SnapshotModel(
        snapshot_id=info.id if shown_id is None else shown_id,
        names=list(info.names),
        sandbox_id=info.sandbox_id,
        tier=info.tier,
        memory=info.memory,
        memory_refused=info.memory_refused,
        size_bytes=info.size_bytes,
        created_at=rfc3339(info.created_at),
    )


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
    #: At the deadline: pause (keeping memory when ``auto_pause_memory``) instead of destroy.
    auto_pause: bool = False
    auto_pause_memory: bool = True
    #: The sandbox and snapshot it was made from (a fork or a create from a snapshot).
    parent: str | None = None
    snapshot: str | None = None
    #: While paused: when it was paused, the running time it had left then
    #: (given back at resume), and the facts of the pause.  ``end_at`` is then
    #: the end of the time it is kept paused.
    paused_at: float | None = None
    left_s: float = 0.0
    pause_facts: dict[str, Any] | None = None
    #: Time spent paused so far: it does not count against ``max_runtime_s``.
    paused_s: float = 0.0
    #: A pause, resume, snapshot or fork is under way: the reaper waits for it.
    busy: int = 0
    #: Serializes pause, resume, snapshot and fork of this sandbox.
    life: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.sb.id

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def hard_end(self) -> float:
        """The policy's max runtime, counted in running time only."""
        return self.created + self.max_runtime_s + self.paused_s


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
                    expires_at=rfc3339(a.expires),
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
        #: Per tenant: sandboxes being destroyed (still running until that ends).
        self._dying: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._on_destroy: list[Callable[[Entry], None]] = []
        self._stopping: builtins.list[threading.Thread] = []
        self._stop_began: float | None = None
        self._destroying = 0
        self.store = SnapshotStore(cfg.snapshot_dir, cfg.snapshot_limits)
        self._pruned_at = time.monotonic()
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

    def _policy(
        self, template: str | None, policy: str | Mapping[str, Any] | Policy | None
    ) -> Policy:
        if isinstance(policy, Policy):  # made by the server itself, never a request's
            return policy
        if policy is not None:
            try:
                if isinstance(policy, str):
                    given = parse_policy(policy, source="request.policy")
                else:
                    given = validate_policy(dict(policy))
            except PolicyError as exc:
                raise translate(exc) from None
            if not (given.template or "").startswith("e2b-"):
                return given
            # A tenant's template of E2B's build API is used by its E2B name, by
            # that tenant only (interfaces/e2b/_template_build.py), never by store name.
            raise ApiError(
                403,
                "forbidden",
                "template: the store's e2b-* templates are tenants' own; use yours by its "
                "E2B name (Sandbox.create)",
                rule="template",
            )
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
        policy: str | Mapping[str, Any] | Policy | None = None,
        backend: str | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        snapshot: str | None = None,
        auto_pause: bool = False,
        auto_pause_memory: bool = True,
        network: NetworkOptions | None = None,
    ) -> Entry:
        """A new sandbox: from a template or a policy, or (``snapshot``) from one of
        the tenant's snapshots, whose files and policy it gets.  ``network``: the
        egress proxy's host-side options (the E2B per-sandbox network overlay)."""
        # Every argument is checked before anything is made: a create that fails
        # must leave nothing behind (no sandbox, no slot of the tenant's cap).
        if timeout_s is not None:
            timeout_s = check_timeout(timeout_s, "timeout_s")
        env = check_mapping(env, "env", env=True)
        metadata = check_mapping(metadata, "metadata")
        auto_pause = check_bool(auto_pause, "auto_pause")
        auto_pause_memory = check_bool(auto_pause_memory, "auto_pause_memory")
        if snapshot is not None:
            if template is not None or policy is not None:
                raise ApiError(
                    400,
                    "invalid",
                    "snapshot: a sandbox made from a snapshot has the snapshot's policy; "
                    "give snapshot, or template/policy, not both",
                    rule="snapshot",
                )
            info = self.get_snapshot(tenant, snapshot)
            # Its policy is in the snapshot: the timeout is checked against it
            # once it is made (and the sandbox destroyed if it does not fit).
            make: Callable[[], Sandbox] = functools.partial(
                Sandbox.from_snapshot,
                info.id,
                store=self.store,
                tenant=tenant.name,
                audit_log=self.cfg.audit_log,
                backend=backend,
            )
            label: str | None = info.id
            snap_id: str | None = info.id
            parent: str | None = info.sandbox_id
        else:
            pol = self._policy(template, policy)
            self._timeout(timeout_s, pol.resources.max_runtime_s)
            make = functools.partial(
                Sandbox,
                pol,
                backend=backend,
                audit_log=self.cfg.audit_log,
                store=self.store,
                tenant=tenant.name,
                network=network,
            )
            label = None if policy is not None else (template or self.cfg.default_template)
            snap_id = parent = None
        with self._slot(tenant):
            sb = self._made(self._owner.submit(make).result)
            return self._admit(
                tenant,
                sb,
                template=label,
                metadata=metadata,
                env=env,
                timeout_s=timeout_s,
                snapshot=snap_id,
                parent=parent,
                auto_pause=auto_pause,
                auto_pause_memory=auto_pause_memory,
            )

    def _timeout(self, timeout_s: float | None, cap: float) -> float:
        """The deadline a new sandbox gets: ``timeout_s``, or the server's default,
        never past the policy's max runtime (``cap``)."""
        timeout = timeout_s if timeout_s is not None else min(self.cfg.default_timeout_s, cap)
        if timeout > cap:
            raise ApiError(
                400,
                "limit",
                f"timeout {timeout:g}s exceeds the policy's max runtime ({cap:g}s)",
                rule="resources.max_runtime_s",
            )
        return timeout

    @contextlib.contextmanager
    def _slot(self, tenant: Tenant) -> Iterator[None]:
        """One place in the tenant's cap, held while a sandbox is being made
        (paused sandboxes count: they keep their memory or their files)."""
        with self._cond:
            if self._closed:
                raise ApiError(503, "unavailable", "the server is shutting down")
            live = sum(1 for e in self._entries.values() if e.tenant == tenant.name)
            busy = live + self._reserved.get(tenant.name, 0) + self._dying.get(tenant.name, 0)
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
            yield
        finally:
            with self._cond:
                self._reserved[tenant.name] -= 1
                self._cond.notify_all()

    @staticmethod
    def _made(wait: Callable[[], Sandbox]) -> Sandbox:
        """The sandbox an owner thread made, or the error as an ApiError."""
        try:
            return wait()
        except GlassroomError as exc:
            raise translate(exc) from None
        except OSError as exc:  # the host, not the input: say so, without a 500
            log.exception("creating a sandbox failed")
            raise ApiError(503, "unavailable", f"cannot create a sandbox: {exc}") from None

    def _admit(
        self,
        tenant: Tenant,
        sb: Sandbox,
        *,
        template: str | None,
        metadata: Mapping[str, str],
        env: Mapping[str, str],
        timeout_s: float | None,
        snapshot: str | None = None,
        parent: str | None = None,
        auto_pause: bool = False,
        auto_pause_memory: bool = True,
    ) -> Entry:
        """List a sandbox that was just made, with its deadline, or destroy it: one
        that is made but not listed would run outside the tenant's cap with no
        deadline."""
        try:
            cap = sb.policy.resources.max_runtime_s
            timeout = self._timeout(timeout_s, cap)
            now = time.time()
            entry = Entry(
                sb=sb,
                tenant=tenant.name,
                template=template,
                metadata=dict(metadata),
                env=dict(env),
                created=now,
                end_at=now + timeout,
                max_runtime_s=cap,
                auto_pause=auto_pause,
                auto_pause_memory=auto_pause_memory,
                parent=parent,
                snapshot=snapshot,
            )
            details: dict[str, Any] = {
                "tenant": tenant.name,
                "template": entry.template,
                "timeout_s": timeout,
                "metadata": entry.metadata,
            }
            if auto_pause:
                details["on_timeout"] = "pause" if auto_pause_memory else "pause (files only)"
            if snapshot or parent:
                details.update(snapshot=snapshot, parent=parent)
            self.audit.append(sb.id, "service.created", details, decision="allow")
        except BaseException as exc:
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
        # Compared as bytes: a token with non-ASCII characters (headers are
        # latin-1 text) is a wrong token, not a TypeError.
        if not token or not hmac.compare_digest(token.encode(), e.access_token.encode()):
            raise ApiError(401, "unauthenticated", "missing or wrong sandbox access token")
        if e.paused:
            # E2B's proxy answers so for a paused sandbox: the SDK's is_running()
            # is False and a call raises SandboxNotRunningException.
            raise paused_error(e.id)
        return e

    def live(self) -> builtins.list[Entry]:
        """Every tenant's sandboxes: for a credential that names no sandbox
        (an E2B signed file URL is matched against each sandbox's token)."""
        with self._cond:
            return list(self._entries.values())

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

    def state(self, e: Entry) -> str:
        """``running``, ``paused`` or ``destroyed``: the core's word, and the
        service's while a pause it began is being recorded."""
        try:
            state = str(e.sb.state)
        except GlassroomError:
            return "destroyed"
        return "paused" if e.paused and state != "destroyed" else state

    def info(self, e: Entry) -> SandboxInfo:
        sb = e.sb
        state = self.state(e)
        walls: dict[str, Any] = {}
        if state == "running":
            with contextlib.suppress(GlassroomError):
                walls = sb.walls
        paused_at = e.paused_at
        return SandboxInfo(
            sandbox_id=e.id,
            tenant=e.tenant,
            template=e.template,
            backend=sb.backend,
            tier=sb.policy.risk,
            state=_STATES.get(state, "destroyed"),
            started_at=rfc3339(e.created),
            end_at=rfc3339(e.end_at),
            timeout_s=max(0.0, round(e.end_at - time.time(), 3)),
            max_runtime_s=e.max_runtime_s,
            metadata=e.metadata,
            walls=walls,
            paused_at=None if paused_at is None else rfc3339(paused_at),
            pause=e.pause_facts if paused_at is not None else None,
            auto_pause=e.auto_pause,
            parent=e.parent,
            snapshot=e.snapshot,
        )

    # -- lifecycle -------------------------------------------------------------

    def set_timeout(self, e: Entry, timeout_s: float, *, allow_zero: bool = False) -> None:
        """Move the deadline to now + ``timeout_s``; 0 (only if ``allow_zero``, for
        E2B's API) makes it now, so the reaper destroys the sandbox at once."""
        timeout_s = check_timeout(timeout_s, "timeout_s", allow_zero=allow_zero)
        if e.paused:
            raise ApiError(
                409,
                "conflict",
                f"sandbox {e.id} is paused: it has no running deadline; resume it with a timeout",
                rule="snapshot.state",
            )
        now = time.time()
        hard = e.hard_end()
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

    # -- pause, resume, snapshot, fork -------------------------------------------

    @contextlib.contextmanager
    def _busy(self, e: Entry) -> Iterator[None]:
        """Hold ``e``'s lifecycle lock and keep the reaper off it meanwhile: a
        deadline that passes during a pause is decided once the pause is done."""
        with e.life:
            with self._cond:
                e.busy += 1
            try:
                yield
            finally:
                with self._cond:
                    e.busy -= 1
                    self._cond.notify_all()

    def _on_owner(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn`` on an owner thread (a resume or a fork may start a sandbox,
        whose ``--die-with-parent`` follows the thread), its errors as ApiErrors.
        Callers on the event loop wrap the whole call in ``anyio.to_thread``."""
        try:
            fut = self._owner.submit(fn, *args, **kw)
        except RuntimeError:  # the pool is shut down: the server is stopping
            raise ApiError(503, "unavailable", "the server is shutting down") from None
        try:
            return fut.result()
        except GlassroomError as exc:
            raise translate(exc) from None
        except OSError as exc:
            log.exception("%s failed", getattr(fn, "__name__", "a snapshot operation"))
            raise ApiError(503, "unavailable", f"the host failed: {exc}") from None

    def pause(self, e: Entry, *, memory: bool = True) -> dict[str, Any]:
        """Pause ``e`` (memory kept where the tier can, or only its files): its
        running deadline stops, and it is kept paused at most ``max_age_s``."""
        memory = check_bool(memory, "memory")
        with self._busy(e):
            if e.paused:
                raise already_paused(e.id)
            facts: dict[str, Any] = self._on_owner(e.sb.pause, memory=memory)
            self._paused(e, facts)
        return facts

    def _paused(self, e: Entry, facts: dict[str, Any]) -> None:
        now = time.time()
        with self._cond:
            e.left_s = max(0.0, e.end_at - now)
            e.paused_at = now
            e.pause_facts = dict(facts)
            e.end_at = now + self.cfg.snapshot_limits.max_age_s
            self._cond.notify_all()

    def resume(self, e: Entry, timeout_s: float | None = None) -> dict[str, Any]:
        """Resume a paused ``e``, same id; its deadline is ``timeout_s`` from now,
        or what it had left when it was paused (the server's default if that
        was nothing, as after an auto-pause), never past the max runtime."""
        if timeout_s is not None:
            timeout_s = check_timeout(timeout_s, "timeout_s")
        with self._busy(e):
            if not e.paused:
                raise ApiError(
                    409, "conflict", f"sandbox {e.id} is not paused", rule="snapshot.state"
                )
            left = self._resume_timeout(e, timeout_s)
            facts: dict[str, Any] = self._on_owner(e.sb.resume)
            now = time.time()
            with self._cond:
                assert e.paused_at is not None
                e.paused_s += now - e.paused_at
                e.paused_at = None
                e.pause_facts = None
                e.end_at = min(now + left, e.hard_end())
                self._cond.notify_all()
        return facts

    def _resume_timeout(self, e: Entry, timeout_s: float | None) -> float:
        assert e.paused_at is not None
        # running time left: the clock stopped when it was paused
        hard_left = e.hard_end() - e.paused_at
        if timeout_s is None:
            timeout_s = e.left_s if e.left_s >= 1.0 else self.cfg.default_timeout_s
            timeout_s = min(timeout_s, hard_left)
        if timeout_s > hard_left + 1e-3 or hard_left <= 0:
            raise ApiError(
                400,
                "limit",
                f"a timeout of {timeout_s:g}s would pass the policy's max runtime "
                f"({e.max_runtime_s:g}s of running time; {max(0.0, hard_left):.0f}s left)",
                rule="resources.max_runtime_s",
            )
        return timeout_s

    def snapshot(
        self,
        e: Entry,
        *,
        name: str | None = None,
        memory: bool | None = None,
        include_tmp: bool = False,
    ) -> SnapshotInfo:
        """Save ``e`` as a snapshot of its tenant; ``e`` keeps running.  ``memory``
        None is the tier's best (files only on namespaces, said in the snapshot)."""
        if name is not None:
            name = check_name(name)
        if memory is not None:
            memory = check_bool(memory, "memory")
        include_tmp = check_bool(include_tmp, "include_tmp")
        with self._busy(e):
            if e.paused:
                raise already_paused(e.id, "snapshot")
            info: SnapshotInfo = self._on_owner(
                e.sb.snapshot, name=name, memory=memory, include_tmp=include_tmp
            )
        return info

    def fork(
        self, e: Entry, count: int = 1, *, timeout_s: float | None = None
    ) -> builtins.list[Entry | ApiError]:
        """``count`` new sandboxes, each a fork of ``e`` with its own id, audit
        trail and slot of the tenant's cap.  Each succeeds or fails on its own:
        the list holds the entry or the error, in order."""
        count = check_count(count)
        if timeout_s is not None:
            timeout_s = check_timeout(timeout_s, "timeout_s")
        tenant = self.tenant(e.tenant)
        out: builtins.list[Entry | ApiError] = []
        with self._busy(e):
            if e.paused:
                raise already_paused(e.id, "fork")
            for _ in range(count):
                try:
                    out.append(self._fork_one(tenant, e, timeout_s))
                except ApiError as exc:
                    out.append(exc)
        return out

    def _fork_one(self, tenant: Tenant, e: Entry, timeout_s: float | None) -> Entry:
        with self._slot(tenant):
            child = self._made(lambda: self._on_owner(e.sb.fork))
            return self._admit(
                tenant,
                child,
                template=e.template,
                metadata=e.metadata,
                env=e.env,
                timeout_s=timeout_s,
                parent=e.id,
                auto_pause=e.auto_pause,
                auto_pause_memory=e.auto_pause_memory,
            )

    # -- the tenant's snapshots ------------------------------------------------------

    def list_snapshots(
        self, tenant: Tenant, *, sandbox_id: str | None = None, name: str | None = None
    ) -> builtins.list[SnapshotInfo]:
        """The tenant's snapshots, newest first (never a paused sandbox's image)."""
        try:
            return self.store.list(tenant=tenant.name, sandbox_id=sandbox_id, name=name)
        except GlassroomError as exc:
            raise translate(exc) from None

    def get_snapshot(self, tenant: Tenant, snapshot_id: str) -> SnapshotInfo:
        """One of the tenant's snapshots; another tenant's is "not found", as is a
        paused sandbox's image (it is no snapshot to make sandboxes from)."""
        if not isinstance(snapshot_id, str) or not 1 <= len(snapshot_id) <= 200:
            raise ApiError(400, "invalid", "snapshot: must be a snapshot id", rule="snapshot")
        try:
            info = self.store.get(snapshot_id, tenant=tenant.name)
        except GlassroomError as exc:
            raise translate(exc) from None
        if info.kind != "snapshot":
            raise snapshot_not_found(snapshot_id)
        return info

    def delete_snapshot(self, tenant: Tenant, snapshot_id: str) -> bool:
        """Delete one of the tenant's snapshots; False if it had none by that id.
        The store keeps no log: the ``snapshot.deleted`` record is written here,
        in the trail of the sandbox it was taken from."""
        try:
            info = self.get_snapshot(tenant, snapshot_id)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        try:
            gone = bool(self.store.delete(snapshot_id, tenant=tenant.name, why="client"))
        except GlassroomError as exc:
            raise translate(exc) from None
        if gone:
            self._deleted(info, "client")
        return gone

    def _deleted(self, info: SnapshotInfo, why: str) -> None:
        self.audit.append(
            info.sandbox_id,
            "snapshot.deleted",
            {"snapshot": info.id, "names": list(info.names), "tenant": info.tenant, "why": why},
            decision="info",
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
            # process exits half-way through it.  The tenant's slot stays taken
            # too: a sandbox whose teardown is slow is still running, and must
            # not let its tenant start another in its place.
            self._destroying += 1
            self._dying[e.tenant] = self._dying.get(e.tenant, 0) + 1
        try:
            for cb in self._on_destroy:
                with contextlib.suppress(Exception):
                    cb(e)
            return e.sb.destroy()
        finally:
            with self._cond:
                self._destroying -= 1
                self._dying[e.tenant] -= 1
                self._cond.notify_all()

    def _reap_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.time()
                waiting = [e for e in self._entries.values() if not e.busy]
                due = [e for e in waiting if e.end_at <= now]
                if not due:
                    nxt = min((e.end_at for e in waiting), default=now + 60)
                    self._cond.wait(max(0.001, min(nxt - now, 60)))
                    prune = time.monotonic() - self._pruned_at >= PRUNE_EVERY_S
                    if prune:
                        self._pruned_at = time.monotonic()
                else:
                    prune = False
                for e in due:
                    if e.auto_pause and not e.paused:
                        e.busy += 1  # the pause runs on an owner thread, not here
            if prune:
                self._in_background(self._prune)
            for e in due:
                if not (e.auto_pause and not e.paused):
                    self._expire(e)
                elif not self._in_background(self._auto_pause, e):
                    with self._cond:
                        e.busy -= 1
                    self._expire(e)

    def _in_background(self, fn: Callable[..., Any], *args: Any) -> bool:
        """``fn`` on an owner thread, not the reaper's (a pause takes seconds and
        other deadlines are due meanwhile); False once the pool is shut down."""
        try:
            self._owner.submit(fn, *args)
        except RuntimeError:  # stopping: every sandbox is being destroyed anyway
            return False
        return True

    def _expire(self, e: Entry) -> None:
        """Destroy ``e`` at its deadline, or at the end of the time it may stay paused."""
        paused = e.paused
        with contextlib.suppress(Exception):
            self.audit.append(
                e.id,
                "sandbox.expired",
                {"end_at": rfc3339(e.end_at), "tenant": e.tenant, "paused": paused},
                decision="deny",
                rule="snapshots.max_age_s" if paused else "lifecycle.timeout",
            )
        with contextlib.suppress(Exception):
            self.destroy(e, reason="kept paused too long" if paused else "timeout")

    def _auto_pause(self, e: Entry) -> None:
        """The deadline of an ``auto_pause`` sandbox: pause it (E2B's
        ``onTimeout: pause``); if it cannot be paused, it is destroyed as any
        sandbox at its deadline, and the record says why."""
        try:
            with e.life:
                if not e.paused:  # a client may have paused it meanwhile
                    facts = e.sb.pause(memory=e.auto_pause_memory)
                    self._paused(e, facts)
                    self.audit.append(
                        e.id,
                        "service.auto_paused",
                        {"tenant": e.tenant, "memory": e.auto_pause_memory, **_brief(facts)},
                        decision="allow",
                        rule="lifecycle.timeout",
                    )
        except Exception as exc:
            log.warning("auto-pause of %s failed, destroying it: %r", e.id, exc)
            with contextlib.suppress(Exception):
                self.audit.append(
                    e.id,
                    "service.auto_pause_failed",
                    {"tenant": e.tenant, "error": str(exc)[:500]},
                    decision="deny",
                    rule=getattr(exc, "rule", None) or "lifecycle.timeout",
                )
            self._expire(e)
        finally:
            with self._cond:
                e.busy -= 1
                self._cond.notify_all()

    def _prune(self) -> None:
        """Remove expired snapshots, each with its ``snapshot.deleted`` record."""
        try:
            known = {i.id: i for i in self.store.list()}
            for sid in self.store.prune():
                if sid in known:
                    self._deleted(known[sid], "expired")
        except Exception as exc:
            log.warning("pruning expired snapshots failed: %r", exc)

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
        pty: tuple[int, int] | None = None,
    ) -> Process:
        full_env = {**e.env, **(env or {})}
        try:
            p = e.sb.spawn(argv, cwd=cwd, env=full_env, timeout_s=timeout_s, pty=pty)
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

    def policy_view(self, e: Entry) -> PolicyView:
        """The console's policy page: as written and as compiled (walls)."""
        walls: dict[str, Any] = {}
        if self.state(e) == "running":
            with contextlib.suppress(GlassroomError):
                walls = e.sb.walls
        return PolicyView(sandbox_id=e.id, written=e.sb.policy.to_toml(), walls=walls)

    def usage(self, e: Entry) -> Usage:
        """CPU/memory/pids/disk now; nothing while paused (there is no cgroup)."""
        got: dict[str, int] = {}
        if self.state(e) == "running":
            with contextlib.suppress(GlassroomError, OSError):
                got = e.sb.usage()
        keep = {k: v for k, v in got.items() if k in Usage.model_fields}
        return Usage(sandbox_id=e.id, **keep)

    def verify_audit(self) -> AuditVerify:
        """``audit verify`` of the log; the same for every tenant (one log, one chain)."""
        from ...audit._verify import verify

        path = Path(self.cfg.audit_log)
        if not path.exists():
            return AuditVerify(ok=True, records=0, problems=[])
        try:
            r = verify(path)
        except (GlassroomError, OSError) as exc:
            return AuditVerify(ok=False, records=0, problems=[str(exc)])
        return AuditVerify(
            ok=r.ok,
            records=r.records,
            problems=r.problems[:20],
            last_seq=r.last_seq,
            anchor=r.anchor_status,
        )

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


_STATES: dict[str, Literal["running", "paused", "destroyed"]] = {
    "running": "running",
    "paused": "paused",
}


def paused_error(sandbox_id: str) -> ApiError:
    """envd's answer for a paused sandbox: E2B's 502 "was not found", so the SDK
    reports it not running, with what to do."""
    return ApiError(
        502,
        "not_found",
        f"The sandbox {sandbox_id} was not found running: it is paused "
        "(connect() or resume() brings it back)",
        rule="snapshot.state",
    )


def already_paused(sandbox_id: str, what: str = "") -> ApiError:
    doing = f"; resume it before a {what}" if what else ""
    return ApiError(
        409, "conflict", f"sandbox {sandbox_id} is already paused{doing}", rule="snapshot.state"
    )


def snapshot_not_found(snapshot_id: str) -> ApiError:
    return ApiError(
        404, "not_found", f"snapshot {snapshot_id} was not found", rule="snapshot.not_found"
    )


def _brief(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The plain facts of a pause for the service's own record (the core's has all)."""
    return {k: v for k, v in facts.items() if isinstance(v, str | int | float | bool | None)}


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
