"""Raw runsc checkpoint / restore, with no glassroom on top, for ``bench/snapshot.py``.

``raw(n)`` runs ``n`` rounds of: ``runsc run`` of a sleeping container (a
bundle like glassroom's: read-only ``/usr`` bind, tmpfs ``/tmp`` and
``/workspace``), ``runsc checkpoint --image-path`` of it (the container
stops), then ``runsc restore`` of that image under a new id, timed until the
restored container is running, and ``runsc delete --force`` (not timed).
Same platform as glassroom picks, ``--network=none``, a private ``--root``,
no cgroups.  Medians and p95 in milliseconds, and the image's bytes.

    python -c 'import sys; sys.path.insert(0, "bench"); import _snap_gvisor as s; print(s.raw(5))'
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

TIMEOUT_S = 60.0


def _bundle(work: str) -> str:
    bundle = os.path.join(work, "bundle")
    os.makedirs(os.path.join(bundle, "rootfs", "usr"))
    for name in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), os.path.join(bundle, "rootfs", name))
    spec = {
        "ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": True},
        "process": {"args": ["/usr/bin/sleep", "3600"], "cwd": "/",
                    "user": {"uid": 1000, "gid": 1000}, "env": ["PATH=/usr/bin"],
                    "noNewPrivileges": True},
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
    return bundle


def _state(base: list[str], cid: str) -> str:
    res = subprocess.run([*base, "state", cid], capture_output=True, text=True,
                         timeout=TIMEOUT_S, check=False)  # fmt: skip
    if res.returncode != 0:
        return ""
    return str(json.loads(res.stdout).get("status", ""))


def _until_running(base: list[str], cid: str, proc: subprocess.Popen[bytes]) -> None:
    """Poll ``runsc state`` (each poll ~10 ms, part of the time measured)."""
    deadline = time.monotonic() + TIMEOUT_S
    while _state(base, cid) != "running":
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"runsc {cid} did not start: {' '.join(err.split())[:300]}")
        time.sleep(0.002)


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {"median_ms": round(statistics.median(xs), 1), "p95_ms": round(p95, 1), "n": len(xs)}


def raw(n: int) -> dict[str, Any]:
    """``n`` rounds of raw runsc run / checkpoint / restore (see the module docstring)."""
    from glassroom.backends import _gvisor_spec

    plat = _gvisor_spec.choose_platform()
    runsc = _gvisor_spec.runsc_path()
    work = tempfile.mkdtemp(prefix="glassroom-bench-snap-")
    bundle = _bundle(work)
    base = [runsc, "--root", os.path.join(work, "state"), f"--platform={plat}",
            "--network=none", "--ignore-cgroups"]  # fmt: skip
    times: dict[str, list[float]] = {"run": [], "checkpoint": [], "restore": []}
    sizes: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([*base, *argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        procs.append(p)
        return p

    try:
        for i in range(n):
            cid, image = f"snap-{i}", os.path.join(work, f"image-{i}")
            t0 = time.perf_counter()
            p = start("run", "--bundle", bundle, cid)
            _until_running(base, cid, p)
            t1 = time.perf_counter()
            subprocess.run([*base, "checkpoint", "--image-path", image, cid], check=True,
                           capture_output=True, timeout=TIMEOUT_S)  # fmt: skip
            t2 = time.perf_counter()
            p.wait(timeout=TIMEOUT_S)
            sizes.append(sum(os.path.getsize(os.path.join(image, f)) for f in os.listdir(image)))
            t3 = time.perf_counter()
            q = start("restore", "--bundle", bundle, "--image-path", image, f"{cid}-r")
            _until_running(base, f"{cid}-r", q)
            t4 = time.perf_counter()
            subprocess.run([*base, "delete", "--force", f"{cid}-r"], capture_output=True,
                           timeout=TIMEOUT_S, check=False)  # fmt: skip
            q.wait(timeout=TIMEOUT_S)
            times["run"].append((t1 - t0) * 1000)
            times["checkpoint"].append((t2 - t1) * 1000)
            times["restore"].append((t4 - t3) * 1000)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "what": "raw runsc: run of `sleep`, checkpoint --image-path, restore (until running)",
        "platform": plat,
        "series": {k: _stats(v) for k, v in times.items()},
        "image_bytes": {"median": int(statistics.median(sizes)), "max": max(sizes)},
    }


if __name__ == "__main__":
    print(json.dumps(raw(5), indent=2))
