"""The web console end to end, in headless Debian chromium driven by Selenium.

Only loopback: the test's own ``glassroom serve`` on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from glassroom.audit import read_records
from glassroom.egress import HostsResolver, NetworkOptions
from glassroom.egress.testing import LoopbackServer

from .serve_helpers import Server, start_server

ART = Path(os.environ.get("GLASSROOM_ARTIFACTS") or Path(__file__).parents[2] / ".artifacts")
SHOTS = ART / "console"
FETCH = """\
import urllib.request
r = urllib.request.urlopen("http://ask.test:{port}/held", timeout=50)
print("STATUS", r.status)
"""
XSS = "<img src=x onerror=window.__pwned=1><script>window.__pwned=1</script>"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s, server, th = start_server(tmp_path_factory.mktemp("console"))
    yield s
    server.should_exit = True
    th.join(20)
    s.service.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    # Chromium runs as root here, where its own sandbox cannot start; without it
    # is acceptable because the browser loads only this test's loopback pages.
    for a in (
        "--no-sandbox",
        "--headless=new",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        opts.add_argument(a)
    # An explicit driver path: selenium-manager never downloads anything.
    d = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    d.set_page_load_timeout(20)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield d
    d.quit()


def shot(d: webdriver.Chrome, name: str) -> None:
    p = SHOTS / f"{name}.png"
    d.save_screenshot(str(p))
    print("screenshot:", p)


def wait_text(d: webdriver.Chrome, css: str, text: str, timeout: float = 15) -> None:
    WebDriverWait(d, timeout).until(
        lambda _: any(text in e.text for e in d.find_elements(By.CSS_SELECTOR, css))
    )


def login(d: webdriver.Chrome, srv: Server, tenant: str) -> None:
    d.get(f"{srv.url}/console/#/login")
    d.delete_all_cookies()
    d.get(f"{srv.url}/console/#/login")
    WebDriverWait(d, 10).until(lambda _: d.find_elements(By.ID, "key"))
    d.find_element(By.ID, "key").send_keys(srv.keys[tenant])
    d.find_element(By.ID, "login-submit").click()
    WebDriverWait(d, 10).until(lambda _: d.find_elements(By.ID, "sandbox-rows"))


def session(srv: Server, tenant: str = "alice") -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=srv.url, timeout=30)
    r = c.post("/console/login", json={"key": srv.keys[tenant]})
    assert r.status_code == 200
    return c, r.json()["csrf"]


def test_login_cookie_and_headers(srv: Server) -> None:
    r = httpx.get(f"{srv.url}/console/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert httpx.post(f"{srv.url}/console/login", json={"key": "nope"}).status_code == 401
    r = httpx.post(f"{srv.url}/console/login", json={"key": srv.keys["alice"]})
    cookies = r.headers.get_list("set-cookie")
    sess = next(c for c in cookies if c.startswith("glassroom_session="))
    low = sess.lower()
    assert "httponly" in low and "samesite=strict" in low and "path=/" in low
    assert "domain" not in low and "secure" not in low  # http: no Secure; host-only


def test_csrf_and_origin_refused(srv: Server) -> None:
    c, token = session(srv)
    assert c.get("/v1/sandboxes").status_code == 200  # a GET needs no CSRF header
    r = c.post("/v1/sandboxes", json={})
    assert r.status_code == 403 and r.json()["error"]["rule"] == "csrf"
    r = c.post(
        "/v1/sandboxes",
        json={},
        headers={"X-Glassroom-CSRF": token, "Origin": "http://evil.example"},
    )
    assert r.status_code == 403
    r = c.post("/v1/sandboxes", json={}, headers={"X-Glassroom-CSRF": token})
    assert r.status_code == 201
    sid = r.json()["sandbox_id"]
    assert c.delete(f"/v1/sandboxes/{sid}").status_code == 403
    assert c.delete(f"/v1/sandboxes/{sid}", headers={"X-Glassroom-CSRF": token}).status_code == 200
    c.post("/console/logout")
    assert c.get("/v1/sandboxes").status_code == 401


def test_port_route_refuses_the_cookie(srv: Server) -> None:
    c, token = session(srv)
    sid = c.post("/v1/sandboxes", json={}, headers={"X-Glassroom-CSRF": token}).json()["sandbox_id"]
    try:
        r = c.get(f"/v1/sandboxes/{sid}/ports/8080/")
        assert r.status_code in (401, 403), r.text
        host = f"8080-sb-{sid.removeprefix('sb-')}.localhost"
        r = c.get("/", headers={"Host": host})
        assert r.status_code in (401, 403, 404), r.text
        assert r.status_code != 200
    finally:
        c.delete(f"/v1/sandboxes/{sid}", headers={"X-Glassroom-CSRF": token})


def test_console_end_to_end(srv: Server, browser: webdriver.Chrome) -> None:
    d = browser
    api = httpx.Client(base_url=srv.url, headers=srv.headers("alice"), timeout=60)
    login(d, srv, "alice")
    shot(d, "1-sandboxes-empty")
    sid = api.post("/v1/sandboxes", json={}).json()["sandbox_id"]
    try:
        wait_text(d, "#sandbox-rows", sid)  # appears by polling
        shot(d, "2-sandboxes")
        # a blocked action (a direct connection under no network) and the XSS pair
        api.post(
            f"/v1/sandboxes/{sid}/commands",
            json={
                "argv": [
                    "python3",
                    "-c",
                    "import socket; socket.create_connection(('192.0.2.10', 80), 1)",
                ]
            },
        )
        api.put(
            f"/v1/sandboxes/{sid}/files", params={"path": f"/workspace/{XSS[:40]}"}, content=b"x"
        )
        d.find_element(By.CSS_SELECTOR, f'tr[data-id="{sid}"] a').click()
        wait_text(d, "#files", "<img src=x")
        d.find_element(By.ID, "cmd").send_keys(f"printf '%s' '{XSS}'")
        d.find_element(By.CSS_SELECTOR, "#cmd ~ button").click()
        wait_text(d, "#cmd-output", XSS)
        assert d.execute_script("return window.__pwned === undefined")
        assert not d.find_elements(By.CSS_SELECTOR, "main img, main script")
        wait_text(d, "#policy", "[filesystem]")
        shot(d, "3-sandbox")
        d.find_element(By.ID, "open-timeline").click()
        wait_text(d, "#audit-rows tr.deny", "network.allow")
        wait_text(d, "#verify", "audit verify: ok")
        d.find_element(By.ID, "f-blocked").click()
        rows = d.find_elements(By.CSS_SELECTOR, "#audit-rows tr")
        assert rows and all("deny" in r.get_attribute("class") for r in rows)
        shot(d, "4-timeline")
        # a real network.ask hold: the sandbox's request waits in the egress
        # proxy, is approved in the console, and then reaches the test's own
        # loopback server ("ask.test" resolves to 127.0.0.1 for this sandbox)
        with LoopbackServer() as web:
            held = srv.service.create(
                srv.service.tenant("alice"),
                policy={"network": {"ask": ["ask.test"], "ask_timeout_s": 60}},
                network=NetworkOptions(resolver=HostsResolver({"ask.test": "127.0.0.1"})),
                timeout_s=60,
            )
            try:
                proc = srv.service.spawn(held, ["python3", "-c", FETCH.format(port=web.port)])
                d.get(f"{srv.url}/console/#/approvals")
                wait_text(d, "#approval-rows", "ask.test")
                shot(d, "5-approvals")
                ap = next(a for a in srv.service.approvals.list({held.id}))
                assert proc.wait(0.5) is None  # still held
                d.find_element(By.CSS_SELECTOR, f'tr[data-id="{ap.approval_id}"] .approve').click()
                res = proc.wait(60)
                assert res is not None and res.stdout.decode() == "STATUS 200\n", res
                assert [h[1] for h in web.hits] == ["/held"]
            finally:
                srv.service.destroy(held)
        # another tenant: none of it, in the UI and the API
        login(d, srv, "bob")
        wait_text(d, "#sandbox-rows", "No live sandboxes")
        assert sid not in d.find_element(By.ID, "main").text
        d.get(f"{srv.url}/console/#/audit/{sid}")
        wait_text(d, "#main", "not found")
        shot(d, "6-other-tenant")
        bob = srv.headers("bob")
        assert httpx.get(f"{srv.url}/v1/sandboxes", headers=bob).json() == []
        assert httpx.get(f"{srv.url}/v1/sandboxes/{sid}/audit", headers=bob).status_code == 404
        assert httpx.get(f"{srv.url}/v1/approvals", headers=bob).json() == []
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.close()
    assert not srv.errors(), srv.errors()


def test_login_takes_json_only_and_bad_bodies_are_4xx(srv: Server) -> None:
    """Found by the attack review: login CSRF with a text/plain or form body (no
    preflight), 500s with tracebacks from malformed bodies, unaudited failures,
    an unbounded session map, a cross-origin logout."""
    url = f"{srv.url}/console/login"
    key = srv.keys["alice"]
    for headers, body in (({"Content-Type": "text/plain"}, f'{{"key": "{key}"}}'),
                          ({"Content-Type": "application/x-www-form-urlencoded"}, f"key={key}")):  # fmt: skip
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["rule"] == "csrf", r.text
    for bad in ("x", "[]", '{"key": 5}', "{"):
        r = httpx.post(url, content=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (bad, r.text)
        assert "JSON" in r.json()["error"]["message"], r.text
    before = sum(1 for x in read_records(srv.cfg.audit_log) if x["event"] == "console.login_failed")
    assert httpx.post(url, json={"key": "e2b_" + "0" * 40}).status_code == 401
    failed = [x for x in read_records(srv.cfg.audit_log) if x["event"] == "console.login_failed"]
    assert len(failed) == before + 1 and failed[-1]["decision"] == "deny"
    tokens = [session(srv, "carol")[0] for _ in range(25)]  # at most 20 per tenant
    alive = [c for c in tokens if c.get("/v1/sandboxes").status_code == 200]
    assert len(alive) == 20, len(alive)
    assert all(c.get("/v1/sandboxes").status_code == 401 for c in tokens[:5])  # oldest went
    c, _ = session(srv)
    r = c.post("/console/logout", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert c.get("/v1/sandboxes").status_code == 200  # still logged in


def test_file_bytes_are_never_the_services_page(srv: Server) -> None:
    api = httpx.Client(base_url=srv.url, headers=srv.headers("alice"), timeout=60)
    sid = api.post("/v1/sandboxes", json={}).json()["sandbox_id"]
    try:
        api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/p.html"},
                content=b"<script>alert(1)</script>")  # fmt: skip
        r = api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/workspace/p.html"})
        assert r.status_code == 200 and r.content == b"<script>alert(1)</script>"
        for k, v in (("x-content-type-options", "nosniff"), ("content-security-policy", "sandbox"),
                     ("content-disposition", "attachment"), ("cache-control", "private, no-store")):  # fmt: skip
            assert r.headers[k] == v, k
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.close()
