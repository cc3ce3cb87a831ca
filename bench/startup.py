"""Start-up cost: create + run ``true`` + destroy, against the raw tools underneath.

Prints one JSON object.  Every series runs in the same process, in the same
run, interleaved round by round so that the machine's noise hits them
alike; figures are medians and p95 in milliseconds, plus ratios.

    python bench/startup.py [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from glassroom import Sandbox
from glassroom._config import is_root, sandbox_ids


def raw_bwrap_argv() -> list[str]:
    """The same namespaces and a comparable root, with no glassroom on top."""
    argv = [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
        "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
        "--tmpfs", "/tmp", "--tmpfs", "/workspace",
    ]  # fmt: skip
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + name):
            argv += ["--symlink", os.readlink("/" + name), "/" + name]
    return [*argv, "true"]


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"median_ms": round(statistics.median(xs), 3), "p95_ms": round(p95, 3), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    log = os.path.join(tempfile.mkdtemp(prefix="glassroom-bench-"), "audit.jsonl")
    uid, gid = sandbox_ids()
    drop = {"user": uid, "group": gid, "extra_groups": []} if is_root() else {}

    parts: dict[str, list[float]] = {"create": [], "run": [], "destroy": []}

    def glassroom_cycle() -> None:
        t0 = time.perf_counter()
        sb = Sandbox(audit_log=log)
        t1 = time.perf_counter()
        sb.run(["true"])
        t2 = time.perf_counter()
        sb.destroy()
        t3 = time.perf_counter()
        parts["create"].append((t1 - t0) * 1000)
        parts["run"].append((t2 - t1) * 1000)
        parts["destroy"].append((t3 - t2) * 1000)

    bwrap = raw_bwrap_argv()
    series: dict[str, Callable[[], object]] = {
        "glassroom_namespaces": glassroom_cycle,
        # bwrap as the same unprivileged uid glassroom uses, for a fair match
        "raw_bwrap_true": lambda: subprocess.run(bwrap, check=True, **drop),  # type: ignore[call-overload]
        "subprocess_true": lambda: subprocess.run(["true"], check=True),
    }
    for fn in series.values():  # warm caches (page cache, seccomp compile, imports)
        fn()
    parts = {k: [] for k in parts}
    times: dict[str, list[float]] = {k: [] for k in series}
    for _ in range(args.runs):
        for name, fn in series.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
    out: dict[str, object] = {
        "benchmark": "startup: create + run true + destroy",
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "as_root": is_root()},
        "series": {k: stats(v) for k, v in times.items()},
        "glassroom_parts": {k: stats(v) for k, v in parts.items()},
    }  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    g = times["glassroom_namespaces"]
    out["ratios"] = {
        "glassroom_vs_raw_bwrap": round(med["glassroom_namespaces"] / med["raw_bwrap_true"], 2),
        "glassroom_vs_subprocess": round(med["glassroom_namespaces"] / med["subprocess_true"], 2),
    }
    out["goals"] = {"median_ms<=15": statistics.median(g) <= 15,
                    "ratio_vs_bwrap<=1.5": out["ratios"]["glassroom_vs_raw_bwrap"] <= 1.5}  # type: ignore[index]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
