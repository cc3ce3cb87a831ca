"""Inbound HTTP to a port inside a sandbox, through serve (issue 16: E2B's
``get_host``).  See ``interfaces/http/_ports.py``.

Harmless: a server the sandbox runs answers through the relay, on every tier,
by the own API and by E2B's headers and host form, body and status intact.
Malicious: without the sandbox's token, with another sandbox's token or
another tenant's key, the request is refused; a port that only the *host*
listens on is not reachable (the relay connects inside the sandbox); the
caller's credentials never reach the sandbox; a page it serves is fenced off
the API's origin; a malformed answer is a 502.  All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from glassroom.audit import read_records

from .serve_helpers import Server

ECHO = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def _answer(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.path == "/garbage":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            return
        if self.path == "/big":
            self.send_response(200)
            self.send_header("content-length", str(9 << 20))
            self.end_headers()
            for _ in range(9):
                self.wfile.write(b"x" * (1 << 20))
            return
        if self.path.startswith("/evil"):
            self.send_response(302)
            where = self.path[5:].replace("DOT", ".").replace("PCT", "%")
            for k, v in (("Location", where or "http://evil.example/"),
                         ("Refresh", "0; url=http://evil.example/"),
                         ("Clear-Site-Data", '"cookies", "storage"'),
                         ("Access-Control-Allow-Origin", "*"), ("SET-COOKIE", "a=1"),
                         ("Link", "<http://evil.example/x.css>; rel=stylesheet"),
                         ("Content-Security-Policy", "default-src *"),
                         ("X-Content-Type-Options", "nope"), ("NEL", '{"report_to":"x"}'),
                         ("Cache-Control", "public, max-age=31536000"),
                         ("content-length", "0")):
                self.send_header(k, v)
            self.end_headers()
            return
        out = json.dumps({
            "method": self.command, "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.hex(),
        }).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("content-type", "application/json")
        self.send_header("set-cookie", "planted=1; Path=/")
        self.send_header("x-from-sandbox", "yes")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_PUT = do_DELETE = _answer
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
PORT = 8080


def _start_echo(serve: Server, sid: str) -> None:
    """Write and start the echo server inside the sandbox, then wait (bounded)
    until the relay reaches it."""
    e = serve.service._entries[sid]
    e.sb.files.write("/tmp/echo.py", ECHO.encode())
    serve.service.spawn(e, ["python3", "/tmp/echo.py", str(PORT)])
    url = f"{serve.url}/v1/sandboxes/{sid}/ports/{PORT}/ready"
    end = time.monotonic() + 60
    with httpx.Client(headers=serve.headers(), timeout=70) as c:
        for _ in range(200):
            if c.get(url).status_code == 200:
                return
            assert time.monotonic() < end, "the echo server did not come up in 60 s"
            time.sleep(0.3)
    raise AssertionError("the echo server did not come up")


@pytest.fixture
def api(serve: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve.url, headers=serve.headers(), timeout=90) as c:
        yield c


def test_port_relay_on_every_tier(serve: Server, api: httpx.Client, backend: str) -> None:
    r = api.post("/v1/sandboxes", json={"backend": backend, "timeout_s": 300})
    assert r.status_code == 201, r.text
    sid = r.json()["sandbox_id"]
    # the host listens on a port of its own loopback: the sandbox's relay must not reach it
    host_srv = socket.socket()
    host_srv.bind(("127.0.0.1", 0))
    host_srv.listen(1)
    host_port = host_srv.getsockname()[1]
    try:
        _start_echo(serve, sid)
        base = f"/v1/sandboxes/{sid}/ports/{PORT}"
        r = api.post(f"{base}/echo?q=1", content=b"\x00\x01binary\xff")
        assert r.status_code == 201, r.text
        got = r.json()
        assert (got["method"], got["path"]) == ("POST", "/echo?q=1")
        assert bytes.fromhex(got["body"]) == b"\x00\x01binary\xff"
        assert "x-api-key" not in got["headers"], "the tenant's key reached the sandbox"
        assert r.headers["x-from-sandbox"] == "yes"
        assert "set-cookie" not in r.headers
        assert r.headers["content-security-policy"] == "sandbox"

        r = api.get(f"/v1/sandboxes/{sid}/ports/{host_port}/")
        assert r.status_code == 502, r.text
        assert r.json()["error"]["message"].startswith(
            f"nothing answers on port {host_port} in the sandbox"
        )
        host_srv.settimeout(0.5)
        with pytest.raises(TimeoutError):
            host_srv.accept()  # nothing came to the host's port
    finally:
        host_srv.close()
        api.delete(f"/v1/sandboxes/{sid}")
    recs = [r for r in read_records(serve.cfg.audit_log) if r.get("sandbox") == sid]
    ports = [r for r in recs if r.get("event") == "port.request"]
    assert any(p["details"]["status"] == 201 and p["details"]["port"] == PORT for p in ports), ports
    assert any(p["details"]["status"] == 502 for p in ports), ports


@pytest.fixture
def echo_sbx(serve: Server) -> Iterator[Any]:
    e2b = pytest.importorskip("e2b")
    sb = e2b.Sandbox.create(timeout=300)
    try:
        _start_echo(serve, sb.sandbox_id)
        yield sb
    finally:
        sb.kill()


def _token(serve: Server, sid: str) -> str:
    return serve.service._entries[sid].access_token


def test_e2b_headers_and_host_forms(serve: Server, echo_sbx: Any) -> None:
    sid = echo_sbx.sandbox_id
    token = _token(serve, sid)
    with httpx.Client(base_url=serve.url, timeout=60) as c:
        r = c.put(
            "/files?x=1",
            content=gzip.compress(b'{"a": 1}'),
            headers={
                "E2b-Sandbox-Id": sid,
                "E2b-Sandbox-Port": str(PORT),
                "E2b-Traffic-Access-Token": token,
                "Content-Encoding": "gzip",
                "Content-Type": "application/json",
                "Authorization": "Bearer secret-of-the-caller",
            },
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["method"], got["path"]) == ("PUT", "/files?x=1")  # not envd's /files
        assert gzip.decompress(bytes.fromhex(got["body"])) == b'{"a": 1}'  # passed as sent
        assert got["headers"]["content-encoding"] == "gzip"
        for leaked in ("authorization", "e2b-traffic-access-token", "x-access-token"):
            assert leaked not in got["headers"], leaked

        host = echo_sbx.get_host(PORT)
        assert host.startswith(f"{PORT}-{sid}.")
        r = c.get("/by-host", headers={"Host": host, "X-Access-Token": token})
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/by-host"


def test_e2b_port_needs_this_sandboxs_token(serve: Server, echo_sbx: Any) -> None:
    e2b = pytest.importorskip("e2b")
    sid = echo_sbx.sandbox_id
    other = e2b.Sandbox.create(timeout=60)
    try:
        cases = {
            "none": {},
            "wrong": {"E2b-Traffic-Access-Token": "x" * 40},
            "other sandbox's": {"E2b-Traffic-Access-Token": _token(serve, other.sandbox_id)},
            "API key instead": {"X-Access-Token": serve.keys["alice"]},
        }
        with httpx.Client(base_url=serve.url, timeout=60) as c:
            for name, extra in cases.items():
                h = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(PORT), **extra}
                r = c.get("/", headers=h)
                assert r.status_code == 401, (name, r.text)
                assert r.json() == {
                    "code": 401,
                    "message": "missing or wrong sandbox access token",
                }, name
    finally:
        other.kill()


def test_own_api_port_needs_the_owners_key(serve: Server, echo_sbx: Any) -> None:
    sid = echo_sbx.sandbox_id
    url = f"{serve.url}/v1/sandboxes/{sid}/ports/{PORT}/"
    assert httpx.get(url, headers=serve.headers("bob"), timeout=30).status_code == 404
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers=serve.headers("alice"), timeout=30).status_code == 200


def test_bad_ports_and_bad_answers(serve: Server, echo_sbx: Any) -> None:
    sid = echo_sbx.sandbox_id
    with httpx.Client(base_url=serve.url, headers=serve.headers(), timeout=60) as c:
        r = c.get(f"/v1/sandboxes/{sid}/ports/99999/")
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "port 99999 is not a port (1-65535)"
        r = c.get(f"/v1/sandboxes/{sid}/ports/{PORT}/garbage")
        assert r.status_code == 502
        assert "the sandbox's server sent a malformed answer" in r.json()["error"]["message"]
        r = c.get(f"/v1/sandboxes/{sid}/ports/{PORT}/", headers={"Upgrade": "websocket"})
        assert r.status_code == 501
        # the relay still works after all that
        assert c.get(f"/v1/sandboxes/{sid}/ports/{PORT}/ok").status_code == 200
    assert not serve.errors(), serve.errors()


def test_the_relay_serves_concurrent_requests_up_to_its_cap(serve: Server, echo_sbx: Any) -> None:
    sid = echo_sbx.sandbox_id
    url = f"{serve.url}/v1/sandboxes/{sid}/ports/{PORT}/c"
    got: dict[int, tuple[int, str]] = {}

    def one(i: int) -> None:
        r = httpx.get(f"{url}{i}", headers=serve.headers(), timeout=60)
        got[i] = (r.status_code, json.loads(r.content)["path"] if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    ok = {i for i, (code, _) in got.items() if code == 200}
    assert len(ok) >= 4, got  # up to MAX_PER_SANDBOX at once always get through
    for i, (code, text) in got.items():
        if i in ok:
            assert text == f"/c{i}"
        else:  # past the cap: refused, never queued behind the others or dropped
            assert code == 429 and '"rule": "ports.concurrency"' in text, text


def test_review_fixes_hold(serve: Server, echo_sbx: Any) -> None:
    """What an attack review found, each kept out: a Unicode digit as a port,
    a non-ASCII token, percent-decoding of the path, headers that act on the
    service's origin, an absolute redirect, and an answer past the relay cap."""
    sid = echo_sbx.sandbox_id
    with httpx.Client(base_url=serve.url, timeout=60) as c:
        r = c.get("/", headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": b"\xb2"})
        assert 400 <= r.status_code < 500, r.text  # not a port request, and no 500
        h = {"Host": f"{PORT}-{sid}.x", "X-Access-Token": b"\xe9"}
        r = c.get("/", headers=h)
        assert r.status_code == 401, r.text
        assert c.get("/", headers={"Host": "8443-prod.example.com"}).status_code != 401
    with httpx.Client(base_url=serve.url, headers=serve.headers(), timeout=60) as c:
        base = f"/v1/sandboxes/{sid}/ports/{PORT}"
        r = c.get(f"{base}/hdrs/a%3Fb%2F..%2F")
        assert r.json()["path"] == "/hdrs/a%3Fb%2F..%2F"  # as sent, not decoded
        r = c.get(f"{base}/evil")
        assert r.status_code == 302
        for gone in ("location", "refresh", "clear-site-data", "access-control-allow-origin",
                     "set-cookie", "link", "nel"):  # fmt: skip
            assert gone not in r.headers, gone
        assert r.headers["content-security-policy"] == "sandbox"
        r = c.get(f"{base}/evil/inside/the/port")
        # a relative one stays on the port: on the path form, under its prefix
        assert r.headers["location"] == f"/v1/sandboxes/{sid}/ports/{PORT}/inside/the/port"
        # ... so a sandbox cannot send its user's client, key and all, to the API
        r = c.get(f"{base}/evil/v1/sandboxes")
        assert r.headers["location"] == f"/v1/sandboxes/{sid}/ports/{PORT}/v1/sandboxes"
        for sneaky in ("/evil/a/DOTDOT/DOTDOT/DOTDOT/DOTDOT/v1/sandboxes", "/evil/a/PCT2ePCT2e/b"):
            r = c.get(f"{base}{sneaky}")
            assert "location" not in r.headers, sneaky  # dot segments: dropped
        assert r.headers["cache-control"] == "private, no-store"
        assert r.headers.get_list("x-content-type-options") == ["nosniff"]
        r = c.get(f"{base}/big")  # past this template's output cap (1 MiB)
        assert r.status_code == 502
        assert r.json()["error"]["rule"] == "resources.max_output_bytes"
    assert not serve.errors(), serve.errors()


def test_the_relay_caps_answers_below_a_large_output_cap(serve: Server, api: httpx.Client) -> None:
    """code-interpreter-v1 allows 64 MiB of output; a relayed answer is held in
    serve's memory, so it stops at the relay's own 8 MiB."""
    r = api.post("/v1/sandboxes", json={"template": "code-interpreter-v1", "timeout_s": 120})
    assert r.status_code == 201, r.text
    sid = r.json()["sandbox_id"]
    try:
        _start_echo(serve, sid)
        r = api.get(f"/v1/sandboxes/{sid}/ports/{PORT}/big")
        assert r.status_code == 502
        assert "the answer is larger than 8 MiB" in r.json()["error"]["message"]
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_a_policy_without_python3_has_no_relay_and_says_why(
    serve: Server, api: httpx.Client
) -> None:
    """Harmless twin: the tests above, whose policies allow python3.  Here the
    policy allows only sh, so the relay (a python3 program run under the
    sandbox's policy) cannot run: a 403 naming ``tools.allow``, not a vague 502."""
    pol = {"tools": {"allow": ["sh"]}}
    r = api.post("/v1/sandboxes", json={"policy": pol, "timeout_s": 60})
    assert r.status_code == 201, r.text
    sid = r.json()["sandbox_id"]
    try:
        r = api.get(f"/v1/sandboxes/{sid}/ports/{PORT}/")
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["rule"] == "tools.allow"
        assert "runs python3 inside the sandbox" in err["message"]
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
    recs = [r for r in read_records(serve.cfg.audit_log) if r.get("sandbox") == sid]
    assert any(
        r.get("event") == "port.request" and r["details"]["status"] == 403 for r in recs
    ), recs
