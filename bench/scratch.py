"""What the scratch disk costs: start-up, and write throughput against tmpfs.

/workspace and /tmp moved from tmpfs (charged as memory) to a per-sandbox
ext4 scratch disk (``_sys/scratch.py``).  Prints one JSON object:

* ``components``: the disk's own steps, in ms (copy of the template, loop
  attach + mount, and the host-side detach, which runs off the start path);
* ``start``: a namespaces create + ``true`` + destroy cycle with the disk and,
  interleaved round by round, the same cycle with the old tmpfs workspace
  (the disk step skipped; for comparison only, never a mode glassroom runs);
  gVisor and microVM cycles with the disk;
* ``write``: MB/s of writing (and closing) files inside a sandbox, to
  /workspace (scratch disk) and to /dev/shm (tmpfs, as the workspace was),
  per tier; plus a file 3x memory_mib to /workspace, which the old tmpfs
  workspace could not hold at all under the same memory cap.

    python bench/scratch.py [--runs 20] [--tiers namespaces,gvisor,microvm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

from glassroom import Sandbox, _config
from glassroom._sys import scratch
from glassroom.backends import namespaces

WRITE = r"""
import os, sys, time
path, mib = sys.argv[1], int(sys.argv[2])
chunk = b'w' * (1 << 20)
t = time.monotonic()
with open(path, 'wb') as f:
    for _ in range(mib):
        f.write(chunk)
print(mib / (time.monotonic() - t))
os.unlink(path)
"""
LOG = os.path.join(tempfile.mkdtemp(prefix="glassroom-bench-scratch-"), "audit.jsonl")
POLICY = {"resources": {"memory_mib": 128, "disk_mib": 512},
          "tools": {"allow": ["python3", "true"]}}  # fmt: skip


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 2),
            "p95": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))], 2), "n": len(xs)}  # fmt: skip


def components(runs: int) -> dict[str, Any]:
    d = _config.scratch_dir()
    scratch.check_backing(d)
    copy, attach_mount, detach = [], [], []
    for i in range(runs):
        img = d / f"bench-{os.getpid()}-{i}.img"
        t0 = time.monotonic()
        scratch.make_image(img, 512 << 20)
        t1 = time.monotonic()
        img.unlink()
        t2 = time.monotonic()
        m = scratch.ScratchMount.create(d, f"bench-{os.getpid()}-{i}", 512 << 20, (65534, 65534),
                                        {"workspace": 0o755, "tmp": 0o1777})  # fmt: skip
        t3 = time.monotonic()
        m.detach()
        t4 = time.monotonic()
        copy.append((t1 - t0) * 1000)
        attach_mount.append((t3 - t2) * 1000 - copy[-1])
        detach.append((t4 - t3) * 1000)
    return {"template_copy_ms": stats(copy), "loop_attach_mount_ms": stats(attach_mount),
            "host_detach_ms (off the start path)": stats(detach)}  # fmt: skip


def cycle(backend: str) -> float:
    t = time.monotonic()
    with Sandbox(POLICY, backend=backend, audit_log=LOG) as sb:
        sb.run(["true"])
    return (time.monotonic() - t) * 1000


def start(runs: int, tiers: list[str]) -> dict[str, Any]:
    with_disk: list[float] = []
    tmpfs: list[float] = []
    real = namespaces.NamespacesInstance._scratch
    for _ in range(runs):
        with_disk.append(cycle("namespaces"))
        namespaces.NamespacesInstance._scratch = lambda self: None  # type: ignore[method-assign]
        try:
            tmpfs.append(cycle("namespaces"))
        finally:
            namespaces.NamespacesInstance._scratch = real  # type: ignore[method-assign]
    out: dict[str, Any] = {
        "namespaces_scratch_disk_ms": stats(with_disk),
        "namespaces_tmpfs_workspace_ms (old layout, comparison only)": stats(tmpfs),
    }
    out["namespaces_added_ms"] = round(statistics.median(with_disk) - statistics.median(tmpfs), 2)
    for tier, n in (("gvisor", max(3, runs // 4)), ("microvm", 3)):
        if tier in tiers:
            cycle(tier)  # warm: runsc's bundle, the VM snapshot
            out[f"{tier}_scratch_disk_ms"] = stats([cycle(tier) for _ in range(n)])
    return out


def write(tiers: list[str], runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tier in tiers:
        n = 3 if tier == "microvm" else runs
        with Sandbox(POLICY, backend=tier, audit_log=LOG) as sb:
            res: dict[str, list[float]] = {"workspace_48MiB": [], "dev_shm_48MiB": []}
            for _ in range(n):
                for key, path in (("workspace_48MiB", "/workspace/w"),
                                  ("dev_shm_48MiB", "/dev/shm/w")):  # fmt: skip
                    r = sb.run(["python3", "-c", WRITE, path, "48"], timeout_s=300)
                    if r.exit_code == 0:
                        res[key].append(float(r.stdout))
            big = sb.run(["python3", "-c", WRITE, "/workspace/big", "384"], timeout_s=600)
        out[tier] = {k: stats(v) for k, v in res.items() if v}
        out[tier]["workspace_384MiB_under_128MiB_cap"] = (
            round(float(big.stdout), 1) if big.exit_code == 0 else f"failed: {big.exit_code}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tiers", default="namespaces,gvisor,microvm")
    args = ap.parse_args()
    tiers = [t for t in args.tiers.split(",") if t]
    if not _config.is_root():
        raise SystemExit("run as root: the scratch disk is a loop device (non-root: tmpfs)")
    report = {
        "host": os.uname().release,
        "scratch_dir": str(_config.scratch_dir()),
        "components": components(args.runs),
        "start": start(args.runs, tiers),
        "write_MBps": write(tiers, max(3, args.runs // 4)),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
