"""Start-up cost: create + run ``true`` + destroy, against the raw tools underneath.

Prints one JSON object.  Every series runs in the same process, in the same
run, interleaved round by round so that the machine's noise hits them
alike; figures are medians and p95 in milliseconds, plus ratios.

    python bench/startup.py [--runs 50] [--cli-runs 15]

The ``cli`` part times ``glassroom run -- true`` as a whole process (the
console script: interpreter, imports, policy, sandbox, audit), beside the
interpreter alone and the interpreter importing the policy models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from glassroom import Sandbox, SandboxPool
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
    ap.add_argument(
        "--gvisor-runs",
        type=int,
        default=20,
        help="rounds of the gvisor tier against raw runsc (0: skip)",
    )
    ap.add_argument(
        "--microvm-runs",
        type=int,
        default=3,
        help="rounds of the microvm tier, cold and restored (0: skip; TCG is slow)",
    )
    ap.add_argument(
        "--cli-runs",
        type=int,
        default=15,
        help="rounds of `glassroom run -- true` as a whole process (0: skip)",
    )
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

    pool = SandboxPool(size=2, audit_log=log)

    def pooled_cycle() -> None:
        # The task arrives when a sandbox is ready: take + run + destroy.
        sb = pool.sandbox()
        sb.run(["true"])
        sb.destroy()

    bwrap = raw_bwrap_argv()
    series: dict[str, Callable[[], object]] = {
        "glassroom_namespaces": glassroom_cycle,
        "glassroom_namespaces_pooled": pooled_cycle,
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
            if name.endswith("_pooled"):
                time.sleep(0.15)  # let the pool's refill finish: not part of the task
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
    pool.close()
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
        "pooled_vs_raw_bwrap": round(med["glassroom_namespaces_pooled"] / med["raw_bwrap_true"], 2),
    }
    if args.gvisor_runs > 0 and shutil.which("runsc"):
        out["gvisor"] = gvisor_series(args.gvisor_runs, log)
    goals: dict[str, bool] = {
        "median_ms<=15": statistics.median(g) <= 15,
        "pooled_median_ms<=15": med["glassroom_namespaces_pooled"] <= 15,
        "ratio_vs_bwrap<=2": out["ratios"]["glassroom_vs_raw_bwrap"] <= 2,  # type: ignore[index]
    }
    out["goals"] = goals
    if "gvisor" in out:
        goals["gvisor_ratio_vs_raw_runsc<=1.3"] = (
            out["gvisor"]["ratios"]["glassroom_vs_raw_runsc_do"] <= 1.3  # type: ignore[index]
        )
    if args.cli_runs > 0:
        out["cli"] = cli_series(args.cli_runs, log)
        goals["cli_run_true_ms<=150"] = (
            out["cli"]["series"]["glassroom_run_true"]["median_ms"] <= 150
        )  # type: ignore[index]
    if args.microvm_runs > 0 and shutil.which("qemu-system-x86_64"):
        from microvm import series as microvm_series  # bench/microvm.py

        out["microvm"] = microvm_series(args.microvm_runs)
    print(json.dumps(out, indent=2))


def cli_series(runs: int, log: str) -> dict[str, object]:
    """``glassroom run -- true`` from a shell's point of view: a new process each time."""
    script = os.path.join(os.path.dirname(sys.executable), "glassroom")
    env = dict(os.environ, GLASSROOM_AUDIT_LOG=log)
    # As a user's shell runs it: with .pyc files.  A caller's PYTHONDONTWRITEBYTECODE
    # (set in some CI and agent shells) would make every run compile every module
    # again, about 0.25 s more than a user ever pays.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    series: dict[str, list[str]] = {
        "glassroom_run_true": [script, "run", "--audit-log", log, "--", "true"],
        "python_startup": [sys.executable, "-c", "pass"],
        "python_import_policy": [sys.executable, "-c",
                                 "from glassroom.policy import default_policy; default_policy()"],
        "raw_bwrap_true": raw_bwrap_argv(),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in series}
    for argv in series.values():  # warm: .pyc files, page cache
        subprocess.run(argv, check=True, env=env)
    for _ in range(runs):
        for name, argv in series.items():
            t = time.perf_counter()
            subprocess.run(argv, check=True, env=env)
            times[name].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "series": {k: stats(v) for k, v in times.items()},
        "ratios": {
            "run_true_vs_raw_bwrap": round(med["glassroom_run_true"] / med["raw_bwrap_true"], 2)
        },
    }


def gvisor_series(runs: int, log: str) -> dict[str, object]:
    """The gvisor tier (create + run ``true`` + destroy) against raw runsc, interleaved.

    ``raw_runsc_do_true`` is ``runsc --platform=P --network=none do true``;
    ``raw_runsc_run_true`` is ``runsc run`` of ``true`` on a bundle like
    glassroom's (read-only /usr bind, tmpfs /tmp and /workspace).  Both use
    the platform glassroom picks, and a private ``--root``.
    """
    from glassroom.backends import _gvisor_spec

    plat = _gvisor_spec.choose_platform()
    runsc = _gvisor_spec.runsc_path()
    work = tempfile.mkdtemp(prefix="glassroom-bench-runsc-")
    bundle = os.path.join(work, "bundle")
    os.makedirs(os.path.join(bundle, "rootfs", "usr"))
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), os.path.join(bundle, "rootfs", name))
    spec = {
        "ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": True},
        "process": {"args": ["/usr/bin/true"], "cwd": "/", "user": {"uid": 1000, "gid": 1000},
                    "env": ["PATH=/usr/bin"], "noNewPrivileges": True},
        "mounts": [
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/workspace", "type": "tmpfs", "source": "tmpfs"},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }  # fmt: skip
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    base = [runsc, "--root", os.path.join(work, "state"), f"--platform={plat}", "--network=none"]
    n = iter(range(1 << 30))
    parts: dict[str, list[float]] = {"create": [], "run": [], "destroy": []}

    def cycle() -> None:
        t0 = time.perf_counter()
        sb = Sandbox(audit_log=log, backend="gvisor")
        t1 = time.perf_counter()
        sb.run(["true"])
        t2 = time.perf_counter()
        sb.destroy()
        t3 = time.perf_counter()
        for k, v in (("create", t1 - t0), ("run", t2 - t1), ("destroy", t3 - t2)):
            parts[k].append(v * 1000)

    pool = SandboxPool(size=2, audit_log=log, backend="gvisor")

    def pooled() -> None:
        sb = pool.sandbox()
        sb.run(["true"])
        sb.destroy()

    failures: list[str] = []

    def raw(argv: list[str]) -> None:
        """One raw runsc run; a failure (seen under heavy load) is retried and counted."""
        for _ in range(3):
            res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            if res.returncode == 0:
                return
            failures.append(" ".join(res.stderr.split())[:200])
        raise RuntimeError(f"runsc failed 3 times: {failures[-1]}")

    series: dict[str, Callable[[], object]] = {
        "glassroom_gvisor": cycle,
        "glassroom_gvisor_pooled": pooled,
        "raw_runsc_do_true": lambda: raw([*base, "do", "true"]),
        "raw_runsc_run_true": lambda: raw(
            [*base, "--ignore-cgroups", "run", "--bundle", bundle, f"bench-{next(n)}"]),
    }  # fmt: skip
    for fn in series.values():
        fn()
    parts = {k: [] for k in parts}
    times: dict[str, list[float]] = {k: [] for k in series}
    try:
        for _ in range(runs):
            for name, fn in series.items():
                if name.endswith("_pooled"):
                    time.sleep(0.6)  # let the pool's refill finish: not part of the task
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
    finally:
        pool.close()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "platform": plat,
        "raw_runsc_failures_retried": failures,
        "series": {k: stats(v) for k, v in times.items()},
        "glassroom_parts": {k: stats(v) for k, v in parts.items()},
        "ratios": {
            "glassroom_vs_raw_runsc_do": round(med["glassroom_gvisor"]
                                               / med["raw_runsc_do_true"], 2),
            "glassroom_vs_raw_runsc_run": round(med["glassroom_gvisor"]
                                                / med["raw_runsc_run_true"], 2),
            "pooled_vs_raw_runsc_do": round(med["glassroom_gvisor_pooled"]
                                            / med["raw_runsc_do_true"], 2),
        },
    }  # fmt: skip


if __name__ == "__main__":
    main()
