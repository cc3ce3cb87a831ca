"""The fleet on this machine: sandboxes/s and create latency with 1, 2 and 3 Ray
nodes behind the front door, and the front door's overhead against a direct
single-host ``glassroom serve``, in the same run.  Prints JSON.

    python bench/fleet.py [--n 15] [--clients 6] [--per-client 4] [--rounds 3]

Every figure is a median: latencies over ``--n`` sequential creates (after two
warm-ups), sandboxes/s over ``--rounds`` rounds of ``--clients`` clients doing
``--per-client`` cycles each (create + run echo + destroy, own API).  All the
nodes share this machine's cores, so more nodes add placement choices here,
not CPU: on real hosts each node brings its own.  Ray runs on loopback with
usage stats off, 80 MB of object store per node.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback stays loopback

import argparse
import json
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MB = 1 << 20
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * MB,
                             "node_ip_address": "127.0.0.1"}  # fmt: skip


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _serve(app: Any) -> tuple[str, Callable[[], None]]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))  # fmt: skip
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    end = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < end, "server did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        th.join(15)

    return f"http://127.0.0.1:{port}", stop


def _p(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(url: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    create: list[float] = []
    run: list[float] = []
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120,
                      trust_env=False) as c:  # fmt: skip
        for i in range(args.n + 2):
            t0 = time.perf_counter()
            r = c.post("/v1/sandboxes", json={})
            t1 = time.perf_counter()
            assert r.status_code == 201, r.text
            sid = r.json()["sandbox_id"]
            e = c.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["echo", "hi"]})
            t2 = time.perf_counter()
            assert e.json()["stdout"] == "hi\n"
            c.delete(f"/v1/sandboxes/{sid}")
            if i >= 2:
                create.append((t1 - t0) * 1000)
                run.append((t2 - t1) * 1000)

    def client(_i: int) -> int:
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120,
                          trust_env=False) as cc:  # fmt: skip
            for _ in range(args.per_client):
                r = cc.post("/v1/sandboxes", json={})
                assert r.status_code == 201, r.text
                sid = r.json()["sandbox_id"]
                cc.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["echo", "hi"]})
                cc.delete(f"/v1/sandboxes/{sid}")
        return args.per_client

    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            total = sum(pool.map(client, range(args.clients)))
        rates.append(total / (time.perf_counter() - t0))
    return {
        "create_p50_ms": round(statistics.median(create), 1),
        "create_p95_ms": round(_p(create, 0.95), 1),
        "run_echo_p50_ms": round(statistics.median(run), 1),
        "sandboxes_per_s": round(statistics.median(rates), 2),
        "rounds_per_s": [round(x, 2) for x in rates],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="glassroom-bench-fleet-", dir="/tmp"))
    root.chmod(0o755)
    os.environ.setdefault("GLASSROOM_STATE_DIR", str(root / "state"))
    os.environ.setdefault("GLASSROOM_CGROUP_PARENT", "glassroom-bench")
    (root / "state").mkdir(mode=0o755)

    import ray
    from ray.cluster_utils import Cluster

    from glassroom.fleet._front import FrontDoor
    from glassroom.fleet._nodes import Fleet
    from glassroom.fleet._ray import node_resources
    from glassroom.interfaces.http import SandboxService, ServeConfig, create_app, new_key

    key = new_key()
    out: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cycle": "create + run echo + destroy, own API, one tenant",
        "clients": args.clients,
    }

    # -- direct: one glassroom serve, no Ray ------------------------------------------
    cfg = ServeConfig(data_dir=root / "direct")
    cfg.add_key("bench", key, max_sandboxes=64)
    svc = SandboxService(cfg)
    url, stop = _serve(create_app(cfg, service=svc))
    out["direct"] = measure(url, key, args)
    stop()
    svc.close()

    # -- the fleet: 1, 2, 3 nodes -----------------------------------------------------
    tiers = ["namespaces"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE_ARGS,
            "include_dashboard": False,
            "resources": node_resources("n1", tiers, 16),
        },  # fmt: skip
    )
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace="glassroom",
             log_to_driver=False)  # fmt: skip
    fcfg = ServeConfig(data_dir=root / "front")
    fcfg.add_key("bench", key, max_sandboxes=64)
    fleet = Fleet(fcfg, root=root / "nodes")
    url, stop = _serve(FrontDoor(fleet))
    try:
        from ray.util.placement_group import placement_group, remove_placement_group

        pg_ms = []
        for _ in range(20):
            t0 = time.perf_counter()
            pg = placement_group([{"glassroom_tier_namespaces": 1.0}], strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=10)
            remove_placement_group(pg)
            pg_ms.append((time.perf_counter() - t0) * 1000)
        out["placement_group_ms_p50"] = round(statistics.median(pg_ms), 2)
        for count in (1, 2, 3):
            if count > 1:
                cluster.add_node(**NODE_ARGS, resources=node_resources(f"n{count}", tiers, 16))
                end = time.monotonic() + 60
                while len(fleet.live_nodes()) < count:
                    assert time.monotonic() < end, "a node did not join"
                    time.sleep(0.2)
            out[f"fleet_{count}_nodes"] = measure(url, key, args)
    finally:
        stop()
        fleet.close(stop_agents=True)
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    d, f1 = out["direct"], out["fleet_1_nodes"]
    out["front_door_overhead"] = {
        "create_p50_ratio": round(f1["create_p50_ms"] / d["create_p50_ms"], 2),
        "create_p95_ratio": round(f1["create_p95_ms"] / d["create_p95_ms"], 2),
        "run_echo_p50_ratio": round(f1["run_echo_p50_ms"] / d["run_echo_p50_ms"], 2),
        "sandboxes_per_s_ratio": round(f1["sandboxes_per_s"] / d["sandboxes_per_s"], 2),
        "note": "fleet with 1 node / direct single-host serve, same machine, same run",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
