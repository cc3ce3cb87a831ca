"""Bad input and abuse against a real ``glassroom serve`` on 127.0.0.1 (issue 14).

Each case was seen to answer 500, leak a sandbox, break a tenant's listings or
stall the event loop.  Every case must now answer a 4xx in its API family's
envelope, leave nothing behind, and never put a traceback in a response or in
the server log; and while one tenant abuses the server, another tenant's
requests are not held up (p99 measured and printed; the guard is a stall
bound, not a timing target).  Every request loop here is bounded in count
and in time, and all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from glassroom.audit import read_records
from glassroom.interfaces.http import ServeConfig, new_key
from glassroom.interfaces.http._edge import MAX_JSON_DEPTH

from .serve_helpers import Server, free_port

pytest.importorskip("e2b")

MIB = 1 << 20
FUZZ_REQUESTS = 400
FUZZ_SEED = 20261203
FUZZ_BUDGET_S = 120.0
LATENCY_SAMPLES = 100
#: Each abuser loops until the sampling is done, at most this many rounds.
ABUSE_ROUNDS = 30
#: The target is a p99 under 200 ms, and it is what this machine measures
#: (p99 95 ms, p50 5 ms on 2026-12-07).  The assert is a stall bound five times that: the
#: bug this guards against (the event loop held by one tenant's work) shows
#: as seconds, while a shared CI machine's noise alone once gave 225 ms.
P99_STALL_S = 1.0
UNIMPLEMENTED = {
    "process.Process/Update",
    "process.Process/StreamInput",
    "filesystem.Filesystem/WatchDir",
    "filesystem.Filesystem/CreateWatcher",
    "filesystem.Filesystem/GetWatcherEvents",
    "filesystem.Filesystem/RemoveWatcher",
}
STREAMING = {"process.Process/Start", "process.Process/Connect"}


# -- helpers -----------------------------------------------------------------------


def _no_traceback(resp: httpx.Response) -> None:
    text = resp.text
    assert "Traceback" not in text and 'File "' not in text, text[:500]


def _ok_status(resp: httpx.Response, what: str) -> None:
    assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"
    _no_traceback(resp)


def _own_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    _no_traceback(resp)
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "rule"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"]
    err: dict[str, Any] = body["error"]
    return err


def _e2b_error(resp: httpx.Response, status: int) -> str:
    """E2B control plane, envd REST and the code interpreter: ``{code: status, message}``."""
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    _no_traceback(resp)
    body = resp.json()
    assert set(body) == {"code", "message"} and body["code"] == status, body
    assert isinstance(body["message"], str) and body["message"]
    msg: str = body["message"]
    return msg


def _connect_error(resp: httpx.Response, streaming: bool) -> dict[str, str]:
    """Connect: unary ``{code: "<connect code>", message}``; streaming: 200 and an
    end-of-stream frame holding ``{"error": {code, message}}``."""
    _no_traceback(resp)
    if not streaming:
        assert resp.headers["content-type"].startswith("application/json"), resp.headers
        body = resp.json()
        assert set(body) == {"code", "message"} and isinstance(body["code"], str), body
        return dict(body)
    assert resp.status_code == 200, (resp.status_code, resp.text[:300])
    frames = _frames(resp.content)
    flags, last = frames[-1]
    assert flags == 0x02, frames
    err = last["error"]
    assert set(err) == {"code", "message"} and isinstance(err["code"], str), err
    return dict(err)


def _frames(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    out = []
    while data:
        assert len(data) >= 5, data[:50]
        flags, n = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + n])))
        data = data[5 + n :]
    return out


def _envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _sandbox_events(serve: Server) -> int:
    """How many sandboxes were ever made, by the audit log (a leaked one is counted too)."""
    return sum(1 for r in read_records(serve.cfg.audit_log) if r.get("event") == "sandbox.created")


class E2B:
    """Raw HTTP to the E2B-compatible endpoints, as the SDKs send it."""

    def __init__(self, serve: Server | Remote, tenant: str = "alice") -> None:
        self.serve = serve
        self.api = httpx.Client(base_url=serve.url, headers=serve.headers(tenant), timeout=60)
        self.sid = ""
        self.token = ""

    def create(self, template: str = "base", timeout: int = 300) -> None:
        for _ in range(5):  # a host hiccup (503, e.g. no free loop device) is retried
            r = self.api.post("/sandboxes", json={"templateID": template, "timeout": timeout})
            if r.status_code != 503:
                break
            time.sleep(0.5)
        assert r.status_code == 201, r.text
        self.sid, self.token = r.json()["sandboxID"], r.json()["envdAccessToken"]

    def envd_headers(self, port: int = 49983) -> dict[str, str]:
        return {
            "E2b-Sandbox-Id": self.sid,
            "E2b-Sandbox-Port": str(port),
            "X-Access-Token": self.token,
        }

    def envd(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.envd_headers(), **kw.pop("headers", {})}
        return self.api.request(method, path, headers=headers, **kw)

    def close(self) -> None:
        if self.sid:
            self.api.delete(f"/sandboxes/{self.sid}")
        self.api.close()


@pytest.fixture
def e2b_sb(serve: Server) -> Iterator[E2B]:
    c = E2B(serve)
    c.create()
    yield c
    c.close()


DELIBERATE = "a deliberate bug for this test"


def _deliberate(record: logging.LogRecord) -> bool:
    """The one exception a test raises on purpose (test_a_bug_answers_500_...)."""
    return bool(record.exc_info and DELIBERATE in str(record.exc_info[1]))


@pytest.fixture(autouse=True)
def _server_log_stays_clean(serve: Server) -> Iterator[None]:
    """After every test: nothing in the server log shows a traceback or an error."""
    before = len(serve.logs)
    yield
    new = [r for r in serve.logs[before:] if not _deliberate(r)]
    bad = [f"{r.name}: {r.getMessage()}" for r in new if r.exc_info or r.levelno >= 40]
    assert not bad, bad[:5]


def _bomb(size: int) -> bytes:
    """A gzip body that inflates to ``size`` zero bytes (made in pieces, not at once)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    piece = b"\0" * MIB
    parts = [comp.compress(piece) for _ in range(size // MIB)]
    return b"".join(parts) + comp.flush()


# -- gzip and other encodings ----------------------------------------------------------


def test_gzip_bomb_on_envd_files_is_413_and_writes_nothing(serve: Server, e2b_sb: E2B) -> None:
    limit = serve.cfg.max_request_bytes
    bomb = _bomb(4 * limit)  # 64 MiB of zeros for the default 16 MiB limit
    assert len(bomb) < limit // 100
    gz = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
    r = e2b_sb.envd("POST", "/files", params={"path": "/workspace/bomb"}, content=bomb, headers=gz)
    msg = _e2b_error(r, 413)
    assert "decoded request body exceeds" in msg and "serve.max_request_bytes" in msg
    r = e2b_sb.envd("GET", "/files", params={"path": "/workspace/bomb"})
    assert r.status_code == 404, r.text  # nothing was written

    # just under the limit is fine, and arrives intact
    data = b"glass" * 1000
    r = e2b_sb.envd(
        "POST", "/files", params={"path": "ok.txt"}, content=gzip.compress(data), headers=gz
    )
    assert r.status_code == 200, r.text
    assert e2b_sb.envd("GET", "/files", params={"path": "ok.txt"}).content == data
    # two gzip members, as `cat a.gz b.gz` makes
    two = gzip.compress(b"one,") + gzip.compress(b"two")
    r = e2b_sb.envd("POST", "/files", params={"path": "two.txt"}, content=two, headers=gz)
    assert r.status_code == 200, r.text
    assert e2b_sb.envd("GET", "/files", params={"path": "two.txt"}).content == b"one,two"
    # deflate, with and without zlib's header
    for body in (zlib.compress(data), zlib.compress(data)[2:-4]):
        r = e2b_sb.envd(
            "POST",
            "/files",
            params={"path": "d.txt"},
            content=body,
            headers={"Content-Encoding": "deflate"},
        )
        assert r.status_code == 200, r.text
        assert e2b_sb.envd("GET", "/files", params={"path": "d.txt"}).content == data


@pytest.mark.parametrize(
    ("body", "encoding", "status", "words"),
    [
        (b"this is not gzip at all", "gzip", 400, "not valid gzip"),
        (gzip.compress(b"x" * 10000)[:-12], "gzip", 400, "ends early"),
        (b"\x1f\x8b\x08\x00garbage-after-magic", "gzip", 400, "not valid gzip"),
        (b"\x00\x01\x02", "deflate", 400, "not valid deflate"),
        (b"hello", "br", 415, "not supported"),
        (b"hello", "gzip, zstd", 415, "not supported"),
    ],
)
def test_bad_content_encoding_is_4xx_per_family(
    serve: Server, e2b_sb: E2B, body: bytes, encoding: str, status: int, words: str
) -> None:
    h = {"Content-Encoding": encoding}
    r = e2b_sb.envd("POST", "/files", params={"path": "x"}, content=body, headers=h)
    assert words in _e2b_error(r, status)
    # the own API, the control plane and Connect decode bodies the same way
    own = httpx.put(
        f"{serve.url}/v1/sandboxes/none/files",
        params={"path": "/workspace/x"},
        content=body,
        headers={**serve.headers(), **h},
        timeout=30,
    )
    assert words in _own_error(own, status)["message"]
    ctl = e2b_sb.api.post("/sandboxes", content=body, headers=h)
    assert words in _e2b_error(ctl, status)
    rpc = e2b_sb.envd(
        "POST",
        "/filesystem.Filesystem/Stat",
        content=body,
        headers={**h, "Content-Type": "application/json"},
    )
    assert rpc.status_code == status
    assert words in _connect_error(rpc, streaming=False)["message"]


def test_gzip_bomb_on_every_family_is_413(serve: Server, e2b_sb: E2B) -> None:
    bomb = _bomb(2 * serve.cfg.max_request_bytes)
    h = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    r = httpx.post(
        f"{serve.url}/v1/sandboxes", content=bomb, headers={**serve.headers(), **h}, timeout=30
    )
    assert _own_error(r, 413)["rule"] == "serve.max_request_bytes"
    _e2b_error(e2b_sb.api.post("/sandboxes", content=bomb, headers=h), 413)
    r = e2b_sb.envd("POST", "/filesystem.Filesystem/Stat", content=bomb, headers=h)
    assert r.status_code == 413
    assert _connect_error(r, streaming=False)["code"] == "resource_exhausted"
    r = e2b_sb.envd(
        "POST",
        "/process.Process/Start",
        content=bomb,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/connect+json"},
    )
    assert _connect_error(r, streaming=True)["code"] == "resource_exhausted"
    r = e2b_sb.api.post(
        "/execute", content=bomb, headers={**e2b_sb.envd_headers(49999), **h}, timeout=30
    )
    _e2b_error(r, 413)


# -- JSON: nesting, NaN/Infinity, huge numbers, surrogates ---------------------------------


def test_deep_nesting_is_400_in_every_family(serve: Server, e2b_sb: E2B) -> None:
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        deep = b"[" * depth + b"]" * depth
        deep_obj = b'{"templateID": ' + deep + b"}"
        h = {"Content-Type": "application/json"}
        r = httpx.post(
            f"{serve.url}/v1/sandboxes", content=deep, headers={**serve.headers(), **h}, timeout=30
        )
        assert "nested deeper" in _own_error(r, 400)["message"]
        assert "nested deeper" in _e2b_error(e2b_sb.api.post("/sandboxes", content=deep_obj), 400)
        r = e2b_sb.envd("POST", "/filesystem.Filesystem/Stat", content=deep, headers=h)
        assert r.status_code == 400
        assert _connect_error(r, streaming=False)["code"] == "invalid_argument"
        r = e2b_sb.envd(
            "POST",
            "/process.Process/Start",
            content=_envelope(deep),
            headers={"Content-Type": "application/connect+json"},
        )
        assert "nested deeper" in _connect_error(r, streaming=True)["message"]
        r = e2b_sb.api.post("/execute", content=deep, headers=e2b_sb.envd_headers(49999))
        assert "nested deeper" in _e2b_error(r, 400)
    # exactly at the limit is still JSON (and then wrong for the route, as a 4xx)
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    r = e2b_sb.api.post("/sandboxes", content=ok)
    assert "JSON object" in _e2b_error(r, 400)


def test_unknown_routes_methods_and_validation_use_the_family_envelope(
    serve: Server, e2b_sb: E2B
) -> None:
    own = httpx.Client(base_url=serve.url, headers=serve.headers(), timeout=30)
    try:
        err = _own_error(own.get("/v1/no-such-thing"), 404)
        assert err["code"] == "not_found" and "/v1/no-such-thing" in err["message"]
        err = _own_error(own.delete("/v1/health"), 405)
        assert err["code"] == "method_not_allowed"
        err = _own_error(own.post("/v1/sandboxes", json={"timeout_s": "soon"}), 422)
        assert "timeout_s" in err["message"]
        err = _own_error(own.post("/v1/sandboxes", json={"nope": 1}), 422)
        assert "nope" in err["message"]
        big = b"x" * (serve.cfg.max_request_bytes + 1)
        assert _own_error(own.post("/v1/sandboxes", content=big), 413)["code"] == "too_large"
    finally:
        own.close()
    assert "no such endpoint" in _e2b_error(e2b_sb.api.get("/no-such-thing"), 404)
    _e2b_error(e2b_sb.api.patch("/sandboxes"), 405)
    _e2b_error(e2b_sb.api.get("/sandboxes/nope"), 404)
    _e2b_error(e2b_sb.envd("PUT", "/files"), 405)
    _e2b_error(e2b_sb.api.get("/contexts/x/restart", headers=e2b_sb.envd_headers(49999)), 405)
    r = e2b_sb.envd("POST", "/process.Process/NoSuchMethod", json={})
    assert r.status_code == 404
    assert _connect_error(r, streaming=False)["code"] == "unimplemented"
    r = e2b_sb.envd("GET", "/filesystem.Filesystem/Stat")
    assert r.status_code == 405
    assert _connect_error(r, streaming=False)["code"] == "unimplemented"
    r = e2b_sb.envd(
        "POST",
        "/filesystem.Filesystem/Stat",
        content=b"\x00\x01",
        headers={"Content-Type": "application/proto"},
    )
    assert r.status_code == 415
    assert "application/json" in _connect_error(r, streaming=False)["message"]
    r = e2b_sb.envd("POST", "/files", content=b"x" * (serve.cfg.max_request_bytes + 1))
    assert "serve.max_request_bytes" in _e2b_error(r, 413)


def test_a_bug_answers_500_in_the_envelope_without_a_traceback(
    serve: Server, e2b_sb: E2B, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last resort: an exception no handler expected.  The client gets the
    family's envelope and no traceback; the server log gets the traceback."""

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError(DELIBERATE)

    n = len(serve.logs)
    monkeypatch.setattr(serve.service, "infos", broken)
    monkeypatch.setattr(serve.service, "list", broken)
    # (a fresh connection each: after an unhandled exception uvicorn closes it)
    h = {**serve.headers(), "Connection": "close"}
    err = _own_error(httpx.get(f"{serve.url}/v1/sandboxes", headers=h, timeout=30), 500)
    assert err["code"] == "internal" and "deliberate" not in err["message"]
    msg = _e2b_error(httpx.get(f"{serve.url}/sandboxes", headers=h, timeout=30), 500)
    assert "deliberate" not in msg
    monkeypatch.undo()
    end = time.monotonic() + 10
    while sum(1 for r in serve.logs[n:] if _deliberate(r)) < 2:  # logged after the answer
        assert time.monotonic() < end, "the bug must be in the server log, with its traceback"
        time.sleep(0.05)


def test_the_e2b_sdk_parses_the_errors(serve: Server) -> None:
    from e2b import NotFoundException, Sandbox
    from e2b.exceptions import SandboxException

    with pytest.raises(NotFoundException) as ei:
        Sandbox.get_info("no-such-sandbox")
    assert "no-such-sandbox" in str(ei.value)
    with pytest.raises(SandboxException) as se:
        Sandbox.create(template="no-such-template", timeout=30)
    assert "no-such-template" in str(se.value)
    sb = Sandbox.create(timeout=60)
    try:
        with pytest.raises(SandboxException) as se:
            sb.files.list("/workspace", depth=10_000)
        assert "depth" in str(se.value)
    finally:
        sb.kill()


BAD_NUMBERS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"1" + b"0" * 30,
    b"1" + b"0" * 5000,
    b"10000000000000000000",
    b"1e300",
    b"0",
    b"-5",
    b"true",
    b'"10"',
    b"[1]",
]


def test_nan_infinity_and_huge_numbers_in_timeouts_are_400_and_leave_nothing(
    serve: Server, e2b_sb: E2B
) -> None:
    tenant = serve.service.tenant("alice")
    live_before = {e.id for e in serve.service.list(tenant)}
    made_before = _sandbox_events(serve)
    h = {"Content-Type": "application/json"}
    for num in BAD_NUMBERS:
        body = b'{"templateID": "base", "timeout": ' + num + b"}"
        msg = _e2b_error(e2b_sb.api.post("/sandboxes", content=body, headers=h), 400)
        assert "timeout" in msg, (num, msg)
        body = b'{"timeout_s": ' + num + b"}"
        r = httpx.post(
            f"{serve.url}/v1/sandboxes", content=body, headers={**serve.headers(), **h}, timeout=30
        )
        assert r.status_code in (400, 422), (num, r.text)
        assert "timeout_s" in _own_error(r, r.status_code)["message"], (num, r.text)
        for path in (f"/sandboxes/{e2b_sb.sid}/timeout", f"/sandboxes/{e2b_sb.sid}/connect"):
            if num == b"0" and path.endswith("/timeout"):
                continue  # E2B's "expire now": test_set_timeout_zero_ends_the_sandbox_now
            r = e2b_sb.api.post(path, content=b'{"timeout": ' + num + b"}", headers=h)
            if num in (b"0",) and path.endswith("/connect"):
                assert r.status_code == 200, r.text  # connect without a timeout: as E2B
                continue
            msg = _e2b_error(r, 400)
            assert "timeout" in msg, (num, msg)
        r = httpx.post(
            f"{serve.url}/v1/sandboxes/{e2b_sb.sid}/timeout",
            content=b'{"timeout_s": ' + num + b"}",
            headers={**serve.headers(), **h},
            timeout=30,
        )
        assert "timeout_s" in _own_error(r, r.status_code)["message"], (num, r.text)
    # the messages name the field and the rule
    r = e2b_sb.api.post("/sandboxes", json={"templateID": "base", "timeout": 1e300})
    assert "timeout: must be a finite number" in _e2b_error(r, 400)
    r = e2b_sb.api.post("/sandboxes", content=b'{"templateID": "base", "timeout": NaN}', headers=h)
    assert "NaN" in _e2b_error(r, 400)
    # nothing was made, the cap is whole, and the listings work
    assert {e.id for e in serve.service.list(tenant)} == live_before
    assert _sandbox_events(serve) == made_before
    assert serve.service._reserved.get("alice", 0) == 0
    assert e2b_sb.api.get("/sandboxes").status_code == 200
    assert e2b_sb.api.get("/v2/sandboxes").status_code == 200
    assert e2b_sb.api.get("/v1/sandboxes").status_code == 200
    info = e2b_sb.api.get(f"/sandboxes/{e2b_sb.sid}").json()
    assert info["endAt"].endswith("Z")


def test_the_service_and_mcp_refuse_non_finite_timeouts(serve: Server) -> None:
    """NaN does not come through JSON any more, but the service is called by MCP
    (and by Python) too: it checks again, and MCP's create_sandbox first."""
    from glassroom.interfaces.http import ApiError

    svc = serve.service
    tenant = svc.tenant("alice")
    made_before = _sandbox_events(serve)
    for bad in (math.nan, math.inf, -math.inf, 1e300, 0.0, -1.0, 10**400):
        with pytest.raises(ApiError) as ei:
            svc.create(tenant, timeout_s=bad)  # type: ignore[arg-type]
        assert ei.value.status == 400 and "timeout_s" in ei.value.message
    with pytest.raises(ApiError):
        svc.create(tenant, metadata={"k": "\ud800"})
    with pytest.raises(ApiError):
        svc.create(tenant, env={"A=B": "x"})
    assert _sandbox_events(serve) == made_before

    pytest.importorskip("mcp")
    import anyio

    from glassroom.interfaces.mcp import build_server

    # An MCP client's JSON turns NaN into null before it is sent, so the tool is
    # called as the server would call it after parsing a raw JSON-RPC message.
    server = build_server(svc)

    async def go() -> list[str]:
        out = []
        for bad in (math.nan, math.inf, -math.inf, 1e300, 0.0):
            r = await server.call_tool("create_sandbox", {"timeout_s": bad})
            assert r.is_error, r  # type: ignore[union-attr]
            out.append(r.content[0].text)  # type: ignore[union-attr]
        return out

    texts = anyio.run(go)
    assert all("timeout_s: must be a finite number" in t for t in texts), texts
    assert _sandbox_events(serve) == made_before


SURROGATE = b'"a\\ud800b"'


def test_lone_surrogates_are_400_and_listings_survive(serve: Server, e2b_sb: E2B) -> None:
    h = {"Content-Type": "application/json"}
    made_before = _sandbox_events(serve)
    cases = [
        (b'{"templateID": "base", "metadata": {"k": ' + SURROGATE + b"}}", "metadata"),
        (b'{"templateID": "base", "metadata": {' + SURROGATE + b': "v"}}', "metadata"),
        (b'{"templateID": "base", "envVars": {"A": ' + SURROGATE + b"}}", "envVars"),
        (b'{"templateID": ' + SURROGATE + b"}", "templateID"),
    ]
    for body, field in cases:
        msg = _e2b_error(e2b_sb.api.post("/sandboxes", content=body, headers=h), 400)
        assert field in msg and "surrogate" in msg, msg
    r = httpx.post(
        f"{serve.url}/v1/sandboxes",
        content=b'{"metadata": {"k": ' + SURROGATE + b"}}",
        headers={**serve.headers(), **h},
        timeout=30,
    )
    assert "body.metadata.k" in _own_error(r, 400)["message"]
    # envd: paths, commands, envs
    r = e2b_sb.envd(
        "POST", "/filesystem.Filesystem/Stat", content=b'{"path": ' + SURROGATE + b"}", headers=h
    )
    assert "surrogate" in _connect_error(r, streaming=False)["message"]
    start = b'{"process": {"cmd": "echo", "args": [' + SURROGATE + b"]}}"
    r = e2b_sb.envd(
        "POST",
        "/process.Process/Start",
        content=_envelope(start),
        headers={"Content-Type": "application/connect+json"},
    )
    assert "body.process.args[0]" in _connect_error(r, streaming=True)["message"]
    r = e2b_sb.api.post(
        "/execute", content=b'{"code": ' + SURROGATE + b"}", headers=e2b_sb.envd_headers(49999)
    )
    assert "body.code" in _e2b_error(r, 400)
    assert _sandbox_events(serve) == made_before
    for path in ("/sandboxes", "/v2/sandboxes", "/v1/sandboxes"):
        r = e2b_sb.api.get(path)
        assert r.status_code == 200, r.text
        assert e2b_sb.sid in r.text


def test_one_bad_sandbox_never_breaks_a_listing(serve: Server, e2b_sb: E2B) -> None:
    """Even if a record that cannot be shown got in (it can no longer through the
    API), the listing leaves that one out and shows the others."""
    other = E2B(serve)
    other.create()
    try:
        bad = serve.service.get(serve.service.tenant("alice"), other.sid)
        saved_meta, saved_end = bad.metadata, bad.end_at
        bad.metadata = {"k": "\udcff"}
        try:
            for path in ("/sandboxes", "/v2/sandboxes", "/v1/sandboxes"):
                r = e2b_sb.api.get(path)
                assert r.status_code == 200, r.text
                assert e2b_sb.sid in r.text and other.sid not in r.text, path
            bad.metadata, bad.end_at = saved_meta, math.nan
            for path in ("/sandboxes", "/v1/sandboxes"):
                r = e2b_sb.api.get(path)
                assert r.status_code == 200 and other.sid not in r.text, r.text
        finally:
            bad.metadata, bad.end_at = saved_meta, saved_end
        r = e2b_sb.api.get("/sandboxes")
        assert other.sid in r.text
    finally:
        other.close()


def test_envd_files_from_the_sandbox_with_non_utf8_names_are_listed(e2b_sb: E2B) -> None:
    start = json.dumps(
        {"process": {"cmd": "python3", "args": ["-c", "open(b'/workspace/\\xff\\xfe', 'w')"]}}
    ).encode()
    r = e2b_sb.envd(
        "POST",
        "/process.Process/Start",
        content=_envelope(start),
        headers={"Content-Type": "application/connect+json"},
    )
    assert r.status_code == 200 and _frames(r.content)[-1][0] == 0x02
    r = e2b_sb.envd("POST", "/filesystem.Filesystem/ListDir", json={"path": "/workspace"})
    assert r.status_code == 200, r.text
    names = [x["name"] for x in r.json()["entries"]]
    assert "\ufffd\ufffd" in names, names
    r = e2b_sb.api.get(f"/v1/sandboxes/{e2b_sb.sid}/dir", params={"path": "/workspace"})
    assert r.status_code == 200, r.text
    assert "\ufffd\ufffd" in [x["name"] for x in r.json()]


# -- the code interpreter: forged frames, and big output --------------------------------------


def _execute(c: E2B, code: str, timeout: float = 120) -> list[dict[str, Any]]:
    r = c.api.post("/execute", json={"code": code}, headers=c.envd_headers(49999), timeout=timeout)
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines() if x]
    assert lines[-1] == {"type": "end_of_execution"}, lines[-3:]
    return lines


FORGE = r"""
import sys
P = "\x1e" + sys.argv[1]
out = sys.__stdout__
for body in [
    '{"type": "end", "execution_count": "many"}',
    '{"type": "stdout", "text": 42}',
    '["not", "an", "object"]',
    '{"type": "result"',
    '{"type": "no-such-kind"}',
    '{"type": "error", "name": {"x": 1}}',
    '{"type": "end", "execution_count": 1e999}',
    '{"type": "end", "execution_count": true}',
    "[" * 5000 + "]" * 5000,
    '{"type": "stdout", "text": "\\ud800 lone"}',
    '{"type": "stdout", "text": "' + "y" * (5 << 20) + '"}',
]:
    out.write(P + body + "\n")
out.flush()
print("after the forgeries")
"""


def test_forged_interpreter_frames_are_output_not_a_crash(serve: Server) -> None:
    c = E2B(serve)
    c.create(template="code-interpreter-v1")
    try:
        lines = _execute(c, FORGE)
        kinds = [x["type"] for x in lines]
        assert "error" not in kinds, [x for x in lines if x["type"] == "error"]
        stdout = "".join(x["text"] for x in lines if x["type"] == "stdout")
        assert '"execution_count": "many"' in stdout  # shown as output, not obeyed
        assert "no-such-kind" in stdout and "after the forgeries" in stdout
        assert "? lone" in stdout  # a forged lone surrogate, made valid
        assert stdout.count("y" * 1000) >= 5 << 10  # the 5 MiB line arrived, as output
        assert kinds.count("number_of_executions") == 1
        # the context still works
        lines = _execute(c, "1 + 1")
        assert {"type": "result", "text": "2", "is_main_result": True} in lines
        # a well-formed forged "end" only ends that cell early: a clean answer
        lines = _execute(
            c,
            "import sys\nsys.__stdout__.write('\\x1e' + sys.argv[1] + "
            '\'{"type": "end", "execution_count": 7}\\n\'); sys.__stdout__.flush()\n'
            "import time; time.sleep(0.5)",
        )
        assert {"type": "number_of_executions", "execution_count": 7} in lines
    finally:
        c.close()


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.write(1, b'x' * SIZE)\nNone",  # raw fd 1: no frames, no newline
        "print('z' * SIZE, end='')",  # through the kernel's framed stdout
    ],
)
def test_big_output_without_newline_is_bounded_and_complete(serve: Server, code: str) -> None:
    size = 40 * MIB  # under code-interpreter-v1's max_output_bytes (64 MiB)
    c = E2B(serve)
    c.create(template="code-interpreter-v1")
    try:
        t0 = time.monotonic()
        lines = _execute(c, code.replace("SIZE", str(size)), timeout=180)
        assert [x for x in lines if x["type"] == "error"] == []
        got = sum(len(x["text"]) for x in lines if x["type"] == "stdout")
        assert got == size, (got, size)
        assert max(len(x.get("text", "")) for x in lines) <= 5 * MIB  # bounded pieces
        assert time.monotonic() - t0 < 120
        assert {"type": "result", "text": "3", "is_main_result": True} in _execute(c, "1 + 2")
    finally:
        c.close()


# -- Connect: a seeded, bounded envelope fuzz ---------------------------------------------------


def _fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 3 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63), 10**19, 7])
    if choice == 3:
        return rng.choice([0.5, -0.0, 1e308, 3.14])
    if choice == 4:
        return rng.choice(["", "x", "/workspace", "../../etc", "~/a", "\u00e9", "a\x00b", "9" * 30])
    if choice == 5:
        return rng.choice(["SIGNAL_SIGKILL", "SIGNAL_SIGTERM", "SIGNAL_SIGHUP", "echo", "/"])
    if choice == 6:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(20)))
    if choice == 7:
        return rng.choice(["aGVsbG8=", "!!!", "%%%"])
    if choice in (8, 9):
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(KEYS): _fuzz_value(rng, depth + 1) for _ in range(rng.randrange(5))}


KEYS = [
    "process",
    "pid",
    "tag",
    "cmd",
    "args",
    "envs",
    "cwd",
    "stdin",
    "input",
    "signal",
    "path",
    "depth",
    "source",
    "destination",
    "pty",
    "x",
]
METHODS = [
    "process.Process/Start",
    "process.Process/Connect",
    "process.Process/List",
    "process.Process/SendInput",
    "process.Process/SendSignal",
    "process.Process/CloseStdin",
    "process.Process/Update",
    "filesystem.Filesystem/Stat",
    "filesystem.Filesystem/ListDir",
    "filesystem.Filesystem/MakeDir",
    "filesystem.Filesystem/Move",
    "filesystem.Filesystem/Remove",
    "filesystem.Filesystem/WatchDir",
]
RAW_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"str"',
    b"\xff\xfe\x00",
    b'{"path": NaN}',
    b'{"depth": Infinity}',
    b'{"pid": 1' + b"0" * 40 + b"}",
    b'{"path": "\\udc80"}',
    b"[" * 3000,
    b'{"a":' * 200 + b"1" + b"}" * 200,
]


def _fuzz_request(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    method = rng.choice(METHODS)
    streaming = method in STREAMING
    kind = rng.randrange(10)
    if kind < 6:
        msg = _fuzz_value(rng)
        if method == "process.Process/Start" and isinstance(msg, dict):
            # keep what runs short: no command that could wait on stdin for ever
            proc = msg.get("process")
            if isinstance(proc, dict) and "cmd" in proc:
                proc["cmd"] = rng.choice(["echo", "true", "", 5, None, "/no/such"])
            msg.pop("stdin", None)
        payload = json.dumps(msg).encode()
    elif kind < 9:
        payload = rng.choice(RAW_BODIES)
    else:
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    body = payload
    if streaming:
        how = rng.randrange(6)
        if how == 0:
            body = payload  # no envelope at all
        elif how == 1:
            body = struct.pack(">BI", rng.choice([1, 2, 0x80]), len(payload)) + payload
        elif how == 2:
            body = struct.pack(">BI", 0, len(payload) + rng.randrange(1, 100)) + payload
        else:
            body = _envelope(payload)
    ctype = rng.choice(
        ["application/connect+json" if streaming else "application/json"] * 6
        + ["", "application/proto", "text/plain", "application/json; charset=utf-8"]
    )
    headers = {"Content-Type": ctype} if ctype else {}
    return method, body, headers


def _fuzz_problem(method: str, r: httpx.Response) -> str | None:
    """What is wrong with one answer of the fuzz, if anything."""
    if r.status_code >= 500 and not (r.status_code == 501 and method in UNIMPLEMENTED):
        return "5xx"
    if "Traceback" in r.text or 'File "' in r.text:
        return "traceback"
    try:
        if method in STREAMING:
            assert r.status_code == 200, "a stream answers 200, errors in its end message"
            flags, last = _frames(r.content)[-1]
            assert flags == 0x02, "the stream has no end-of-stream message"
            if "error" in last:
                assert set(last["error"]) == {"code", "message"}, last
        elif r.status_code != 200:
            _connect_error(r, streaming=False)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        return f"envelope: {exc}"
    return None


def test_connect_envelope_fuzz_no_5xx(serve: Server) -> None:
    c = E2B(serve, tenant="bob")
    c.create()
    rng = random.Random(FUZZ_SEED)
    seen: dict[int, int] = {}
    failures: list[str] = []
    end = time.monotonic() + FUZZ_BUDGET_S
    sent = 0
    try:
        for _ in range(FUZZ_REQUESTS):
            if time.monotonic() > end:
                break
            method, body, headers = _fuzz_request(rng)
            r = c.envd("POST", f"/{method}", content=body, headers=headers, timeout=20)
            sent += 1
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            problem = _fuzz_problem(method, r)
            if problem:
                failures.append(
                    f"{problem}: {method} {body[:80]!r} {headers} -> {r.status_code} {r.text[:200]}"
                )
        # the sandbox and its listing are fine afterwards
        assert c.envd("POST", "/process.Process/List", json={}).status_code == 200
        assert c.api.get("/sandboxes").status_code == 200
    finally:
        c.close()
    print(f"connect fuzz: {sent} requests, status codes {sorted(seen.items())}")
    assert sent >= FUZZ_REQUESTS // 2, sent
    assert not failures, "\n".join(failures[:10])


# -- while one tenant abuses, the other is served --------------------------------------------------


def _abusers(
    serve: Server | Remote, stop: threading.Event, ops: dict[str, int]
) -> list[Callable[[], None]]:
    """Tenant alice's abuse, each loop bounded (ABUSE_ROUNDS) and stopped by ``stop``;
    ``ops`` counts what each one did."""
    bomb = _bomb(4 * serve.cfg.max_request_bytes)
    deep = b"[" * 100_000 + b"]" * 100_000

    def big_output() -> None:
        c = E2B(serve)
        c.create(template="code-interpreter-v1")
        try:
            for _ in range(ABUSE_ROUNDS):  # the kernel is cut at 64 MiB: a new one is made
                if stop.is_set():
                    return
                code = f"import os\nos.write(1, b'x' * {40 * MIB})\nNone"
                with c.api.stream(
                    "POST",
                    "/execute",
                    json={"code": code},
                    headers=c.envd_headers(49999),
                    timeout=180,
                ) as r:
                    assert r.status_code == 200
                    for _chunk in r.iter_raw():  # read, not parsed: keep the client light
                        pass
                ops["big_output"] = ops.get("big_output", 0) + 1
        finally:
            c.close()

    def bombs() -> None:
        c = E2B(serve)
        c.create()
        try:
            h = {"Content-Encoding": "gzip"}
            for _ in range(ABUSE_ROUNDS * 20):
                if stop.is_set():
                    return
                c.envd("POST", "/files", params={"path": "b"}, content=bomb, headers=h)
                c.api.post("/sandboxes", content=deep)
                ops["bombs"] = ops.get("bombs", 0) + 1
        finally:
            c.close()

    def fuzz() -> None:
        c = E2B(serve)
        c.create()
        rng = random.Random(FUZZ_SEED + 1)
        try:
            for _ in range(ABUSE_ROUNDS * 100):
                if stop.is_set():
                    return
                method, body, headers = _fuzz_request(rng)
                c.envd("POST", f"/{method}", content=body, headers=headers, timeout=20)
                ops["fuzz"] = ops.get("fuzz", 0) + 1
        finally:
            c.close()

    return [big_output, bombs, fuzz]


def abuse_main(url: str, keys: dict[str, str], limit: int, budget_s: float) -> None:
    """The abusing tenant, run in a process of its own (``python -c``) so that
    its client work shares no interpreter with the measuring client.  Prints
    ``ready`` once the abuse runs, and a JSON report when SIGTERM (or the
    budget) ends it."""
    import tempfile

    target = Remote(
        url,
        keys,
        ServeConfig(data_dir=Path(tempfile.gettempdir()), max_request_bytes=limit),
        Path("/dev/null"),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    errors: list[str] = []
    ops: dict[str, int] = {}

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported, not swallowed
                errors.append(f"{fn.__name__}: {exc!r}"[:2000])

        return run

    threads = [
        threading.Thread(target=guard(fn), name=fn.__name__, daemon=True)
        for fn in _abusers(target, stop, ops)
    ]
    for t in threads:
        t.start()
    time.sleep(3.0)  # sandboxes made, output flowing
    print("ready", flush=True)
    stop.wait(budget_s)
    busy = [t.name for t in threads if t.is_alive()]
    stop.set()
    for t in threads:
        t.join(240)
    print(json.dumps({"errors": errors, "busy": busy, "ops": ops}), flush=True)


ABUSER_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.interfaces.test_abuse import abuse_main
abuse_main(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
"""


SERVER_SCRIPT = """
import json, logging, sys
from pathlib import Path
import uvicorn
from glassroom.interfaces.http import ServeConfig, create_app
data, port, keys = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
cfg = ServeConfig(data_dir=data)
for tenant, key in keys.items():
    cfg.add_key(tenant, key, max_sandboxes=40)
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
uvicorn.run(create_app(cfg), host="127.0.0.1", port=port, log_level="info", access_log=False)
"""


@dataclass
class Remote:
    """``glassroom serve`` in a process of its own, as in production: the
    clients of this test (the abusers, too) then share no interpreter with it."""

    url: str
    keys: dict[str, str]
    cfg: ServeConfig
    log: Path

    def headers(self, tenant: str = "alice") -> dict[str, str]:
        return {"X-API-Key": self.keys[tenant]}


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    data = tmp_path_factory.mktemp("remote")
    keys = {t: new_key() for t in ("alice", "bob")}
    port = free_port()
    log = data / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(data), str(port), json.dumps(keys)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < end, "glassroom serve did not start in 30 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        yield Remote(url, keys, ServeConfig(data_dir=data), log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    text = log.read_text(errors="replace")
    bad = [
        ln for ln in text.splitlines() if "Traceback" in ln or ln.startswith(("ERROR", "CRITICAL"))
    ]
    assert not bad, text[-3000:]


def test_other_tenant_not_stalled_while_one_abuses(remote: Remote) -> None:
    """Tenant alice abuses (40 MiB no-newline output, gzip bombs, deep JSON, the
    Connect fuzz) from a process of its own, against a server in a process of
    its own; tenant bob's requests meanwhile: p99 of LATENCY_SAMPLES printed,
    and under the stall bound."""
    repo = Path(__file__).resolve().parents[2]
    abuser = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ABUSER_SCRIPT,
            str(repo),
            remote.url,
            json.dumps({"alice": remote.keys["alice"]}),
            str(remote.cfg.max_request_bytes),
            "120",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: list[float] = []
    try:
        assert abuser.stdout is not None
        ready = abuser.stdout.readline().strip()
        assert ready == "ready", ready
        bob = httpx.Client(base_url=remote.url, headers=remote.headers("bob"), timeout=10)
        try:
            end = time.monotonic() + 60
            for i in range(LATENCY_SAMPLES):
                assert time.monotonic() < end, "sampling took over 60 s"
                path = "/v1/health" if i % 2 == 0 else "/sandboxes"  # a route, and a listing
                t0 = time.perf_counter()
                r = bob.get(path)
                samples.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                time.sleep(0.05)
        finally:
            bob.close()
    finally:
        abuser.send_signal(signal.SIGTERM)
        out, _ = abuser.communicate(timeout=300)
    report = json.loads(out.strip().splitlines()[-1])
    p99 = _p99(samples)
    print(
        f"tenant bob under abuse: n={len(samples)} p50={sorted(samples)[len(samples) // 2]:.4f}s "
        f"p99={p99:.4f}s max={max(samples):.4f}s; abuse done meanwhile: {report['ops']}; "
        f"still busy at the end: {report['busy']}"
    )
    assert not report["errors"], report["errors"]
    assert len(report["busy"]) == 3, "an abuser ended before the sampling did: not under load"
    assert p99 < P99_STALL_S, f"p99 {p99 * 1000:.1f} ms for the other tenant: stalled"
