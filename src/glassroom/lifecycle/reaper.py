"""Clean up after supervisors that died without destroying their sandboxes.

Every sandbox has a record in ``<state>/sandboxes/ID.json`` written before
any of its parts exist (supervisor pid + start time, its processes, its
cgroup).  A record whose supervisor is gone is an orphan: its processes are
killed, its cgroups removed and the record deleted.  Start times guard
against pid reuse: a recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from .. import _config
from .._errors import WallError
from .._sys import cgroups, proc


def _same_process(entry: dict[str, Any]) -> bool:
    pid, start = entry.get("pid"), entry.get("start")
    if not isinstance(pid, int) or pid <= 1:
        return False
    now = proc.process_start_time(pid)
    return now is not None and now == start


def orphan_records(state: Path | None = None) -> list[Path]:
    base = (state or _config.state_dir()) / "sandboxes"
    out = []
    for path in sorted(base.glob("*.json")) if base.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            out.append(path)
            continue
        if not _same_process(rec.get("supervisor", {})):
            out.append(path)
    return out


def reap(state: Path | None = None) -> list[dict[str, Any]]:
    """Remove every orphaned sandbox; return what was cleaned, one dict each."""
    cleaned = []
    for path in orphan_records(state):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            rec = {}
        done: dict[str, Any] = {"sandbox_id": rec.get("sandbox_id", path.stem), "killed": []}
        for entry in rec.get("pids", []):
            if _same_process(entry):
                with contextlib.suppress(OSError):
                    os.kill(entry["pid"], signal.SIGKILL)
                    done["killed"].append(entry["pid"])
        errors: list[str] = []
        cg = rec.get("cgroup")
        if isinstance(cg, dict) and isinstance(cg.get("name"), str):
            parent = str(cg.get("parent", "glassroom"))
            try:
                cs = cgroups.CgroupSet.open(cg["name"], parent=parent)
            except WallError:
                cs = None  # none of its cgroups exists any more
            if cs is not None:
                try:
                    cs.kill_all(timeout=5.0)
                    done["cgroups"] = cs.remove()
                except (OSError, WallError) as exc:
                    errors.append(f"cgroups: {exc}")
                if cs.exists():
                    errors.append(f"cgroups still present: {list(cs.paths)}")
        gates = [g for g in rec.get("gates", []) if isinstance(g, str)]
        if gates:  # write gates: unmounted and rmdir'ed, never deleted through
            from ..backends._gates import cleanup

            errors += [f"{g}: write gate dir still present" for g in cleanup(gates)]
        errors += _reap_scratch(rec, str(done["sandbox_id"]))
        for extra in rec.get("paths", []):
            try:
                _rmtree(Path(extra))
            except OSError as exc:
                errors.append(f"{extra}: {exc.strerror}")
        if errors:
            # Keep the record: the next reaper pass must still find what is left.
            done["errors"] = errors
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        cleaned.append(done)
    return cleaned


def _rmtree(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _reap_scratch(rec: dict[str, Any], sandbox_id: str) -> list[str]:
    """Detach a dead sandbox's scratch disk: the mounts its record names, and
    the disk's predictable name too (``scratch_dir()/ID.mnt``, ``ID.img``),
    for a supervisor killed after making the disk but before recording it."""
    from .._sys.scratch import detach_path  # the disk itself goes with its holders

    errors = []
    named = [Path(m) for m in rec.get("scratch", []) if isinstance(m, str)]
    base = _config.scratch_dir()
    if _config.is_root() and sandbox_id.startswith("sb-") and sandbox_id[3:].isalnum():
        if (base / f"{sandbox_id}.mnt") not in named:
            named.append(base / f"{sandbox_id}.mnt")
        with contextlib.suppress(OSError):
            (base / f"{sandbox_id}.img").unlink()  # not yet unlinked: the loop holds none
    for mnt in named:
        if os.path.lexists(mnt) and not detach_path(mnt):
            errors.append(f"{mnt}: scratch disk still mounted")
    return errors
