"""E2B's sandbox metrics: ``GET /sandboxes/{id}/metrics?start=&end=``.

Each figure is real and read from the host (``Sandbox.usage``): CPU time and
charged memory from the sandbox's cgroups (the runsc sentry's on gVisor, the
QEMU process's on microVM: what the sandbox costs the host), disk from the
workspace's statfs.  ``cpuCount`` and ``memTotal`` are the policy's limits.

E2B collects a sample every 5 s; glassroom samples when asked, so no thread
polls idle sandboxes.  A sample is kept per 5-second bucket (its timestamp is
the bucket's start, as E2B aligns them), at most ``MAX_SAMPLES`` per
sandbox, and a query returns the kept samples whose bucket overlaps
``[start, end]``.  ``cpuUsedPct`` is the CPU time used since the previous
sample (since the start for the first) over the cores the policy gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..._errors import GlassroomError
from ..http._service import ApiError, Entry, rfc3339

BUCKET_S = 5
#: An hour of 5-second buckets per sandbox.
MAX_SAMPLES = 720
_KEY = "e2b.metrics"


@dataclass
class _History:
    samples: list[dict[str, Any]]
    cpu_usec: int = 0
    at: float = 0.0


def _when(raw: str | None, field: str) -> float | None:
    """A query's Unix seconds (the SDK sends whole seconds)."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
        raise ApiError(400, "invalid", f"{field}: must be a Unix time in seconds")
    return float(raw)


def _sample(e: Entry, hist: _History) -> dict[str, Any] | None:
    """A sample now, or None while the sandbox is paused (nothing runs)."""
    try:
        use = e.sb.usage()
    except GlassroomError:
        return None
    res = e.sb.policy.resources
    cpus = max(1, int(res.cpus))
    now = time.time()
    cpu = use.get("cpu_usec", 0)
    since = hist.at or e.created
    used = max(0, cpu - hist.cpu_usec) / 1e6
    pct = min(100.0, 100.0 * used / max(1e-3, now - since) / cpus)
    hist.cpu_usec, hist.at = cpu, now
    bucket = int(now) // BUCKET_S * BUCKET_S
    return {
        "timestamp": rfc3339(bucket),
        "timestampUnix": bucket,
        "cpuCount": cpus,
        "cpuUsedPct": round(pct, 2),
        "memUsed": use.get("memory_bytes", 0),
        "memTotal": res.memory_mib << 20,
        "memCache": use.get("memory_cache", 0),
        "diskUsed": use.get("disk_used", 0),
        "diskTotal": use.get("disk_total", res.disk_mib << 20),
    }


def metrics(e: Entry, start_raw: str | None, end_raw: str | None) -> list[dict[str, Any]]:
    """The samples of ``e`` in ``[start, end]`` (default: its whole life)."""
    start = _when(start_raw, "start")
    end = _when(end_raw, "end")
    with e.lock:
        hist = e.extra.setdefault(_KEY, _History([]))
    new = _sample(e, hist)  # not under the lock: a gVisor statfs is a round trip
    with e.lock:
        if new is not None:
            if hist.samples and hist.samples[-1]["timestampUnix"] == new["timestampUnix"]:
                hist.samples[-1] = new  # one per bucket: the latest
            else:
                hist.samples.append(new)
                del hist.samples[:-MAX_SAMPLES]
        kept = list(hist.samples)
    lo = e.created if start is None else start
    hi = time.time() if end is None else end
    return [s for s in kept if s["timestampUnix"] <= hi and s["timestampUnix"] + BUCKET_S > lo]
