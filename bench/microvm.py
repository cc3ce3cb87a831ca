"""The microvm tier's start-up figures (imported by ``startup.py``; also runnable alone).

* cold: QEMU boots the kernel, the initramfs mounts the root image, the
  agent starts; then the walls are applied and ``echo`` prints.
* restored: QEMU starts from the booted-idle snapshot (``-incoming``).
* idle RSS: the QEMU process's resident memory, one VM idle after a command.
* raw: the same QEMU command line started directly (no supervisor, policy,
  cgroups or walls), cold and from the same snapshot, until the guest
  agent's first frame: the tool underneath, for the ratios.

Under TCG (no real KVM here) every figure is emulation-bound; the run count
is kept small on purpose.  Prints JSON when run alone.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _one(log: str, snapshot: bool) -> tuple[float, float, int, dict[str, Any]]:
    from glassroom import Sandbox

    os.environ["GLASSROOM_MICROVM_SNAPSHOT"] = "1" if snapshot else "0"
    t0 = time.monotonic()
    sb = Sandbox({"risk": "high"}, backend="microvm", audit_log=log)
    try:
        r = sb.run(["echo", "first"])
        first = (time.monotonic() - t0) * 1000
        assert r.stdout == "first\n", r
        inst: Any = sb._sup.instance
        time.sleep(1.0)  # idle
        rss = _rss_kib(inst.proc.pid)
        boot = dict(inst.boot)
    finally:
        t1 = time.monotonic()
        sb.destroy()
    return first, (time.monotonic() - t1) * 1000, rss, boot


def _raw(img: Any, accel: Any, snapshot: str | None) -> float:
    """Plain QEMU: spawn, wait for the agent's ``ready``, kill (ms)."""
    import socket
    import subprocess

    from glassroom.backends.microvm import qemu

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(snapshot, os.O_RDONLY) if snapshot else None
    # The default high-risk policy's VM shape, as `microvm prepare` snapshots it:
    # RAM for memory_mib only, and the scratch disk as the second virtio-blk disk.
    ram, _ = qemu.vm_size(512 << 20, 512 << 20, 1.0)
    disk = qemu.scratch_disk(512 << 20, mkfs=False)
    argv = qemu.argv(img, accel, ram, 1, theirs.fileno(), console=None, incoming_fd=fd,
                     scratch_fds=disk)  # fmt: skip
    t0 = time.monotonic()
    passed = [theirs.fileno(), *disk] + ([fd] if fd is not None else [])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={}, pass_fds=passed)  # fmt: skip
    theirs.close()
    try:
        qemu.handshake(ours, qemu.BOOT_TIMEOUT_S)
        return (time.monotonic() - t0) * 1000
    finally:
        proc.kill()
        proc.wait()
        ours.close()
        for d in disk:
            os.close(d)
        if fd is not None:
            os.close(fd)


def series(runs: int = 3) -> dict[str, Any]:
    os.environ.setdefault("GLASSROOM_MICROVM_ALLOW_TCG", "1")
    import dataclasses

    from glassroom.backends.microvm import image, qemu
    from glassroom.backends.microvm._instance import choose_agent
    from glassroom.backends.microvm.prepare import prepare

    prep = prepare(snapshot=True)
    img = image.prepare()
    # the raw runs boot the agent the sandboxes boot (GLASSROOM_INIT, as they do)
    img = dataclasses.replace(img, agent=choose_agent(img)[0])
    accel = qemu.choose_accel()
    log = os.path.join(tempfile.mkdtemp(prefix="glassroom-bench-mvm-"), "audit.jsonl")
    saved = os.environ.get("GLASSROOM_MICROVM_SNAPSHOT")
    res: dict[str, list[float]] = {"cold": [], "restored": [], "destroy": [], "rss_kib": [],
                                   "raw_cold": [], "raw_restored": []}  # fmt: skip
    snap_path = str(prep["snapshot"]) if str(prep.get("snapshot", "")).startswith("/") else None
    boots: dict[str, list[dict[str, Any]]] = {"cold": [], "restored": []}
    try:
        _one(log, True)  # warm the page cache and the snapshot
        for _ in range(runs):
            for kind, snap in (("cold", False), ("restored", True)):
                first, destroy, rss, boot = _one(log, snap)
                res[kind].append(first)
                res["destroy"].append(destroy)
                boots[kind].append(boot)
                if snap:
                    res["rss_kib"].append(rss)
            res["raw_cold"].append(_raw(img, accel, None))
            if snap_path:
                res["raw_restored"].append(_raw(img, accel, snap_path))
    finally:
        if saved is None:
            os.environ.pop("GLASSROOM_MICROVM_SNAPSHOT", None)
        else:
            os.environ["GLASSROOM_MICROVM_SNAPSHOT"] = saved
    med = {k: round(statistics.median(v), 1) for k, v in res.items() if v}
    return {
        "accel": accel.detail,
        "runs": runs,
        "median_ms": {
            "cold_boot_to_first_output": med["cold"],
            "snapshot_restore_to_first_output": med["restored"],
            "destroy": med["destroy"],
            "raw_qemu_cold_to_agent_ready": med["raw_cold"],
            "raw_qemu_restore_to_agent_ready": med.get("raw_restored"),
        },
        "ratio_vs_raw_qemu": {
            "cold": round(med["cold"] / med["raw_cold"], 2),
            "restored": round(med["restored"] / med["raw_restored"], 2)
            if med.get("raw_restored") else None,
        },
        "idle_rss_mib_per_vm": round(med["rss_kib"] / 1024, 1),
        "samples_ms": {k: [round(x, 1) for x in v] for k, v in res.items() if k != "rss_kib"},
        "vmm_phase_ms": {k: [b.get("vmm_ms") for b in v] for k, v in boots.items()},
        "sizes_bytes": {
            **img.sizes(),
            "snapshot": prep.get("snapshot_bytes"),
        },
        "kernel": img.kernel_release,
        "agent": img.agent,
        "goals_tcg": {  # issue 18's
            "cold_ms<=1000": med["cold"] <= 1000,
            "restored_ms<=200": med["restored"] <= 200,
        },
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print(json.dumps(series(n), indent=2))
