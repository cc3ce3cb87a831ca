"""The Python SDK: ``with Sandbox(policy=...) as sb: sb.run([...])``.

A thin, typed face over the supervisor.  The sandbox is created when the
object is constructed (so it can be used without ``with``), and destroyed
on ``__exit__``/``destroy()``; both are idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._errors import GlassroomError, SandboxError
from .backends.base import FileEntry, Process, Receipt
from .egress import NetworkOptions
from .lifecycle.snapshots import SnapshotInfo, SnapshotStore, default_store
from .lifecycle.supervisor import Blocked, RunOutcome, Supervised
from .policy import Policy, default_policy, load_policy, parse_policy, validate_policy

if TYPE_CHECKING:
    from .lifecycle.workspace import CopyReport

#: Largest file ``files.read`` returns unless told otherwise.
DEFAULT_READ_MAX = 64 * 1024 * 1024


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool = False
    signal: int | None = None
    blocked: list[Blocked] = field(default_factory=list)
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def _as_policy(policy: Policy | str | Path | Mapping[str, Any] | None) -> Policy:
    if policy is None:
        return default_policy()
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Path):
        return load_policy(policy)
    if isinstance(policy, str):
        # A string holding TOML (has a newline or '=') or a file path.
        if "\n" in policy or "=" in policy:
            return parse_policy(policy)
        return load_policy(policy)
    if isinstance(policy, Mapping):
        return validate_policy(policy)
    raise TypeError(f"policy must be a Policy, TOML text, a path or a dict, not {type(policy)}")


class Files:
    """File access in the sandbox's own view: what it cannot see, this cannot touch."""

    def __init__(self, sup: Supervised) -> None:
        self._sup = sup

    def _do(self, op: str, path: str, fn: Any, *args: Any) -> Any:
        try:
            out = fn(path, *args)
        except GlassroomError as exc:
            self._sup.file_event(op, path, exc)
            raise
        self._sup.file_event(op, path, None)
        return out

    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self._do("write", path, self._sup.instance.write_file, raw, mode)

    def read(self, path: str, max_bytes: int = DEFAULT_READ_MAX) -> bytes:
        out: bytes = self._do("read", path, self._sup.instance.read_file, max_bytes)
        return out

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def list(self, path: str = "/workspace") -> list[FileEntry]:
        out: list[FileEntry] = self._do("list", path, self._sup.instance.list_dir)
        return out

    def make_dir(self, path: str) -> None:
        self._do("mkdir", path, self._sup.instance.make_dir)

    def remove(self, path: str) -> None:
        self._do("remove", path, self._sup.instance.remove)

    def exists(self, path: str) -> bool:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e.name == name for e in self._sup.instance.list_dir(parent or "/"))
        except SandboxError:
            return False


class _InstanceOrClass:
    """``sb.resume()`` on a paused object, ``Sandbox.resume(id)`` from anywhere else.

    One name for both, as users of sandbox services expect: the instance form
    resumes in place; the class form rebuilds a sandbox paused by another
    process from its saved image (gVisor, microVM, files-only pauses)."""

    def __init__(self, on_instance: Any, on_class: Any) -> None:
        self._i, self._c = on_instance, on_class

    def __get__(self, obj: Any, cls: type) -> Any:
        if obj is None:
            return self._c.__get__(cls, cls)
        return self._i.__get__(obj, cls)


class Sandbox:
    """A fresh sandbox for one task.

    With ``url=`` (and ``api_key=``) the sandbox lives in a ``glassroom serve``
    at that URL instead of in this process; the API is the same (the object
    is a :class:`glassroom._remote.RemoteSandbox`).
    """

    def __new__(cls, *args: Any, url: str | None = None, **kw: Any) -> Sandbox:
        if url is not None and cls is Sandbox:
            try:
                from ._remote import RemoteSandbox
            except ModuleNotFoundError as exc:
                from ._extras import missing_extra

                raise (missing_extra(exc, "Sandbox(url=...)") or exc) from None
            return object.__new__(RemoteSandbox)
        return object.__new__(cls)

    def __init__(
        self,
        policy: Policy | str | Path | Mapping[str, Any] | None = None,
        *,
        backend: str | None = None,
        audit_log: str | Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        network: NetworkOptions | None = None,
        store: SnapshotStore | None = None,
        tenant: str = "local",
    ) -> None:
        if url is not None or api_key is not None:
            raise SandboxError("api_key= is only meaningful with url= (a glassroom serve)")
        self._sup = Supervised(_as_policy(policy), backend=backend, audit_log=audit_log,
                               network=network, store=store, tenant=tenant)  # fmt: skip
        self.files = Files(self._sup)

    @classmethod
    def _wrap(cls, sup: Supervised) -> Sandbox:
        sb = object.__new__(cls)
        sb._sup = sup
        sb.files = Files(sup)
        return sb

    # -- pause, resume, snapshot, fork (docs/snapshots.md) ----------------------------

    @property
    def state(self) -> str:
        """"running", "paused" or "destroyed"."""
        return self._sup.state

    @property
    def paused(self) -> bool:
        return self._sup.state == "paused"

    def pause(self, *, memory: bool = True) -> dict[str, Any]:
        """Stop it, keeping processes and memory (``memory``) or its files only."""
        return self._sup.pause(memory=memory)

    def _resume_self(self) -> dict[str, Any]:
        return self._sup.resume()

    @classmethod
    def _resume_by_id(cls, sandbox_id: str, *, store: SnapshotStore | None = None,
                      audit_log: str | Path | None = None) -> Sandbox:  # fmt: skip
        from .lifecycle.pausing import from_store

        return cls._wrap(from_store(sandbox_id, kind="pause", store=store, tenant=None,
                                    audit_log=audit_log))  # fmt: skip

    resume = _InstanceOrClass(_resume_self, classmethod(_resume_by_id))

    def snapshot(self, *, name: str | None = None, memory: bool | None = None,
                 include_tmp: bool = False) -> SnapshotInfo:  # fmt: skip
        """Save it as it is now, under ``name``; it goes on running."""
        return self._sup.snapshot(name=name, memory=memory, include_tmp=include_tmp)

    def fork(self) -> Sandbox:
        """A new running sandbox from this one as it is now, with its own id and credentials."""
        return type(self)._wrap(self._sup.fork())

    @classmethod
    def from_snapshot(cls, snapshot_id: str, *, store: SnapshotStore | None = None,
                      tenant: str | None = "local", audit_log: str | Path | None = None,
                      network: NetworkOptions | None = None,
                      backend: str | None = None, url: str | None = None,
                      api_key: str | None = None) -> Sandbox:  # fmt: skip
        """A new sandbox from a snapshot: its files (and processes, where the tier
        saved them), its policy and tier; ``backend``, if given, must be that tier.
        With ``url=`` the snapshot is one of that ``glassroom serve``'s."""
        if url is not None:
            from ._remote import RemoteSandbox

            return RemoteSandbox.from_snapshot(snapshot_id, url=url, api_key=api_key,
                                               backend=backend)  # fmt: skip
        from .lifecycle.pausing import from_store

        return cls._wrap(from_store(snapshot_id, kind="snapshot", store=store, tenant=tenant,
                                    audit_log=audit_log, network=network,
                                    backend=backend))  # fmt: skip

    @staticmethod
    def list_snapshots(*, store: SnapshotStore | None = None, tenant: str | None = None,
                       sandbox_id: str | None = None,
                       name: str | None = None) -> list[SnapshotInfo]:  # fmt: skip
        return (store or default_store()).list(tenant=tenant, sandbox_id=sandbox_id, name=name)

    @staticmethod
    def delete_snapshot(snapshot_id: str, *, store: SnapshotStore | None = None,
                        tenant: str | None = None) -> bool:  # fmt: skip
        return (store or default_store()).delete(snapshot_id, tenant=tenant)

    @property
    def id(self) -> str:
        return self._sup.id

    @property
    def backend(self) -> str:
        return self._sup.backend

    @property
    def policy(self) -> Policy:
        return self._sup.policy

    @property
    def walls(self) -> dict[str, Any]:
        return dict(self._sup.instance.walls)

    def copy_in(self, host_dir: str | Path, dest: str = "/workspace") -> CopyReport:
        """Copy a host directory's tree into the sandbox (``glassroom run
        --workspace``).  A symlink or special file in it refuses the whole copy:
        see :mod:`glassroom.lifecycle.workspace`."""
        from .lifecycle.workspace import copy_in

        return copy_in(self, host_dir, dest)

    def copy_out(self, host_dir: str | Path, paths: list[str] | None = None) -> CopyReport:
        """Copy ``/workspace`` (or ``paths`` under it) to a new or empty host
        directory (``glassroom run --out``).  Symlinks and special files the
        sandbox made are left behind and listed in the report."""
        from .lifecycle.workspace import copy_out

        return copy_out(self, host_dir, paths)

    def usage(self) -> dict[str, int]:
        """What the sandbox uses now, read from the host, never from inside it:
        ``cpu_usec``, ``memory_bytes``, ``memory_cache`` (its cgroups, on every
        tier) and ``disk_used``/``disk_total`` (its workspace).  A figure the
        tier cannot give is left out.  Raises as :attr:`walls` when paused or
        destroyed."""
        inst = self._sup.instance
        cg = getattr(inst, "cg", None)
        out: dict[str, int] = dict(cg.usage()) if cg is not None else {}
        disk = getattr(inst, "workspace_usage", lambda: None)()
        if disk:
            out["disk_used"], out["disk_total"] = disk
        return out

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        timeout_s: float | None = None,
    ) -> RunResult:
        """Run a command; a string runs through ``sh -c``.  Never raises for exit codes."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if not argv:
            raise SandboxError("run: empty command")
        data = stdin.encode() if isinstance(stdin, str) else stdin
        out = self._sup.run(argv, cwd=cwd, env=env, stdin=data, timeout_s=timeout_s)
        r = out.result
        return RunResult(
            exit_code=r.exit_code,
            stdout=r.stdout.decode(errors="replace"),
            stderr=r.stderr.decode(errors="replace"),
            duration_ms=r.duration_ms,
            truncated=r.truncated,
            timed_out=r.timed_out,
            signal=r.signal,
            blocked=out.blocked,
            stdout_bytes=r.stdout,
            stderr_bytes=r.stderr,
        )

    def spawn(
        self,
        cmd: Sequence[str] | str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        on_exit: Callable[[RunOutcome], None] | None = None,
        pty: tuple[int, int] | None = None,
    ) -> Process:
        """Start a command in the background: a handle that streams output, takes
        stdin and signals (``glassroom.backends.base.Process``).

        ``pty=(rows, cols)`` runs it on a pseudo-terminal made inside the
        sandbox, under the same walls: its output arrives as ``"pty"`` events,
        ``write_stdin`` types into it and ``resize(rows, cols)`` changes its size."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if not argv:
            raise SandboxError("spawn: empty command")
        return self._sup.spawn(
            argv, cwd=cwd, env=env, timeout_s=timeout_s, on_exit=on_exit, pty=pty
        )

    def destroy(self) -> Receipt:
        return self._sup.destroy()

    close = destroy

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


class SandboxPool:
    """Optional warm pool: ``pool.sandbox()`` returns a new, never-used Sandbox
    that was built ahead of time, so the task does not wait for the walls.

    Each sandbox is still used for one task and destroyed; see
    ``glassroom.lifecycle.pool`` for why the pool outlives what it hands out.
    """

    def __init__(
        self,
        policy: Policy | str | Path | Mapping[str, Any] | None = None,
        *,
        size: int = 2,
        backend: str | None = None,
        audit_log: str | Path | None = None,
    ) -> None:
        from .lifecycle.pool import Pool

        self._pool = Pool(_as_policy(policy), size=size, backend=backend, audit_log=audit_log)

    def sandbox(self, timeout: float = 30.0) -> Sandbox:
        return Sandbox._wrap(self._pool.take(timeout))

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
