"""The egress proxy's anti-bypass rules, each as a harmless/malicious pair.

The proxy runs on 127.0.0.1 (TCP) in-process, with a hosts-map resolver and
loopback servers only; no sandbox is needed to show these rules.  Every
request has a timeout and every loop is bounded.
"""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from glassroom.egress import EgressProxy, HostsResolver, PlanDecider, ProxyConfig, Request
from glassroom.egress._decide import host_addresses, internal_reason
from glassroom.egress._tls import NotTLS, client_hello_length, parse_sni
from glassroom.egress.testing import LoopbackServer, TestCA
from glassroom.policy import compile, parse_policy

PROXIES: list[EgressProxy] = []


class Untrusted(HostsResolver):
    """A resolver whose answers are NOT the operator's: like real DNS."""

    def __init__(self, hosts: dict[str, str]) -> None:
        super().__init__(hosts, trusted=False)


def make_proxy(policy: str, resolver: Any, ca: TestCA | None = None) -> tuple[EgressProxy, list]:
    recs: list[tuple[dict[str, Any], str, str | None]] = []
    plan = compile(parse_policy(policy)).network
    proxy = EgressProxy(ProxyConfig(
        "sb-test", PlanDecider(plan), lambda d, dec, rule: recs.append((d, dec, rule)),
        resolver=resolver, upstream_ca=ca.ca_file if ca else None, ask_timeout_s=1,
    ))  # fmt: skip
    proxy.start(tcp=("127.0.0.1", 0))
    PROXIES.append(proxy)
    return proxy, recs


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def tls_ca() -> Iterator[TestCA]:
    ca = TestCA(["a.test", "b.test"])
    yield ca
    ca.cleanup()


@pytest.fixture(scope="module")
def tls_server(tls_ca: TestCA) -> Iterator[LoopbackServer]:
    with LoopbackServer(tls=tls_ca) as srv:
        yield srv


def get(proxy: EgressProxy, url: str) -> int:
    assert proxy.tcp_address is not None
    host, port = proxy.tcp_address
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": f"http://{host}:{port}"})
    )
    try:
        return int(opener.open(url, timeout=10).status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def connect(proxy: EgressProxy, target: str, sni: str | None, ca: TestCA) -> str:
    """CONNECT ``target`` then TLS with ``sni``; 'ok <status>' or the failure."""
    assert proxy.tcp_address is not None
    s = socket.create_connection(proxy.tcp_address, timeout=10)
    try:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = s.recv(200).split(b"\r\n")[0].decode()
        if " 200 " not in head + " ":
            return head
        ctx = ssl.create_default_context(cafile=ca.ca_file)
        if sni is None:
            ctx.check_hostname = False
        try:
            t = ctx.wrap_socket(s, server_hostname=sni)
            t.sendall(f"GET /t HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
            return "ok " + t.recv(100).split(b"\r\n")[0].decode()
        except (OSError, ssl.SSLError) as e:
            return f"failed {type(e).__name__}"
    finally:
        s.close()


def last(recs: list, **match: Any) -> tuple[dict[str, Any], str, str | None]:
    for p in list(PROXIES):
        p.flush()
    hits = [r for r in recs if all(r[0].get(k) == v for k, v in match.items())]
    assert hits, recs
    return hits[-1]


# -- anti-rebinding and internal ranges -------------------------------------------------


def test_a_name_resolving_to_loopback_is_refused(server: LoopbackServer) -> None:
    """Rebinding: an allowed name whose DNS answer is internal gets nowhere."""
    pinned, _ = make_proxy('[network]\nallow=["a.test"]', HostsResolver({"a.test": "127.0.0.1"}))
    rebound, recs = make_proxy('[network]\nallow=["a.test"]', Untrusted({"a.test": "127.0.0.1"}))
    try:
        before = len(server.hits)
        assert get(pinned, f"http://a.test:{server.port}/pinned") == 200  # twin
        assert get(rebound, f"http://a.test:{server.port}/rebound") == 403
        assert [h[1] for h in server.hits[before:]] == ["/pinned"]
        d, dec, rule = last(recs, path="/rebound")
        assert (dec, rule, d["ip"]) == ("deny", "network.internal", "127.0.0.1")
    finally:
        pinned.stop()
        rebound.stop()


def test_internal_address_allowed_explicitly_by_address(server: LoopbackServer) -> None:
    proxy, recs = make_proxy(
        f'[network]\nallow=["a.test", "127.0.0.1:{server.port}"]',
        Untrusted({"a.test": "127.0.0.1"}),
    )
    try:
        assert get(proxy, f"http://a.test:{server.port}/named") == 200
        assert get(proxy, f"http://127.0.0.1:{server.port}/literal") == 200
        assert (
            get(proxy, f"http://127.0.0.1:{server.port + 1 if server.port < 65535 else 1}/") == 403
        )
        assert last(recs, path="/literal")[2] == "network.allow[1]"
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    "ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
           "100.64.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "0.0.0.0"],
)  # fmt: skip
def test_internal_ranges(ip: str) -> None:
    import ipaddress

    assert internal_reason(ipaddress.ip_address(ip)) is not None
    assert internal_reason(ipaddress.ip_address("93.184.216.34")) is None  # twin


def test_host_own_addresses_are_internal() -> None:
    own = host_addresses()
    assert own, "no host address found"
    for addr in own:
        assert internal_reason(addr) is not None


def test_metadata_literal_is_refused(server: LoopbackServer) -> None:
    proxy, recs = make_proxy('[network]\nallow=["a.test"]', HostsResolver({"a.test": "127.0.0.1"}))
    try:
        assert get(proxy, "http://169.254.169.254/latest/meta-data/") == 403
        d, dec, rule = last(recs, host="169.254.169.254")
        assert (dec, rule) == ("deny", "network.internal") and "metadata" in d["reason"]
    finally:
        proxy.stop()


# -- SNI, Host, not-TLS --------------------------------------------------------------


def test_connect_sni_must_match(tls_ca: TestCA, tls_server: LoopbackServer) -> None:
    proxy, recs = make_proxy(
        '[network]\nallow=["a.test", "b.test"]',
        HostsResolver({"a.test": "127.0.0.1", "b.test": "127.0.0.1"}),
    )
    try:
        target = f"a.test:{tls_server.port}"
        assert connect(proxy, target, "a.test", tls_ca) == "ok HTTP/1.1 200 OK"  # twin
        assert connect(proxy, target, "b.test", tls_ca).startswith("failed")
        d, dec, rule = last(recs, sni="b.test")
        assert (dec, rule, d["host"]) == ("deny", "network.sni", "a.test")
        assert connect(proxy, target, None, tls_ca).startswith("failed")  # no SNI
        assert last(recs, sni=None, host="a.test")[2] == "network.sni"
    finally:
        proxy.stop()


def test_tunnel_that_is_not_tls_is_cut(server: LoopbackServer) -> None:
    proxy, recs = make_proxy('[network]\nallow=["a.test"]', HostsResolver({"a.test": "127.0.0.1"}))
    try:
        assert proxy.tcp_address is not None
        s = socket.create_connection(proxy.tcp_address, timeout=10)
        s.sendall(f"CONNECT a.test:{server.port} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
        assert b" 200 " in s.recv(200)
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        assert s.recv(100) == b""  # closed, nothing forwarded
        s.close()
        proxy.stop()
        d, dec, rule = last(recs, kind="connect")
        assert (dec, rule) == ("deny", "network.sni") and "not TLS" in d["reason"]
    finally:
        proxy.stop()


def test_plain_http_host_header_must_match(server: LoopbackServer) -> None:
    proxy, recs = make_proxy(
        '[network]\nallow=["a.test", "b.test"]',
        HostsResolver({"a.test": "127.0.0.1", "b.test": "127.0.0.1"}),
    )
    try:
        assert proxy.tcp_address is not None
        for host, want in ((f"a.test:{server.port}", b" 200 "), ("b.test", b" 403 ")):
            s = socket.create_connection(proxy.tcp_address, timeout=10)
            s.sendall(f"GET http://a.test:{server.port}/h HTTP/1.1\r\nHost: {host}\r\n"
                      "Connection: close\r\n\r\n".encode())  # fmt: skip
            assert want in s.recv(200)
            s.close()
        assert last(recs, path="/h", status=200)[2] == "network.allow[0]"
        assert last(recs, path="/h", status=403)[2] == "network.host-header"
    finally:
        proxy.stop()


def test_clienthello_parsing() -> None:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="api.example.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    assert client_hello_length(hello) == len(hello)
    assert client_hello_length(hello[:20]) == len(hello)  # known from the record header
    assert client_hello_length(hello[:4]) is None
    assert parse_sni(hello) == "api.example.test"
    with pytest.raises(NotTLS):
        client_hello_length(b"GET / HTTP/1.1\r\n")


# -- decisions ------------------------------------------------------------------------


def test_decider_table() -> None:
    plan = compile(parse_policy(
        '[network]\nallow=["pypi.org", "*.pythonhosted.org", "api.github.com:443"]\n'
        'deny=["169.254.0.0/16", "evil.example.com"]\nask=["*.example.org"]\n'
        '[[network.rules]]\nhost="api.github.com"\nmethods=["GET"]\npaths=["/repos/*"]\n'
        'inspect_tls=true\n'
    )).network  # fmt: skip
    d = PlanDecider(plan)

    def act(
        host: str, port: int = 443, method: str | None = None, path: str | None = None
    ) -> tuple[str, str]:
        r = d.decide(Request(host, port, "https", method, path))
        return r.action, r.rule

    assert act("pypi.org") == ("allow", "network.allow[0]")
    assert act("files.pythonhosted.org") == ("allow", "network.allow[1]")
    assert act("pythonhosted.org") == ("deny", "network.allow")  # "*." is strictly beneath
    assert act("api.github.com", 80) == ("deny", "network.allow")  # port-scoped
    assert act("x.example.org") == ("ask", "network.ask[0]")
    assert act("evil.example.com") == ("deny", "network.deny[1]")
    assert act("api.github.com", 443, "GET", "/repos/x") == ("allow", "network.allow[2]")
    assert act("api.github.com", 443, "DELETE", "/repos/x") == ("deny", "network.rules[0]")
    assert act("api.github.com", 443, "GET", "/user") == ("deny", "network.rules[0]")
    assert d.decide(Request("api.github.com", 443, "https")).inspect_tls
    assert d.check_address(Request("pypi.org", 443, "https"), "169.254.1.1", True).rule == (
        "network.deny[0]"
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('allow = ["*"]', "network.allow[0]: '*' would allow the whole network"),
        ('allow = ["*.com"]', "network.allow[0]: '*.com' matches a whole top-level domain"),
        ('allow = ["a.*.com"]', "network.allow[0]: 'a.*.com': '*' is only allowed"),
        ('deny = ["http://x.com"]', "network.deny[0]: 'http://x.com': write a host, not a URL"),
        ('ask = ["x.com:0"]', "network.ask[0]: 'x.com:0': the port must be 1..65535"),
        (
            'allow = ["10.0.0.0/8"]',
            "network.allow[0]: '10.0.0.0/8': a CIDR block may only be denied",
        ),
        ('mode = "none"\nallow = ["x.com"]', "network.allow[0]: mode 'none' means no network"),
        (
            'allow = ["x.com"]\n[[network.rules]]\nhost = "y.com"',
            "network.rules[0].host: 'y.com' is not admitted by allow or ask",
        ),
    ],
)
def test_policy_refusals_carry_file_and_line(toml: str, message: str) -> None:
    from glassroom import PolicyError as PE

    with pytest.raises(PE) as exc:
        parse_policy("[network]\n" + toml, source="p.toml")
    assert str(exc.value).startswith(f"p.toml:{1 + toml.count(chr(10)) + 1}: {message}") or str(
        exc.value
    ).startswith("p.toml:2: " + message), str(exc.value)


def test_maximum_risk_is_air_gapped() -> None:
    from glassroom import PolicyError as PE

    with pytest.raises(PE, match="air-gapped"):
        parse_policy('risk = "maximum"\n[network]\nallow = ["pypi.org"]')


def test_header_hook_sees_allowed_requests_only(server: LoopbackServer) -> None:
    seen: list[tuple[str, str | None]] = []

    def hook(req: Request, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        seen.append((req.host, req.path))
        return headers

    plan = compile(parse_policy('[network]\nallow=["a.test"]')).network
    proxy = EgressProxy(ProxyConfig(
        "sb-hook", PlanDecider(plan), lambda *a: None, rewrite_headers=hook,
        resolver=HostsResolver({"a.test": "127.0.0.1", "b.test": "127.0.0.1"}),
    ))  # fmt: skip
    proxy.start(tcp=("127.0.0.1", 0))
    try:
        assert get(proxy, f"http://a.test:{server.port}/hooked") == 200
        assert get(proxy, f"http://b.test:{server.port}/refused") == 403
        assert seen == [("a.test", "/hooked")]
    finally:
        proxy.stop()


NET_ATTEMPTS = ["egress-unauthorized", "dns-exfiltration", "metadata-endpoint", "direct-socket"]


@pytest.mark.parametrize("name", NET_ATTEMPTS)
def test_network_drill_attempt(name: str, tmp_path: Any) -> None:
    """The drill's four network attempts on the namespaces tier: twin works,
    attack blocked, and a deny record names the expected rule."""
    from glassroom.audit import verify
    from glassroom.drill import _one
    from glassroom.drill._network import network_attempts, setup_net
    from glassroom.policy import default_policy

    net, cleanup = setup_net()
    try:
        att = next(a for a in network_attempts(net) if a.name == name)
        log = tmp_path / "audit.jsonl"
        res = _one(att, default_policy(), "namespaces", log, None)
    finally:
        cleanup()
    assert res.twin_ok, f"harmless twin of {name} failed: {res.detail}"
    assert res.blocked, f"{name} was NOT blocked: {res.detail}"
    assert res.audited, f"{name}: no deny record with rule {att.rule}"
    assert verify(log).ok
