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
from typing import Any

from ._errors import GlassroomError, SandboxError
from .backends.base import FileEntry, Process, Receipt
from .egress import NetworkOptions
from .lifecycle.supervisor import Blocked, RunOutcome, Supervised
from .policy import Policy, default_policy, load_policy, parse_policy, validate_policy

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
    ) -> None:
        if url is not None or api_key is not None:
            raise SandboxError("api_key= is only meaningful with url= (a glassroom serve)")
        self._sup = Supervised(_as_policy(policy), backend=backend, audit_log=audit_log,
                               network=network)  # fmt: skip
        self.files = Files(self._sup)

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
    ) -> Process:
        """Start a command in the background: a handle that streams output, takes
        stdin and signals (``glassroom.backends.base.Process``)."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if not argv:
            raise SandboxError("spawn: empty command")
        return self._sup.spawn(argv, cwd=cwd, env=env, timeout_s=timeout_s, on_exit=on_exit)

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
        sb = object.__new__(Sandbox)
        sb._sup = self._pool.take(timeout)
        sb.files = Files(sb._sup)
        return sb

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
