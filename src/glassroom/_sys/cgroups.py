"""Per-sandbox cgroups for memory, pids and CPU, on cgroup v2 or v1 (or a mix).

Hosts differ: pure v2, pure v1, or hybrid (v1 controllers plus a v2 mount
that owns only some controllers).  Each controller is therefore placed on
its own: v2 when the unified root lists it in ``cgroup.controllers``, else
the v1 hierarchy mounted with it.  Mount points come from
``/proc/self/mountinfo`` rather than assumed paths.

A sandbox gets ``<mount>/<parent>/<name>`` in each hierarchy.  Creation is
all-or-nothing: on any failure what was made is removed and a
:class:`WallError` names the controller and file, because a sandbox without
its limits must not start.  ``kill_all`` freezes before killing (v1 freezer
or v2 ``cgroup.freeze``) so pids read from ``cgroup.procs`` cannot exit and be
reused by unrelated processes while we signal them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass

from glassroom._errors import WallError

__all__ = ["CgroupLimits", "CgroupSet", "layout", "list_names"]

LIMITED = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
_MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    pids: int
    cpus: float


@dataclass(frozen=True)
class _Cg:
    controller: str
    version: str  # "v1" | "v2"
    path: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal ``\\ooo``."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def layout() -> dict[str, tuple[str, str]]:
    """controller -> ("v1" | "v2", mount point) for every controller on this host."""
    v1: dict[str, str] = {}
    v2_mount: str | None = None
    try:
        lines = _read(_MOUNTINFO).splitlines()
    except OSError:
        return {}
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mountpoint, fstype = _unescape(fields[4]), tail[0]
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mountpoint
        elif fstype == "cgroup":
            for opt in tail[2].split(","):
                if opt not in ("rw", "ro") and "=" not in opt:
                    v1.setdefault(opt, mountpoint)
    result = {c: ("v1", m) for c, m in v1.items()}
    if v2_mount is not None:
        try:
            for c in _read(os.path.join(v2_mount, "cgroup.controllers")).split():
                result[c] = ("v2", v2_mount)
        except OSError:
            pass
    return result


def _check_name(kind: str, value: str) -> None:
    parts = value.split("/")
    if not value or value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise WallError(f"cgroups: invalid {kind} name {value!r}", rule="limits")


def _placement(parent: str, name: str) -> tuple[list[_Cg], dict[str, tuple[str, str]]]:
    """Where each controller's cgroup lives (plus the v1 freezer when present)."""
    _check_name("parent", parent)
    _check_name("cgroup", name)
    lay = layout()
    cgs = []
    for c in LIMITED:
        if c not in lay:
            raise WallError(f"cgroups: controller {c!r} is not mounted on this host", rule="limits")
        version, mount = lay[c]
        cgs.append(_Cg(c, version, os.path.join(mount, parent, name)))
    if lay.get("freezer", ("", ""))[0] == "v1":
        cgs.append(_Cg("freezer", "v1", os.path.join(lay["freezer"][1], parent, name)))
    return cgs, lay


def _wall(cg: _Cg, what: str, path: str, exc: OSError) -> WallError:
    msg = f"cgroups: {cg.controller}: cannot {what} {path}: {exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        msg += f" (delegate {os.path.dirname(os.path.dirname(cg.path))} to uid {os.geteuid()})"
    return WallError(msg, rule="limits")


def _write(cg: _Cg, filename: str, value: str) -> None:
    path = os.path.join(cg.path, filename)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise _wall(cg, f"write {value!r} to", path, exc) from exc


def _enable_v2(cg: _Cg, mount: str, parent: str) -> None:
    """Enable the controller in ``cgroup.subtree_control`` of the root and each parent dir.

    A v2 cgroup only gets a controller's files when every ancestor delegates it.
    """
    d = mount
    for part in [*parent.split("/"), None]:
        try:
            enabled = _read(os.path.join(d, "cgroup.subtree_control")).split()
        except OSError as exc:
            raise _wall(cg, "read", os.path.join(d, "cgroup.subtree_control"), exc) from exc
        if cg.controller not in enabled:
            _write(_Cg(cg.controller, "v2", d), "cgroup.subtree_control", f"+{cg.controller}")
        if part is not None:
            d = os.path.join(d, part)


def _apply_limits(cg: _Cg, limits: CgroupLimits) -> None:
    if cg.controller == "memory":
        if cg.version == "v1":
            _write(cg, "memory.limit_in_bytes", str(limits.memory_bytes))
            if os.path.exists(os.path.join(cg.path, "memory.memsw.limit_in_bytes")):
                # Same value as RAM: swapping out must not extend the limit.
                _write(cg, "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        else:
            _write(cg, "memory.max", str(limits.memory_bytes))
            if os.path.exists(os.path.join(cg.path, "memory.swap.max")):
                _write(cg, "memory.swap.max", "0")
    elif cg.controller == "pids":
        _write(cg, "pids.max", str(limits.pids))
    elif cg.controller == "cpu":
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))  # kernel minimum is 1 ms
        if cg.version == "v1":
            _write(cg, "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cg, "cpu.cfs_quota_us", str(quota))
        else:
            _write(cg, "cpu.max", f"{quota} {CPU_PERIOD_US}")


def _counters(path: str) -> dict[str, int]:
    """Parse a flat ``key value`` file (memory.events, pids.events, cpu.stat, ...)."""
    out: dict[str, int] = {}
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


class CgroupSet:
    """The cgroups of one sandbox, one per controller (v1) or shared (v2)."""

    def __init__(self, cgs: tuple[_Cg, ...]) -> None:
        self._cgs = cgs
        self.paths: tuple[str, ...] = tuple(dict.fromkeys(cg.path for cg in cgs))

    def __repr__(self) -> str:
        return f"CgroupSet({self.paths!r})"

    @classmethod
    def create(cls, name: str, limits: CgroupLimits, *, parent: str = "glassroom") -> CgroupSet:
        """Make the cgroups and write the limits; all-or-nothing."""
        if limits.memory_bytes <= 0 or limits.pids <= 0 or limits.cpus <= 0:
            raise WallError(f"cgroups: limits must be positive: {limits}", rule="limits")
        cgs, lay = _placement(parent, name)
        made: list[_Cg] = []
        try:
            for cg in cgs:
                parent_dir = os.path.dirname(cg.path)
                try:
                    os.makedirs(parent_dir, exist_ok=True)
                except OSError as exc:
                    raise _wall(cg, "create", parent_dir, exc) from exc
                if cg.version == "v2":
                    _enable_v2(cg, lay[cg.controller][1], parent)
            for cg in cgs:
                if cg.path not in {m.path for m in made}:  # v2: one dir, many controllers
                    try:
                        os.mkdir(cg.path)
                    except OSError as exc:
                        raise _wall(cg, "create", cg.path, exc) from exc
                    made.append(cg)
                _apply_limits(cg, limits)
        except BaseException:
            CgroupSet(tuple(made)).remove()
            raise
        return cls(tuple(cgs))

    @classmethod
    def open(cls, name: str, *, parent: str = "glassroom") -> CgroupSet:
        """The existing cgroups of ``name`` (the reaper's view); missing ones are left out."""
        cgs, _ = _placement(parent, name)
        found = tuple(cg for cg in cgs if os.path.isdir(cg.path))
        if not found:
            raise WallError(f"cgroups: no cgroup {parent}/{name} in any hierarchy", rule="limits")
        return cls(found)

    def exists(self) -> bool:
        return any(os.path.isdir(p) for p in self.paths)

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` into every cgroup of the set (before it runs untrusted code)."""
        seen: set[str] = set()
        for cg in self._cgs:
            if cg.path not in seen:
                seen.add(cg.path)
                _write(cg, "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.paths:
            try:
                found.update(int(x) for x in _read(os.path.join(path, "cgroup.procs")).split())
            except (OSError, ValueError):
                continue
        return found

    def _freeze(self, frozen: bool) -> None:
        for cg in self._cgs:
            try:
                if cg.controller == "freezer":
                    _write(cg, "freezer.state", "FROZEN" if frozen else "THAWED")
                elif cg.version == "v2" and os.path.exists(os.path.join(cg.path, "cgroup.freeze")):
                    _write(cg, "cgroup.freeze", "1" if frozen else "0")
            except WallError:
                continue  # best effort: the SIGKILL loop below still works unfrozen

    def _freezers(self) -> list[tuple[_Cg, str]]:
        out = []
        for cg in self._cgs:
            if cg.controller == "freezer":
                out.append((cg, "freezer.state"))
            elif cg.version == "v2" and os.path.exists(os.path.join(cg.path, "cgroup.freeze")):
                out.append((cg, "cgroup.freeze"))
        return list({cg.path: (cg, f) for cg, f in out}.values())

    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every task in place, memory kept (a pause); back once all are stopped.

        WallError (rule ``snapshot.freeze``) where the host gives this sandbox no
        freezer, or its tasks do not all stop within ``timeout``: a pause that
        left a process running would be a lie.
        """
        fz = self._freezers()
        if not fz:
            raise WallError("cgroups: this host has no freezer for the sandbox (neither the "
                            "v1 freezer controller nor v2 cgroup.freeze)",
                            rule="snapshot.freeze")  # fmt: skip
        for cg, f in fz:
            _write(cg, f, "FROZEN" if f == "freezer.state" else "1")
        deadline = time.monotonic() + timeout
        while not all(self._is_frozen(cg, f) for cg, f in fz):
            if time.monotonic() > deadline:
                self.thaw()
                raise WallError(f"cgroups: the sandbox's tasks did not all stop within "
                                f"{timeout:g}s", rule="snapshot.freeze")  # fmt: skip
            time.sleep(0.005)

    @staticmethod
    def _is_frozen(cg: _Cg, f: str) -> bool:
        try:
            if f == "freezer.state":
                return _read(os.path.join(cg.path, f)).strip() == "FROZEN"
            events = _read(os.path.join(cg.path, "cgroup.events"))
            return "frozen 1" in events
        except OSError:
            return False

    def thaw(self) -> None:
        for cg, f in self._freezers():
            _write(cg, f, "THAWED" if f == "freezer.state" else "0")

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the set; raise WallError if any survive ``timeout``."""
        deadline = time.monotonic() + timeout
        for cg in self._cgs:
            kill_file = os.path.join(cg.path, "cgroup.kill")
            if cg.version == "v2" and os.path.exists(kill_file):
                _write(cg, "cgroup.kill", "1")
        while True:
            pids = self.pids()
            if not pids:
                return
            if time.monotonic() > deadline:
                raise WallError(
                    f"cgroups: {len(pids)} process(es) survived kill_all in {self.paths[0]}: "
                    f"{sorted(pids)[:10]}",
                    rule="limits",
                )
            self._freeze(True)
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._freeze(False)  # v1-frozen tasks only die once thawed
            time.sleep(0.01)

    def remove(self) -> list[str]:
        """rmdir every cgroup (retrying while dying tasks keep it busy); idempotent."""
        removed: list[str] = []
        for path in reversed(self.paths):
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    os.rmdir(path)
                    removed.append(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise WallError(
                            f"cgroups: cannot remove {path}: {exc.strerror}", rule="limits"
                        ) from exc
                    time.sleep(0.01)
        return removed

    def stats(self) -> dict[str, int]:
        """Limit-hit counters: oom_kill, memory_failcnt, pids_max_hits, cpu_throttled."""
        out = {"oom_kill": 0, "memory_failcnt": 0, "pids_max_hits": 0, "cpu_throttled": 0}
        for cg in self._cgs:
            if cg.controller == "memory" and cg.version == "v1":
                out["oom_kill"] = _counters(os.path.join(cg.path, "memory.oom_control")).get(
                    "oom_kill", 0
                )
                with contextlib.suppress(OSError, ValueError):
                    out["memory_failcnt"] = int(_read(os.path.join(cg.path, "memory.failcnt")))
            elif cg.controller == "memory":
                events = _counters(os.path.join(cg.path, "memory.events"))
                out["oom_kill"] = events.get("oom_kill", 0)
                out["memory_failcnt"] = events.get("max", 0)
            elif cg.controller == "pids":
                out["pids_max_hits"] = _counters(os.path.join(cg.path, "pids.events")).get("max", 0)
            elif cg.controller == "cpu":
                out["cpu_throttled"] = _counters(os.path.join(cg.path, "cpu.stat")).get(
                    "nr_throttled", 0
                )
        return out

    def usage(self) -> dict[str, int]:
        """What the sandbox uses now: ``cpu_usec`` (CPU time so far),
        ``memory_bytes`` (charged memory) and ``memory_cache`` (its page cache),
        for E2B's metrics, and ``pids`` (its tasks now, for the console).  A
        counter the kernel does not offer is left out."""
        out: dict[str, int] = {}
        for cg in self._cgs:
            with contextlib.suppress(OSError, ValueError):
                if cg.controller == "pids":  # the same file on v1 and v2
                    out["pids"] = int(_read(os.path.join(cg.path, "pids.current")))
                elif cg.controller == "memory" and cg.version == "v2":
                    out["memory_bytes"] = int(_read(os.path.join(cg.path, "memory.current")))
                    stat = _counters(os.path.join(cg.path, "memory.stat"))
                    out["memory_cache"] = stat.get("file", 0)
                elif cg.controller == "memory":
                    raw = _read(os.path.join(cg.path, "memory.usage_in_bytes"))
                    out["memory_bytes"] = int(raw)
                    stat = _counters(os.path.join(cg.path, "memory.stat"))
                    out["memory_cache"] = stat.get("cache", 0)
                elif cg.controller == "cpu" and cg.version == "v2":
                    cpu = _counters(os.path.join(cg.path, "cpu.stat"))
                    if "usage_usec" in cpu:
                        out["cpu_usec"] = cpu["usage_usec"]
                elif cg.controller in ("cpu", "cpuacct") and os.path.exists(
                    os.path.join(cg.path, "cpuacct.usage")
                ):
                    ns = int(_read(os.path.join(cg.path, "cpuacct.usage")))
                    out["cpu_usec"] = ns // 1000
        return out


def list_names(parent: str = "glassroom") -> list[str]:
    """Child cgroup names under ``parent`` in any hierarchy we use (for the reaper)."""
    _check_name("parent", parent)
    lay = layout()
    names: set[str] = set()
    for c in (*LIMITED, "freezer"):
        if c not in lay:
            continue
        try:
            with os.scandir(os.path.join(lay[c][1], parent)) as it:
                names.update(e.name for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    return sorted(names)
