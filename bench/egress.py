"""Egress proxy benchmark: added latency per request, and download throughput.

    python bench/egress.py [--requests 1000] [--mib 100]

Prints JSON.  A loopback HTTP server runs in its own process on 127.0.0.1;
names resolve through a hosts map.  Three paths are measured with the same
client code (HTTP/1.1 keep-alive to whatever it talks to):

* ``direct``: host client -> server;
* ``proxy_only``: host client -> glassroom's proxy (own process, TCP) -> server;
* ``sandbox``: client inside a namespaces sandbox -> 127.0.0.1:3128 (the
  init's forwarder) -> Unix socket -> the proxy in this supervisor -> server.

``added_*`` is the difference of percentiles against ``direct``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

CLIENT = r"""
import http.client, json, sys, time
host, url = sys.argv[1], sys.argv[3]
port, n, mib = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
conn = http.client.HTTPConnection(host, port, timeout=30)
lat = []
for i in range(n + 20):
    t = time.perf_counter()
    conn.request("GET", url + "/ping")
    r = conn.getresponse(); r.read()
    if r.status != 200:
        raise SystemExit(f"status {r.status}")
    if i >= 20:  # warm-up excluded
        lat.append((time.perf_counter() - t) * 1000)
lat.sort()
t = time.perf_counter()
conn.request("GET", url + f"/bytes/{mib << 20}")
r = conn.getresponse()
got = 0
while chunk := r.read(1 << 20):
    got += len(chunk)
dt = time.perf_counter() - t
print(json.dumps({"p50_ms": lat[len(lat) // 2], "p95_ms": lat[int(len(lat) * 0.95)],
                  "mean_ms": sum(lat) / len(lat), "requests": len(lat),
                  "download_bytes": got, "download_s": dt,
                  "throughput_mib_s": got / dt / (1 << 20)}))
"""

SERVER = (
    "from glassroom.egress.testing import LoopbackServer; import time\n"
    "s = LoopbackServer(); print(s.port, flush=True); time.sleep(3600)\n"
)

PROXY = (
    "import sys, time\n"
    "from glassroom.egress import EgressProxy, ProxyConfig, PlanDecider, HostsResolver\n"
    "from glassroom.policy import parse_policy, compile\n"
    "plan = compile(parse_policy('[network]\\nallow=[\"bench.test\"]')).network\n"
    "p = EgressProxy(ProxyConfig('bench', PlanDecider(plan), lambda *a: None,\n"
    "                resolver=HostsResolver({'bench.test': '127.0.0.1'})))\n"
    "p.start(tcp=('127.0.0.1', 0)); print(p.tcp_address[1], flush=True); time.sleep(3600)\n"
)


def _spawn(code: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _client(host: str, port: int, url: str, n: int, mib: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CLIENT, host, str(port), url, str(n), str(mib)],
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    return dict(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--mib", type=int, default=100)
    args = ap.parse_args()
    from glassroom import Sandbox
    from glassroom.egress import HostsResolver, NetworkOptions

    server, sport = _spawn(SERVER)
    proxy, pport = _spawn(PROXY)
    try:
        direct = _client("127.0.0.1", sport, "", args.requests, args.mib)
        via = _client("127.0.0.1", pport, f"http://bench.test:{sport}", args.requests, args.mib)
        policy = {"network": {"allow": ["bench.test"]},
                  "resources": {"max_runtime_s": 600, "memory_mib": 1024}}  # fmt: skip
        opts = NetworkOptions(resolver=HostsResolver({"bench.test": "127.0.0.1"}))
        with (
            tempfile.TemporaryDirectory() as tmp,
            Sandbox(policy, network=opts, audit_log=os.path.join(tmp, "audit.jsonl")) as sb,
        ):
            res = sb.run(["python3", "-c", CLIENT, "127.0.0.1", "3128",
                          f"http://bench.test:{sport}", str(args.requests), str(args.mib)],
                         timeout_s=600)  # fmt: skip
            if res.exit_code != 0:
                raise SystemExit(f"sandbox client failed: {res.stderr[-500:]}")
            inside = json.loads(res.stdout)
    finally:
        for p in (server, proxy):
            p.kill()
            p.wait()

    def added(m: dict[str, Any]) -> dict[str, float]:
        return {"added_p50_ms": round(m["p50_ms"] - direct["p50_ms"], 3),
                "added_p95_ms": round(m["p95_ms"] - direct["p95_ms"], 3)}  # fmt: skip

    report = {
        "requests": args.requests,
        "download_mib": args.mib,
        "direct": direct,
        "proxy_only": {**via, **added(via)},
        "sandbox": {**inside, **added(inside)},
        "goal": "added p50 <= 1 ms",
    }
    for k in ("direct", "proxy_only", "sandbox"):
        report[k] = {
            key: round(v, 3) if isinstance(v, float) else v for key, v in report[k].items()
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
