"""The egress proxy: an asyncio HTTP forward + CONNECT proxy built on h11.

It is mechanism only: every "may this go out?" question goes to a
:class:`~glassroom.egress._decide.Decider`.  What it does itself:

* parses requests with h11 (absolute-form for plain HTTP, ``CONNECT
  host:port`` for tunnels) and refuses a ``Host`` header that differs from
  the target (domain fronting over plain HTTP);
* resolves names itself, only after the name was allowed, checks every
  resolved address, and connects to the address it resolved (anti-rebinding);
* for a tunnel, reads the TLS ClientHello before connecting upstream and
  refuses a tunnel whose SNI differs from the CONNECT host, or that is not TLS;
* with ``inspect_tls``, terminates TLS with a leaf certificate from the
  sandbox's CA, so method, path and status are seen and HTTP rules applied;
* holds ``ask`` requests for an approval;
* emits one record per request (host, port, resolved IP, method/path where
  visible, status, bytes each way, duration, decision, rule), also for
  requests cut short when the proxy is stopped.

It runs its own event loop in a thread, listening on a Unix socket (the
namespaces tier bridges a loopback port inside the sandbox to it) and/or a
TCP port (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11

from .._errors import GlassroomError
from . import _approvals
from ._decide import (
    RULE_HOST_HEADER,
    RULE_SNI,
    Decider,
    Decision,
    Request,
    as_ip,
)
from ._resolve import ResolveError, Resolver, SystemResolver
from ._tls import (
    NotTLS,
    RecordChecker,
    SandboxCA,
    TLSStream,
    client_hello_length,
    parse_sni,
)

#: ``emit(details, decision, rule)``: where request records go (the audit log).
Emit = Callable[[dict[str, Any], str, "str | None"], None]
#: ``rewrite_headers(request, headers) -> headers`` (see ProxyConfig).
HeaderHook = Callable[[Request, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]
Headers = list[tuple[bytes, bytes]]


class ExchangeFilter(Protocol):
    """One request and its response, as the proxy sees them (plain HTTP and
    inspected HTTPS): e.g. to swap a credential placeholder for its value on
    the way out and take the value out of the response on the way back.

    ``response_head`` returns the reason phrase and headers to pass on; it
    may raise a ``GlassroomError`` to refuse the response
    (the sandbox gets a 502 naming ``error.rule``).  ``response_body`` and
    ``response_end`` together must return exactly as many bytes as they were
    given, so the response's framing (Content-Length) stays right.  ``close``
    is called once, whatever happened.
    """

    def request(self, headers: Headers) -> Headers: ...
    def response_head(self, status: int, reason: bytes,
                      headers: Headers) -> tuple[bytes, Headers]: ...  # fmt: skip
    def response_body(self, data: bytes) -> bytes: ...
    def response_end(self) -> bytes: ...
    def close(self) -> None: ...


#: ``exchange_filter(request) -> ExchangeFilter | None``, once per visible request.
FilterFactory = Callable[[Request], "ExchangeFilter | None"]
#: ``on_approval(approval) -> True (allow) | False (deny) | None (no opinion)``.
ApprovalCallback = Callable[[_approvals.Approval], "bool | None"]

HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
    b"proxy-authenticate", b"te", b"trailer", b"upgrade",
}  # fmt: skip
CHUNK = 1 << 18
HELLO_TIMEOUT_S = 10.0
MAX_HEAD = 64 * 1024


class Stream(Protocol):
    async def read(self, n: int = CHUNK) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


LINGER_S = 0.5
LINGER_BYTES = 1 << 20


async def _discard_input(client: Stream) -> None:
    """After an error response that ends the connection: read what the client
    still sends (a request body the refusal did not need), briefly and bounded.

    Why: closing a socket whose receive queue is not empty resets the
    connection (TCP sends RST; a Unix socket gives its peer ECONNRESET), and
    the client may then lose the response it has not read yet.
    """
    deadline = asyncio.get_running_loop().time() + LINGER_S
    left = LINGER_BYTES
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError):
        while left > 0:
            wait = deadline - asyncio.get_running_loop().time()
            if wait <= 0:
                return
            chunk = await asyncio.wait_for(client.read(min(left, CHUNK)), wait)
            if not chunk:
                return
            left -= len(chunk)


class Plain:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, n: int = CHUNK) -> bytes:
        return await self.reader.read(n)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


POOL_IDLE_S = 30.0
POOL_PER_KEY = 8


class _Stale(Exception):
    """A pooled upstream connection was already closed by the server."""


@dataclass
class _Upstream:
    stream: Plain
    conn: h11.Connection
    key: tuple[str, int, str, bool]
    idle_since: float = 0.0
    reused: bool = False


class Blocked(Exception):
    def __init__(self, status: int, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.rule, self.reason = status, rule, reason


@dataclass
class ProxyConfig:
    sandbox_id: str
    decider: Decider
    emit: Emit
    resolver: Resolver | None = None
    ca: SandboxCA | None = None
    #: Extra CA file the proxy trusts for upstream TLS (tests); else the host's roots.
    upstream_ca: str | None = None
    ask_timeout_s: float = 60.0
    on_approval: ApprovalCallback | None = None
    connect_timeout_s: float = 10.0
    #: Called for each allowed request whose headers the proxy sees (plain HTTP,
    #: inspected HTTPS), just before it goes upstream: e.g. to swap a credential
    #: placeholder for the real value.  Never sees uninspected tunnels.
    rewrite_headers: HeaderHook | None = None
    #: Like ``rewrite_headers``, and also sees the response (see ExchangeFilter).
    exchange_filter: FilterFactory | None = None


async def _next_event(conn: h11.Connection, stream: Stream) -> Any:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await stream.read())
            continue
        return ev


def _header(headers: Any, name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


def _split_authority(text: str, default_port: int | None) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif as_ip(text.rpartition(":")[0]) is not None and text.rpartition(":")[2].isdigit():
        host, _, port = text.rpartition(":")  # an unbracketed IPv6 address with a port
    else:
        host, port = text, ""
    if not host:
        raise ValueError("empty host")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port {port!r}")
        return host.lower().rstrip("."), int(port)
    if default_port is None:
        raise ValueError("a port is required")
    return host.lower().rstrip("."), default_port


class EgressProxy:
    """One sandbox's proxy, on its own event loop thread."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.resolver: Resolver = cfg.resolver or SystemResolver()
        self._upstream_ctx = ssl.create_default_context(cafile=cfg.upstream_ca)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool: dict[tuple[str, int, str, bool], list[_Upstream]] = {}
        self._servers: list[asyncio.Server] = []
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._records: queue.Queue[tuple[dict[str, Any], str, str | None] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_records, daemon=True,
                                        name=f"egress-log-{cfg.sandbox_id}")  # fmt: skip
        self.unix_path: str | None = None
        self.tcp_address: tuple[str, int] | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self, *, unix_path: str | None = None, tcp: tuple[str, int] | None = None) -> None:
        self._writer.start()
        self._thread = threading.Thread(
            target=self._run, args=(unix_path, tcp), daemon=True,
            name=f"egress-{self.cfg.sandbox_id}",
        )  # fmt: skip
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self.stop()
            raise self._error

    def _run(self, unix_path: str | None, tcp: tuple[str, int] | None) -> None:
        try:
            asyncio.run(self._main(unix_path, tcp))
        except BaseException as exc:  # reported to start(); the thread ends
            self._error = exc
            self._ready.set()

    async def _main(self, unix_path: str | None, tcp: tuple[str, int] | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if unix_path:
            srv = await asyncio.start_unix_server(self._accept, path=unix_path, limit=MAX_HEAD)
            self._servers.append(srv)
            self.unix_path = unix_path
        if tcp:
            tsrv = await asyncio.start_server(self._accept, tcp[0], tcp[1], limit=MAX_HEAD)
            self._servers.append(tsrv)
            self.tcp_address = tsrv.sockets[0].getsockname()[:2]
        self._ready.set()
        await self._stop.wait()
        for srv in self._servers:
            srv.close()
        for idle in self._pool.values():
            for u in idle:
                u.stream.close()
        self._pool.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def stop(self) -> None:
        """Stop accepting, cut every open request (each still logged), flush the log."""
        loop, ev = self._loop, self._stop
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._writer.is_alive():
            self._records.put(None)
            self._writer.join(timeout=10)
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    def _emit(self, rec: dict[str, Any], decision: str, rule: str | None) -> None:
        self._records.put((rec, decision, rule))

    def _write_records(self) -> None:
        """The audit log fsyncs each record: writing happens off the event loop."""
        while True:
            item = self._records.get()
            try:
                if item is None:
                    return
                self.cfg.emit(*item)
            except Exception as exc:  # a failing sink must not stop the proxy
                print(f"glassroom egress: cannot log a request: {exc!r}", file=sys.stderr)
            finally:
                self._records.task_done()

    def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) for open connections to end, then for their records."""
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._writer.is_alive():
            self._records.join()

    # -- connections ----------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = Plain(reader, writer)
        try:
            await self._serve_http(client, tunnel=None)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, h11.ProtocolError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the request's record was written on the way out
        finally:
            client.close()
            self._tasks.discard(task)

    async def _serve_http(self, client: Stream, tunnel: tuple[str, int, str] | None) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                ev = await _next_event(conn, client)
            except h11.RemoteProtocolError:
                await self._plain_error(conn, client, 400, "", "malformed request")
                return
            if not isinstance(ev, h11.Request):
                return
            if ev.method == b"CONNECT":
                if tunnel is not None:
                    await self._plain_error(conn, client, 400, "", "CONNECT inside a tunnel")
                    return
                await self._tunnel(conn, ev, client)
                return
            keep = await self._forward(conn, ev, client, tunnel)
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _plain_error(self, conn: h11.Connection, client: Stream, status: int,
                           rule: str, reason: str) -> None:  # fmt: skip
        body = f"glassroom egress: {reason}" + (f" (rule {rule})" if rule else "") + "\n"
        data = body.encode()
        headers = [("content-type", "text/plain"), ("content-length", str(len(data))),
                   ("connection", "close")]  # fmt: skip
        if rule:
            headers.append(("x-glassroom-rule", rule))
        with contextlib.suppress(h11.LocalProtocolError, OSError):
            phrase = {400: b"Bad Request", 403: b"Forbidden", 502: b"Bad Gateway"}.get(status, b"")
            out = conn.send(h11.Response(status_code=status, headers=headers, reason=phrase))
            out = (out or b"") + (conn.send(h11.Data(data=data)) or b"")
            out += conn.send(h11.EndOfMessage()) or b""
            await client.write(out)
        await _discard_input(client)

    async def _decide(self, req: Request, rec: dict[str, Any]) -> Decision:
        dec = self.cfg.decider.decide(req)
        if dec.action == "ask":
            dec = await self._ask(req, dec, rec)
        rec["rule"] = dec.rule
        if dec.extra_rules:
            rec["http_rules"] = list(dec.extra_rules)
        if dec.action != "allow":
            raise Blocked(403, dec.rule, dec.reason or "not allowed")
        return dec

    async def _ask(self, req: Request, dec: Decision, rec: dict[str, Any]) -> Decision:
        ap = _approvals.create(self.cfg.sandbox_id, req.host, req.port, req.method, req.path,
                               dec.rule, self.cfg.ask_timeout_s)  # fmt: skip
        rec["approval"] = {"id": ap.id}
        loop = asyncio.get_running_loop()
        cb: asyncio.Future[bool | None] | None = None
        if self.cfg.on_approval is not None:
            cb = loop.run_in_executor(None, self.cfg.on_approval, ap)
        deadline = time.monotonic() + self.cfg.ask_timeout_s
        try:
            while True:
                if cb is not None and cb.done():
                    verdict = None if cb.exception() else cb.result()
                    cb = None
                    if verdict is not None:
                        _approvals.decide(ap.id, "allow" if verdict else "deny", "sdk:callback")
                found = _approvals.read_decision(ap.id)
                if found is not None:
                    break
                if time.monotonic() >= deadline:
                    _approvals.decide(ap.id, "deny", "timeout")
                    found = _approvals.read_decision(ap.id) or {"decision": "deny",
                                                                "by": "timeout"}  # fmt: skip
                    break
                await asyncio.sleep(0.05)
        finally:
            _approvals.settle(ap.id)
        rec["approval"].update(decision=found["decision"], by=found.get("by"))
        if found["decision"] == "allow":
            return Decision("allow", dec.rule, inspect_tls=dec.inspect_tls,
                            extra_rules=dec.extra_rules)  # fmt: skip
        reason = "approval timed out" if found.get("by") == "timeout" else "approval denied"
        return Decision("deny", dec.rule, f"{reason} ({found.get('by')})")

    async def _resolve(self, req: Request, rec: dict[str, Any]) -> str:
        if as_ip(req.host) is not None:
            candidates = [str(as_ip(req.host))]
            trusted = False
        else:
            try:
                candidates = await self.resolver.resolve(req.host, req.port)
            except ResolveError as exc:
                raise Blocked(502, "", str(exc)) from None
            trusted = self.resolver.trusted
        refusal: Decision | None = None
        for ip in candidates:
            d = self.cfg.decider.check_address(req, ip, trusted)
            if d.action == "allow":
                rec["ip"] = ip
                return ip
            refusal = refusal or d
            rec["ip"] = ip
        assert refusal is not None
        rec["rule"] = refusal.rule
        raise Blocked(403, refusal.rule, refusal.reason)

    async def _open(
        self, ip: str, req: Request, tls: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    ip, req.port, limit=CHUNK,
                    ssl=self._upstream_ctx if tls else None,
                    server_hostname=req.host if tls else None,
                ),
                timeout=self.cfg.connect_timeout_s,
            )  # fmt: skip
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            why = f"cannot connect to {req.host} ({ip}:{req.port}): {exc}"
            raise Blocked(502, "", why) from None

    def _record(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "host": None, "port": None, "ip": None, "method": None,
                "path": None, "status": None, "bytes_up": 0, "bytes_down": 0,
                "t0": time.monotonic()}  # fmt: skip

    def _finish(self, rec: dict[str, Any], decision: str) -> None:
        rec["duration_ms"] = round((time.monotonic() - rec.pop("t0")) * 1000, 3)
        rule = rec.pop("rule", None)
        self._emit(rec, decision, rule or None)

    # -- plain HTTP (and inspected HTTPS) ---------------------------------------

    async def _forward(self, conn: h11.Connection, ev: h11.Request, client: Stream,
                       tunnel: tuple[str, int, str] | None) -> bool:  # fmt: skip
        rec = self._record("https" if tunnel else "http")
        if tunnel is not None:
            rec.update(ip=tunnel[2], inspected=True)
        decision = "deny"
        method = ev.method.decode("ascii", "replace")
        target = ev.target.decode("ascii", "replace")
        rec["method"] = method
        try:
            try:
                if tunnel is None:
                    url = urlsplit(target)
                    if url.scheme != "http" or not url.netloc:
                        raise Blocked(400, "", "a proxy request needs an absolute http:// URL")
                    host, port = _split_authority(url.netloc.rpartition("@")[2], 80)
                    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                else:
                    host, port, _ip = tunnel
                    path = target
                rec.update(host=host, port=port, path=path)
                # Origin-form only in a tunnel: an absolute-form target ("GET
                # http://other/ ...") names its own authority, which an
                # upstream must prefer to Host (RFC 9112 3.2.2).
                if not (path.startswith("/") or (path == "*" and method == "OPTIONS")):
                    raise Blocked(400, RULE_HOST_HEADER,
                                  f"target {path!r} in a TLS tunnel is not a /path")
                names = [k.lower() for k, _ in ev.headers]
                if b"transfer-encoding" in names and b"content-length" in names:
                    # h11 frames by chunked; an upstream that frames by
                    # Content-Length would see another request (smuggling).
                    raise Blocked(400, "", "both Content-Length and Transfer-Encoding")
                hh = _header(ev.headers, b"host")
                if hh is not None:
                    h_host, h_port = _split_authority(hh, port)
                    if (h_host, h_port) != (host, port):
                        raise Blocked(
                            403,
                            RULE_HOST_HEADER,
                            f"Host header {hh!r} differs from the target {host}:{port}",
                        )
                req = Request(host, port, "https" if tunnel else "http", method, path)
                await self._decide(req, rec)
                if tunnel is not None:
                    ip = tunnel[2]  # resolved and checked when the tunnel was opened
                else:
                    ip = await self._resolve(req, rec)
            except ValueError as exc:
                await self._plain_error(conn, client, 400, "", str(exc))
                return False
            except Blocked as b:
                rec["status"] = b.status
                rec["reason"] = b.reason
                if b.rule:
                    rec["rule"] = b.rule
                await self._plain_error(conn, client, b.status, b.rule, b.reason)
                return False
            for fresh in (False, True):
                try:
                    up = await self._acquire(ip, req, tunnel is not None, fresh)
                except Blocked as b:
                    rec.update(status=b.status, reason=b.reason)
                    await self._plain_error(conn, client, b.status, b.rule, b.reason)
                    return False
                decision = "allow"
                done = False
                try:
                    keep = await self._exchange(conn, ev, client, up, host, port, path, rec)
                    done = True
                    return keep
                except _Stale:
                    continue  # a pooled connection the server had closed: once more
                except Blocked as b:  # the response was refused before any of it went out
                    decision = "deny"
                    rec.update(status=b.status, reason=b.reason, rule=b.rule)
                    await self._plain_error(conn, client, b.status, b.rule, b.reason)
                    return False
                finally:
                    if done:
                        self._release(up)
                    else:
                        up.stream.close()
            return False
        finally:
            if rec.get("status") is None:
                rec["aborted"] = True
            self._finish(rec, decision)

    async def _acquire(self, ip: str, req: Request, tls: bool, fresh: bool) -> _Upstream:
        """A kept-alive upstream connection to exactly this address, or a new one."""
        key = (ip, req.port, req.host, tls)
        idle = self._pool.get(key, [])
        while idle and not fresh:
            u = idle.pop()
            if time.monotonic() - u.idle_since < POOL_IDLE_S and not u.stream.reader.at_eof():
                u.reused = True
                return u
            u.stream.close()
        reader, writer = await self._open(ip, req, tls)
        return _Upstream(Plain(reader, writer), h11.Connection(h11.CLIENT), key)

    def _release(self, u: _Upstream) -> None:
        idle = self._pool.setdefault(u.key, [])
        if (u.conn.our_state is h11.DONE and u.conn.their_state is h11.DONE
                and len(idle) < POOL_PER_KEY and self._stop is not None
                and not self._stop.is_set()):  # fmt: skip
            u.conn.start_next_cycle()
            u.idle_since = time.monotonic()
            idle.append(u)
        else:
            u.stream.close()

    async def _exchange(self, conn: h11.Connection, ev: h11.Request, client: Stream,
                        u: _Upstream, host: str, port: int, path: str,
                        rec: dict[str, Any]) -> bool:  # fmt: skip
        # A request without a body may be replayed once if a pooled connection
        # turns out to have been closed by the server before any response.
        replayable = u.reused and not any(
            k.lower() in (b"content-length", b"transfer-encoding") and v not in (b"0",)
            for k, v in ev.headers
        )
        headers = [(k, v) for k, v in ev.headers if k.lower() not in HOP_BY_HOP]
        if not any(k.lower() == b"host" for k, _ in headers):
            default = 443 if rec["kind"] == "https" else 80
            headers.insert(0, (b"host", host.encode() if port == default
                               else f"{host}:{port}".encode()))  # fmt: skip
        seen = Request(host, port, "https" if rec["kind"] == "https" else "http",
                       rec["method"], path)  # fmt: skip
        if self.cfg.rewrite_headers is not None:
            headers = self.cfg.rewrite_headers(seen, headers)
        flt = self.cfg.exchange_filter(seen) if self.cfg.exchange_filter is not None else None
        if flt is None:
            return await self._send_exchange(conn, ev, client, u, headers, replayable, rec, None)
        try:
            return await self._send_exchange(conn, ev, client, u, flt.request(headers),
                                             replayable, rec, flt)  # fmt: skip
        finally:
            flt.close()

    async def _send_exchange(self, conn: h11.Connection, ev: h11.Request, client: Stream,
                             u: _Upstream, headers: Headers, replayable: bool,
                             rec: dict[str, Any], flt: ExchangeFilter | None) -> bool:  # fmt: skip
        up, upstream = u.conn, u.stream
        path = rec["path"]
        try:
            await upstream.write(up.send(h11.Request(method=ev.method, target=path.encode(),
                                                     headers=headers)) or b"")  # fmt: skip
        except OSError:
            if replayable:
                raise _Stale() from None
            raise
        while True:  # request body
            cev = await _next_event(conn, client)
            if isinstance(cev, h11.Data):
                rec["bytes_up"] += len(cev.data)
                await upstream.write(up.send(cev) or b"")
            elif isinstance(cev, h11.EndOfMessage):
                await upstream.write(up.send(h11.EndOfMessage()) or b"")
                break
            else:
                return False
        while True:  # response head
            try:
                uev = await _next_event(up, upstream)
            except (OSError, h11.RemoteProtocolError):
                if replayable:
                    raise _Stale() from None
                raise
            if isinstance(uev, h11.Response):
                break
            if not isinstance(uev, h11.InformationalResponse):
                if replayable:
                    raise _Stale()
                return False
        rheaders = [(k, v) for k, v in uev.headers if k.lower() not in HOP_BY_HOP]
        reason = bytes(uev.reason)
        if flt is not None:
            try:
                reason, rheaders = flt.response_head(uev.status_code, reason, rheaders)
            except GlassroomError as exc:
                raise Blocked(502, exc.rule or "", str(exc)) from None
        rec["status"] = uev.status_code
        await client.write(conn.send(h11.Response(status_code=uev.status_code, headers=rheaders,
                                                  reason=reason)) or b"")  # fmt: skip
        pending: Any = None
        while True:
            uev, pending = pending or await _next_event(up, upstream), None
            if isinstance(uev, h11.Data):
                # The Data events already buffered (many tiny chunks in one
                # read) go out as one: the filter rescans what it held back
                # at each call, and a server must not make that quadratic.
                pieces = [bytes(uev.data)]
                got = len(pieces[0])
                while got < CHUNK:
                    nxt = up.next_event()
                    if not isinstance(nxt, h11.Data):
                        pending = None if nxt is h11.NEED_DATA else nxt
                        break
                    pieces.append(bytes(nxt.data))
                    got += len(nxt.data)
                rec["bytes_down"] += got
                data = b"".join(pieces)
                data = data if flt is None else flt.response_body(data)
                if data:
                    await client.write(conn.send(h11.Data(data=data)) or b"")
            elif isinstance(uev, h11.EndOfMessage):
                rest = flt.response_end() if flt is not None else b""
                if rest:
                    await client.write(conn.send(h11.Data(data=rest)) or b"")
                await client.write(conn.send(h11.EndOfMessage()) or b"")
                return True
            else:
                return False

    # -- CONNECT ----------------------------------------------------------------

    async def _tunnel(self, conn: h11.Connection, ev: h11.Request, client: Stream) -> None:
        rec = self._record("connect")
        rec["method"] = "CONNECT"
        decision = "deny"
        try:
            try:
                host, port = _split_authority(ev.target.decode("ascii", "replace"), None)
                rec.update(host=host, port=port)
                hh = _header(ev.headers, b"host")
                if hh is not None and _split_authority(hh, port) != (host, port):
                    raise Blocked(
                        403, RULE_HOST_HEADER, f"Host header {hh!r} differs from the CONNECT target"
                    )
                req = Request(host, port, "https")
                dec = await self._decide(req, rec)
                ip = await self._resolve(req, rec)
            except ValueError as exc:
                rec["status"] = 400
                await self._plain_error(conn, client, 400, "", str(exc))
                return
            except Blocked as b:
                rec["status"] = b.status
                rec["reason"] = b.reason
                if b.rule:
                    rec["rule"] = b.rule
                await self._plain_error(conn, client, b.status, b.rule, b.reason)
                return
            await client.write(conn.send(h11.Response(status_code=200, headers=[])) or b"")
            rec["status"] = 200
            hello, _closed = conn.trailing_data
            try:
                hello = await asyncio.wait_for(self._read_hello(client, bytes(hello)),
                                               HELLO_TIMEOUT_S)  # fmt: skip
                sni = parse_sni(hello[: client_hello_length(hello)])
            except (NotTLS, TimeoutError) as exc:
                rec.update(rule=RULE_SNI, reason=f"tunnel is not TLS: {exc}", status=None)
                rec["closed"] = "not TLS"
                return
            rec["sni"] = sni
            if sni is None and as_ip(host) is None:
                rec.update(rule=RULE_SNI, reason="TLS without SNI to a named host")
                return
            if sni is not None and sni != host:
                rec.update(
                    rule=RULE_SNI, reason=f"TLS SNI {sni!r} differs from the CONNECT host {host!r}"
                )
                return
            if dec.inspect_tls and self.cfg.ca is not None and sni is not None:
                rec["inspected"] = True
                decision = "allow"
                tls = TLSStream(client.reader, client.writer,  # type: ignore[attr-defined]
                                self.cfg.ca.server_context(host), server_side=True,
                                initial=hello)  # fmt: skip
                await tls.handshake()
                await self._serve_http(tls, tunnel=(host, port, ip))
                return
            ureader, uwriter = await self._open(ip, req, tls=False)
            decision = "allow"
            upstream = Plain(ureader, uwriter)
            try:
                cut = await self._splice(client, upstream, rec, hello)
            finally:
                upstream.close()
            if cut is not None:
                decision = "deny"
                rec.update(rule=RULE_SNI, reason=f"tunnel is not TLS: {cut}", closed="not TLS")
        except Blocked as b:
            rec.update(status=b.status, reason=b.reason)
        finally:
            self._finish(rec, decision)

    async def _read_hello(self, client: Stream, buf: bytes) -> bytes:
        while True:
            need = client_hello_length(buf)
            if need is not None and len(buf) >= need:
                return buf
            if len(buf) > 70000:
                raise NotTLS("ClientHello too large")
            data = await client.read(CHUNK)
            if not data:
                raise NotTLS("closed before a ClientHello")
            buf += data

    async def _splice(self, client: Stream, upstream: Stream, rec: dict[str, Any],
                      hello: bytes) -> str | None:  # fmt: skip
        """Pass TLS records both ways, starting with the client's ``hello``.

        Each direction goes through a RecordChecker: the first byte that is
        not TLS record framing cuts both sides at once (nothing of that
        record is forwarded).  Returns why it was cut, or None.
        """
        cut: list[str] = []

        async def pump(src: Stream, dst: Stream, key: str, check: RecordChecker,
                       data: bytes) -> None:  # fmt: skip
            try:
                data = data or await src.read(CHUNK)
                while data:
                    ok = check.feed(data)
                    if ok:
                        rec[key] += len(ok)
                        await dst.write(ok)
                    data = await src.read(CHUNK)
            except NotTLS as exc:
                cut.append(f"{'client' if key == 'bytes_up' else 'server'}: {exc}")
                client.close()
                upstream.close()
            finally:
                w = getattr(dst, "writer", None)
                if w is not None and w.can_write_eof():
                    with contextlib.suppress(OSError, RuntimeError):
                        w.write_eof()

        # The server's first record answers the hello: a handshake or an alert.
        results = await asyncio.gather(
            pump(client, upstream, "bytes_up", RecordChecker(), hello),
            pump(upstream, client, "bytes_down",
                 RecordChecker(first_types=frozenset({21, 22})), b""),
            return_exceptions=True,
        )  # fmt: skip
        for r in results:
            if isinstance(r, asyncio.CancelledError):
                raise r
        return cut[0] if cut else None
