"""Pause, resume, snapshot and fork per tier, beside the raw tool underneath, in one run.

    .venv/bin/python bench/snapshot.py [--runs N] [--tiers namespaces,gvisor,microvm]

For each tier, ``N`` times: a sandbox with a counter process and a few files;
``pause()`` then ``resume()`` (memory kept), ``pause(memory=False)`` then
``resume()``, ``snapshot()``, ``fork()``, and a sandbox from the snapshot.
Medians in ms and the image sizes in bytes.  Beside them, the same steps with
the raw tool and no glassroom: the cgroup freezer on a plain ``bwrap``
(namespaces), ``runsc checkpoint``/``restore`` (``bench/_snap_gvisor.py``),
QEMU ``migrate``/``-incoming`` (``bench/_snap_microvm.py``), and the ratios.
Prints JSON.  The machine is shared and noisy: medians, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

COUNTER = (
    "import time\ni = 0\nwhile True:\n    i += 1\n"
    "    open('/workspace/counter', 'w').write(str(i))\n    time.sleep(0.05)\n"
)


def _ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 1) if xs else float("nan")


def _one_run(backend: str, store: Any, log: Path, t: dict[str, list[float]],
             sizes: dict[str, list[float]], notes: dict[str, str]) -> None:  # fmt: skip
    from glassroom import Sandbox

    sb = Sandbox(backend=backend, audit_log=log, store=store)
    try:
        sb.files.write("/workspace/counter.py", COUNTER)
        sb.files.write("/workspace/data.bin", os.urandom(1 << 20))
        sb.spawn(["python3", "/workspace/counter.py"])
        time.sleep(0.3)
        ms, facts = _ms(sb.pause)
        t["pause"].append(ms)
        sizes["pause"].append(facts.get("bytes", 0))
        notes["pause"] = facts["how"]
        t["resume"].append(_ms(sb.resume)[0])
        t["resume_first_output"].append(t["resume"][-1] + _ms(lambda: sb.run(["true"]))[0])
        t["pause_files"].append(_ms(lambda: sb.pause(memory=False))[0])
        t["resume_files"].append(_ms(sb.resume)[0])
        ms, info = _ms(sb.snapshot)
        t["snapshot"].append(ms)
        sizes["snapshot"].append(info.size_bytes)
        notes["snapshot"] = "memory" if info.memory else "files only"
        ms, again = _ms(lambda: Sandbox.from_snapshot(info.id, store=store, audit_log=log))
        t["from_snapshot"].append(ms)
        again.destroy()
        ms, child = _ms(sb.fork)
        t["fork"].append(ms)
        t["fork_first_output"].append(ms + _ms(lambda: child.run(["true"]))[0])
        child.destroy()
        store.delete(info.id)
    finally:
        sb.destroy()


def glassroom_tier(backend: str, runs: int, work: Path) -> dict[str, Any]:
    from glassroom import SnapshotStore

    store = SnapshotStore(work / f"snapshots-{backend}")
    log = work / f"audit-{backend}.jsonl"
    keys = ("pause", "resume", "resume_first_output", "pause_files", "resume_files",
            "snapshot", "from_snapshot", "fork", "fork_first_output")  # fmt: skip
    t: dict[str, list[float]] = {k: [] for k in keys}
    sizes: dict[str, list[float]] = {"pause": [], "snapshot": []}
    notes: dict[str, str] = {}
    for _ in range(runs):
        _one_run(backend, store, log, t, sizes, notes)
    out: dict[str, Any] = {f"{k}_ms": _median(v) for k, v in t.items()}
    out.update({f"{k}_bytes": int(statistics.median(v)) for k, v in sizes.items() if v})
    out["how"] = notes
    return out


def raw_namespaces(runs: int) -> dict[str, Any]:
    """The cgroup freezer on a plain bwrap running sleep: freeze and thaw."""
    from glassroom._sys import cgroups

    fz, th = [], []
    for i in range(runs):
        cg = cgroups.CgroupSet.create(f"bench-raw-{os.getpid()}-{i}", cgroups.CgroupLimits(
            memory_bytes=256 << 20, pids=64, cpus=1.0), parent="glassroom-bench")  # fmt: skip
        p = subprocess.Popen(["bwrap", "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent",
                              "sleep", "60"])  # fmt: skip
        try:
            cg.add_pid(p.pid)
            time.sleep(0.05)
            fz.append(_ms(cg.freeze)[0])
            th.append(_ms(cg.thaw)[0])
        finally:
            p.kill()
            p.wait()
            cg.kill_all()
            cg.remove()
    return {"tool": "cgroup freezer on plain bwrap", "freeze_ms": _median(fz),
            "thaw_ms": _median(th)}  # fmt: skip


def _ratio(a: Any, b: Any) -> float | None:
    try:
        return round(float(a) / float(b), 2) if b else None
    except (TypeError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tiers", default="namespaces,gvisor,microvm")
    args = ap.parse_args()
    os.environ.setdefault("GLASSROOM_MICROVM_ALLOW_TCG", "1")
    work = Path(tempfile.mkdtemp(prefix="glassroom-bench-snap-", dir="/tmp"))
    os.chmod(work, 0o755)
    os.environ.setdefault("GLASSROOM_STATE_DIR", str(work / "state"))
    (work / "state").mkdir(mode=0o755, exist_ok=True)
    result: dict[str, Any] = {"runs": args.runs, "tiers": {}}
    try:
        for tier in args.tiers.split(","):
            g = glassroom_tier(tier, args.runs, work)
            if tier == "namespaces":
                raw = raw_namespaces(args.runs)
                ratios = {"pause": _ratio(g["pause_ms"], raw["freeze_ms"]),
                          "resume": _ratio(g["resume_ms"], raw["thaw_ms"])}  # fmt: skip
            elif tier == "gvisor":
                import _snap_gvisor

                raw = _snap_gvisor.raw(args.runs)
                ser = raw["series"]
                ratios = {"pause": _ratio(g["pause_ms"], ser["checkpoint"]["median_ms"]),
                          "resume": _ratio(g["resume_ms"], ser["restore"]["median_ms"]),
                          "fork": _ratio(g["fork_ms"], ser["checkpoint"]["median_ms"]
                                         + ser["restore"]["median_ms"])}  # fmt: skip
            else:
                import _snap_microvm

                raw = _snap_microvm.raw(args.runs)
                med = raw["median_ms"]
                ratios = {"pause": _ratio(g["pause_ms"], med["checkpoint_stop_migrate_to_file"]),
                          "resume": _ratio(g["resume_ms"], med["restore_incoming_to_agent_ready"]),
                          "fork": _ratio(g["fork_ms"], med["checkpoint_stop_migrate_to_file"]
                                         + med["restore_incoming_to_agent_ready"])}  # fmt: skip
            result["tiers"][tier] = {"glassroom": g, "raw": raw, "ratio": ratios}
            print(json.dumps({tier: result["tiers"][tier]}), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
