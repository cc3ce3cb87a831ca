"""Cost of the write gate (``_sys/fusegate.py``): start-up and file operations.

Prints one JSON object: sandbox create + ``true`` with and without a
``filesystem.write`` dir (interleaved round by round, so the machine's noise
hits both alike; medians and minimums in ms), then the cost per small file
created and read in the writable dir against ``/workspace``.  Needs root
(the gate is a FUSE mount).

    python bench/write_gate.py [--backend namespaces] [--runs 25]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from glassroom import Sandbox
from glassroom._config import sandbox_ids

TOOLS = ["true", "sh", "python3"]
FILES = 2000
PER_FILE = (
    "import os, sys, time\nd = sys.argv[1]\nt = time.perf_counter()\n"
    f"for i in range({FILES}): open(f'{{d}}/f{{i}}', 'w').write('x')\n"
    f"t1 = time.perf_counter()\nfor i in range({FILES}): open(f'{{d}}/f{{i}}').read()\n"
    f"t2 = time.perf_counter()\nprint((t1 - t) * 1e6 / {FILES}, (t2 - t1) * 1e6 / {FILES})\n"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="namespaces")
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="gr-bench-gate-", dir="/var/tmp")
    os.chmod(root, 0o755)
    wdir = os.path.join(root, "w")
    os.mkdir(wdir)
    os.chown(wdir, *sandbox_ids())
    log = os.path.join(root, "audit.jsonl")
    base: dict[str, Any] = {"tools": {"allow": TOOLS}}
    gated: dict[str, Any] = {"tools": {"allow": TOOLS}, "filesystem": {"write": [wdir]}}

    def start(policy: dict[str, Any]) -> float:
        t = time.perf_counter()
        with Sandbox(policy, backend=args.backend, audit_log=log) as sb:
            sb.run(["true"])
            return (time.perf_counter() - t) * 1000

    try:
        start(base), start(gated)  # warm caches (init, plans, runsc)
        series: dict[str, list[float]] = {"no_write_dir": [], "write_dir": []}
        for _ in range(args.runs):
            series["no_write_dir"].append(start(base))
            series["write_dir"].append(start(gated))
        out: dict[str, Any] = {"backend": args.backend, "runs": args.runs}
        for name, xs in series.items():
            out[name] = {"median_ms": round(statistics.median(xs), 1), "min_ms": round(min(xs), 1)}
        out["start_overhead_ms"] = round(
            out["write_dir"]["median_ms"] - out["no_write_dir"]["median_ms"], 1
        )
        for name, policy, where in (("write_dir", gated, wdir), ("workspace", base, "/workspace")):
            with Sandbox(policy, backend=args.backend, audit_log=log) as sb:
                create, read = map(float, sb.run(["python3", "-c", PER_FILE, where]).stdout.split())
            out[f"{name}_us_per_file"] = {"create": round(create, 1), "read": round(read, 1)}
        print(json.dumps(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
