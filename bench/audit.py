"""Cost of the file/exec audit: one file-heavy task per ``audit.level``.

The task (issue 7's): Python imports a dozen stdlib packages, then walks a
10,000-file tree (``os.walk`` + ``lstat`` of every file).  The tree is made
once on the host and bound read-only, so building it is neither timed nor
traced.  Each level gets its own sandbox; the rounds are interleaved
(actions, files, syscalls, actions, ...) so the machine's noise hits them
alike.  ``actions`` has no tracer: it is the unaudited baseline, and the
ratios are against it.  The raw command on the host (no sandbox) is there
too, as the floor.

Prints one JSON object; medians in milliseconds of the command's wall time
as the supervisor measures it, plus the time destroy takes to flush the
last events (the log is written asynchronously while the task runs).

    python bench/audit.py [--runs 10] [--backend namespaces] [--files 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from glassroom import Sandbox
from glassroom.audit import read_records
from glassroom.policy import parse_policy

LEVELS = ("actions", "files", "syscalls")
IMPORTS = (
    "json", "csv", "re", "datetime", "decimal", "fractions", "statistics", "pathlib",
    "email.message", "http.client", "urllib.parse", "xml.etree.ElementTree", "sqlite3",
    "argparse", "logging",
)  # fmt: skip


def workload(tree: str) -> str:
    return (
        "import " + ", ".join(IMPORTS) + "\n"
        "import os\n"
        "n = 0\n"
        f"for d, _, files in os.walk({tree!r}):\n"
        "    for f in files:\n"
        "        os.lstat(os.path.join(d, f)); n += 1\n"
        "print(n)\n"
    )


def make_tree(root: str, count: int) -> None:
    per_dir = 100
    for i in range(0, count, per_dir):
        d = os.path.join(root, f"d{i // per_dir:04d}")
        os.makedirs(d, exist_ok=True)
        for j in range(min(per_dir, count - i)):
            with open(os.path.join(d, f"f{j:03d}.txt"), "w") as f:
                f.write("x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--backend", default="namespaces")
    ap.add_argument("--files", type=int, default=10_000)
    args = ap.parse_args()
    # Not under /tmp: the sandbox has its own /tmp, so a policy may not bind one there.
    work = tempfile.mkdtemp(prefix="glassroom-bench-audit-", dir="/var/tmp")
    os.chmod(work, 0o755)
    tree = os.path.join(work, "tree")
    make_tree(tree, args.files)
    for dirpath, dirs, files in os.walk(work):  # readable by the sandbox's uid
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)
    code = workload(tree)
    base = (
        "[filesystem]\n"
        f'read = ["/usr", "/etc/alternatives", "/etc/ssl/certs", {tree!r}]\n'
        "[resources]\nmax_runtime_s = 3600.0\n"
    )
    times: dict[str, list[float]] = {lvl: [] for lvl in LEVELS}
    times["host"] = []
    flush: dict[str, float] = {}
    events: dict[str, int] = {}
    boxes = {}
    for lvl in LEVELS:
        log = os.path.join(work, f"{lvl}.jsonl")
        policy = parse_policy(base + f'[audit]\nlevel = "{lvl}"\n')
        boxes[lvl] = (Sandbox(policy, backend=args.backend, audit_log=log), log)
    try:
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
            times["host"].append((time.perf_counter() - t0) * 1000)
            for lvl in LEVELS:
                sb = boxes[lvl][0]
                t0 = time.perf_counter()
                res = sb.run(["python3", "-c", code])
                times[lvl].append((time.perf_counter() - t0) * 1000)
                if res.exit_code != 0 or res.stdout.strip() != str(args.files):
                    raise SystemExit(
                        f"{lvl}: task failed: {res.exit_code} {res.stdout[-200:]!r} "
                        f"{res.stderr[-400:]!r}"
                    )
    finally:
        for lvl, (sb, log) in boxes.items():
            t0 = time.perf_counter()
            sb.close()
            flush[lvl] = round((time.perf_counter() - t0) * 1000, 3)
            inside = ("file.", "exec")
            events[lvl] = sum(
                1 for r in read_records(log) if str(r.get("event", "")).startswith(inside)
            )
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out = {
        "bench": "audit",
        "backend": args.backend,
        "host": platform.node(),
        "runs": args.runs,
        "files_in_tree": args.files,
        "median_ms": med,
        "ratio_vs_actions": {lvl: round(med[lvl] / med["actions"], 3) for lvl in LEVELS},
        "sandbox_vs_host": round(med["actions"] / med["host"], 3),
        "events_logged": events,
        "events_per_run": {lvl: round(events[lvl] / args.runs) for lvl in LEVELS},
        "destroy_ms": flush,
        "goal": "files <= 1.3x actions",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
