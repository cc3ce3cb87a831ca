"""Network egress through a real sandbox: the proxy is the only way out.

Only loopback servers (127.0.0.1) are used.  Names resolve through an
injected hosts map, never the system DNS.  Every request in a sandbox has a
timeout, and every loop here is bounded in count and time.  Each test
checks the audit record and the rule that decided.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom.egress import HostsResolver, NetworkOptions
from glassroom.egress.testing import LoopbackServer, TestCA

HOSTS = {
    "api.test": "127.0.0.1",
    "other.test": "127.0.0.1",
    "bad.corp.test": "127.0.0.1",
    "ok.corp.test": "127.0.0.1",
    "ask.test": "127.0.0.1",
    "insp.test": "127.0.0.1",
}

FETCH = """\
import json, os, socket, ssl, sys, urllib.request, urllib.error
def fetch(url, method="GET", data=None, cafile=None):
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https") else None
    req = urllib.request.Request(url, method=method, data=data)
    try:
        r = urllib.request.urlopen(req, timeout=15, context=ctx)
        print("STATUS", r.status, r.read().decode()[:60])
    except urllib.error.HTTPError as e:
        print("STATUS", e.code, e.headers.get("x-glassroom-rule"))
    except OSError as e:
        print("OSERR", type(e).__name__, e)
"""


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    ca = TestCA(["api.test", "other.test", "insp.test", "ask.test"])
    yield ca
    ca.cleanup()


@pytest.fixture(scope="module")
def http_server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def https_server(ca: TestCA) -> Iterator[LoopbackServer]:
    with LoopbackServer(tls=ca) as srv:
        yield srv


#: Backends that must have the egress proxy path (never skipped).
PROXY_BACKENDS = {"namespaces", "gvisor"}


def _has_proxy_path(backend: str) -> bool:
    """A backend without the proxy path must refuse proxy policies, naming the rule."""
    from glassroom import PlanError
    from glassroom.policy import compile, validate_policy

    try:
        compile(validate_policy({"network": {"allow": ["api.test"]}}), backend)
    except PlanError as exc:
        assert exc.rule == "network.allow", exc
        assert backend not in PROXY_BACKENDS, exc
        return False
    return True


@pytest.fixture
def proxy_sandbox(make_sandbox: Any, backend: str) -> Any:
    """``make_sandbox`` for proxy policies; an explicit skip where they are refused."""
    if not _has_proxy_path(backend):
        pytest.skip(f"backend {backend}: no egress proxy path; proxy policies are refused")
    return make_sandbox


def opts(ca: TestCA | None = None, **kw: Any) -> NetworkOptions:
    return NetworkOptions(
        resolver=HostsResolver(HOSTS), upstream_ca=ca.ca_file if ca else None, **kw
    )


def net_records(log: Path, sid: str, event: str = "network.request") -> list[dict[str, Any]]:
    """The sandbox's records of ``event``, once they stop changing (the proxy logs
    from a writer thread; bounded: at most 5 s)."""
    deadline, last, stable_since = time.monotonic() + 5, -1, time.monotonic()
    while True:
        recs = [r for r in records(log, sid) if r["event"] == event]
        now = time.monotonic()
        if len(recs) != last:
            last, stable_since = len(recs), now
        elif (recs and now - stable_since > 0.2) or now > deadline:
            return recs
        time.sleep(0.05)


def one(recs: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    hits = [r for r in recs if all(r["details"].get(k) == v for k, v in match.items())]
    assert len(hits) == 1, f"want one record with {match}, got: " + json.dumps(recs, indent=1)
    return hits[0]


def run_py(sb: Any, body: str, timeout: float = 40) -> Any:
    res = sb.run(["python3", "-c", FETCH + body], timeout_s=timeout)
    assert res.exit_code == 0, res.stderr
    return res


# -- reachability ------------------------------------------------------------------


def test_allowed_host_over_http_and_https(
    proxy_sandbox: Any, audit_log: Path, ca: TestCA, http_server: Any, https_server: Any
) -> None:
    sb = proxy_sandbox({"network": {"allow": ["api.test"]}}, network=opts(ca))
    sb.files.write("/workspace/ca.pem", ca.ca_pem)
    res = run_py(
        sb,
        f"""
print(os.environ["HTTP_PROXY"], os.environ["https_proxy"], os.environ["ALL_PROXY"])
fetch("http://api.test:{http_server.port}/plain")
fetch("https://api.test:{https_server.port}/secure", cafile="/workspace/ca.pem")
""",
    )
    assert "http://127.0.0.1:3128" in res.stdout
    assert "STATUS 200 ok GET /plain" in res.stdout
    assert "STATUS 200 ok GET /secure" in res.stdout
    recs = net_records(audit_log, sb.id)
    plain = one(recs, kind="http", path="/plain")
    assert plain["decision"] == "allow" and plain["rule"] == "network.allow[0]"
    d = plain["details"]
    assert (d["host"], d["port"], d["ip"], d["method"], d["status"]) == (
        "api.test", http_server.port, "127.0.0.1", "GET", 200,
    )  # fmt: skip
    assert d["bytes_down"] > 0 and d["duration_ms"] > 0
    tunnel = one(recs, kind="connect", port=https_server.port)
    assert tunnel["decision"] == "allow" and tunnel["rule"] == "network.allow[0]"
    assert tunnel["details"]["sni"] == "api.test" and tunnel["details"]["ip"] == "127.0.0.1"
    assert tunnel["details"]["bytes_up"] > 0 and tunnel["details"]["bytes_down"] > 0
    if sb._sup.backend == "microvm":  # with a NIC too, QEMU (and its relay) dropped root
        import os

        from glassroom._config import vmm_uid_range

        first, count = vmm_uid_range()
        uid = sb._sup.instance.walls["vmm_uid"]
        assert first <= uid < first + count if os.geteuid() == 0 else uid == os.geteuid()


def test_not_allowed_host_gets_403_naming_the_rule(
    proxy_sandbox: Any, audit_log: Path, http_server: Any
) -> None:
    sb = proxy_sandbox({"network": {"allow": ["api.test"]}}, network=opts())
    before = len(http_server.hits)
    res = run_py(sb, f'fetch("http://other.test:{http_server.port}/nope")')
    assert "STATUS 403 network.allow" in res.stdout
    assert len(http_server.hits) == before  # never reached the server
    rec = one(net_records(audit_log, sb.id), host="other.test")
    assert rec["decision"] == "deny" and rec["rule"] == "network.allow"
    assert rec["details"]["status"] == 403 and rec["details"]["path"] == "/nope"


def test_ip_literals_are_blocked(proxy_sandbox: Any, audit_log: Path, http_server: Any) -> None:
    sb = proxy_sandbox({"network": {"allow": ["api.test"]}}, network=opts())
    res = run_py(
        sb,
        f"""
fetch("http://93.184.216.34:{http_server.port}/literal")
fetch("http://127.0.0.1:{http_server.port}/loop")
fetch("https://[2001:db8::1]:443/v6")
try:
    socket.create_connection(("93.184.216.34", {http_server.port}), timeout=5); print("CONNECTED")
except OSError as e:
    print("DIRECT", e.errno)
""",
    )
    assert "STATUS 403 network.ip-literal" in res.stdout
    assert "STATUS 403 network.internal" in res.stdout
    # ENETUNREACH in the empty netns; gVisor's netstack says EHOSTUNREACH (113).
    assert "CONNECTED" not in res.stdout and (
        "DIRECT 101" in res.stdout or "DIRECT 113" in res.stdout
    )
    recs = net_records(audit_log, sb.id)
    assert one(recs, host="93.184.216.34")["rule"] == "network.ip-literal"
    assert one(recs, host="127.0.0.1")["rule"] == "network.internal"
    assert one(recs, host="2001:db8::1")["decision"] == "deny"
    direct = one(net_records(audit_log, sb.id, "network.direct"), address="93.184.216.34")
    assert direct["decision"] == "deny" and direct["rule"] == "network.direct"
    assert direct["details"]["protocol"] == "tcp" and direct["details"]["port"] == http_server.port


@pytest.mark.parametrize("mode", ["proxy", "none"])
def test_dns_over_udp_53_fails_and_is_logged(
    make_sandbox: Any, audit_log: Path, mode: str, backend: str
) -> None:
    if mode == "proxy" and not _has_proxy_path(backend):
        pytest.skip(f"backend {backend}: no egress proxy path; proxy policies are refused")
    policy = {"network": {"allow": ["api.test"]}} if mode == "proxy" else None
    sb = make_sandbox(policy, network=opts())
    res = run_py(
        sb,
        """
q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x04leak\\x04test\\x00\\x00\\x01\\x00\\x01"
for dest in [("9.9.9.9", 53), ("10.0.0.2", 53)]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(q, dest); print("SENT")
    except OSError as e:
        print("UDP", e.errno)
try:
    socket.getaddrinfo("leak.test", 80); print("RESOLVED")
except socket.gaierror:
    print("NORESOLVE")
""",
    )
    # ENETUNREACH (no route in the netns); gVisor's netstack says EHOSTUNREACH.
    assert res.stdout.count("UDP 101") + res.stdout.count("UDP 113") == 2, res.stdout
    assert "SENT" not in res.stdout
    assert "NORESOLVE" in res.stdout and "RESOLVED" not in res.stdout.replace("NORESOLVE", "")
    direct = net_records(audit_log, sb.id, "network.direct")
    rule = "network.direct" if mode == "proxy" else "network.allow"
    for addr in ("9.9.9.9", "10.0.0.2"):
        rec = one(direct, destination=f"{addr}:53")
        assert rec["decision"] == "deny" and rec["rule"] == rule
        assert rec["details"]["syscall"] == "sendto"
        assert rec["details"].get("protocol", "udp") == "udp"


def test_domain_fronting_is_blocked(
    proxy_sandbox: Any, audit_log: Path, ca: TestCA, http_server: Any, https_server: Any
) -> None:
    """SNI differs from the CONNECT target; Host differs from the URL."""
    sb = proxy_sandbox({"network": {"allow": ["api.test", "other.test"]}}, network=opts(ca))
    sb.files.write("/workspace/ca.pem", ca.ca_pem)
    before = len(https_server.hits)
    res = run_py(
        sb,
        f"""
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(b"CONNECT api.test:{https_server.port} HTTP/1.1\\r\\nHost: api.test:{https_server.port}\\r\\n\\r\\n")
print("TUNNEL", s.recv(100).split(b"\\r\\n")[0].decode())
ctx = ssl.create_default_context(cafile="/workspace/ca.pem")
try:
    t = ctx.wrap_socket(s, server_hostname="other.test")
    t.sendall(b"GET /fronted HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n"); print("GOT", t.recv(100))
except (OSError, ssl.SSLError) as e:
    print("FRONTING-FAILED", type(e).__name__)
s2 = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s2.sendall(b"GET http://api.test:{http_server.port}/hh HTTP/1.1\\r\\nHost: other.test:{http_server.port}\\r\\n\\r\\n")
print("HOSTHDR", s2.recv(200).split(b"\\r\\n")[0].decode())
""",
    )
    assert "TUNNEL HTTP/1.1 200" in res.stdout
    assert "FRONTING-FAILED" in res.stdout and "GOT" not in res.stdout
    assert "HOSTHDR HTTP/1.1 403 Forbidden" in res.stdout
    assert len(https_server.hits) == before
    recs = net_records(audit_log, sb.id)
    sni = one(recs, kind="connect", host="api.test")
    assert sni["decision"] == "deny" and sni["rule"] == "network.sni"
    assert sni["details"]["sni"] == "other.test"
    hh = one(recs, kind="http", path="/hh")
    assert hh["decision"] == "deny" and hh["rule"] == "network.host-header"


def test_deny_beats_allow(proxy_sandbox: Any, audit_log: Path, http_server: Any) -> None:
    sb = proxy_sandbox(
        {"network": {"allow": ["*.corp.test"], "deny": ["bad.corp.test"]}}, network=opts()
    )
    res = run_py(
        sb,
        f"""
fetch("http://ok.corp.test:{http_server.port}/ok")
fetch("http://bad.corp.test:{http_server.port}/bad")
""",
    )
    assert "STATUS 200 ok GET /ok" in res.stdout and "STATUS 403 network.deny[0]" in res.stdout
    recs = net_records(audit_log, sb.id)
    assert one(recs, host="ok.corp.test")["rule"] == "network.allow[0]"
    bad = one(recs, host="bad.corp.test")
    assert bad["decision"] == "deny" and bad["rule"] == "network.deny[0]"


def test_deny_cidr_beats_a_pinned_address(
    proxy_sandbox: Any, audit_log: Path, http_server: Any
) -> None:
    """A deny CIDR applies to the address a name resolves to, even a pinned one."""
    sb = proxy_sandbox(
        {"network": {"allow": ["api.test"], "deny": ["127.0.0.0/8"]}}, network=opts()
    )
    res = run_py(sb, f'fetch("http://api.test:{http_server.port}/x")')
    assert "STATUS 403 network.deny[0]" in res.stdout
    rec = one(net_records(audit_log, sb.id), host="api.test")
    assert rec["rule"] == "network.deny[0]" and rec["details"]["ip"] == "127.0.0.1"


def test_method_and_path_rules_with_tls_inspection(
    proxy_sandbox: Any, audit_log: Path, ca: TestCA, https_server: Any
) -> None:
    policy = {
        "network": {
            "allow": ["insp.test"],
            "rules": [
                {"host": "insp.test", "methods": ["GET"], "paths": ["/repos/*"],
                 "inspect_tls": True},
            ],
        }
    }  # fmt: skip
    sb = proxy_sandbox(policy, network=opts(ca))
    p = https_server.port
    res = run_py(
        sb,
        f"""
print("CA", os.environ["SSL_CERT_FILE"], os.environ["REQUESTS_CA_BUNDLE"], os.environ["NODE_EXTRA_CA_CERTS"])
fetch("https://insp.test:{p}/repos/glassroom")
fetch("https://insp.test:{p}/admin")
fetch("https://insp.test:{p}/repos/glassroom", method="POST", data=b"x")
""",
    )
    assert (
        "CA /.glassroom-net/ca-bundle.pem /.glassroom-net/ca-bundle.pem /.glassroom-net/ca.pem"
        in res.stdout
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("STATUS")]
    assert lines == [
        "STATUS 200 ok GET /repos/glassroom",
        "STATUS 403 network.rules[0]",
        "STATUS 403 network.rules[0]",
    ], res.stdout
    recs = [r for r in net_records(audit_log, sb.id) if r["details"]["kind"] == "https"]
    ok = one(recs, path="/repos/glassroom", method="GET")
    assert ok["decision"] == "allow" and ok["details"]["status"] == 200
    assert ok["details"]["http_rules"] == ["network.rules[0]"] and ok["details"]["inspected"]
    for method, path in (("GET", "/admin"), ("POST", "/repos/glassroom")):
        rec = one(recs, path=path, method=method)
        assert rec["decision"] == "deny" and rec["rule"] == "network.rules[0]"


def test_method_rules_without_inspection_refuse_https(
    proxy_sandbox: Any, audit_log: Path, ca: TestCA, https_server: Any
) -> None:
    """A method/path rule that cannot be seen (no inspect_tls) fails closed on HTTPS."""
    policy = {"network": {"allow": ["insp.test"],
                          "rules": [{"host": "insp.test", "methods": ["GET"]}]}}  # fmt: skip
    sb = proxy_sandbox(policy, network=opts(ca))
    sb.files.write("/workspace/ca.pem", ca.ca_pem)
    res = run_py(sb, f'fetch("https://insp.test:{https_server.port}/", cafile="/workspace/ca.pem")')
    assert "403" in res.stdout or "OSERR" in res.stdout
    rec = one(net_records(audit_log, sb.id), kind="connect")
    assert rec["decision"] == "deny" and rec["rule"] == "network.rules[0]"


# -- approvals -------------------------------------------------------------------


def _approve_from_cli(verb: str, stop: threading.Event, out: list[str]) -> None:
    """Another process decides: poll ``approvals list`` (bounded), then allow/deny."""
    cli = [sys.executable, "-m", "glassroom.interfaces.cli", "approvals"]
    deadline = time.monotonic() + 20
    while not stop.is_set() and time.monotonic() < deadline:
        listed = subprocess.run([*cli, "list", "--json"], capture_output=True, text=True,
                                timeout=30, check=False, env=dict(os.environ))  # fmt: skip
        pending = json.loads(listed.stdout or "[]")
        if pending:
            done = subprocess.run([*cli, verb, pending[0]["id"]], capture_output=True,
                                  text=True, timeout=30, check=False)  # fmt: skip
            out.append(done.stdout + done.stderr)
            return
        time.sleep(0.1)


@pytest.mark.parametrize("verb", ["allow", "deny"])
def test_approval_decided_from_the_cli(
    proxy_sandbox: Any, audit_log: Path, http_server: Any, verb: str
) -> None:
    sb = proxy_sandbox({"network": {"ask": ["ask.test"], "ask_timeout_s": 30}}, network=opts())
    stop, out = threading.Event(), []
    th = threading.Thread(target=_approve_from_cli, args=(verb, stop, out), daemon=True)
    th.start()
    try:
        res = run_py(sb, f'fetch("http://ask.test:{http_server.port}/held")')
    finally:
        stop.set()
        th.join(timeout=30)
    assert out and f": {verb} (by cli:" in out[0], out
    want = "STATUS 200 ok GET /held" if verb == "allow" else "STATUS 403 network.ask[0]"
    assert want in res.stdout
    rec = one(net_records(audit_log, sb.id), path="/held")
    assert rec["decision"] == verb and rec["rule"] == "network.ask[0]"
    assert rec["details"]["approval"]["decision"] == verb
    assert rec["details"]["approval"]["by"].startswith("cli:")


def test_approval_denied_by_sdk_callback(
    proxy_sandbox: Any, audit_log: Path, http_server: Any
) -> None:
    seen: list[Any] = []

    def on_approval(ap: Any) -> bool:
        seen.append(ap)
        return ap.path != "/no"

    sb = proxy_sandbox({"network": {"ask": ["ask.test"]}}, network=opts(on_approval=on_approval))
    res = run_py(
        sb,
        f"""
fetch("http://ask.test:{http_server.port}/yes")
fetch("http://ask.test:{http_server.port}/no")
""",
    )
    assert "STATUS 200 ok GET /yes" in res.stdout and "STATUS 403 network.ask[0]" in res.stdout
    assert [a.path for a in seen] == ["/yes", "/no"] and seen[0].sandbox == sb.id
    recs = net_records(audit_log, sb.id)
    yes, no = one(recs, path="/yes"), one(recs, path="/no")
    assert yes["decision"] == "allow" and yes["details"]["approval"]["by"] == "sdk:callback"
    assert no["decision"] == "deny" and no["rule"] == "network.ask[0]"
    assert no["details"]["approval"] == {"id": no["details"]["approval"]["id"],
                                         "decision": "deny", "by": "sdk:callback"}  # fmt: skip


def test_approval_times_out_to_deny(proxy_sandbox: Any, audit_log: Path, http_server: Any) -> None:
    sb = proxy_sandbox({"network": {"ask": ["ask.test"], "ask_timeout_s": 1.0}}, network=opts())
    t0 = time.monotonic()
    res = run_py(sb, f'fetch("http://ask.test:{http_server.port}/late")')
    assert "STATUS 403 network.ask[0]" in res.stdout
    assert 0.9 < time.monotonic() - t0 < 20
    rec = one(net_records(audit_log, sb.id), path="/late")
    assert rec["decision"] == "deny" and rec["details"]["approval"]["by"] == "timeout"
    assert "timed out" in rec["details"]["reason"]


# -- air gap, teardown -----------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", [None, {"network": {"mode": "none"}}], ids=["empty-allow", "mode-none"]
)
def test_no_network_means_no_proxy(make_sandbox: Any, audit_log: Path, policy: Any) -> None:
    sb = make_sandbox(policy)
    res = run_py(
        sb,
        """
print("PROXYENV", sorted(k for k in os.environ if "PROXY" in k.upper()))
print("NETDIR", os.path.exists("/.glassroom-net"))
try:
    socket.create_connection(("127.0.0.1", 3128), timeout=3); print("LISTENING")
except OSError as e:
    print("NOPROXY", e.errno)
""",
    )
    assert "PROXYENV []" in res.stdout and "NETDIR False" in res.stdout
    assert "NOPROXY 111" in res.stdout  # ECONNREFUSED: nothing listens
    assert not net_records(audit_log, sb.id)


def test_destroy_mid_request_loses_nothing(
    proxy_sandbox: Any, audit_log: Path, http_server: Any
) -> None:
    sb = proxy_sandbox({"network": {"allow": ["api.test"]}}, network=opts())
    done = threading.Event()

    def slow() -> None:
        try:
            sb.run(["python3", "-c", FETCH + f'fetch("http://api.test:{http_server.port}/slow/8")'],
                   timeout_s=30)  # fmt: skip
        except Exception:
            pass
        done.set()

    # The server is shared by the module: wait for THIS sandbox's request.
    seen = sum(h[1] == "/slow/8" for h in list(http_server.hits))
    th = threading.Thread(target=slow, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        sum(h[1] == "/slow/8" for h in list(http_server.hits)) <= seen
    ):
        time.sleep(0.05)
    receipt = sb.destroy()
    th.join(timeout=15)
    assert receipt.clean, receipt.as_dict()
    assert receipt.removed["egress"]["left"] is False
    recs = records(audit_log, sb.id)
    events = [r["event"] for r in recs]
    cut = one([r for r in recs if r["event"] == "network.request"], path="/slow/8")
    assert cut["details"].get("aborted") is True and cut["decision"] == "allow"
    assert events.index("network.request") < events.index("sandbox.destroyed")
