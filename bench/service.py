"""Latency of ``glassroom serve``: create a sandbox, run ``echo``, destroy, through
the own API (httpx) and through the unmodified ``e2b`` SDK; then sandboxes per
second (create + echo + destroy) with 8 concurrent clients.  Prints JSON.

    python bench/service.py [--n 30] [--clients 8] [--per-client 10]

The server runs in this process on 127.0.0.1 (uvicorn), with its own state
dir, cgroup parent and audit log (fsync'd, as in production).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _pcts(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return {"p50_ms": round(statistics.median(s), 2), "p95_ms": round(p95, 2), "n": len(s)}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=10)
    args = ap.parse_args()

    state = tempfile.mkdtemp(prefix="glassroom-bench-", dir="/tmp")
    os.chmod(state, 0o755)
    os.environ.setdefault("GLASSROOM_STATE_DIR", state)
    os.environ.setdefault("GLASSROOM_CGROUP_PARENT", "glassroom-bench")

    import httpx
    import uvicorn

    from glassroom.interfaces.http import SandboxService, ServeConfig, create_app, new_key

    cfg = ServeConfig(data_dir=Path(state) / "serve")
    key = new_key()
    cfg.add_key("bench", key, max_sandboxes=max(64, args.clients * 2))
    svc = SandboxService(cfg)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(cfg, service=svc),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key)
    out: dict[str, Any] = {
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
    }

    # -- own API ------------------------------------------------------------------
    c = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60)
    create, run, destroy = [], [], []
    for _ in range(args.n + 2):
        ms, r = _timed(lambda: c.post("/v1/sandboxes", json={}))
        sid = r.json()["sandbox_id"]
        ms2, r2 = _timed(
            lambda sid=sid: c.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["echo", "hi"]})
        )
        assert r2.json()["stdout"] == "hi\n"
        ms3, r3 = _timed(lambda sid=sid: c.delete(f"/v1/sandboxes/{sid}"))
        assert r3.json()["clean"]
        create.append(ms)
        run.append(ms2)
        destroy.append(ms3)
    out["own_api"] = {
        "create": _pcts(create[2:]),
        "run_echo": _pcts(run[2:]),
        "destroy": _pcts(destroy[2:]),
    }

    # -- e2b SDK ------------------------------------------------------------------
    from e2b import Sandbox

    create, run, destroy = [], [], []
    for _ in range(args.n + 2):
        ms, sb = _timed(Sandbox.create)
        ms2, res = _timed(lambda sb=sb: sb.commands.run("echo hi"))
        assert res.stdout == "hi\n"
        ms3, _ = _timed(sb.kill)
        create.append(ms)
        run.append(ms2)
        destroy.append(ms3)
    out["e2b_sdk"] = {
        "create": _pcts(create[2:]),
        "run_echo": _pcts(run[2:]),
        "destroy": _pcts(destroy[2:]),
    }

    # -- throughput -----------------------------------------------------------------
    def client(_i: int) -> int:
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as cc:
            for _ in range(args.per_client):
                sid = cc.post("/v1/sandboxes", json={}).json()["sandbox_id"]
                r = cc.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["echo", "hi"]})
                assert r.json()["stdout"] == "hi\n"
                assert cc.delete(f"/v1/sandboxes/{sid}").json()["clean"]
        return args.per_client

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        total = sum(pool.map(client, range(args.clients)))
    wall = time.perf_counter() - t0
    out["throughput"] = {
        "clients": args.clients,
        "sandboxes": total,
        "seconds": round(wall, 2),
        "sandboxes_per_second": round(total / wall, 2),
        "cycle": "create + run echo + destroy, own API",
    }

    server.should_exit = True
    th.join(10)
    svc.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
