"""Inbound HTTP to a port inside a sandbox, through ``glassroom serve``.

E2B's ``get_host(port)`` gives clients ``{port}-{id}.{domain}`` to reach a
server the sandbox runs.  Here a request reaches a sandbox's port three ways,
each authenticated for that one sandbox:

* own API: ``/v1/sandboxes/{id}/ports/{port}/{path}``, with the tenant's key;
* E2B, by headers: ``E2b-Sandbox-Id`` + ``E2b-Sandbox-Port`` (any port but
  envd's and the code interpreter's), with the sandbox's access token in
  ``E2b-Traffic-Access-Token`` or ``X-Access-Token``;
* E2B, by host: ``Host: {port}-{id}.{anything}`` with the same token.

Why a relay inside the sandbox rather than a host socket: the host never joins
a sandbox's network (gVisor's netstack and a microVM's guest stack have no host
side to join), and nothing here may open a path from the sandbox to the host.
Each request runs a few lines of Python *inside* the sandbox, under its walls
and as its uid, that connect to the sandbox's own loopback and copy bytes
between its stdio and that socket.  The host builds the request with h11 and
parses the answer with h11: everything the sandbox sends is untrusted and
bounded by the policy's output cap.  One request per relay (``Connection:
close``), so streaming responses and WebSockets are not carried; the answer
says so when asked for an upgrade.

The answer is served from the service's own origin, so it is fenced off the
API: ``Set-Cookie`` is dropped and ``Content-Security-Policy: sandbox`` is
added, so a page the sandbox serves runs in an opaque origin and cannot use a
console session or call the API as the viewer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import h11
from starlette.types import Receive, Scope, Send

from ..._errors import GlassroomError
from ._edge import send_error
from ._port_target import SCOPE_PORT, Target
from ._service import ApiError, translate

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from ._service import Entry, SandboxService

#: How long one relayed request may take, end to end.
RELAY_TIMEOUT_S = 60.0
#: The largest answer relayed: it is held in memory (h11 parses it whole),
#: so far below a policy's output cap, which may be 64 MiB.
MAX_ANSWER_BYTES = 8 << 20
#: Relays at once: per sandbox, per tenant, and in all.  Each holds a thread of
#: its own limiter (never the worker pool every tenant's routes share) for up
#: to RELAY_TIMEOUT_S; past a cap the answer is 429.
MAX_PER_SANDBOX = 4
MAX_PER_TENANT = 8
MAX_RELAYS = 32
#: Headers never passed on: hop-by-hop ones (RFC 9110 7.6.1), framing (the host
#: frames the relayed request itself), and glassroom's own credentials, which
#: must never reach code in the sandbox.
_DROP_IN = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
        "trailer", "upgrade", "content-length", "host", "authorization",
        "proxy-authorization", "x-api-key", "x-access-token", "e2b-traffic-access-token",
        "e2b-sandbox-id", "e2b-sandbox-port", "cookie",
    }
)  # fmt: skip
#: ... and from the answer: framing, and whatever would let a page served by
#: the sandbox act on the service's origin (cookies, site data, redirects by
#: header, cross-origin grants, framing rules of its own).
_DROP_OUT = frozenset(
    {
        "connection", "keep-alive", "transfer-encoding", "trailer", "upgrade",
        "content-length", "set-cookie", "set-cookie2", "content-security-policy",
        "content-security-policy-report-only", "clear-site-data", "refresh", "link",
        "x-frame-options", "permissions-policy", "strict-transport-security",
        "alt-svc", "origin-agent-cluster", "cross-origin-opener-policy",
        "cross-origin-embedder-policy", "cross-origin-resource-policy",
        # ours are added (nosniff, no-store); the sandbox's could undo them,
        # or have browsers report the service's URLs to where it says
        "x-content-type-options", "cache-control", "expires", "pragma", "nel", "report-to",
        "reporting-endpoints", "service-worker-allowed", "speculation-rules",
        "document-policy", "accept-ch", "critical-ch", "timing-allow-origin",
    }
)  # fmt: skip

#: Runs inside the sandbox (``python3 -c``): connect to the sandbox's own
#: loopback, copy stdin to the socket, the socket to stdout.  Exit 3 with the
#: reason on stderr when nothing listens.
RELAY = """\
import os, socket, sys
port = int(sys.argv[1])
s = None
for host in ("127.0.0.1", "::1"):
    try:
        s = socket.create_connection((host, port), 10)
        break
    except OSError as e:
        err = e.strerror or str(e)
if s is None:
    sys.stderr.write(err)
    sys.exit(3)
s.sendall(sys.stdin.buffer.read())
while True:
    b = s.recv(65536)
    if not b:
        break
    os.write(1, b)
"""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _entry(svc: SandboxService, t: Target, headers: Mapping[str, str]) -> Entry:
    if t.own_api:
        key = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return svc.get(svc.authenticate(key), t.sandbox_id)
    token = headers.get("e2b-traffic-access-token") or headers.get("x-access-token")
    return svc.get_by_token(t.sandbox_id, token)


def _request_bytes(
    conn: h11.Connection, method: str, t: Target, headers: list[tuple[str, str]], body: bytes
) -> bytes:
    out = [(k, v) for k, v in headers if k.lower() not in _DROP_IN]
    out += [("host", f"localhost:{t.port}"), ("connection", "close")]
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        out.append(("content-length", str(len(body))))
    try:
        wire = conn.send(h11.Request(method=method, target=t.path, headers=out))
        if body:
            wire += conn.send(h11.Data(data=body))
        wire += conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        raise ApiError(400, "invalid", f"the request cannot be relayed: {exc}") from None
    return wire or b""


def _parse(conn: h11.Connection, raw: bytes, method: str, t: Target) -> Answer:
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, out, body = 0, [], bytearray()
    try:
        for _ in range(len(raw) + 8):  # each event consumes input; bounded anyway
            ev = conn.next_event()
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                status = ev.status_code
                out = [(k, _relocated(v, t) if k.lower() == b"location" else v)
                       for k, v in ev.headers if _passed(k.decode().lower(), v)]  # fmt: skip
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                break
            elif ev is h11.NEED_DATA:
                raise h11.RemoteProtocolError("the answer ended early")
    except h11.RemoteProtocolError as exc:
        raise ApiError(
            502, "bad_gateway", f"the sandbox's server sent a malformed answer: {exc}"
        ) from None
    if not status:
        raise ApiError(502, "bad_gateway", "the sandbox's server closed without an answer")
    out += [
        (b"content-security-policy", b"sandbox"),
        (b"x-content-type-options", b"nosniff"),
        (b"cache-control", b"private, no-store"),
        (b"content-length", str(0 if method == "HEAD" else len(body)).encode()),
    ]
    return Answer(status, out, bytes(body))


def _passed(name: str, value: bytes) -> bool:
    if name in _DROP_OUT or name.startswith("access-control-"):
        return False
    if name == "location":  # a redirect stays on this sandbox's port: relative only
        v = value.decode("latin-1")
        if not v.startswith("/") or v.startswith("//") or "\\" in v or "%2e" in v.lower():
            return False
        # no dot segment: a client would resolve it out of the port's prefix
        return not any(seg in (".", "..") for seg in v.split("?")[0].split("#")[0].split("/"))
    return True


def _relocated(value: bytes, t: Target) -> bytes:
    """A relative redirect of the sandbox's server, where the client will land.

    On the path form the sandbox's ``/`` is ``/v1/sandboxes/{id}/ports/{port}/``:
    a bare ``/v1/...`` would send the client, with its API key, to the service's
    own API (a sandbox making its user delete or create things).  On the host
    and header forms the sandbox's ``/`` is the client's ``/`` already."""
    if not t.own_api:
        return value
    return f"/v1/sandboxes/{t.sandbox_id}/ports/{t.port}".encode() + value


def relay(
    svc: SandboxService, e: Entry, t: Target, method: str, headers: list[tuple[str, str]],
    body: bytes,
) -> Answer:  # fmt: skip
    """One request to ``t.port`` inside ``e``'s sandbox and its answer (blocking)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    wire = _request_bytes(conn, method, t, headers, body)
    t0 = time.monotonic()
    try:
        proc = e.sb.spawn(
            ["python3", "-I", "-S", "-c", RELAY, str(t.port)], timeout_s=RELAY_TIMEOUT_S
        )
    except GlassroomError as exc:  # a denied tool, a dead sandbox: the service's error
        raise translate(exc) from None
    try:
        proc.write_stdin(wire)
    except BrokenPipeError:
        pass
    proc.close_stdin()
    chunks: list[bytes] = []
    errs: list[bytes] = []
    index, done, size = 0, False, 0
    while not done and time.monotonic() - t0 < RELAY_TIMEOUT_S + 5:
        events, index, done = proc.events_since(index, 1.0)
        for stream, data in events:
            if stream == "stdout":
                chunks.append(data)
                size += len(data)
            elif sum(map(len, errs)) < 4096:
                errs.append(data)
        if size > MAX_ANSWER_BYTES:
            proc.signal(9)
            proc.wait(5)
            _audit(svc, e, {**_brief(e, t, method, body, t0)}, 502, "answer over the relay cap")
            raise ApiError(
                502, "bad_gateway",
                f"port {t.port}: the answer is larger than {MAX_ANSWER_BYTES >> 20} MiB, "
                "the most a port relay carries",
            )  # fmt: skip
    res = proc.wait(5)
    rec = _brief(e, t, method, body, t0)
    if res is None or res.timed_out:
        proc.signal(9)
        _audit(svc, e, rec, 504, "no answer in time")
        raise ApiError(504, "timeout", f"port {t.port}: no answer in {RELAY_TIMEOUT_S:.0f} s")
    if res.exit_code == 126:
        # The relay is a python3 program run inside the sandbox, under its
        # policy: a policy that does not allow python3 has no port relay.
        # Say so, naming the rule, rather than a vague "no answer".
        why = b"".join(errs).decode(errors="replace").strip()[:200]
        _audit(svc, e, rec, 403, why or "python3 is not allowed")
        raise ApiError(
            403, "forbidden",
            f"port {t.port}: the port relay runs python3 inside the sandbox, and its policy "
            f"does not allow it ({why or 'exit 126'})",
            rule="tools.allow",
        )  # fmt: skip
    if res.exit_code == 3:
        why = b"".join(errs).decode(errors="replace")[:200]
        _audit(svc, e, rec, 502, why)
        raise ApiError(
            502, "bad_gateway", f"nothing answers on port {t.port} in the sandbox: {why}"
        )
    if res.truncated:
        _audit(svc, e, rec, 502, "answer over the output cap")
        raise ApiError(
            502, "bad_gateway",
            f"port {t.port}: the answer is larger than the sandbox's output cap",
            rule="resources.max_output_bytes",
        )  # fmt: skip
    answer = _parse(conn, b"".join(chunks), method, t)
    rec["bytes_out"] = len(answer.body)
    _audit(svc, e, rec, answer.status, "")
    if method == "HEAD":
        answer.body = b""
    return answer


def _brief(e: Entry, t: Target, method: str, body: bytes, t0: float) -> dict[str, Any]:
    ms = round((time.monotonic() - t0) * 1000, 1)
    return {"tenant": e.tenant, "port": t.port, "method": method, "path": t.path[:300],
            "bytes_in": len(body), "ms": ms}  # fmt: skip


def _audit(svc: SandboxService, e: Entry, rec: dict[str, Any], status: int, error: str) -> None:
    rec["status"] = status
    if error:
        rec["error"] = error
    svc.audit.append(e.id, "port.request", rec, decision="allow" if status < 500 else "info")


class PortRelay:
    """ASGI middleware in front of the routes: port requests go to :func:`relay`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.limiter = anyio.CapacityLimiter(MAX_RELAYS)
        self.busy: dict[str, int] = {}  # sandbox id or "tenant:NAME" -> relays running

    def _take(self, e: Entry) -> list[str]:
        keys = [e.id, f"tenant:{e.tenant}"]
        for key, cap in zip(keys, (MAX_PER_SANDBOX, MAX_PER_TENANT), strict=True):
            if self.busy.get(key, 0) >= cap:
                raise ApiError(
                    429, "rate_limited",
                    f"{cap} port requests are already running for this "
                    + ("sandbox" if key == e.id else "tenant"),
                    rule="ports.concurrency",
                )  # fmt: skip
        for key in keys:
            self.busy[key] = self.busy.get(key, 0) + 1
        return keys

    def _give(self, keys: list[str]) -> None:
        for key in keys:
            self.busy[key] -= 1
            if not self.busy[key]:
                del self.busy[key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The Edge (outside this) decided whether this is a port request and
        # read its body unparsed: one decision, so the two can never disagree.
        t: Target | None = scope.get(SCOPE_PORT) if scope["type"] == "http" else None
        if t is None:
            await self.app(scope, receive, send)
            return
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = {k.lower(): v for k, v in raw}
        body = bytearray()
        while True:  # the Edge has read and bounded the body already
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        svc: SandboxService = scope["app"].state.service  # Starlette sets scope["app"]
        try:
            if not 1 <= t.port <= 65535:
                raise ApiError(400, "invalid", f"port {t.port} is not a port (1-65535)")
            if headers.get("upgrade"):
                raise ApiError(501, "unimplemented", "a port relay carries one request: no Upgrade")
            e = _entry(svc, t, headers)
            method = scope.get("method", "GET")
            keys = self._take(e)  # on the event loop: no lock needed
            try:
                answer = await anyio.to_thread.run_sync(
                    relay, svc, e, t, method, raw, bytes(body), limiter=self.limiter
                )
            finally:
                self._give(keys)
        except ApiError as exc:
            await send_error(scope, send, exc)
            return
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
        )
        await send({"type": "http.response.body", "body": answer.body})
