"""The backend protocol: start a plan, exec in it, move files, destroy.

Kept deliberately small (compare httpx's one-method transport) so that the
gVisor and microVM tiers only have to implement these few calls.  Backends
report facts (exit status, cgroup counters, what was removed); the
supervisor turns facts into audit records and decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .._errors import SandboxError
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
    #: ``(rows, cols)``: run on a new pseudo-terminal made inside the sandbox
    #: (its controlling tty; stdout and stderr both arrive as ``"pty"`` events,
    #: stdin is typed into it).  Only :meth:`Instance.spawn` takes it.
    pty: tuple[int, int] | None = None


#: A terminal's rows and columns are ``unsigned short`` in ``struct winsize``.
MAX_PTY_SIDE = 0xFFFF


def pty_size(rows: object, cols: object) -> tuple[int, int]:
    """``(rows, cols)`` checked: whole numbers from 1 to 65535, or ``SandboxError``."""
    for name, v in (("rows", rows), ("cols", cols)):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_PTY_SIDE:
            raise SandboxError(f"pty: {name} must be a whole number from 1 to {MAX_PTY_SIDE}",
                               rule="pty")  # fmt: skip
    assert isinstance(rows, int) and isinstance(cols, int)
    return rows, cols


def resize_message(
    has_pty: bool, pid: int, running: bool, rid: int, rows: object, cols: object
) -> dict[str, Any] | None:
    """The init's ``resize`` request for a process (the namespaces and gVisor
    inits take the same one), or None once there is nothing to resize."""
    if not has_pty:
        raise SandboxError(f"process {pid} has no pty to resize", rule="pty")
    r, c = pty_size(rows, cols)
    if not running or not rid:
        return None
    return {"op": "resize", "target": rid, "rows": r, "cols": c}


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
    """One entry of a directory listing, as the sandbox saw it (not followed).

    ``type`` is ``"file"`` (a regular file), ``"dir"``, ``"symlink"`` or
    ``"other"`` (a FIFO, socket or character/block device: reading or
    writing one through the file API is refused with ENXIO)."""

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


@dataclass
class Checkpoint:
    """What :meth:`Instance.checkpoint` wrote into its directory.

    The caller (``lifecycle/snapshots.py``) hashes and signs every file the
    backend lists, so a changed image is refused before ``restore`` sees it.
    """

    #: The backend that wrote it; only that backend restores it.
    tier: str
    #: True when processes and memory were saved (restore resumes them).
    memory: bool
    #: Names of the files written, relative to the checkpoint's directory.
    files: list[str]
    #: Tier facts for the audit record and the bench: sizes, times, the raw tool.
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "memory": self.memory, "files": list(self.files),
                "details": dict(self.details)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Checkpoint:
        files = [str(f) for f in d["files"]]
        return cls(str(d["tier"]), bool(d["memory"]), files, dict(d.get("details", {})))


class Process(Protocol):
    """A command started with :meth:`Instance.spawn`, running in the background.

    Output is kept as a list of ``(stream, bytes)`` events ("stdout" or
    "stderr", or "pty" for a command on a pseudo-terminal), bounded by the
    request's ``max_output_bytes`` over the whole life of the process;
    consumers read it from an index, so several may follow one process.
    ``result`` is set once it has exited.
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

    def resize(self, rows: int, cols: int) -> None:
        """Set the size of its pseudo-terminal (``TIOCSWINSZ``, inside the sandbox;
        the terminal's programs get ``SIGWINCH``).  ``SandboxError`` if it has none."""
        ...

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

    def checkpoint(self, dest: Path, *, leave_running: bool) -> Checkpoint:
        """Save the whole sandbox, processes, memory and files, into ``dest``.

        ``dest`` is an empty directory (mode 0700, root's) on the data disk.
        With ``leave_running`` the sandbox goes on as before (a snapshot or a
        fork); without it, the sandbox's processes are gone when this returns
        (a pause) and the caller then calls :meth:`destroy` to release the rest.
        A tier that cannot save processes raises ``SnapshotError`` with rule
        ``snapshot.memory`` naming the tier (``lifecycle/snapshots.py`` then
        offers a files-only snapshot); it never pretends.
        """
        ...

    def freeze(self) -> None:
        """Stop every process in place, memory kept (the namespaces tier's pause);
        ``SnapshotError`` (rule ``snapshot.freeze``) where the tier has no freezer."""
        ...

    def thaw(self) -> None:
        """Undo :meth:`freeze`."""
        ...


class Backend(Protocol):
    name: ClassVar[str]
    #: Risk levels this backend serves; ``compile`` refuses others.
    risks: ClassVar[Sequence[str]]

    def start(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> Instance: ...

    def restore(
        self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink, src: Path,
        checkpoint: Checkpoint,
    ) -> Instance:  # fmt: skip
        """A running sandbox again from what :meth:`Instance.checkpoint` wrote in
        ``src`` (already integrity-checked).  The walls are built from ``plan``
        exactly as :meth:`start` builds them; ``sandbox_id`` may differ from the
        one saved (a fork, or a sandbox made from a snapshot)."""
        ...
