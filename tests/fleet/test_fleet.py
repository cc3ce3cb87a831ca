"""The fleet on a real 3-node Ray cluster (``ray.cluster_utils.Cluster``) on this machine.

Nodes: ``n1`` (the head) and ``n2`` advertise namespaces and gvisor, ``n3``
namespaces only.  One cluster and one front door for the module; the tests
run in file order and node loss comes last (it removes ``n2`` and brings it
back).  Ray talks on loopback only, with usage stats off.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback stays loopback

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import uvicorn
from ray.cluster_utils import Cluster

from glassroom.audit import read_records, verify
from glassroom.fleet import Progress, Task, run_batch
from glassroom.fleet._audit import check_anchored
from glassroom.fleet._front import FrontDoor, sandbox_id_of
from glassroom.fleet._nodes import Fleet
from glassroom.fleet._ray import node_resources
from glassroom.interfaces.http import ServeConfig, new_key
from glassroom.policy import default_policy, validate_policy

MB = 1 << 20
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * MB,
                             "node_ip_address": "127.0.0.1"}  # fmt: skip
TIERS = {"n1": ["namespaces", "gvisor"], "n2": ["namespaces", "gvisor"], "n3": ["namespaces"]}
#: Templates only n3 has (a tool or an image the other hosts lack).
N3_TEMPLATES = ["n3-only", "gvisor-on-n3"]
CAPS = {"alice": 20, "bob": 20, "carol": 2}


@dataclass
class Env:
    cluster: Cluster
    fleet: Fleet
    url: str
    keys: dict[str, str]
    root: Path
    nodes: dict[str, Any]  # name -> ray's node handle
    front: FrontDoor

    def h(self, tenant: str = "alice") -> dict[str, str]:
        return {"X-API-Key": self.keys[tenant]}

    def node_of(self, sid: str) -> str:
        node = self.fleet.where(sid)
        assert node is not None, sid
        return node.name

    def node_log(self, name: str) -> Path:
        return self.root / "nodes" / name / "serve" / "audit.jsonl"

    def verifies(self, name: str) -> bool:
        """Node ``name``'s log checks out, anchor included, against that node's own key."""
        pub = self.root / "nodes" / name / "state" / "audit-anchor.pub"
        res = verify(self.node_log(name), pubkey=pub)
        assert res.ok, (name, res.problems)
        return res.anchored_seq is not None


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="glassroom-fleet-", dir="/tmp"))
    root.chmod(0o755)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **NODE_ARGS,
            "include_dashboard": False,
            "resources": node_resources("n1", TIERS["n1"], 16),
            "_system_config": {
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 4,
            },  # fmt: skip
        },
    )
    nodes = {"n1": cluster.head_node}
    for name in ("n2", "n3"):
        extra = N3_TEMPLATES if name == "n3" else []
        nodes[name] = cluster.add_node(
            **NODE_ARGS, resources=node_resources(name, TIERS[name], 16, extra)
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", namespace="glassroom",
             log_to_driver=False)  # fmt: skip
    cfg = ServeConfig(data_dir=root / "front")
    cfg.templates["n3-only"] = cfg.templates["base"]
    cfg.templates["gvisor-on-n3"] = validate_policy(_policy("medium"))
    keys = {}
    for tenant, cap in CAPS.items():
        keys[tenant] = new_key()
        cfg.add_key(tenant, keys[tenant], max_sandboxes=cap)
    fleet = Fleet(cfg, root=root / "nodes", place_wait_s=5)
    port = _free_port()
    front = FrontDoor(fleet)
    server = uvicorn.Server(uvicorn.Config(front, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))  # fmt: skip
    th = threading.Thread(target=server.run, name="test-front", daemon=True)
    th.start()
    end = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < end and th.is_alive(), "the front door did not start"
        time.sleep(0.02)
    try:
        yield Env(cluster, fleet, f"http://127.0.0.1:{port}", keys, root, nodes, front)
    finally:
        server.should_exit = True
        th.join(15)
        fleet.close(stop_agents=True)
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def http(env: Env) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=env.url, timeout=60, trust_env=False) as c:
        yield c


def _policy(risk: str) -> dict[str, Any]:
    p = default_policy().model_dump(mode="json")
    p["risk"] = risk
    return p


def _create(http: httpx.Client, env: Env, tenant: str = "alice", **body: Any) -> str:
    r = http.post("/v1/sandboxes", json=body or {"template": "base"}, headers=env.h(tenant))
    assert r.status_code == 201, r.text
    return str(r.json()["sandbox_id"])


def _destroy(http: httpx.Client, env: Env, sid: str, tenant: str = "alice") -> None:
    r = http.delete(f"/v1/sandboxes/{sid}", headers=env.h(tenant))
    assert r.status_code == 200, r.text


# -- placement and routing -----------------------------------------------------------


def test_sandboxes_run_on_every_node_and_calls_reach_them(env: Env, http: httpx.Client) -> None:
    ids = [_create(http, env) for _ in range(3)]
    try:
        assert sorted(env.node_of(s) for s in ids) == ["n1", "n2", "n3"]
        for sid in ids:
            r = http.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["echo", sid]},
                          headers=env.h())  # fmt: skip
            assert r.status_code == 200 and r.json()["stdout"] == sid + "\n", r.text
            w = http.put(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f"},
                         content=b"x" * 100_000, headers=env.h())  # fmt: skip
            assert w.status_code == 200, w.text
            got = http.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/f"},
                           headers=env.h())  # fmt: skip
            assert got.content == b"x" * 100_000
        listed = {i["sandbox_id"] for i in http.get("/v1/sandboxes", headers=env.h()).json()}
        assert set(ids) <= listed
        # a stream (NDJSON) passes through the front door as it is made
        with http.stream("POST", f"/v1/sandboxes/{ids[1]}/commands/stream", headers=env.h(),
                         json={"command": "for i in 1 2 3; do echo $i; done"}) as s:  # fmt: skip
            events = [json.loads(line) for line in s.iter_lines() if line]
        assert events[0]["type"] == "start" and events[-1]["type"] == "exit"
        assert "".join(e.get("data", "") for e in events if e["type"] == "stdout") == "1\n2\n3\n"
    finally:
        for sid in ids:
            _destroy(http, env, sid)
    assert not any(env.fleet.where(s) for s in ids)


def test_medium_risk_is_never_placed_on_the_node_without_gvisor(
    env: Env, http: httpx.Client
) -> None:
    ids = [_create(http, env, policy=_policy("medium")) for _ in range(3)]
    try:
        for sid in ids:
            assert env.node_of(sid) in ("n1", "n2")
            info = http.get(f"/v1/sandboxes/{sid}", headers=env.h()).json()
            assert info["backend"] == "gvisor", info
    finally:
        for sid in ids:
            _destroy(http, env, sid)


def test_a_tier_no_node_has_is_refused_naming_the_rule(env: Env, http: httpx.Client) -> None:
    before = len(ray.util.placement_group_table())
    r = http.post("/v1/sandboxes", json={"policy": _policy("high")}, headers=env.h())
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["rule"] == "fleet.tier"
    assert "microvm" in err["message"] and "weaker tier" in err["message"]
    assert "n3: namespaces" in err["message"]
    assert len(ray.util.placement_group_table()) == before  # nothing was held for it


def test_a_template_some_nodes_declare_is_placed_only_there(env: Env, http: httpx.Client) -> None:
    ids = [_create(http, env, template="n3-only") for _ in range(3)]
    try:
        assert [env.node_of(s) for s in ids] == ["n3", "n3", "n3"]
        e2b = http.post("/sandboxes", json={"templateID": "n3-only"}, headers=env.h())
        assert e2b.status_code == 201, e2b.text
        ids.append(e2b.json()["sandboxID"])
        assert env.node_of(ids[-1]) == "n3"
    finally:
        for sid in ids:
            _destroy(http, env, sid)
    # only n3 has the template, and n3 has no gvisor: refused, never a weaker tier
    r = http.post("/v1/sandboxes", json={"template": "gvisor-on-n3"}, headers=env.h())
    assert r.status_code == 503 and r.json()["error"]["rule"] == "fleet.template", r.text


def test_python_sdk_works_unchanged_against_the_front_door(env: Env) -> None:
    from glassroom import Sandbox

    with Sandbox(url=env.url, api_key=env.keys["alice"], template="base") as sb:
        sb.files.write("/workspace/a.txt", "hello fleet")
        res = sb.run(["cat", "/workspace/a.txt"])
        assert res.stdout == "hello fleet"
        assert env.fleet.where(sb.id) is not None


def test_e2b_sdk_through_the_front_door(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    e2b = pytest.importorskip("e2b")
    monkeypatch.setenv("E2B_API_URL", env.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", env.url)
    monkeypatch.setenv("E2B_API_KEY", env.keys["alice"])
    sbx = e2b.Sandbox.create(timeout=120)
    try:
        assert env.fleet.where(sbx.sandbox_id) is not None
        # envd's Connect stream, routed by the E2b-Sandbox-Id header
        out = sbx.commands.run("echo routed; echo err >&2")
        assert out.stdout == "routed\n" and out.stderr == "err\n"
        sbx.files.write("/home/user/x.txt", "via envd")
        assert sbx.files.read("/home/user/x.txt") == "via envd"
        assert sbx.is_running()
    finally:
        sbx.kill()
    assert not sbx.is_running()


def test_the_three_ways_of_naming_a_sandbox() -> None:
    assert sandbox_id_of("/v1/sandboxes/sb-0a1b2c3d/commands", {}) == "sb-0a1b2c3d"
    assert sandbox_id_of("/sandboxes/sb-0a1b2c3d", {}) == "sb-0a1b2c3d"
    assert sandbox_id_of("/v2/sandboxes/sb-0a1b2c3d/connect", {}) == "sb-0a1b2c3d"
    assert sandbox_id_of("/files", {"e2b-sandbox-id": "sb-0a1b2c3d"}) == "sb-0a1b2c3d"
    assert sandbox_id_of("/", {"host": "8080-sb-0a1b2c3d.fleet.example"}) == "sb-0a1b2c3d"
    assert sandbox_id_of("/", {"host": "8443-prod.example.com"}) is None


def test_port_relay_by_host_reaches_the_right_node(env: Env, http: httpx.Client) -> None:
    """The ``{port}-{id}.`` host form: a server in the sandbox, reached through the front."""
    pol = default_policy().model_dump(mode="json")
    pol["resources"]["max_runtime_s"] = 600
    ids = [_create(http, env, policy=pol) for _ in range(2)]
    try:
        sid = ids[-1]
        code = ("import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n"
                "    def do_GET(s):\n        s.send_response(200); s.end_headers(); "
                f"s.wfile.write(b'{sid}')\n"
                "h.HTTPServer(('127.0.0.1', 8000), H).serve_forever()\n")  # fmt: skip
        http.put(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/s.py"},
                 content=code.encode(), headers=env.h())  # fmt: skip
        with http.stream(
            "POST",
            f"/v1/sandboxes/{sid}/commands/stream",
            headers=env.h(),
            json={"argv": ["python3", "/workspace/s.py"], "timeout_s": 60},
        ):
            end = time.monotonic() + 20
            while True:
                r = http.get(f"/v1/sandboxes/{sid}/ports/8000/", headers=env.h())
                if r.status_code == 200 or time.monotonic() > end:
                    break
                time.sleep(0.3)
            assert r.status_code == 200 and r.content == sid.encode(), r.text
            tok = http.get(f"/sandboxes/{sid}", headers=env.h()).json()
            hdrs = {"Host": f"8000-{sid}.fleet.example"}
            if tok.get("trafficAccessToken"):
                hdrs["e2b-traffic-access-token"] = tok["trafficAccessToken"]
            by_host = http.get("/", headers=hdrs)
            assert by_host.status_code == 200 and by_host.content == sid.encode(), by_host.text
    finally:
        for sid in ids:
            _destroy(http, env, sid)


# -- tenancy -------------------------------------------------------------------------


def test_tenants_are_kept_apart_across_the_fleet(env: Env, http: httpx.Client) -> None:
    ids = [_create(http, env) for _ in range(3)]
    try:
        for sid in ids:
            for path in (f"/v1/sandboxes/{sid}", f"/sandboxes/{sid}"):
                r = http.get(path, headers=env.h("bob"))
                assert r.status_code == 404, (path, r.text)
            r = http.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["true"]},
                          headers=env.h("bob"))  # fmt: skip
            assert r.status_code == 404
            assert http.delete(f"/v1/sandboxes/{sid}", headers=env.h("bob")).status_code == 404
        assert http.get("/v1/sandboxes", headers=env.h("bob")).json() == []
        assert (
            http.get("/v1/sandboxes", headers={"X-API-Key": "e2b_" + "0" * 40}).status_code == 401
        )
        unknown = http.get("/v1/sandboxes/sb-00000000deadbeef", headers=env.h())
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    finally:
        for sid in ids:
            _destroy(http, env, sid)


def test_the_tenant_cap_counts_every_node(env: Env, http: httpx.Client) -> None:
    ids = [_create(http, env, "carol") for _ in range(2)]
    try:
        assert env.node_of(ids[0]) != env.node_of(ids[1])  # on two nodes, one cap
        r = http.post("/v1/sandboxes", json={"template": "base"}, headers=env.h("carol"))
        assert r.status_code == 429, r.text
        assert r.json()["error"]["rule"] == "tenant.max_sandboxes"
        assert "across the fleet" in r.json()["error"]["message"]
        e2b = http.post("/sandboxes", json={"templateID": "base"}, headers=env.h("carol"))
        assert e2b.status_code == 429 and "tenant.max_sandboxes" in e2b.json()["message"]
    finally:
        for sid in ids:
            _destroy(http, env, sid, "carol")
    _destroy(http, env, _create(http, env, "carol"), "carol")  # the slots came back
    # racing creates: exactly the cap is made, across the nodes, the rest refused
    from concurrent.futures import ThreadPoolExecutor

    def one(_i: int) -> httpx.Response:
        with httpx.Client(base_url=env.url, timeout=60, trust_env=False) as c:
            return c.post("/v1/sandboxes", json={"template": "base"}, headers=env.h("carol"))

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, range(5)))
    made = [r.json()["sandbox_id"] for r in answers if r.status_code == 201]
    assert len(made) == 2 and sorted(r.status_code for r in answers) == [201, 201, 429, 429, 429]
    for sid in made:
        _destroy(http, env, sid, "carol")


def test_mcp_sessions_are_pinned_to_one_node(env: Env) -> None:
    """MCP through the front door: each handshake session stays on the node it
    opened on (its sandboxes are there); a session-less client on one per tenant."""
    import anyio
    from mcp import Client, ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    url = env.url + "/mcp"
    seen: list[tuple[str, str]] = []  # (sandbox id, node of the session)

    async def session(tenant: str) -> None:
        async with create_mcp_http_client(headers=env.h(tenant)) as hc:
            transport = streamable_http_client(url, http_client=hc)
            async with transport as streams, ClientSession(*streams[:2]) as s:
                await s.initialize()
                r = await s.call_tool("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                sid = r.structured_content["sandbox_id"]
                r = await s.call_tool("execute_command", {"sandbox_id": sid, "command": "echo ok"})
                assert r.structured_content["stdout"] == "ok\n", r.content
                pinned = set(env.front._mcp_sessions.values())
                assert len(pinned) == 1
                await anyio.to_thread.run_sync(env.fleet.resync)
                assert env.node_of(sid) in pinned  # the sandbox is on the session's node
                seen.append((sid, pinned.pop()))
                r = await s.call_tool("kill_sandbox", {"sandbox_id": sid})
                assert not r.is_error

    async def sessionless(tenant: str) -> None:
        async with create_mcp_http_client(headers=env.h(tenant)) as hc:
            transport = streamable_http_client(url, http_client=hc)
            async with Client(transport, mode="auto") as c:
                r = await c.call_tool("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                handle = r.structured_content["sandbox_id"]
                r = await c.call_tool(
                    "execute_command", {"sandbox_id": handle, "command": "echo hi"}
                )
                assert r.structured_content["stdout"] == "hi\n", r.content
                r = await c.call_tool("kill_sandbox", {"sandbox_id": handle})
                assert not r.is_error

    async def main() -> None:
        with anyio.fail_after(120):
            await session("alice")
            env.fleet.resync()
            await sessionless("bob")

    anyio.run(main)
    assert seen and seen[0][1] in ("n1", "n2", "n3")
    assert env.front._mcp_pins.get("bob") in ("n1", "n2", "n3")
    r = httpx.post(url, headers={**env.h(), "Mcp-Session-Id": "no-such-session",
                                 "Accept": "application/json, text/event-stream"},
                   json={"jsonrpc": "2.0", "id": 1, "method": "ping"})  # fmt: skip
    assert r.status_code == 404


# -- batches ---------------------------------------------------------------------------


def test_run_batch_runs_tasks_with_bounded_concurrency_and_progress(env: Env) -> None:
    seen: list[Progress] = []
    held: list[int] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        held.append(env.fleet.count("bob"))  # bob's live sandboxes, fleet-wide

    tasks = [Task(commands=[f"echo task-{i}", "cat /workspace/in"], files={"/workspace/in": f"{i}"})
             for i in range(5)]  # fmt: skip
    tasks.append(Task(commands=["exit 3"]))
    results = run_batch(tasks, url=env.url, api_key=env.keys["bob"], concurrency=3,
                        progress=progress)  # fmt: skip
    assert [r.index for r in results] == list(range(6))
    for i, r in enumerate(results[:5]):
        assert r.ok and r.outcomes[0].stdout == f"task-{i}\n" and r.outcomes[1].stdout == f"{i}"
    assert not results[5].ok and results[5].outcomes[0].exit_code == 3
    assert [p.done for p in seen] == list(range(1, 7)) and seen[-1].failed == 1
    assert len({r.sandbox_id for r in results}) == 6
    assert max(held) <= 3  # never more sandboxes at once than the concurrency
    assert env.fleet.count("bob") == 0  # every sandbox of the batch was destroyed


# -- audit ----------------------------------------------------------------------------


def test_every_node_log_verifies_and_heads_are_anchored(env: Env, http: httpx.Client) -> None:
    r = http.post("/v1/fleet/audit", headers=env.h())
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"], report
    assert sorted(n["node"] for n in report["nodes"]) == ["n1", "n2", "n3"]
    assert all(n["records"] > 0 and n["hash"] for n in report["nodes"])
    anchored = [x for x in read_records(env.fleet.cfg.audit_log) if x["event"] == "fleet.anchored"]
    assert anchored and {h["node"] for h in anchored[-1]["details"]["heads"]} == {"n1", "n2", "n3"}
    # the CLI, as a second Ray driver, checks the same and the front door's anchored heads
    out = subprocess.run(
        [str(Path(sys.executable).parent / "glassroom"), "audit", "verify", "--fleet", "--ray",
         env.cluster.address, "--anchor-log", str(env.fleet.cfg.audit_log)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("n1", "n2", "n3"):
        assert f"{name}: ok" in out.stdout
        assert env.verifies(name)
    # a head that no longer matches what the front door anchored is named
    agents = {n.name: n.agent for n in env.fleet.live_nodes()}
    forged = {"n1": {"node": "n1", "seq": 1, "hash": "0" * 64}}
    problems = check_anchored(agents, forged)
    assert len(problems) == 1 and "node n1: record seq 1" in problems[0]
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "glassroom"), "audit", "show", "--fleet", "--ray",
         env.cluster.address, "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    recs = [json.loads(line) for line in shown.stdout.splitlines()]
    assert {r["node"] for r in recs} == {"n1", "n2", "n3"}
    assert any(r["event"] == "service.created" for r in recs)


def test_glassroom_serve_ray_is_the_front_door(env: Env, tmp_path: Path) -> None:
    """The CLI's front door, a second driver: it finds the same agents (and
    their sandboxes); the SDK works against it unchanged."""
    from glassroom import Sandbox

    port = _free_port()
    key = new_key()
    # the same tenants and keys as the first front door (it pushes its config to the
    # agents: every front door of a fleet must share one), and dave's key
    by_tenant: dict[str, list[str]] = {}
    for digest, tenant in env.fleet.cfg.key_hashes.items():
        by_tenant.setdefault(tenant, []).append(digest)
    toml = "".join(
        f"[tenants.{t}]\nmax_sandboxes = {CAPS[t]}\napi_keys_sha256 = {json.dumps(hs)}\n"
        for t, hs in by_tenant.items()
    )
    (tmp_path / "serve.toml").write_text(toml)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "glassroom"), "serve", "--ray", env.cluster.address,
         "--port", str(port), "--data-dir", str(tmp_path / "front2"),
         "--config", str(tmp_path / "serve.toml")],
        env={**os.environ, "GLASSROOM_API_KEY": key, "GLASSROOM_TENANT": "dave"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < end, "glassroom serve --ray did not start"
            time.sleep(0.3)
        with Sandbox(url=f"http://127.0.0.1:{port}", api_key=key, template="base") as sb:
            assert sb.run(["echo", "cli"]).stdout == "cli\n"
            nodes = httpx.get(f"http://127.0.0.1:{port}/v1/fleet/nodes",
                              headers={"X-API-Key": key}).json()  # fmt: skip
            assert sorted(n["name"] for n in nodes) == ["n1", "n2", "n3"]
    finally:
        proc.terminate()
        proc.wait(30)


# -- node loss (last: it takes n2 away and brings it back) ---------------------------


def test_node_loss_marks_sandboxes_lost_and_the_reaper_cleans_on_rejoin(
    env: Env, http: httpx.Client
) -> None:
    ids = [_create(http, env) for _ in range(3)]
    lost = [s for s in ids if env.node_of(s) == "n2"]
    kept = [s for s in ids if s not in lost]
    assert lost and kept
    # a stream open on the node when it goes ends, instead of hanging its client
    ended = threading.Event()

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{env.url}/v1/sandboxes/{lost[0]}/commands/stream",
                              json={"command": "echo up; sleep 60"}, headers=env.h(),
                              timeout=90, trust_env=False) as s:  # fmt: skip
                for _ in s.iter_lines():
                    pass
        except httpx.HTTPError:
            pass
        ended.set()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    time.sleep(1.0)
    env.cluster.remove_node(env.nodes["n2"], allow_graceful=False)  # SIGKILL, no goodbye
    assert ended.wait(30), "a stream from the lost node did not end"
    end = time.monotonic() + 40
    while True:
        r = http.get(f"/v1/sandboxes/{lost[0]}", headers=env.h())
        if r.status_code == 410 or time.monotonic() > end:
            break
        time.sleep(0.3)
    assert r.status_code == 410, r.text
    err = r.json()["error"]
    assert err["code"] == "sandbox.lost" and "'n2'" in err["message"]
    assert err["rule"] == "fleet.node_lost"
    assert http.get(f"/sandboxes/{lost[0]}", headers=env.h()).status_code == 410
    envd = http.get("/health", headers={"E2b-Sandbox-Id": lost[0]})
    assert envd.status_code == 502 and "lost" in envd.text
    assert http.get(f"/v1/sandboxes/{lost[0]}", headers=env.h("bob")).status_code == 404
    recs = [x for x in read_records(env.fleet.cfg.audit_log) if x["event"] == "sandbox.lost"]
    assert {x["sandbox"] for x in recs} >= set(lost)
    assert all(x["details"]["node"] == "n2" for x in recs)
    # the others go on, and new sandboxes avoid the lost node
    for sid in kept:
        r = http.post(f"/v1/sandboxes/{sid}/commands", json={"argv": ["true"]}, headers=env.h())
        assert r.status_code == 200, r.text
    fresh = _create(http, env, policy=_policy("medium"))
    assert env.node_of(fresh) == "n1"  # the only gvisor node left
    _destroy(http, env, fresh)
    # n2 comes back under its name: its reaper cleans what the kill left
    env.nodes["n2"] = env.cluster.add_node(
        **NODE_ARGS, resources=node_resources("n2", TIERS["n2"], 16)
    )
    end = time.monotonic() + 60
    while not any(n.name == "n2" and n.alive for n in env.fleet.live_nodes()):
        assert time.monotonic() < end, "n2 did not rejoin"
        time.sleep(0.3)
    cleaned = {x["sandbox"]: x["details"] for x in read_records(env.node_log("n2"))
               if x["event"] == "reaper.cleaned"}  # fmt: skip
    assert set(lost) <= set(cleaned)
    for sid in lost:  # the sandboxes' processes died with the node: nothing left to kill
        assert cleaned[sid]["killed"] == [], cleaned[sid]
    assert http.get(f"/v1/sandboxes/{lost[0]}", headers=env.h()).status_code == 410
    for sid in kept:
        _destroy(http, env, sid)
    for name in ("n1", "n2", "n3"):
        env.verifies(name)
    assert verify(env.fleet.cfg.audit_log).ok
    # a front door that restarts remembers, from its log, what was lost and where
    again = Fleet(env.fleet.cfg, root=env.root / "nodes")
    try:
        assert all(again.lost[s] == ("alice", "n2") for s in lost)
        assert sorted(n.name for n in again.live_nodes()) == ["n1", "n2", "n3"]
    finally:
        again.close()
