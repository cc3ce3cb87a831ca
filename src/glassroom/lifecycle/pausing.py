"""Pause, resume, snapshot and fork of a supervised sandbox (``docs/snapshots.md``).

What each tier saves is the backend's business (``Instance.checkpoint``,
``Backend.restore``, ``Instance.freeze``); what is done around it is the
same everywhere and lives here:

* credentials are revoked before a pause returns, and before a snapshot or
  fork is stored (the sandbox that goes on running gets new ones): a saved
  image never holds a live token;
* every image is written through the store, which hashes and signs it, and
  every restore goes through ``SnapshotStore.open``, which checks them;
* every step is an audit record with the tier, the sizes and the credentials.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import GlassroomError, SnapshotError, SnapshotIntegrityError
from ..backends.base import Checkpoint, Instance, Receipt
from ..policy import Policy, validate_policy
from . import _filesave
from .snapshots import SnapshotInfo, SnapshotStore, default_store, discard

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..credentials import Issued
    from ..plan import LaunchPlan
    from .supervisor import Supervised

#: Tiers whose pause freezes processes in place instead of saving them.
FREEZE_TIERS = frozenset({"namespaces"})


class ProxyHook:
    """The egress proxy's ``exchange_filter``, pointing at the credentials of now.

    The proxy keeps the filter it was given for its whole life; this
    indirection lets a pause take the credentials away and a resume put new
    ones in without restarting the proxy."""

    def __init__(self) -> None:
        self.current: Callable[[Any], Any] | None = None

    def __call__(self, req: Any) -> Any:
        cur = self.current
        return cur(req) if cur is not None else None


@dataclass
class RestoreFrom:
    """A verified store entry a new (or resumed) sandbox is started from."""

    info: SnapshotInfo
    manifest: dict[str, Any]
    dir: Path
    #: "resume", "snapshot" (made from a snapshot) or "fork".
    how: str
    parent: str | None = None
    loaded: dict[str, Any] | None = None

    @property
    def checkpoint(self) -> Checkpoint | None:
        ck = self.manifest.get("checkpoint")
        return Checkpoint.from_dict(ck) if ck else None

    def audit_details(self) -> dict[str, Any]:
        d: dict[str, Any] = {"restored": self.how, "memory": self.info.memory}
        if self.how != "resume":
            d["snapshot"] = self.info.id
            d["parent"] = self.parent or self.info.sandbox_id
        return d


def open_entry(store: SnapshotStore, entry_id: str, *, tenant: str | None, kind: str,
               audit: AuditLog) -> tuple[SnapshotInfo, dict[str, Any], Path]:  # fmt: skip
    """``store.open``, with a refused entry written to the audit log before it raises."""
    try:
        return store.open(entry_id, tenant=tenant, kind=kind)
    except SnapshotIntegrityError as exc:
        audit.append(entry_id, "snapshot.refused", {"error": str(exc)}, decision="deny",
                     rule=exc.rule)  # fmt: skip
        raise


class Pausing:
    """The pause/resume/snapshot/fork half of :class:`Supervised`."""

    # Provided by Supervised.
    id: str
    state: str
    tenant: str
    backend: str
    policy: Policy
    plan: LaunchPlan
    _plan0: LaunchPlan
    audit: AuditLog
    audit_path: Path
    _store: SnapshotStore | None
    _frozen: bool
    _instance: Instance | None
    _issued: list[Issued]
    _lock: threading.RLock
    _paused_receipt: Receipt | None = None
    #: Placeholders of proxy credentials revoked at a pause, for the resume to keep.
    _kept_placeholders: dict[str, str] | None = None
    #: Running time before the last start or resume (max_runtime_s counts running time).
    _runtime_used: float = 0.0
    _run_since: float = 0.0

    if TYPE_CHECKING:
        def _revoke_credentials(self, *, log: bool = True, why: str | None = None) -> None: ...
        def _issue_credentials(self) -> None: ...
        def _inject_credentials(self, inst: Instance, *, replace: bool = False) -> None: ...
        def _arm_proxy_hook(self) -> None: ...
        def _start_egress(self) -> None: ...
        def _stop_egress(self) -> dict[str, Any] | None: ...
        def _launch(self, restore: RestoreFrom | None) -> Instance: ...
        @property
        def instance(self) -> Instance: ...

    # -- helpers -------------------------------------------------------------------

    @property
    def store(self) -> SnapshotStore:
        if self._store is None:
            self._store = default_store()
        return self._store

    def _require(self, state: str) -> None:
        if self.state != state:
            raise SnapshotError(f"sandbox {self.id} is {self.state}, not {state}",
                                rule="snapshot.state")  # fmt: skip

    def _files_roots(self, include_tmp: bool) -> list[str]:
        roots = [self.plan.workspace]
        if include_tmp:
            roots.append("/tmp")
        return roots

    def _manifest_extra(self, ck: Checkpoint | None, files: dict[str, Any] | None,
                        roots: list[str]) -> dict[str, Any]:  # fmt: skip
        return {
            "policy": self.policy.model_dump(mode="json"),
            "policy_digest": self.plan.policy_digest,
            "backend": self.backend,
            "checkpoint": ck.as_dict() if ck is not None else None,
            "files_only": {"roots": roots, **files} if files is not None else None,
            # Not secrets (what the sandbox sees instead of the value): kept so a
            # restored process's copy still works.
            "placeholders": {**(self._kept_placeholders or {}),
                             **{c.name: c.placeholder for c in self._issued if c.placeholder}},
            "runtime_used_s": round(self._runtime_used + time.monotonic() - self._run_since, 3),
        }

    def _rotate_credentials(self, why: str) -> dict[str, Any]:
        """Revoke what the sandbox holds now and give it new credentials (it goes on running).

        Called after a snapshot or fork captured the sandbox: the copy holds
        only tokens that are dead by the time it is stored."""
        if not self._issued:
            return {"revoked": 0, "reissued": 0}
        n = len(self._issued)
        self._reissue(self.instance, why)
        return {"revoked": n, "reissued": len(self._issued)}

    def _reissue(self, inst: Instance, why: str) -> None:
        self._renew_credentials(why)
        self._inject_credentials(inst, replace=True)

    def _renew_credentials(self, why: str) -> None:
        """Revoke what is held, issue anew (same placeholders where they fit) and point
        the proxy at the new values; the sandbox itself is not touched here."""
        old = dict(self._kept_placeholders or {})
        old.update({c.name: c.placeholder for c in self._issued if c.placeholder})
        if self._issued:
            self._revoke_credentials(why=why)
        try:
            self._issue_credentials()
        except BaseException:
            self._revoke_credentials(log=False)  # the ones issued before the failure
            raise
        self._apply_placeholders(old)
        self._arm_proxy_hook()

    def _apply_placeholders(self, old: dict[str, str]) -> None:
        """The same placeholder where the new value has the same length: a process
        that kept the old one (in memory, across a pause) still gets the new value."""
        for c in self._issued:
            ph = old.get(c.name)
            if c.placeholder and ph and len(ph) == len(c.placeholder):
                c.placeholder = ph

    def _limit_runtime(self, used: float) -> None:
        """A resumed sandbox gets what is left of max_runtime_s, not all of it again."""
        from dataclasses import replace

        cap = self.policy.resources.max_runtime_s
        left = cap - used
        if left <= 0:
            raise SnapshotError(
                f"sandbox {self.id} has used all of its {cap:g}s of running time: it cannot "
                "resume", rule="resources.max_runtime_s")  # fmt: skip
        self._plan0 = replace(self._plan0, limits=replace(self._plan0.limits, max_runtime_s=left))
        self.plan = replace(self.plan, limits=replace(self.plan.limits, max_runtime_s=left))

    def _keep_placeholders(self) -> None:
        self._kept_placeholders = {c.name: c.placeholder for c in self._issued if c.placeholder}

    def _save(self, inst: Instance, kind: str, memory: bool, leave_running: bool,
              roots: list[str], names: list[str], refused: str | None,
              entry_id: str | None = None,
              before_commit: Callable[[], dict[str, Any]] | None = None,
              ) -> tuple[SnapshotInfo, dict[str, Any]]:  # fmt: skip
        """Checkpoint or copy files into a store entry; ``before_commit`` runs between."""
        for gone in self.store.prune():  # expired ones go first, each on the record
            self.audit.append(gone, "snapshot.deleted", {"why": "expired (max_age_s)"},
                              decision="info", rule="snapshots.max_age_s")  # fmt: skip
        st = self.store.begin(kind, self.tenant, entry_id=entry_id)
        t0 = time.monotonic()
        try:
            ck: Checkpoint | None = None
            files: dict[str, Any] | None = None
            if memory:
                ck = inst.checkpoint(st.data, leave_running=leave_running)
            else:
                limit = min(self.store.limits.max_bytes, max(self.plan.limits.disk_bytes, 1))
                files = _filesave.save(inst, st.dir / _filesave.ARCHIVE, roots, limit)
            facts = before_commit() if before_commit is not None else {}
            info = self.store.commit(st, names=names, sandbox_id=self.id, tier=self.backend,
                                     memory=ck is not None, memory_refused=refused,
                                     extra=self._manifest_extra(ck, files, roots))  # fmt: skip
        except BaseException:
            self.store.abort(st)
            raise
        facts.update({"ms": round((time.monotonic() - t0) * 1000, 1),
                      "bytes": info.size_bytes,
                      "checkpoint": ck.details if ck is not None else None,
                      "files": files})  # fmt: skip
        return info, facts

    # -- pause / resume ------------------------------------------------------------

    def _ended_during_save(self, inst: Instance, why: str) -> None:
        """A save that ended the sandbox (a checkpoint that failed half-way): it is
        gone, so everything around it goes too, and the state says so."""
        if inst.alive():
            return
        self._paused_receipt = inst.destroy()
        self._instance = None
        self.state = "destroyed"
        self._stop_egress()
        self._revoke_credentials(why=why)

    def pause(self, *, memory: bool = True) -> dict[str, Any]:
        """Stop the sandbox, keeping its processes (``memory``) or only its files.

        gVisor and microVM save everything to disk and free the memory;
        namespaces freezes the processes in place.  ``memory=False`` keeps
        ``/workspace`` and ``/tmp`` only, and the processes end."""
        with self._lock:
            self._require("running")
            inst = self.instance
            t0 = time.monotonic()
            n = len(self._issued)
            if memory and self.backend in FREEZE_TIERS:
                inst.freeze()
                self._runtime_used += time.monotonic() - self._run_since
                self._keep_placeholders()
                self._revoke_credentials(why="pause")
                self._frozen = True
                facts: dict[str, Any] = {"how": "freeze", "memory": True, "bytes": 0,
                                         "kept": "in memory, frozen (not across a host restart)"}
            else:
                if memory:  # the checkpoint stops it: a refusal must come before that
                    lim = self.plan.limits
                    self.store.check_room(self.tenant, lim.memory_bytes + lim.disk_bytes,
                                          replacing=self.id)  # fmt: skip

                def revoke() -> dict[str, Any]:
                    # Before the image is stored: it never holds a live token.
                    self._keep_placeholders()
                    self._revoke_credentials(why="pause")
                    return {}

                try:
                    _, facts = self._save(inst, "pause", memory, False, self._files_roots(True),
                                          [], None if memory else "files only: asked for",
                                          entry_id=self.id, before_commit=revoke)  # fmt: skip
                except BaseException:
                    self._ended_during_save(inst, "pause failed: the sandbox ended")
                    if self.state == "running" and self.policy.credentials and not self._issued:
                        # Refused after its credentials went (a files-only save past a
                        # limit): it goes on running, so it gets them back.
                        with contextlib.suppress(GlassroomError):
                            self._reissue(inst, "pause refused")
                    raise
                self._paused_receipt = inst.destroy()
                self._instance = None
                self._runtime_used += time.monotonic() - self._run_since
                self._stop_egress()
                facts.update(how="checkpoint" if memory else "files", memory=memory)
            self.state = "paused"
            facts.update(tier=self.backend, credentials_revoked=n,
                         total_ms=round((time.monotonic() - t0) * 1000, 1))  # fmt: skip
            self.audit.append(self.id, "sandbox.paused", facts, decision="info")
            return facts

    def resume(self) -> dict[str, Any]:
        """Run again where it stopped, with credentials issued anew."""
        with self._lock:
            self._require("paused")
            t0 = time.monotonic()
            facts = self._thaw() if self._frozen else self._restore_paused()
            self.state = "running"
            facts.update(tier=self.backend, credentials_reissued=len(self._issued),
                         ms=round((time.monotonic() - t0) * 1000, 1))  # fmt: skip
            self.audit.append(self.id, "sandbox.resumed", facts, decision="info")
            return facts

    def _thaw(self) -> dict[str, Any]:
        inst = self._instance
        assert inst is not None
        # Issued while still frozen (a source that fails leaves it paused, as it
        # was); thawed before they are injected: its init writes the files.
        self._renew_credentials("resume")
        inst.thaw()
        self._frozen = False
        self._run_since = time.monotonic()
        self.state = "running"
        self._inject_credentials(inst, replace=True)
        return {"how": "thaw", "memory": True}

    def _restore_paused(self) -> dict[str, Any]:
        info, manifest, d = open_entry(self.store, self.id, tenant=None, kind="pause",
                                       audit=self.audit)  # fmt: skip
        try:
            restore = RestoreFrom(info, manifest, d, "resume")
            self._limit_runtime(self._runtime_used)
            self._issue_credentials()
            self._apply_placeholders({**(manifest.get("placeholders") or {}),
                                      **(self._kept_placeholders or {})})  # fmt: skip
            self._start_egress()
            try:
                inst = self._launch(restore)
            except BaseException:
                self._revoke_credentials(log=False)
                self._stop_egress()
                raise
        except BaseException:
            self._revoke_credentials(log=False)
            raise
        finally:
            discard(d)
        self._instance = inst
        self._run_since = time.monotonic()
        self.state = "running"
        self.store.delete(self.id, kind="pause")  # running again: the image is spent
        self._inject_credentials(inst, replace=True)
        return {"how": "restore" if info.memory else "files", "memory": info.memory,
                "files": restore.loaded}  # fmt: skip

    # -- snapshot / fork -------------------------------------------------------------

    def _memory_choice(self, memory: bool | None) -> tuple[bool, str | None]:
        if self.backend in FREEZE_TIERS:
            from ..backends.namespaces import NO_PROCESS_STATE

            if memory:
                raise SnapshotError(NO_PROCESS_STATE, rule="snapshot.memory")
            return False, NO_PROCESS_STATE
        if memory is False:
            return False, "files only: asked for"
        return True, None

    def snapshot(self, *, name: str | None = None, memory: bool | None = None,
                 include_tmp: bool = False, kind: str = "snapshot") -> SnapshotInfo:  # fmt: skip
        """Save the running sandbox as a named snapshot; it goes on running.

        ``memory=None`` saves processes where the tier can and says why not
        where it cannot (``SnapshotInfo.memory_refused``)."""
        from .snapshots import check_name

        with self._lock:
            self._require("running")
            names = [check_name(name)] if name is not None else []
            mem, refused = self._memory_choice(memory)
            inst = self.instance
            try:
                info, facts = self._save(
                    inst, kind, mem, True, self._files_roots(include_tmp), names, refused,
                    before_commit=lambda: {"credentials": self._rotate_credentials(kind)},
                )
            except BaseException:
                self._ended_during_save(inst, f"{kind} failed: the sandbox ended")
                raise
            self.audit.append(self.id, "snapshot.created",
                              {"snapshot": info.id, "names": info.names, "kind": kind,
                               "tier": self.backend, "memory": info.memory,
                               "memory_refused": refused, **facts},
                              decision="info")  # fmt: skip
            return info

    def fork(self, **kw: Any) -> Supervised:
        """A new running sandbox from this one as it is now: own id, credentials, trail."""
        from .supervisor import Supervised

        info = self.snapshot(kind="fork")
        try:
            _, manifest, d = open_entry(self.store, info.id, tenant=self.tenant, kind="fork",
                                        audit=self.audit)  # fmt: skip
        finally:
            self.store.delete(info.id, kind="fork")  # the verified copy is all it needs now
        try:
            child = Supervised(self.policy, backend=self.backend,
                               audit_log=kw.pop("audit_log", self.audit_path),
                               store=self.store, tenant=self.tenant,
                               restore=RestoreFrom(info, manifest, d, "fork", parent=self.id),
                               **kw)  # fmt: skip
        finally:
            discard(d)
        details = {"parent": self.id, "child": child.id, "tier": self.backend,
                   "memory": info.memory, "memory_refused": info.memory_refused,
                   "bytes": info.size_bytes,
                   "credentials": {"parent_rotated": len(self._issued),
                                   "child_issued": len(child._issued)}}  # fmt: skip
        self.audit.append(self.id, "sandbox.forked", details, decision="info")
        child.audit.append(child.id, "sandbox.forked", details, decision="info")
        return child


def from_store(entry_id: str, *, kind: str, store: SnapshotStore | None, tenant: str | None,
               audit_log: str | Path | None, backend: str | None = None,
               **kw: Any) -> Supervised:  # fmt: skip
    """A sandbox from a snapshot (new id) or a paused image (its own id again)."""
    from ..audit import AuditLog
    from .supervisor import Supervised

    store = store or default_store()
    store.get(entry_id, tenant=tenant, kind=kind)  # not found: before any audit record
    # The refusal goes to the trail the entry's sandbox used, unless told another.
    audit = AuditLog(audit_log) if audit_log else None
    try:
        info, manifest, d = open_entry(store, entry_id, tenant=tenant, kind=kind,
                                       audit=audit or _default_audit())  # fmt: skip
    finally:
        if audit is not None:
            audit.close()
    try:
        policy = validate_policy(manifest["policy"])
        if backend is not None and backend != manifest["backend"]:
            raise SnapshotError(f"snapshot {entry_id} was taken on the {manifest['backend']} "
                                f"tier and restores only there, not on {backend}",
                                rule="snapshot.tier")  # fmt: skip
        how = "resume" if kind == "pause" else "snapshot"
        # The trail is the caller's (or the default): never a path read from the
        # manifest, which whoever can write the store could point anywhere.
        sup = Supervised(policy, backend=manifest["backend"], audit_log=audit_log, store=store,
                         tenant=info.tenant, restore=RestoreFrom(info, manifest, d, how),
                         sandbox_id=info.sandbox_id if kind == "pause" else None,
                         **kw)  # fmt: skip
    finally:
        discard(d)
    if kind == "pause":
        store.delete(entry_id, kind="pause")
        sup.audit.append(sup.id, "sandbox.resumed",
                         {"how": "restore" if info.memory else "files", "memory": info.memory,
                          "tier": sup.backend, "credentials_reissued": len(sup._issued),
                          "from": "another process"}, decision="info")  # fmt: skip
    return sup


def _default_audit() -> AuditLog:
    from .. import _config
    from ..audit import AuditLog

    return AuditLog(_config.audit_log_path())
