"""What every tier's instance shares on the host: a start that is whole or
undone, the reaper's record, and what a closed sandbox says.

Why one place: each tier builds its walls and carries its byte stream its own
way (bwrap and a socket, runsc and stdio, QEMU and virtio-serial), but what
the reaper finds on disk after a supervisor dies, and the error a caller gets
from a sandbox that has ended, must not depend on the tier.  These were three
copies that had begun to drift.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .. import _config
from .._errors import SandboxClosed
from .._sys import cgroups, proc
from ..plan import LaunchPlan
from .base import EventSink, Receipt


class _Destroyable(Protocol):
    def destroy(self) -> object: ...


_I = TypeVar("_I", bound=_Destroyable)


def started(inst: _I, build: Callable[[], object]) -> _I:
    """``inst`` once ``build`` has made all of it.  A build that fails at any
    step destroys what it made (processes, cgroups, mounts, the record) before
    the error goes on: a sandbox is started whole or not at all."""
    try:
        build()
    except BaseException:
        inst.destroy()
        raise
    return inst


class InstanceBase:
    """What every tier's instance holds from its start: its plan, where its
    record goes, its host process and cgroups once made, and its deadline."""

    def __init__(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> None:
        self.plan = plan
        self.sandbox_id = sandbox_id
        self.on_event = on_event
        self.walls: dict[str, Any] = {}
        self.state = _config.state_dir()
        self.record_path = self.state / "sandboxes" / f"{sandbox_id}.json"
        self.cg: cgroups.CgroupSet | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.deadline = time.monotonic() + plan.limits.max_runtime_s
        #: Why it ended (the reader's last word), once it has.
        self.dead_reason: str | None = None
        self.killed_by_deadline = False
        self._destroyed: Receipt | None = None

    def kill(self) -> None:
        """SIGKILL everything in it, now; never raises (the deadline calls it too)."""
        raise NotImplementedError

    def _teardown(self, removed: dict[str, Any]) -> None:
        """After the kill: undo the tier's walls and host resources, each into ``removed``."""
        raise NotImplementedError

    def _leftovers(self) -> dict[str, list[str]]:
        """What the teardown could not remove (the receipt shows it)."""
        raise NotImplementedError

    def destroy(self) -> Receipt:
        """Kill it, undo everything it held, drop its record.  Idempotent: a
        second call returns the first call's receipt."""
        if self._destroyed is not None:
            return self._destroyed
        removed: dict[str, Any] = {}
        self.kill()
        self._teardown(removed)
        self._drop_record(removed)
        self._destroyed = Receipt(self.sandbox_id, removed, self._leftovers())
        return self._destroyed

    def _expired(self, what: str = "sandbox") -> str:
        """The reader's step at the max runtime: say so in the log (the kill
        follows); operations from now on fail with :meth:`_closed_error`."""
        self.killed_by_deadline = True
        self.on_event("anomaly", {"reason": f"max runtime exceeded; {what} killed",
                                  "max_runtime_s": self.plan.limits.max_runtime_s},
                      "deny", "resources.max_runtime_s")  # fmt: skip
        return "max_runtime exceeded"

    def _closed_error(self) -> SandboxClosed:
        """The error for an operation on a sandbox that has ended, naming why."""
        if self.killed_by_deadline:
            return SandboxClosed(
                f"sandbox {self.sandbox_id} was killed at its max runtime "
                f"({self.plan.limits.max_runtime_s:g}s)",
                rule="resources.max_runtime_s",
            )
        return SandboxClosed(f"sandbox {self.sandbox_id} is no longer running ({self.dead_reason})")

    def _save_record(self, backend: str, pids: Sequence[int | None], **fields: Any) -> None:
        """What the reaper needs if this supervisor dies without cleaning up:
        who supervised it, its host processes (with their start times, so a
        reused pid is never killed), and the tier's own ``fields``.  Written to
        a temporary file and renamed, so the reaper never reads half of one."""
        sup = os.getpid()
        rec = {
            "sandbox_id": self.sandbox_id,
            "backend": backend,
            "supervisor": {"pid": sup, "start": proc.process_start_time(sup)},
            "pids": [{"pid": p, "start": proc.process_start_time(p)} for p in pids if p],
            **fields,
            "created": time.time(),
        }
        self.record_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.record_path)

    def _drop_record(self, removed: dict[str, Any]) -> None:
        """The last step of destroy: nothing is left for the reaper to do."""
        if self.record_path.exists():
            self.record_path.unlink()
            removed["state"] = str(self.record_path)
