"""The backend protocol: start a plan, exec in it, move files, destroy.

Kept deliberately small (compare httpx's one-method transport) so that the
gVisor and microVM tiers only have to implement these few calls.  Backends
report facts (exit status, cgroup counters, what was removed); the
supervisor turns facts into audit records and decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..plan import LaunchPlan

#: ``on_event(event, details, decision, rule)``: how a backend reports what it
#: saw (a limit hit, the deadline) to the supervisor's audit log.
EventSink = Callable[[str, dict[str, Any], str, "str | None"], None]


@dataclass(frozen=True)
class ExecRequest:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    stdin: bytes | None = None
    timeout_s: float | None = None
    max_output_bytes: int = 1 << 20


@dataclass
class ExecResult:
    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration_ms: float
    truncated: bool
    timed_out: bool = False
    #: errno of a failed execve (EACCES: not allowed, ENOENT: not found).
    exec_errno: int | None = None
    exec_error: str = ""
    limits_hit: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FileEntry:
    name: str
    type: str
    size: int


@dataclass
class Receipt:
    """What destroy removed, and the check that nothing is left."""

    sandbox_id: str
    removed: dict[str, Any]
    leftovers: dict[str, list[str]]

    @property
    def clean(self) -> bool:
        return not any(self.leftovers.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "sandbox_id": self.sandbox_id,
            "removed": self.removed,
            "leftovers": self.leftovers,
            "clean": self.clean,
        }


class Process(Protocol):
    """A command started with :meth:`Instance.spawn`, running in the background.

    Output is kept as a list of ``(stream, bytes)`` events ("stdout" or
    "stderr"), bounded by the request's ``max_output_bytes`` over the whole
    life of the process; consumers read it from an index, so several may
    follow one process.  ``result`` is set once it has exited.
    """

    pid: int
    result: ExecResult | None

    def events_since(
        self, index: int, timeout: float
    ) -> tuple[list[tuple[str, bytes]], int, bool]:
        """New events from ``index`` (waiting up to ``timeout`` for some): (events, next
        index, done).  ``done`` is true once the process exited and all was read."""
        ...

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        """The result once the process exited; None if ``timeout`` passed first."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process's group (a no-op once it exited)."""
        ...

    def write_stdin(self, data: bytes) -> None:
        """Write to its stdin; ``BrokenPipeError`` once stdin is closed."""
        ...

    def close_stdin(self) -> None: ...

    def on_exit(self, callback: Callable[[ExecResult], None]) -> None:
        """Call ``callback(result)`` when it exits (at once if it already has)."""
        ...


class Instance(Protocol):
    """A running sandbox."""

    sandbox_id: str
    walls: dict[str, Any]

    def exec(self, req: ExecRequest) -> ExecResult: ...
    def spawn(self, req: ExecRequest) -> Process:
        """Start ``req`` like :meth:`exec` (same walls, same errors for a denied or
        missing executable, reported as the process's result) but return at once."""
        ...

    def read_file(self, path: str, max_bytes: int) -> bytes: ...
    def write_file(self, path: str, data: bytes, mode: int) -> None: ...
    def list_dir(self, path: str) -> list[FileEntry]: ...
    def remove(self, path: str) -> None: ...
    def make_dir(self, path: str) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> None: ...
    def destroy(self) -> Receipt: ...


class Backend(Protocol):
    name: ClassVar[str]
    #: Risk levels this backend serves; ``compile`` refuses others.
    risks: ClassVar[Sequence[str]]

    def start(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> Instance: ...
