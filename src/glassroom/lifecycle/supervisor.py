"""The supervisor: create → run → destroy, with every step in the audit log.

It owns what must watch or outlive the sandbox: the audit log, the
reaper, and turning backend facts (exit status, cgroup counters, exec
errors) into decisions with the rule that made them.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _config
from .._errors import BackendUnavailable, GlassroomError, SandboxClosed, SnapshotError
from ..audit import AuditLog
from ..backends.base import (
    EventSink,
    ExecRequest,
    ExecResult,
    Instance,
    Process,
    Receipt,
    pty_size,
)
from ..egress import Egress, NetworkOptions
from ..plan import SECRETS_DIR, LaunchPlan
from ..policy import Policy
from ..policy import compile as compile_policy
from . import _filesave, reaper
from .pausing import Pausing, ProxyHook, RestoreFrom
from .snapshots import SnapshotStore

if TYPE_CHECKING:  # the broker (cryptography) and the redactor load with a credential
    from ..credentials import Issued

_reaped_once = threading.Lock()
#: How long destroy waits for a pause/snapshot/fork in progress before ending the sandbox.
DESTROY_WAIT_S = 0.5
_reaped = False


@dataclass(frozen=True)
class Blocked:
    action: str
    target: str
    rule: str

    def as_dict(self) -> dict[str, str]:
        return {"action": self.action, "target": self.target, "rule": self.rule}


@dataclass
class RunOutcome:
    result: ExecResult
    blocked: list[Blocked] = field(default_factory=list)


def get_backend(name: str) -> Any:
    if name == "namespaces":
        from ..backends.namespaces import NamespacesBackend

        return NamespacesBackend()
    if name == "gvisor":
        from ..backends.gvisor import GvisorBackend

        return GvisorBackend()
    if name == "microvm":
        from ..backends.microvm import MicrovmBackend

        return MicrovmBackend()
    raise BackendUnavailable(f"backend {name!r} is not available in this build", rule="backend")


def reap_orphans(audit: AuditLog) -> None:
    """Run the reaper once per process, before the first sandbox starts."""
    global _reaped
    with _reaped_once:
        if _reaped:
            return
        _reaped = True
        for done in reaper.reap():
            failed = bool(done.get("errors"))
            audit.append(done["sandbox_id"], "reaper.cleaned", done,
                         decision="deny" if failed else "info",
                         rule="lifecycle.reaper")  # fmt: skip


class Supervised(Pausing):
    """One sandbox under supervision."""

    def __init__(
        self,
        policy: Policy,
        *,
        backend: str | None = None,
        audit_log: str | Path | None = None,
        network: NetworkOptions | None = None,
        store: SnapshotStore | None = None,
        tenant: str = "local",
        restore: RestoreFrom | None = None,
        sandbox_id: str | None = None,
        plan: LaunchPlan | None = None,
    ) -> None:
        """``plan``: a plan compiled already (a template build step's,
        ``policy.compile_build``); otherwise the policy is compiled here."""
        self.policy = policy
        self.audit = AuditLog(audit_log or _config.audit_log_path())
        self.audit_path = Path(audit_log or _config.audit_log_path())
        self.id = sandbox_id or "sb-" + secrets.token_hex(6)
        self.tenant = tenant
        self._store = store
        #: "running", "paused" or "destroyed" (see lifecycle/pausing.py).
        self.state = "running"
        self._frozen = False
        self._instance: Instance | None = None
        self._receipt: Receipt | None = None
        self._counters: dict[str, int] = {}
        self._lock = threading.RLock()
        self._egress: Egress | None = None
        self._network_opts = network
        self._issued: list[Issued] = []
        #: The proxy's credential filter; swapped when credentials are reissued.
        self._proxy_hook = ProxyHook()
        #: Called once after destroy (the warm pool counts its sandboxes).
        self.on_destroy: Callable[[], None] | None = None
        #: Env vars every command gets: credentials injected as env, and
        #: proxy placeholders.  Values never reach the audit log.
        self._secret_env: dict[str, str] = {}
        try:
            reap_orphans(self.audit)
            self._plan0: LaunchPlan = plan or compile_policy(policy, backend)
            self.plan: LaunchPlan = self._plan0
            self.backend = self.plan.backend
            if restore is not None and restore.how == "resume":
                self._runtime_used = float(restore.manifest.get("runtime_used_s") or 0.0)
                self._limit_runtime(self._runtime_used)
            # Issued before any wall exists: a source that fails costs nothing.
            self._issue_credentials()
            if restore is not None:
                self._apply_placeholders(restore.manifest.get("placeholders") or {})
            self._start_egress()
            inst = self._launch(restore)
            self._instance = inst
            self._run_since = time.monotonic()
            self._inject_credentials(inst, replace=restore is not None)
        except GlassroomError as exc:
            self._revoke_credentials(log=False)
            if self._instance is not None:
                self._instance.destroy()
                self._instance = None
            self._stop_egress()
            self.audit.append(self.id, "sandbox.refused", {"error": str(exc)},
                              decision="deny", rule=exc.rule)  # fmt: skip
            self.audit.close()
            raise
        except BaseException:
            self._stop_egress()
            raise
        self._counters = self._limit_counters()
        details: dict[str, Any] = {
            "backend": self.backend,
            "tier": self.plan.risk,
            "policy_digest": self.plan.policy_digest,
            "walls": inst.walls,
            "limits": self.plan.limits.__dict__,
        }
        if self.plan.template:  # NAME@sha256:...: exactly which tree was the sandbox's /
            details["template"] = self.plan.template
        if restore is not None:
            details.update(restore.audit_details())
        self.audit.append(self.id, "sandbox.created", details, decision="allow")

    def _launch(self, restore: RestoreFrom | None) -> Instance:
        """Start the backend: fresh, from a memory checkpoint, or fresh plus saved files."""
        backend = get_backend(self.backend)
        if restore is None:
            inst: Instance = backend.start(self.plan, self.id, self._sink())
            return inst
        if restore.checkpoint is not None:
            inst = backend.restore(self.plan, self.id, self._sink(), restore.dir / "data",
                                   restore.checkpoint)  # fmt: skip
            return inst
        inst = backend.start(self.plan, self.id, self._sink())
        try:
            restore.loaded = _filesave.load(inst, restore.dir / _filesave.ARCHIVE)
        except BaseException:
            inst.destroy()
            raise
        return inst

    def _start_egress(self) -> None:
        if self._plan0.network.mode == "proxy":  # the only way out; see docs/network.md
            network = self._with_credential_hook(self._network_opts)
            self._egress = Egress(self._plan0.network, self.id, self._network_sink(), network)
            self.plan = replace(self._plan0, network=replace(
                self._plan0.network, host_dir=str(self._egress.dir)))  # fmt: skip

    # -- credentials ----------------------------------------------------------

    def _issue_credentials(self) -> None:
        if not self.policy.credentials:  # the broker's import is paid only with a credential
            return
        from ..credentials import issue as issue_credential

        limit = self.policy.resources.max_runtime_s
        for i, cred in enumerate(self.policy.credentials):
            self._issued.append(issue_credential(cred, i, self.id, limit))

    def _inject_credentials(self, inst: Instance, *, replace: bool = False) -> None:
        """Put each credential where the policy says; ``replace`` for a restored or
        resumed sandbox, whose old 0400 files are unlinked first (not rewritable)."""
        where: dict[str, str] = {}
        for cred in self._issued:
            if cred.inject == "file" and replace:
                with contextlib.suppress(GlassroomError):
                    inst.remove(f"{SECRETS_DIR}/{cred.name}")
            if cred.inject == "file":
                inst.write_file(f"{SECRETS_DIR}/{cred.name}", cred.value.encode(), 0o400)
                where[cred.name] = f"{SECRETS_DIR}/{cred.name}"
            elif cred.inject == "env":
                self._secret_env[cred.var] = cred.value
                where[cred.name] = cred.var
            else:
                assert cred.placeholder is not None
                self._secret_env[cred.var] = cred.placeholder
                where[cred.name] = f"{cred.var} (placeholder; the proxy adds the value)"
        for cred in self._issued:
            self.audit.append(self.id, "credential.issued", cred.audit_details(),
                              decision="allow", rule=cred.rule)  # fmt: skip
            details: dict[str, Any] = {"name": cred.name, "how": cred.inject,
                                       "where": where[cred.name]}  # fmt: skip
            if cred.inject == "env":
                details["warning"] = "injected as env: every process in the sandbox can read it"
            self.audit.append(self.id, "credential.injected", details, decision="allow",
                              rule=f"{cred.rule}.inject")  # fmt: skip

    def _revoke_credentials(self, *, log: bool = True, why: str | None = None) -> None:
        self._proxy_hook.current = None
        for cred in self._issued:
            expired = time.time() >= cred.expires_at
            error = None
            try:
                if cred.revoke is not None:
                    cred.revoke()
            except Exception as exc:  # a revoke that fails must be visible, not fatal
                error = f"{type(exc).__name__}: {exc}"
            if log:
                details = {"name": cred.name, **{k: v for k, v in cred.facts.items()
                                                 if k in ("token_id", "accessor", "lease_id")}}
                if error:
                    details["error"] = error
                if why:
                    details["why"] = why
                event = "credential.expired" if expired else "credential.revoked"
                if cred.revoke is None and not expired:
                    # A static secret (env:, file:, a Vault KV value): nothing can
                    # revoke it, and the record must not say it was.
                    event = "credential.released"
                    details["revocable"] = False
                decision = "deny" if error else "info"
                self.audit.append(self.id, event, details, decision=decision, rule=cred.rule)
        self._issued = []
        self._secret_env.clear()

    # -- egress -----------------------------------------------------------------

    def _with_credential_hook(self, network: NetworkOptions | None) -> NetworkOptions:
        """Proxy credentials: the proxy swaps placeholders only for listed host:ports,
        and takes the values back out of responses (credentials/_proxy_inject.py)."""
        opts = network or NetworkOptions()
        if not any(c.inject == "proxy" for c in self.policy.credentials):
            return opts
        self._arm_proxy_hook()
        return replace(opts, exchange_filter=self._proxy_hook)

    def _arm_proxy_hook(self) -> None:
        """Point the proxy's filter at the credentials issued now (none while paused)."""
        proxied = [c for c in self._issued if c.inject == "proxy"]
        if not proxied:
            self._proxy_hook.current = None
            return
        from ..credentials._proxy_inject import header_hook

        creds = {c.name: c for c in self.policy.credentials}
        self._proxy_hook.current = header_hook(
            proxied,
            {n: list(creds[n].hosts) for n in creds},
            {n: creds[n].header for n in creds},
            lambda event, details, decision, rule: self.audit.append(
                self.id, event, details, decision=decision, rule=rule
            ),
        )

    def _network_sink(self) -> Callable[[dict[str, Any], str, str | None], None]:
        def emit(details: dict[str, Any], decision: str, rule: str | None) -> None:
            self.audit.append(self.id, "network.request", details, decision=decision, rule=rule)

        return emit

    def _stop_egress(self) -> dict[str, Any] | None:
        egress, self._egress = self._egress, None
        return egress.stop() if egress is not None else None

    def _sink(self) -> EventSink:
        def sink(event: str, details: dict[str, Any], decision: str, rule: str | None) -> None:
            self.audit.append(self.id, event, details, decision=decision, rule=rule)

        def many(batch: list[tuple[str, dict[str, Any], str, str | None]]) -> None:
            """Traced calls come by the hundred: one batch, one fsync."""
            self.audit.append_many(self.id, batch)

        sink.many = many  # type: ignore[attr-defined]
        return sink

    @property
    def instance(self) -> Instance:
        if self.state == "paused":
            raise SnapshotError(f"sandbox {self.id} is paused: resume it first",
                                rule="snapshot.state")  # fmt: skip
        if self._instance is None or self._receipt is not None:
            raise SandboxClosed(f"sandbox {self.id} has been destroyed")
        return self._instance

    def _limit_counters(self) -> dict[str, int]:
        stats = getattr(self._instance, "cgroup_stats", None)
        return dict(stats()) if stats else {}

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
    ) -> RunOutcome:
        inst = self.instance
        if not inst.alive():
            raise inst._closed_error() if hasattr(inst, "_closed_error") else SandboxClosed(
                f"sandbox {self.id} is no longer running"
            )
        full_env = dict(self.plan.env)
        full_env.update(self._secret_env)
        full_env.update(env or {})
        req = ExecRequest(
            argv=tuple(argv), env=full_env, cwd=cwd or self.plan.workspace, stdin=stdin,
            timeout_s=timeout_s, max_output_bytes=self.plan.limits.max_output_bytes,
        )  # fmt: skip
        started = {"argv": list(argv), "cwd": req.cwd, "env": sorted(full_env)}
        self.audit.append(self.id, "command.started", started)
        res = inst.exec(req)
        blocked = self._judge(req, res)
        self.audit.append(
            self.id,
            "command.ended",
            {
                "argv0": argv[0] if argv else "",
                "exit_code": res.exit_code,
                "signal": res.signal,
                "duration_ms": round(res.duration_ms, 3),
                "stdout_bytes": len(res.stdout),
                "stderr_bytes": len(res.stderr),
                "truncated": res.truncated,
                "timed_out": res.timed_out,
            },
            decision="deny" if blocked else "info",
            rule=blocked[0].rule if blocked else None,
        )
        return RunOutcome(res, blocked)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        on_exit: Callable[[RunOutcome], None] | None = None,
        pty: tuple[int, int] | None = None,
    ) -> Process:
        """Start ``argv`` in the background; its end is judged and logged like ``run``'s.
        ``pty=(rows, cols)``: on a pseudo-terminal made inside the sandbox."""
        inst = self.instance
        size = pty_size(*pty) if pty is not None else None
        if not inst.alive():
            raise SandboxClosed(f"sandbox {self.id} is no longer running")
        full_env = dict(self.plan.env)
        full_env.update(getattr(self, "_secret_env", None) or {})
        full_env.update(env or {})
        req = ExecRequest(
            argv=tuple(argv), env=full_env, cwd=cwd or self.plan.workspace, stdin=None,
            timeout_s=timeout_s, max_output_bytes=self.plan.limits.max_output_bytes, pty=size,
        )  # fmt: skip
        started: dict[str, Any] = {"argv": list(argv), "cwd": req.cwd, "env": sorted(full_env),
                                   "background": True}  # fmt: skip
        if size is not None:
            started["pty"] = list(size)
        self.audit.append(self.id, "command.started", started)
        if getattr(inst, "spawn", None) is None:  # a tier that has not implemented it yet
            raise BackendUnavailable(
                f"backend {self.backend!r} cannot run background processes yet", rule="backend"
            )
        proc = inst.spawn(req)

        def ended(res: ExecResult) -> None:
            blocked: list[Blocked] = []
            with contextlib.suppress(GlassroomError):
                blocked = self._judge(req, res)
                self.audit.append(
                    self.id, "command.ended",
                    {"argv0": argv[0] if argv else "", "pid": proc.pid,
                     "exit_code": res.exit_code, "signal": res.signal,
                     "duration_ms": round(res.duration_ms, 3),
                     "stdout_bytes": len(res.stdout), "stderr_bytes": len(res.stderr),
                     "truncated": res.truncated, "timed_out": res.timed_out},
                    decision="deny" if blocked else "info",
                    rule=blocked[0].rule if blocked else None,
                )  # fmt: skip
            if on_exit is not None:
                on_exit(RunOutcome(res, blocked))

        proc.on_exit(ended)
        return proc

    def _judge(self, req: ExecRequest, res: ExecResult) -> list[Blocked]:
        """Turn what the backend saw into blocked actions, each logged with its rule."""
        out: list[Blocked] = []
        if res.exec_errno == errno.EACCES:
            out.append(Blocked("exec", req.argv[0], "tools.allow"))
        if res.truncated:
            out.append(Blocked("output", f"{self.plan.limits.max_output_bytes} bytes",
                               "resources.max_output_bytes"))  # fmt: skip
        if res.timed_out and "max_runtime" in res.limits_hit:
            out.append(Blocked("timeout", f"{self.plan.limits.max_runtime_s:g}s",
                               "resources.max_runtime_s"))  # fmt: skip
        elif res.timed_out:
            out.append(Blocked("timeout", f"{req.timeout_s:g}s", "run.timeout_s"))
        now = self._limit_counters()
        for key, rule, what in (
            ("oom_kill", "resources.memory_mib", "memory"),
            ("pids_max_hits", "resources.pids", "pids"),
        ):
            if now.get(key, 0) > self._counters.get(key, 0):
                out.append(Blocked("limit", what, rule))
        self._counters = now or self._counters
        usage = getattr(self._instance, "workspace_usage", lambda: None)()
        # "Full" with a little room left: on the ext4 scratch disk, delayed
        # allocation keeps a metadata reserve, so a writer meets ENOSPC while
        # statfs still shows a few hundred KiB free (tmpfs showed exactly 0).
        if usage and usage[1] and usage[1] - usage[0] <= max(1 << 20, usage[1] // 64):
            out.append(Blocked("limit", "disk (workspace full)", "resources.disk_mib"))
        if res.signal == 25:  # SIGXFSZ: RLIMIT_FSIZE
            out.append(Blocked("limit", "file size", "resources.disk_mib"))
        for b in out:
            self.audit.append(self.id, "blocked", {"action": b.action, "target": b.target},
                              decision="deny", rule=b.rule)  # fmt: skip
        return out

    def file_event(self, op: str, path: str, error: GlassroomError | None) -> None:
        if error is None:
            self.audit.append(self.id, "file." + op, {"path": path}, decision="allow")
        else:
            self.audit.append(self.id, "blocked", {"action": op, "target": path,
                                                   "error": str(error)},
                              decision="deny", rule=error.rule)  # fmt: skip

    def destroy(self) -> Receipt:
        if not self._lock.acquire(timeout=DESTROY_WAIT_S):
            # A pause, snapshot or fork holds the lock, perhaps waiting on the
            # sandbox itself: a destroy must not wait for it.  Ending the sandbox
            # makes that operation fail and let go.
            inst = self._instance
            if inst is not None:
                inst.kill()
            self._lock.acquire()
        try:
            return self._destroy_locked()
        finally:
            self._lock.release()

    def _destroy_locked(self) -> Receipt:
        if self._receipt is not None:
            return self._receipt
        t0 = time.monotonic()
        if self._instance is None:
            if self._paused_receipt is None:
                raise SandboxClosed(f"sandbox {self.id} was never started")
            # Its processes ended at the pause (or a failed one): what is left
            # is the saved image, if any.
            receipt = self._paused_receipt
        else:
            receipt = self._instance.destroy()
        if self._store is not None:  # a pause image of this sandbox never outlives it
            gone = self._store.delete(self.id, kind="pause")
            if gone or self._instance is None:
                receipt.removed["paused_image"] = "deleted" if gone else "none"
        egress = self._stop_egress()  # after the sandbox: its open requests are logged
        if egress is not None:
            receipt.removed["egress"] = egress
            if egress["left"]:
                receipt.leftovers.setdefault("state", []).append(egress["egress_dir"])
        self._revoke_credentials()
        self._receipt = receipt
        self.state = "destroyed"
        details = receipt.as_dict()
        details["duration_ms"] = round((time.monotonic() - t0) * 1000, 3)
        self.audit.append(self.id, "sandbox.destroyed", details,
                          decision="info" if receipt.clean else "deny",
                          rule=None if receipt.clean else "lifecycle.teardown")  # fmt: skip
        self.audit.close()
        if self.on_destroy is not None:
            self.on_destroy()
        return receipt
