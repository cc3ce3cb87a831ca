"""inject = "proxy" as harmless/malicious pairs, on an in-process proxy.

The proxy runs on 127.0.0.1 with a hosts-map resolver and loopback servers
(IPv4 and ``::1``) only.  Each pair checks what the upstream server received,
what came back to the "sandbox" (the test's client) byte for byte, and the
audit record with its rule.  Every request has a timeout; every loop is
bounded.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from glassroom import PolicyError
from glassroom.credentials import Issued, issue
from glassroom.credentials._proxy_inject import header_hook, host_listed
from glassroom.credentials._redact import Redactor, forms
from glassroom.egress import EgressProxy, HostsResolver, PlanDecider, ProxyConfig, SandboxCA
from glassroom.egress.testing import LoopbackServer, RawRecorder, TestCA
from glassroom.policy import compile, parse_policy
from glassroom.policy._credentials import CredentialPolicy
from glassroom.policy._network import parse_entry

SECRET = "s3cr3t/proxy+canary=4f1c9e7d"  # '/', '+', '=': its encoded forms differ
ENV = "GLASSROOM_TEST_PROXY_SECRET"
TIMEOUT = 10


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    with LoopbackServer() as p, LoopbackServer() as q:
        yield p, q


@pytest.fixture(scope="module")
def tls_ca() -> Iterator[TestCA]:
    ca = TestCA(["api.test"])
    yield ca
    ca.cleanup()


class Harness:
    """A proxy for one policy with one proxy credential; records everything."""

    def __init__(self, policy: str, monkeypatch: pytest.MonkeyPatch,
                 ca: TestCA | None = None) -> None:  # fmt: skip
        monkeypatch.setenv(ENV, SECRET)
        pol = parse_policy(policy)
        self.cred: Issued = issue(pol.credentials[0], 0, "sb-test", 600)
        assert self.cred.placeholder is not None
        self.ph = self.cred.placeholder
        self.events: list[tuple[str, dict[str, Any], str, str | None]] = []
        self.records: list[tuple[dict[str, Any], str, str | None]] = []
        c = pol.credentials[0]
        hook = header_hook([self.cred], {c.name: list(c.hosts)}, {c.name: c.header},
                           lambda *e: self.events.append(e))  # fmt: skip
        self.sandbox_ca = SandboxCA("sb-test") if ca else None
        self.proxy = EgressProxy(ProxyConfig(
            "sb-test", PlanDecider(compile(pol).network),
            lambda d, dec, rule: self.records.append((d, dec, rule)),
            resolver=HostsResolver({"api.test": "127.0.0.1", "other.test": "127.0.0.1"}),
            ca=self.sandbox_ca, upstream_ca=ca.ca_file if ca else None, exchange_filter=hook,
        ))  # fmt: skip
        self.proxy.start(tcp=("127.0.0.1", 0))
        assert self.proxy.tcp_address is not None
        self.addr = self.proxy.tcp_address

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(*self.addr, timeout=TIMEOUT)

    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, str, str]:  # fmt: skip
        """(status, response headers as text, body as text), via the proxy."""
        own = conn is None
        c = conn or self.conn()
        try:
            c.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
            c.putheader("Host", url.split("/")[2])
            for k, v in (headers or {}).items():
                c.putheader(k, v)
            c.endheaders()
            r = c.getresponse()
            body = r.read()  # http.client checks Content-Length / chunk framing
            head = f"{r.reason}\n" + "".join(f"{k}: {v}\n" for k, v in r.getheaders())
            return r.status, head, body.decode("latin-1")
        finally:
            if own:
                c.close()

    def events_of(self, event: str) -> list[tuple[dict[str, Any], str, str | None]]:
        self.proxy.flush()
        return [(d, dec, rule) for ev, d, dec, rule in self.events if ev == event]

    def stop(self) -> None:
        self.proxy.stop()


def policy(allow: list[str], hosts: list[str], extra: str = "") -> str:
    q = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    return (f"[network]\nallow = {q(allow)}\n{extra}"
            f'[[credentials]]\nname = "gh"\nsource = "env:{ENV}"\ninject = "proxy"\n'
            f"hosts = {q(hosts)}\n")  # fmt: skip


def auth_seen(srv: LoopbackServer, n: int) -> list[str | None]:
    return [{k.lower(): v for k, v in h.items()}.get("authorization")
            for h in srv.seen_headers[-n:]]  # fmt: skip


@pytest.fixture
def harness_pq(
    servers: tuple[LoopbackServer, LoopbackServer], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Harness]:
    p, q = servers
    h = Harness(policy([f"127.0.0.1:{p.port}", f"127.0.0.1:{q.port}", "other.test"],
                       [f"127.0.0.1:{p.port}"]), monkeypatch)  # fmt: skip
    yield h
    h.stop()


# -- hosts: exact host:port pairs --------------------------------------------------


def test_port_of_a_hosts_entry_is_exact(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    """Twin: port P (listed) gets the value.  Attack: port Q (allowed by
    network.allow, not listed) gets the placeholder, or nothing at all."""
    h, (p, q) = harness_pq, servers
    bearer = {"Authorization": f"Bearer {h.ph}"}
    assert h.request("GET", f"http://127.0.0.1:{p.port}/twin", bearer)[0] == 200
    assert auth_seen(p, 1) == [f"Bearer {SECRET}"]
    assert h.request("GET", f"http://127.0.0.1:{q.port}/steal", bearer)[0] == 200
    assert h.request("GET", f"http://127.0.0.1:{q.port}/bare")[0] == 200
    assert auth_seen(q, 2) == [f"Bearer {h.ph}", None]
    assert all(SECRET not in str(x) for x in q.seen_headers)
    blocked = h.events_of("credential.placeholder_blocked")
    assert [(d["port"], dec, rule) for d, dec, rule in blocked] == [
        (q.port, "deny", "credentials[0].hosts")]  # fmt: skip
    used = h.events_of("credential.used")
    assert [(d["port"], d["path"], rule) for d, _, rule in used] == [
        (p.port, "/twin", "credentials[0]")]  # fmt: skip


def test_nothing_is_added_without_the_placeholder(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    """Twin: the placeholder in Authorization is swapped.  Attack (old
    behaviour): a request without it must not get the header added."""
    h, (p, _q) = harness_pq, servers
    assert h.request("GET", f"http://127.0.0.1:{p.port}/plain")[0] == 200
    assert h.request("GET", f"http://127.0.0.1:{p.port}/asked",
                     {"Authorization": f"Bearer {h.ph}"})[0] == 200  # fmt: skip
    assert auth_seen(p, 2) == [None, f"Bearer {SECRET}"]


def test_placeholder_is_swapped_only_in_the_named_header(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    h, (p, _q) = harness_pq, servers
    sneaky = {"User-Agent": f"x {h.ph}", "Cookie": f"t={h.ph}", "Referer": f"http://x/{h.ph}",
              "X-Anything": h.ph, "Authorization": f"Bearer {h.ph}"}  # fmt: skip
    assert h.request("GET", f"http://127.0.0.1:{p.port}/hdrs", sneaky)[0] == 200
    seen = {k.lower(): v for k, v in p.seen_headers[-1].items()}
    assert seen["authorization"] == f"Bearer {SECRET}"  # twin: the named header
    for name in ("user-agent", "cookie", "referer", "x-anything"):
        assert h.ph in seen[name] and SECRET not in seen[name], name
    blocked = h.events_of("credential.placeholder_blocked")
    assert len(blocked) == 1
    d, dec, rule = blocked[0]
    assert (dec, rule) == ("deny", "credentials[0].header")
    assert d["headers"] == ["cookie", "referer", "user-agent", "x-anything"]


@pytest.mark.parametrize(
    ("entry", "host", "port", "scheme", "listed"),
    [
        ("api.test", "api.test", 443, "https", True),
        ("api.test", "api.test", 80, "http", True),
        ("api.test", "api.test", 80, "https", False),
        ("api.test", "api.test", 443, "http", False),
        ("api.test", "api.test", 8443, "https", False),
        ("api.test:8443", "api.test", 8443, "https", True),
        ("api.test:8443", "api.test", 443, "https", False),
        ("*.api.test", "x.api.test", 443, "https", True),
        ("*.api.test", "api.test", 443, "https", False),
        ("[::1]:8080", "::1", 8080, "http", True),
        ("[::1]:8080", "::1", 8081, "http", False),
        ("[::1]:8080", "0:0:0:0:0:0:0:1", 8080, "http", True),
        ("::1", "::1", 80, "http", True),
        ("127.0.0.1:9", "127.0.0.1", 9, "http", True),
        ("127.0.0.1:9", "localhost", 9, "http", False),
        ("127.0.0.1:9", "127.0.0.2", 9, "http", False),
    ],
)  # fmt: skip
def test_host_listed_table(entry: str, host: str, port: int, scheme: str, listed: bool) -> None:
    assert host_listed([parse_entry(entry)], host, port, scheme) is listed


def test_bracketed_ipv6_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[::1]:P`` gets the value on port P of ::1, and not on ::1's port Q."""
    with LoopbackServer(host="::1") as p, LoopbackServer(host="::1") as q:
        h = Harness(policy([f"[::1]:{p.port}", f"[::1]:{q.port}"], [f"[::1]:{p.port}"]),
                    monkeypatch)  # fmt: skip
        try:
            bearer = {"Authorization": f"Bearer {h.ph}"}
            status, head, body = h.request("GET", f"http://[::1]:{p.port}/echo", bearer)
            assert status == 200 and auth_seen(p, 1) == [f"Bearer {SECRET}"]
            assert SECRET not in head + body and h.ph in body  # echoed, then redacted
            assert h.request("GET", f"http://[::1]:{q.port}/echo", bearer)[0] == 200
            assert auth_seen(q, 1) == [f"Bearer {h.ph}"]
            rules = [r for _, _, r in h.events_of("credential.placeholder_blocked")]
            assert rules == ["credentials[0].hosts"]
        finally:
            h.stop()


# -- the value must not come back ---------------------------------------------------


ECHOES = {
    "content-length": "/echo",
    "chunked-3": "/echo?chunked=3",  # the secret split across chunks
    "chunked-1": "/echo?chunked=1",
    "chunked-17": "/echo?chunked=17",
    "close-delimited": "/echo?close=1",
    "base64": "/echo?b64=1",
    "reason-phrase": "/echo?reason=1",  # the value as the status line's reason
}


@pytest.mark.parametrize("shape", list(ECHOES))
def test_echoed_value_is_redacted(
    shape: str, harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    """Twin: the host really received the value.  Attack: the host echoes it
    (headers and body, in every framing); the sandbox sees the placeholder."""
    h, (p, _q) = harness_pq, servers
    status, head, body = h.request("GET", f"http://127.0.0.1:{p.port}{ECHOES[shape]}",
                                   {"Authorization": f"Bearer {h.ph}"})  # fmt: skip
    assert status == 200
    assert auth_seen(p, 1) == [f"Bearer {SECRET}"]  # twin: it was sent
    assert SECRET not in head + body
    assert f"x-echo-authorization: Bearer {h.ph}" in head
    if shape == "base64":
        assert SECRET.encode() not in base64.b64decode(body)
    else:
        assert f"Bearer {h.ph}" in body
    red = h.events_of("credential.redacted")
    assert len(red) == 1
    d, dec, rule = red[0]
    assert (dec, rule, d["host"], d["count"]) == ("deny", "credentials[0].inject", "127.0.0.1",
                                                  3 if "reason" in shape else 2)  # fmt: skip
    assert SECRET not in repr(h.events) + repr(h.records)


def test_range_cannot_fetch_the_value_a_slice_at_a_time(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    h, (p, _q) = harness_pq, servers
    url = f"http://127.0.0.1:{p.port}/echo"
    # Twin: a Range request that carries no secret is passed on (206).
    assert h.request("GET", url, {"Range": "bytes=0-3"})[0] == 206
    # Attack: slices of the echoed value.  The proxy drops Range: whole body, redacted.
    got = ""
    for start in range(0, 200, 40):
        status, _head, body = h.request("GET", url, {"Authorization": f"Bearer {h.ph}",
                                                     "Range": f"bytes={start}-{start + 39}"})
        assert status == 200
        got += body
    assert SECRET not in got and SECRET[:8] not in got
    assert "range" not in {k.lower() for k in p.seen_headers[-1]}


def test_head_and_keep_alive_are_redacted(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    """Several requests on one kept-alive connection, HEAD among them."""
    h, (p, _q) = harness_pq, servers
    c = h.conn()
    try:
        out = []
        for method, path in (("GET", "/twin"), ("HEAD", "/echo"), ("GET", "/echo?chunked=5"),
                             ("GET", "/echo")):  # fmt: skip
            out.append(h.request(method, f"http://127.0.0.1:{p.port}{path}",
                                 {"Authorization": f"Bearer {h.ph}"}, conn=c))  # fmt: skip
    finally:
        c.close()
    assert [s for s, _, _ in out] == [200, 200, 200, 200]
    assert out[0][2] == "ok GET /twin"
    assert all(SECRET not in hd + b for _, hd, b in out)
    assert auth_seen(p, 4) == [f"Bearer {SECRET}"] * 4
    counts = [d["count"] for d, _, _ in h.events_of("credential.redacted")]
    assert counts == [1, 2, 2]  # HEAD: the header only


def test_stored_value_fetched_later_without_the_placeholder(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    """A host that was sent the value is asked for identity encoding and
    scanned on later requests too, even those that carry no placeholder."""
    h, (p, _q) = harness_pq, servers
    url = f"http://127.0.0.1:{p.port}/echo"
    assert h.request("GET", url, {"Authorization": f"Bearer {h.ph}"})[0] == 200
    status, head, body = h.request("GET", url, {"Accept-Encoding": "gzip", "X-Echo": SECRET})
    assert status == 200 and SECRET not in head + body and h.ph in body
    assert {k.lower(): v for k, v in p.seen_headers[-1].items()}["accept-encoding"] == "identity"


def test_encoded_response_is_refused(
    harness_pq: Harness, servers: tuple[LoopbackServer, LoopbackServer]
) -> None:
    """Twin: gzip passes when no secret is at stake.  Attack: a host that
    gzips the echo although identity was asked for gets a 502, not a pass."""
    h, (p, q) = harness_pq, servers
    status, head, _ = h.request("GET", f"http://127.0.0.1:{q.port}/echo?gzip=1")
    assert status == 200 and "content-encoding: gzip" in head.lower()
    status, head, body = h.request("GET", f"http://127.0.0.1:{p.port}/echo?gzip=1",
                                   {"Authorization": f"Bearer {h.ph}"})  # fmt: skip
    assert status == 502 and "x-glassroom-rule: credentials[0].inject" in head.lower()
    assert "cannot be checked" in body
    h.proxy.flush()
    rec = [r for r in h.records if r[0]["path"] == "/echo?gzip=1" and r[0]["status"] == 502]
    assert [(dec, rule) for _, dec, rule in rec] == [("deny", "credentials[0].inject")]


def test_echo_under_inspect_tls(tls_ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    with LoopbackServer(tls=tls_ca) as srv:
        extra = '[[network.rules]]\nhost = "api.test"\ninspect_tls = true\n'
        h = Harness(policy(["api.test"], [f"api.test:{srv.port}"], extra), monkeypatch, tls_ca)
        try:
            assert h.sandbox_ca is not None
            ctx = ssl.create_default_context(cadata=h.sandbox_ca.pem.decode())
            c = http.client.HTTPSConnection(*h.addr, timeout=TIMEOUT, context=ctx)
            c.set_tunnel("api.test", srv.port)
            c.request("GET", "/echo?chunked=4", headers={"Authorization": f"Bearer {h.ph}"})
            r = c.getresponse()
            body = r.read().decode()
            head = "".join(f"{k}: {v}\n" for k, v in r.getheaders())
            c.close()
            assert r.status == 200 and auth_seen(srv, 1) == [f"Bearer {SECRET}"]
            assert SECRET not in head + body and f"Bearer {h.ph}" in body
            red = h.events_of("credential.redacted")
            assert [(d["host"], d["count"], rule) for d, _, rule in red] == [
                ("api.test", 2, "credentials[0].inject")]  # fmt: skip
        finally:
            h.stop()


def test_absolute_target_in_a_tls_tunnel_is_refused(
    tls_ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twin: ``GET /echo`` in an inspected tunnel gets the value.  Attack:
    ``GET http://other.test/echo`` in the same tunnel names another authority,
    which the upstream must prefer to Host (a shared front end would route the
    value there): refused before anything goes upstream."""
    with LoopbackServer(tls=tls_ca) as srv:
        extra = '[[network.rules]]\nhost = "api.test"\ninspect_tls = true\n'
        h = Harness(policy(["api.test"], [f"api.test:{srv.port}"], extra), monkeypatch, tls_ca)
        try:
            assert h.sandbox_ca is not None
            ctx = ssl.create_default_context(cadata=h.sandbox_ca.pem.decode())
            got = []
            for target in ("/echo", "http://other.test/echo", "other.test:443"):
                c = http.client.HTTPSConnection(*h.addr, timeout=TIMEOUT, context=ctx)
                c.set_tunnel("api.test", srv.port)
                c.request("GET", target, headers={"Authorization": f"Bearer {h.ph}"})
                r = c.getresponse()
                got.append((r.status, r.getheader("x-glassroom-rule"), r.read()))
                c.close()
            assert got[0][0] == 200 and got[1][:2] == got[2][:2] == (400, "network.host-header")
            assert [path for _, path, _ in srv.hits] == ["/echo"]
            assert auth_seen(srv, 1) == [f"Bearer {SECRET}"]
            assert len(h.events_of("credential.used")) == 1
            refused = [(d["path"], dec, rule) for d, dec, rule in h.records
                       if d["kind"] == "https" and d["status"] == 400]  # fmt: skip
            assert refused == [("http://other.test/echo", "deny", "network.host-header"),
                               ("other.test:443", "deny", "network.host-header")]  # fmt: skip
        finally:
            h.stop()


def test_request_with_both_lengths_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twin: a chunked POST carrying the value goes out.  Attack: Content-Length
    and Transfer-Encoding together: h11 frames by chunked, an upstream that
    frames by Content-Length would take the rest of the body for a second
    request of the sandbox's making (request smuggling)."""
    with RawRecorder(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok") as rec:
        h = Harness(policy([f"127.0.0.1:{rec.port}"], [f"127.0.0.1:{rec.port}"]), monkeypatch)
        try:
            a = f"127.0.0.1:{rec.port}"
            head = (f"POST http://{a}/up HTTP/1.1\r\nHost: {a}\r\n"
                    f"Authorization: Bearer {h.ph}\r\nTransfer-Encoding: chunked\r\n")  # fmt: skip
            smuggled = f"GET /smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n".encode()
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
            answers = []
            for extra in ("", "Content-Length: 5\r\n"):
                s = socket.create_connection(h.addr, timeout=TIMEOUT)
                s.sendall(head.encode() + extra.encode() + b"\r\n" + body)
                got = b""
                for _ in range(20):  # the end of the body may come in a later write
                    data = s.recv(4096)
                    got += data
                    top, _, rest = got.partition(b"\r\n\r\n")
                    size = top.lower().partition(b"content-length: ")[2].split(b"\r")[0]
                    if not data or (size and len(rest) >= int(size)):
                        break
                answers.append(got)
                s.close()
            assert answers[0].startswith(b"HTTP/1.1 200 ") and answers[0].endswith(b"ok")
            assert answers[1].startswith(b"HTTP/1.1 400 ")
            assert b"both Content-Length and Transfer-Encoding" in answers[1]
            time.sleep(0.3)
            sent = b"".join(bytes(c) for c in rec.conns)
            assert sent.count(b"POST /up ") == 1 and f"Bearer {SECRET}".encode() in sent
            assert b"content-length: 5" not in sent.lower()
            h.proxy.flush()
            assert [(d["status"], dec) for d, dec, _ in h.records] == [(200, "allow"),
                                                                       (400, "deny")]  # fmt: skip
        finally:
            h.stop()


def test_value_in_another_case_header_name_and_tiny_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: a host that returns the value upper-cased, in UTF-16, as a
    header *name* (h11 lowers names, so the bytes the sandbox gets are not the
    value's), and in a body of one-byte chunks.  Twin: the rest of the
    response reaches the sandbox unchanged."""
    v = SECRET.encode()
    name = b"x-" + base64.urlsafe_b64encode(v)[:37]  # a header token; h11 lowers it
    chunks = v.upper() + b" twin " + SECRET.encode("utf-16-le") + b" " + v
    body = b"".join(b"1\r\n%c\r\n" % c for c in chunks) + b"0\r\n\r\n"
    answer = (b"HTTP/1.1 200 OK\r\n" + name + b": 1\r\nx-up: " + v.upper()
              + b"\r\ntransfer-encoding: chunked\r\n\r\n" + body)  # fmt: skip
    with RawRecorder(answer) as rec:
        h = Harness(policy([f"127.0.0.1:{rec.port}"], [f"127.0.0.1:{rec.port}"]), monkeypatch)
        try:
            status, head, text = h.request("GET", f"http://127.0.0.1:{rec.port}/x",
                                           {"Authorization": f"Bearer {h.ph}"})  # fmt: skip
            assert status == 200 and len(text) == len(chunks)
            out = (head + text).encode("latin-1")
            assert v not in out.lower() and base64.urlsafe_b64encode(v)[:37].lower() not in out
            assert SECRET.encode("utf-16-le") not in out.lower()
            assert b" twin " in out and b"x-up: " in out  # twin
            red = h.events_of("credential.redacted")
            assert [(d["in_headers"], d["in_body"], dec, rule) for d, dec, rule in red] == [
                (2, 3, "deny", "credentials[0].inject")]  # fmt: skip
        finally:
            h.stop()


def test_refusal_of_an_encoded_response_does_not_quote_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: a host that reflects the value into Content-Encoding.  The
    refusal (502) quotes the encoding to the sandbox and to the audit log:
    redacted there too.  Twin: the refusal and its rule are as usual."""
    answer = (b"HTTP/1.1 200 OK\r\ncontent-encoding: x-" + SECRET.encode()
              + b"\r\ncontent-length: 2\r\n\r\nok")  # fmt: skip
    with RawRecorder(answer) as rec:
        h = Harness(policy([f"127.0.0.1:{rec.port}"], [f"127.0.0.1:{rec.port}"]), monkeypatch)
        try:
            status, head, body = h.request("GET", f"http://127.0.0.1:{rec.port}/x",
                                           {"Authorization": f"Bearer {h.ph}"})  # fmt: skip
            assert status == 502 and "x-glassroom-rule: credentials[0].inject" in head.lower()
            assert SECRET not in head + body and f"x-{h.ph}" in body
            h.proxy.flush()
            assert SECRET not in repr(h.records) + repr(h.events)
            assert [(dec, rule) for d, dec, rule in h.records if d["status"] == 502] == [
                ("deny", "credentials[0].inject")]  # fmt: skip
        finally:
            h.stop()


# -- the redactor itself --------------------------------------------------------------


def test_redactor_every_split_point_and_form() -> None:
    value, ph = SECRET.encode(), b"glsr-" + b"p" * (len(SECRET) - 5)
    pairs = forms(value, ph, 0)
    texts = [b"a " + value + b" b", b"q=" + http.client.parse_headers.__name__.encode(),
             b"x%s" % value.replace(b"/", b"%2F").replace(b"+", b"%2B").replace(b"=", b"%3D"),
             b"auth=" + base64.b64encode(b"user:" + value) + b";",
             b"k " + base64.urlsafe_b64encode(b"xy" + value + b"z"),
             b'{"a": "' + value.replace(b"/", b"\\/") + b'"}', b"h " + value.hex().encode()]
    for text in texts:
        for cut in range(len(text) + 1):
            r = Redactor(pairs)
            out = r.feed(text[:cut]) + r.feed(text[cut:]) + r.end()
            assert len(out) == len(text)
            assert value not in out and value.hex().encode() not in out
            assert base64.b64encode(value)[4:-4] not in out
    r = Redactor(pairs)
    out = b"".join(r.feed(bytes([c])) for c in texts[0]) + r.end()
    assert out == b"a " + ph + b" b" and r.counts[0] == 1


def test_redactor_case_charset_and_escape_forms() -> None:
    """Forms a server produces without being asked: another case, UTF-16/7,
    HTML entities and other per-character escapes of some of the value's
    punctuation, quoted-printable.  Twin: a near miss is left alone."""
    value, ph = SECRET.encode(), b"glsr-" + b"p" * (len(SECRET) - 5)
    esc = lambda fmt, chars: "".join(fmt.format(ord(c)) if c in chars else c  # noqa: E731
                                     for c in SECRET).encode()  # fmt: skip
    texts = [value.upper(), value.replace(b"c", b"C"), value.hex().upper().encode(),
             SECRET.encode("utf-16-le"), SECRET.encode("utf-16-be"),
             esc("&#x{:X};", "+"), esc("&#{:d};", "+"), esc("&#x{:x};", "/+="),
             esc("\\u{:04X}", "/"), esc("\\x{:02x}", "+="), esc("={:02X}", "="),
             esc("%{:02x}", "/="), esc("%{:02X}", "+"), SECRET.encode("utf-7")]  # fmt: skip
    for text in texts:
        for cut in range(0, len(text) + 1, 3):
            r = Redactor(forms(value, ph, 0))
            out = r.feed(b"<" + text[:cut]) + r.feed(text[cut:] + b">") + r.end()
            assert len(out) == len(text) + 2 and out != b"<" + text + b">", text
            assert r.counts[0] == 1, text
    near = SECRET[:-1].encode() + b"X"
    r = Redactor(forms(value, ph, 0))
    assert r.feed(near) + r.end() == near and not r.counts


def test_placeholder_is_as_long_as_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    cred = CredentialPolicy(name="gh", source=f"env:{ENV}", inject="proxy", hosts=["a.test"])
    ph = issue(cred, 0, "sb-x", 60).placeholder
    assert ph is not None and ph.startswith("glsr-") and len(ph) == len(SECRET) and ph != SECRET
    monkeypatch.setenv(ENV, "short")
    from glassroom import CredentialError

    with pytest.raises(CredentialError, match=r"credentials\[0\]: a proxy credential must be"):
        issue(cred, 0, "sb-x", 60)


# -- policy: hosts are validated like network entries -----------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("http://127.0.0.1:9/path", "'http://127.0.0.1:9/path': write a host, not a URL"),
        ("*", "'*' would allow the whole network"),
        ("127.0.0.1:99999", "'127.0.0.1:99999': the port must be 1..65535"),
        ("*.com", "'*.com' matches a whole top-level domain"),
        ("10.0.0.0/8", "'10.0.0.0/8': a credential goes to named hosts or addresses"),
        ("[::1", "'[::1': unclosed '['"),
        ("a b", "'a b' is not a valid host name"),
    ],
)
def test_hosts_entries_refused_with_file_and_line(entry: str, message: str) -> None:
    text = (f'[network]\nallow = ["a.test"]\n[[credentials]]\nname = "gh"\n'
            f'source = "env:X"\ninject = "proxy"\nhosts = [\n  "a.test",\n  "{entry}",\n]\n')
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, source="p.toml")
    assert str(exc.value).startswith(f"p.toml:9: credentials[0].hosts[1]: {message}"), exc.value
    # The same parser, the same words, as a network.allow entry.
    if "CIDR" not in message and "credential" not in message:
        with pytest.raises(PolicyError) as net:
            parse_policy(f'[network]\nallow = ["{entry}"]\n', source="p.toml")
        assert message in str(net.value)
    # Twin: valid entries pass.
    parse_policy(text.replace(f'"{entry}"', '"[::1]:8443"'), source="p.toml")


@pytest.mark.parametrize("header", ["Host: {secret}", "Content-Length: {secret}",
                                    "Bad Name: {secret}", "Authorization: Bearer"])
def test_header_template_refused(header: str) -> None:
    text = (f'[network]\nallow = ["a.test"]\n[[credentials]]\nname = "gh"\nsource = "env:X"\n'
            f'inject = "proxy"\nhosts = ["a.test"]\nheader = "{header}"\n')
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, source="p.toml")
    assert str(exc.value).startswith("p.toml:8: credentials[0].header: "), exc.value


# -- a tunnel that is not TLS is cut, whatever follows the first record ---------------------


def client_hello(sni: str = "api.test") -> bytes:
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def tunnel(addr: tuple[str, int], port: int, pieces: list[bytes]) -> bytes:
    """CONNECT, then send each piece (a short pause between); what came back."""
    s = socket.create_connection(addr, timeout=TIMEOUT)
    try:
        s.sendall(f"CONNECT api.test:{port} HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n".encode())
        assert b" 200 " in s.recv(200)
        for piece in pieces:
            try:
                s.sendall(piece)
            except OSError:
                break
            time.sleep(0.2)
        s.settimeout(2)
        back = b""
        for _ in range(20):
            try:
                data = s.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                break
            back += data
        return back
    finally:
        s.close()


APP_RECORD = b"\x17\x03\x03\x00\x10" + b"TWIN-OK-RECORD!!"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n"


BAD_TAILS = {
    "hello+plaintext": ([SMUGGLED], "client: record type 71 is not TLS"),
    "hello+record+plaintext": ([APP_RECORD, SMUGGLED], "client: record type 71"),
    "heartbeat": ([b"\x18\x03\x03\x00\x05hello"], "client: record type 24"),
    "oversized": ([b"\x17\x03\x03\xff\xff" + SMUGGLED], "longer than TLS allows"),
    "ssl3": ([b"\x17\x03\x00\x00\x05hello"], "version 3.0"),
}


@pytest.mark.parametrize("case", [*BAD_TAILS, "padded-hello", "glued"])
def test_tunnel_not_tls_after_the_hello_is_cut(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twin: a ClientHello and a well-framed record reach the server.  Attack:
    whatever follows the hello that is not a TLS record cuts the tunnel, and
    not one byte of it goes upstream."""
    rec = RawRecorder()
    h = Harness(policy(["api.test"], ["api.test"]), monkeypatch)
    try:
        hello = client_hello()
        tunnel(h.addr, rec.port, [hello, APP_RECORD])
        for _ in range(30):
            if rec.conns and bytes(rec.conns[-1]) == hello + APP_RECORD:
                break
            time.sleep(0.1)
        assert bytes(rec.conns[-1]) == hello + APP_RECORD
        h.proxy.flush()
        assert [(d["kind"], dec) for d, dec, _ in h.records] == [("connect", "allow")]
        before = len(rec.conns)
        hello = client_hello()
        if case == "padded-hello":  # bytes after the ClientHello inside its own record
            body = hello[5:] + SMUGGLED
            pieces, good, why = ([hello[:3] + len(body).to_bytes(2, "big") + body], b"",
                                 "more than the ClientHello")  # fmt: skip
        elif case == "glued":  # hello and plaintext in one write
            pieces, good, why = [hello + SMUGGLED], b"", "client: record type 71"
        else:
            tail, why = BAD_TAILS[case]
            pieces = [hello, *tail]
            good = hello + (APP_RECORD if APP_RECORD in tail else b"")
        tunnel(h.addr, rec.port, pieces)
        time.sleep(0.3)
        sent = b"".join(bytes(c) for c in rec.conns[before:])
        assert good.startswith(sent), sent[-60:]
        assert b"smuggled" not in sent and b"hello" not in sent
        h.proxy.flush()
        d, dec, rule = h.records[-1]
        assert (d["kind"], dec, rule) == ("connect", "deny", "network.sni")
        assert "not TLS" in d["reason"] and why in d["reason"], d["reason"]
    finally:
        h.stop()
        rec.close()


def test_tunnel_to_a_server_that_is_not_tls_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = RawRecorder(answer=b"HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\n\r\nnope")
    h = Harness(policy(["api.test"], ["api.test"]), monkeypatch)
    try:
        back = tunnel(h.addr, rec.port, [client_hello()])
        assert b"HTTP/1.1 400" not in back and back == b""
        h.proxy.flush()
        d, dec, rule = h.records[-1]
        assert (dec, rule) == ("deny", "network.sni") and "server:" in d["reason"]
    finally:
        h.stop()
        rec.close()
