"""Write gates for a plan's writable host dirs (``_sys/fusegate.py``), shared by two tiers.

Each ``bind`` mount of the plan (a ``filesystem.write`` dir) is served by a
gate mounted on a staging dir of its own, ``<state>/gates/<sandbox>/<n>``;
the backend binds the staging dir where the host dir would have been.  The
sandbox's dir is owned by the sandbox uid, mode 0700: on the host, only that
uid (and root) can reach the staging mounts.

Fail closed: if any gate cannot be mounted the sandbox does not start, and
the error names ``filesystem.protected``.  ``close`` unmounts (lazily) and
removes the staging dirs with rmdir only, never a recursive delete: a
recursive delete through a live gate would delete the user's files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .. import _config
from .._errors import WallError
from .._sys import fusegate
from ..plan import LaunchPlan
from .base import EventSink

RULE = "filesystem.protected"


class Gates:
    """The gates of one sandbox: ``staging[target]`` is what to bind at ``target``."""

    def __init__(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink, *,
                 gvisor: bool = False) -> None:  # fmt: skip
        self.plan = plan
        self.sandbox_id = sandbox_id
        self.on_event = on_event
        self.gvisor = gvisor
        self.gates: list[fusegate.Gate] = []
        self.staging: dict[str, str] = {}
        self.root = _config.state_dir() / "gates" / sandbox_id

    @property
    def needed(self) -> bool:
        return any(m.kind == "bind" for m in self.plan.mounts)

    def dirs(self) -> list[str]:
        """What the reaper must unmount and rmdir if this supervisor dies.

        Every staging dir ``start`` will make, known before it runs: the record
        is written first, and a supervisor killed mid-start leaves mounts too.
        """
        if not self.needed:
            return []
        binds = sum(m.kind == "bind" for m in self.plan.mounts)
        return [*(str(self.root / str(i)) for i in range(binds)), str(self.root)]

    def start(self) -> dict[str, Any]:
        """Mount every gate; returns the walls entry.  Raises WallError(filesystem.protected)."""
        why = fusegate.available()
        if why is not None:
            raise WallError(
                f"{RULE}: filesystem.write needs the write gate, which {why}; "
                "without it protected names could not be enforced",
                rule=RULE,
            )
        uid, gid = _config.sandbox_ids()
        rules = [fusegate.Rule(tuple(fusegate.norm(p) for p in e.path.split("/")), e.tree,
                               e.path, e.reason) for e in self.plan.protected]  # fmt: skip
        base = self.root.parent
        base.mkdir(parents=True, exist_ok=True, mode=0o711)
        os.chmod(base, 0o711)
        self.root.mkdir(mode=0o700)
        os.chown(self.root, uid, gid)
        binds = [m for m in self.plan.mounts if m.kind == "bind"]
        for i, m in enumerate(binds):
            lifted = [u[len(m.target):].lstrip("/") for u in self.plan.unprotect
                      if u == m.target or u.startswith(m.target + "/")]  # fmt: skip
            for path in lifted:
                self.on_event("policy.unprotect",
                              {"path": "/".join(filter(None, (m.target, path))),
                               "reason": "filesystem.unprotect lifts the protected names here"},
                              "allow", "filesystem.unprotect")  # fmt: skip
            gate = fusegate.Gate(
                str(m.source), m.target, fusegate.Protection(rules, lifted),
                uid=uid, gid=gid, on_deny=self._deny,
                id_map=(_config.INSIDE_UID, _config.INSIDE_GID) if self.gvisor else None,
                chown_noop=(_config.INSIDE_UID, _config.INSIDE_GID) if self.gvisor else None,
            )  # fmt: skip
            stage = self.root / str(i)
            stage.mkdir(mode=0o755)
            try:
                gate.mount(str(stage))
            except OSError as exc:
                raise WallError(f"{RULE}: cannot mount the write gate for {m.target}: {exc}",
                                rule=RULE) from exc  # fmt: skip
            self.gates.append(gate)
            self.staging[m.target] = str(stage)
        return {"dirs": [m.target for m in binds], "protected": len(rules),
                "unprotect": list(self.plan.unprotect),
                "how": "FUSE gate served by the supervisor, as the sandbox uid"}  # fmt: skip

    def detach(self) -> None:
        """The sandbox holds its binds now: no gate stays mounted on the host."""
        for gate in self.gates:
            gate.detach()

    def _deny(self, rule: str, details: dict[str, Any]) -> None:
        self.on_event("blocked", details, "deny", rule)

    def abort(self) -> None:
        """Abort every gate's FUSE connection (idempotent; ``close`` still cleans up).

        Called first when a sandbox is killed: a FUSE request the gate has
        received holds its task in an uninterruptible wait, which SIGKILL
        cannot end, so the sandbox would outlive its kill (and its cgroup
        could not be removed) if a gate were stuck.  Aborting the connection
        ends every such request with ENOTCONN."""
        for gate in self.gates:
            gate.close()

    def close(self) -> dict[str, Any]:
        denied = sum(g.denied for g in self.gates)
        for gate in self.gates:
            gate.close()
        self.gates.clear()
        left = cleanup(self.dirs())  # a gate that failed to mount left its dir too
        if left:
            return {"gates": list(self.staging), "denied": denied, "left": left}
        return {"gates": list(self.staging), "denied": denied}


def cleanup(dirs: list[str]) -> list[str]:
    """Detach any mount at each dir and rmdir it; returns what is left."""
    left = []
    for d in dirs:
        fusegate.unmount(d)
        with contextlib.suppress(FileNotFoundError):
            try:
                os.rmdir(d)
            except OSError:
                left.append(d)
    return [d for d in left if Path(d).exists()]
