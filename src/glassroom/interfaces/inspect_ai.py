"""An inspect_ai sandbox provider: ``Task(..., sandbox=("glassroom", "policy.toml"))``.

inspect-ai (https://inspect.aisi.org.uk) runs each sample's tool calls in a
*sandbox environment* it gets from a provider registered under a name.  This
module registers ``glassroom`` (found through the ``inspect_ai`` entry point in
pyproject.toml, so ``pip install glassroom[inspect]`` is all a user does): every
sample gets a fresh :class:`glassroom.Sandbox` built from the task's policy, and
every ``exec``/``write_file``/``read_file`` inspect makes is an ordinary SDK
call on it, under that policy and audited like any other action.  Nothing here
opens a wall: the provider only translates.

What inspect expects (``inspect_ai.util.SandboxEnvironment``'s docstrings) and
how glassroom's outcomes map onto it:

* a policy refusal of a file operation (``SandboxPathError`` with EACCES, EPERM
  or EROFS) is a ``PermissionError``; ENOENT a ``FileNotFoundError``, EISDIR an
  ``IsADirectoryError``, ENOTDIR a ``NotADirectoryError``;
* a command the policy's ``tools.allow`` refuses (exit 126 with a
  ``tools.allow`` block for that very program) is a ``PermissionError``; a
  refusal *inside* a command (a shell's ``od``) stays the shell's exit status;
* the ``timeout`` ending a command is a ``TimeoutError``;
* output or a file over inspect's limits (``INSPECT_SANDBOX_MAX_*``), or output
  the policy's ``resources.max_output_bytes`` cut short, is an
  ``OutputLimitExceededError``;
* ``user`` other than the sandbox's own (``agent``, uid 1000) is a
  ``SandboxUserUnsupportedError``: there is no root inside, by design;
* a sandbox that is gone (destroyed, past its deadline) is a
  ``SandboxUnavailableError``.

``connection()`` stays inspect's ``NotImplementedError``: a local sandbox lives
inside the eval's process, and there is no shell to attach to from outside.

The SDK is synchronous, so each call runs in a worker thread; one sample's
sandbox never blocks another's event loop.
"""

from __future__ import annotations

import errno as _errno
import posixpath
import re
from pathlib import Path
from typing import Any, Literal, overload

import anyio.to_thread
from inspect_ai.util import (
    ExecResult,
    OutputLimitExceededError,
    SandboxEnvironment,
    SandboxEnvironmentConfigType,
    SandboxEnvironmentLimits,
    SandboxUnavailableError,
    SandboxUserUnsupportedError,
    sandboxenv,
)
from pydantic import BaseModel, ConfigDict

from .._errors import GlassroomError, SandboxClosed, SandboxError, SandboxPathError
from .._sandbox import RunResult, Sandbox

#: The one user a glassroom sandbox runs commands as (the names inspect may pass).
SANDBOX_USERS = frozenset({"agent", "1000"})
#: The per-sample working directory: relative paths and ``cwd`` resolve here.
WORKDIR = "/workspace"
#: The exit status glassroom gives a command the policy refused to start.
EXEC_REFUSED = 126
#: File names looked for in the task's directory when no config is given.
CONFIG_FILES = ["glassroom.toml"]
#: How a glassroom path error names its errno at the end of its message.
_ERRNO_NAME = re.compile(r"\((E[A-Z]+)\)\s*$")


class GlassroomSandboxConfig(BaseModel):
    """What ``sandbox=("glassroom", GlassroomSandboxConfig(...))`` can say.

    A plain string config is ``policy``.  Local sandboxes take ``policy``,
    ``backend`` and ``audit_log``; with ``url`` the sandboxes live in a
    ``glassroom serve`` (``api_key``, ``template`` and ``timeout_s`` are for it,
    and its audit log is the server's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str | None = None
    """A policy file path or TOML text; None is glassroom's default policy."""
    backend: str | None = None
    """``namespaces``, ``gvisor`` or ``microvm``; None is the policy's tier."""
    audit_log: str | None = None
    url: str | None = None
    api_key: str | None = None
    template: str | None = None
    timeout_s: float | None = None


def _config(config: SandboxEnvironmentConfigType | None) -> GlassroomSandboxConfig:
    if config is None:
        return GlassroomSandboxConfig()
    if isinstance(config, GlassroomSandboxConfig):
        return config
    if isinstance(config, str):
        return GlassroomSandboxConfig(policy=config)
    raise GlassroomError(
        f"glassroom sandbox config must be a policy path or GlassroomSandboxConfig, "
        f"not {type(config).__name__}"
    )


def _open(cfg: GlassroomSandboxConfig) -> Sandbox:
    if cfg.url is not None:
        try:
            from .._remote import RemoteSandbox
        except ModuleNotFoundError as exc:
            from .._extras import missing_extra

            raise (missing_extra(exc, "a glassroom sandbox with url") or exc) from None
        return RemoteSandbox(cfg.policy, url=cfg.url, api_key=cfg.api_key, backend=cfg.backend,
                             template=cfg.template, timeout_s=cfg.timeout_s)  # fmt: skip
    if cfg.template is not None or cfg.timeout_s is not None or cfg.api_key is not None:
        raise GlassroomError("glassroom sandbox config: template, timeout_s and api_key need url")
    policy: str | Path | None = cfg.policy
    if isinstance(policy, str) and "\n" not in policy and "=" not in policy:
        policy = Path(policy)  # a path, relative to the task's directory (inspect's cwd)
    return Sandbox(policy, backend=cfg.backend, audit_log=cfg.audit_log)


def _os_error(exc: SandboxError, path: str) -> OSError | None:
    """The OSError inspect's contract names for a failed file operation, if any.

    A local sandbox's error carries ``errno``; one from a ``glassroom serve``
    (remote mode) carries only its message, which ends in the errno's name
    ("... (ENOENT)"), and any other path refusal there is a permission one."""
    err = getattr(exc, "errno", None)
    if err is None:
        named = _ERRNO_NAME.search(str(exc))
        err = getattr(_errno, named.group(1), None) if named else None
        if err is None and isinstance(exc, SandboxPathError):
            err = _errno.EACCES
    kind: type[OSError] | None = {
        _errno.EACCES: PermissionError,
        _errno.EPERM: PermissionError,
        _errno.EROFS: PermissionError,
        _errno.ENOENT: FileNotFoundError,
        _errno.EISDIR: IsADirectoryError,
        _errno.ENOTDIR: NotADirectoryError,
    }.get(err or 0)
    if kind is None or err is None:
        return None
    return kind(err, str(exc), path)


def _refused_exec(cmd: list[str], r: RunResult) -> bool:
    """The policy refused to start ``cmd[0]`` itself (not something it ran)."""
    if r.exit_code != EXEC_REFUSED:
        return False
    name = posixpath.basename(cmd[0])
    return any(b.rule == "tools.allow" and posixpath.basename(b.target) == name
               for b in r.blocked)  # fmt: skip


@sandboxenv(name="glassroom")
class GlassroomSandboxEnvironment(SandboxEnvironment):
    """One sample's glassroom sandbox, as inspect sees it."""

    def __init__(self, sb: Sandbox) -> None:
        super().__init__()
        self.sandbox = sb

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def config_files(cls) -> list[str]:
        return list(CONFIG_FILES)

    @classmethod
    def config_deserialize(cls, config: dict[str, Any]) -> BaseModel:
        return GlassroomSandboxConfig(**config)

    @classmethod
    async def task_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None) -> None:
        # Fail at task start, not in every sample, on a config that cannot work:
        # this parses and validates the policy (PolicyError names field and line).
        cfg = _config(config)
        if cfg.url is None and not (cfg.template is None and cfg.timeout_s is None
                                    and cfg.api_key is None):  # fmt: skip
            raise GlassroomError("glassroom sandbox config: template, timeout_s, api_key need url")
        if cfg.policy is not None:
            from ..policy import load_policy, parse_policy

            text = cfg.policy
            if "\n" in text or "=" in text:
                parse_policy(text)
            else:
                load_policy(Path(text))

    @classmethod
    async def sample_init(
        cls, task_name: str, config: SandboxEnvironmentConfigType | None, metadata: dict[str, str]
    ) -> dict[str, SandboxEnvironment]:
        cfg = _config(config)
        sb = await anyio.to_thread.run_sync(_open, cfg)
        return {"default": cls(sb)}

    @classmethod
    async def sample_cleanup(
        cls,
        task_name: str,
        config: SandboxEnvironmentConfigType | None,
        environments: dict[str, SandboxEnvironment],
        interrupted: bool,
    ) -> None:
        for env in environments.values():
            sb = env.as_type(GlassroomSandboxEnvironment).sandbox
            await anyio.to_thread.run_sync(sb.destroy)

    @classmethod
    async def task_cleanup(
        cls, task_name: str, config: SandboxEnvironmentConfigType | None, cleanup: bool
    ) -> None:
        # Every sandbox belongs to one sample and is destroyed with it (and the
        # supervisor's reaper ends any left by a crash): nothing task-wide to free.
        return None

    def default_polling_interval(self) -> float:
        return 0.2

    # -- operations ----------------------------------------------------------------

    def _resolve(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join(WORKDIR, path)

    async def exec(
        self,
        cmd: list[str],
        input: str | bytes | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
        timeout: int | None = None,
        timeout_retry: bool = True,
        concurrency: bool = True,
    ) -> ExecResult[str]:
        # timeout_retry: a retried command would run twice with its side effects;
        # glassroom runs it once and reports the timeout (documented in docs/inspect.md).
        if user is not None and user not in SANDBOX_USERS:
            raise SandboxUserUnsupportedError(
                f"a glassroom sandbox runs commands only as 'agent' (uid 1000), not {user!r}"
            )
        where = self._resolve(cwd) if cwd is not None else WORKDIR

        limit_s = None if timeout is None else float(timeout)

        def run() -> RunResult:
            return self.sandbox.run(cmd, cwd=where, env=env, stdin=input, timeout_s=limit_s)

        try:
            r = await anyio.to_thread.run_sync(run)
        except SandboxClosed as exc:
            raise SandboxUnavailableError(str(exc)) from exc
        if r.timed_out:
            raise TimeoutError(f"command timed out after {timeout}s: {cmd!r}")
        if _refused_exec(cmd, r):
            raise PermissionError(_errno.EACCES, r.stderr.strip(), cmd[0])
        if r.truncated:
            # The policy's own cap (resources.max_output_bytes) cut the output:
            # what is left is its beginning, so say so rather than pass it off as whole.
            raise OutputLimitExceededError("the policy's resources.max_output_bytes", r.stdout)
        limit = SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE
        for out in (r.stdout_bytes, r.stderr_bytes):
            if len(out) > limit:
                raise OutputLimitExceededError(
                    SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE_STR,
                    out[:limit].decode(errors="replace"),
                )
        return ExecResult(success=r.exit_code == 0, returncode=r.exit_code,
                          stdout=r.stdout, stderr=r.stderr)  # fmt: skip

    async def write_file(self, file: str, contents: str | bytes) -> None:
        path = self._resolve(file)
        parent = posixpath.dirname(path)

        def write() -> None:
            # inspect wants missing parents made; each mkdir is a policy-checked,
            # audited file operation like the write itself.
            self._make_parents(parent)
            self.sandbox.files.write(path, contents)

        try:
            await anyio.to_thread.run_sync(write)
        except SandboxClosed as exc:
            raise SandboxUnavailableError(str(exc)) from exc
        except SandboxError as exc:
            raise (_os_error(exc, path) or exc) from exc

    def _make_parents(self, parent: str) -> None:
        missing: list[str] = []
        d = parent
        while d not in ("/", "") and not self.sandbox.files.exists(d):
            missing.append(d)
            d = posixpath.dirname(d)
            if len(missing) > 64:  # bounded: no real path is that deep
                break
        for m in reversed(missing):
            self.sandbox.files.make_dir(m)

    @overload
    async def read_file(self, file: str, text: Literal[True] = True) -> str: ...

    @overload
    async def read_file(self, file: str, text: Literal[False]) -> bytes: ...

    async def read_file(self, file: str, text: bool = True) -> str | bytes:
        path = self._resolve(file)
        limit = SandboxEnvironmentLimits.MAX_READ_FILE_SIZE
        try:
            # One byte more than the limit tells "too big" from "exactly the limit".
            data = await anyio.to_thread.run_sync(self.sandbox.files.read, path, limit + 1)
        except SandboxClosed as exc:
            raise SandboxUnavailableError(str(exc)) from exc
        except SandboxError as exc:
            raise (_os_error(exc, path) or exc) from exc
        if len(data) > limit:
            raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, None)
        # newline="" semantics: bytes are decoded as they are, CRLF stays CRLF.
        return data.decode("utf-8") if text else data
