"""The front door of a fleet: one ASGI app that speaks the single host's APIs.

It holds no sandbox itself.  It authenticates the tenant for what needs the
whole fleet (create and list), enforces the tenant's ``max_sandboxes``
across every node, places a create (``_placement``), and forwards every
other call, bytes unchanged and streamed both ways, to the node that holds
the sandbox the call names:

* the path: ``/v1/sandboxes/{id}/...``, ``/sandboxes/{id}/...``, ``/v2/...``;
* the ``E2b-Sandbox-Id`` header (envd, the code interpreter, ports);
* the host: ``{port}-{id}.domain``.

The node then does everything a single host does, tenancy included: the
same config, the same keys, so another tenant's id is a 404 there exactly as
on one host.  An id no node holds is forwarded to any node, which answers
the single host's 404 (or envd's 502) in its family's envelope.  A call
that names no sandbox (snapshots, approvals, a signed file URL) is asked of
each node in turn until one knows it; listings are merged.

A sandbox whose node died is *lost*: its own-API and control-plane calls
get 410 ``sandbox.lost`` naming the node, envd and Connect calls E2B's
"not running" 502 (what E2B's SDKs expect of a sandbox that is gone).

MCP (``/mcp``, streamable HTTP) is pinned, not placed per sandbox: each agent
serves ``glassroom mcp --http``'s app on the node's own service, and an MCP
session stays on the node that opened it (``Mcp-Session-Id``), since its
sandboxes live there; a session-less (2026-07-28) client is pinned to one
node per tenant, for its handles.  A session whose node left is a 404, which
tells an MCP client to open a new session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread
import httpx

from .. import __version__
from ..interfaces.http import ApiError, ServeConfig, Tenant
from ..interfaces.http._edge import Family, _inflate, error_payload, family_of, strict_json
from ._nodes import Fleet, Node
from ._placement import declared, policy_of, requirement, template_of

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("glassroom.fleet")

CREATE_PATHS = frozenset({"/v1/sandboxes", "/sandboxes", "/v2/sandboxes"})
#: GETs answered by merging every node's JSON array.
MERGED = frozenset({"/v1/sandboxes", "/sandboxes", "/v2/sandboxes", "/v1/snapshots",
                    "/snapshots", "/v1/approvals"})  # fmt: skip
_PATH_ID = re.compile(r"^(?:/v1|/v2)?/sandboxes/([^/]{1,200})(?:/|$)")
_HOST_ID = re.compile(r"^[0-9]{1,5}-(sb-[0-9a-f]{6,64})\.", re.ASCII)
_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                  b"te", b"trailers", b"transfer-encoding", b"upgrade"})  # fmt: skip
_OWN_HEADERS = frozenset({b"server", b"date"})  # uvicorn adds its own
#: How often an unknown id may trigger a rebuild of the table from the agents.
RESYNC_EVERY_S = 1.0


class NodeDown(Exception):
    """The node did not answer (connection refused, reset before a response)."""


def sandbox_id_of(path: str, headers: dict[str, str]) -> str | None:
    """The sandbox a request is for, the three ways a client can say it."""
    m = _PATH_ID.match(path)
    if m:
        return m.group(1)
    sid = headers.get("e2b-sandbox-id")
    if sid:
        return sid
    m = _HOST_ID.match(headers.get("host", ""))
    return m.group(1) if m else None


def _key(headers: dict[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


class FrontDoor:
    """The ASGI app (see the module docstring)."""

    def __init__(self, fleet: Fleet, cfg: ServeConfig | None = None) -> None:
        self.fleet = fleet
        self.cfg = cfg or fleet.cfg
        self._client: httpx.AsyncClient | None = None
        self._reserved: dict[str, int] = {}
        self._placing: dict[str, int] = {}  # node -> creates being placed there now
        self._mcp_sessions: dict[str, str] = {}  # Mcp-Session-Id -> node
        self._mcp_pins: dict[str, str] = {}  # tenant -> node, for session-less MCP clients
        self._lock = threading.RLock()
        self._resynced = 0.0

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
            # TCP_NODELAY: httpx writes a request's head and body apart, and Nagle's
            # wait for the node's delayed ACK added 40 ms to every forwarded call.
            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=5.0),
                transport=httpx.AsyncHTTPTransport(limits=limits, socket_options=nodelay),
                trust_env=False,
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope.get("path", "")
        family = family_of(path, headers)
        started = False

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self._route(scope, receive, tracked, headers, path)
        except Exception as exc:
            if started:  # a stream broke off: nothing more can be said to this client
                log.warning("front door: %s %s ended early: %s", scope.get("method"), path, exc)
                return
            if not isinstance(exc, ApiError):  # a bug or Ray failing: the envelope, no traceback
                log.exception("front door: %s %s", scope.get("method"), path)
                exc = ApiError(503, "unavailable", "the fleet could not answer; see its log")
            status, body, ctype = error_payload(family, exc, streaming=_streaming(path))
            await _answer(send, status, body, ctype)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routing ---------------------------------------------------------------

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], path: str
    ) -> None:
        method = scope.get("method", "GET")
        if path == "/v1/health":
            body = {"status": "ok", "version": __version__}
            await _answer(send, 200, json.dumps(body).encode(), "application/json")
            return
        if path == "/mcp" or path.startswith("/mcp/"):
            await self._mcp(scope, receive, send, headers)
            return
        if path == "/v1/fleet/nodes" and method == "GET":
            self._tenant(headers)
            nodes = [
                {"name": n.name, "url": n.url, "tiers": n.tiers, "alive": n.alive}
                for n in list(self.fleet.nodes.values())
            ]
            await _answer(send, 200, json.dumps(nodes).encode(), "application/json")
            return
        if path == "/v1/fleet/audit" and method == "POST":
            self._tenant(headers)
            from ._audit import anchor_heads

            report = await anyio.to_thread.run_sync(anchor_heads, self.fleet)
            await _answer(send, 200, json.dumps(report).encode(), "application/json")
            return
        if method == "POST" and path in CREATE_PATHS:
            await self._create(scope, receive, send, headers, path)
            return
        if method == "GET" and path in MERGED:
            await self._merged(scope, receive, send)
            return
        sid = sandbox_id_of(path, headers)
        if sid is None:
            await self._ask_each(scope, receive, send)
            return
        node = await self._holder(sid, headers, path)
        if method == "DELETE" and _PATH_ID.fullmatch(path + "/"):
            await self._destroy(node, sid, scope, receive, send, headers, path)
            return
        status = await self._forward_or_lost(node, sid, scope, receive, send, headers, path)
        if path.endswith("/fork") and 200 <= status < 300:
            self._resynced = 0.0  # the forks are on that node: the next lookup finds them

    async def _destroy(
        self,
        node: Node,
        sid: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        path: str,
    ) -> None:
        """A destroy, buffered: the table lets go of the sandbox (and its placement
        group) before its client hears that it is gone."""
        body = await _read(receive, self.cfg.max_request_bytes)
        try:
            status, hdrs, got = await self._buffered(node, scope, body)
        except NodeDown:
            await anyio.to_thread.run_sync(self.fleet.check_agent, node.name)
            lost = self._lost_error(sid, headers, path)
            raise lost or ApiError(
                503, "unavailable", f"node {node.name!r} did not answer", rule="fleet"
            ) from None
        if 200 <= status < 300:
            self.fleet.drop(sid)
        await _answer_raw(send, status, hdrs, got)

    async def _mcp(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]
    ) -> None:
        """MCP, pinned: a session to the node that opened it (its sandboxes are
        there), a session-less client to one node per tenant (its handles are)."""
        session = headers.get("mcp-session-id")
        if session:
            name = self._mcp_sessions.get(session)
            node = self.fleet.nodes.get(name) if name else None
            if node is None or not node.alive:
                where = f": it was on node {name!r}, which left the fleet" if name else ""
                msg = f"session not found{where}"
                err = {"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": msg}}
                await _answer(send, 404, json.dumps(err).encode(), "application/json")
                return
        else:
            tenant = self.cfg.tenant_for(_key(headers))
            pin = tenant.name if tenant else ""
            node = self.fleet.nodes.get(self._mcp_pins.get(pin, ""))
            if node is None or not node.alive:
                live = self.fleet.live_nodes()
                if not live:
                    raise ApiError(503, "unavailable", "no node of the fleet is up", rule="fleet")
                node = min(live, key=lambda n: self.fleet.load(n.name))
                self._mcp_pins[pin] = node.name
        chosen = node

        def opened(resp: httpx.Response) -> None:
            sid = resp.headers.get("mcp-session-id")
            if sid and resp.status_code < 300:
                self._mcp_sessions[sid] = chosen.name

        try:
            status = await self.forward(node, scope, receive, send, base=node.mcp_url,
                                        on_start=opened)  # fmt: skip
        except NodeDown:
            await anyio.to_thread.run_sync(self.fleet.check_agent, node.name)
            raise ApiError(503, "unavailable", f"node {node.name!r} did not answer",
                           rule="fleet") from None  # fmt: skip
        if session and scope.get("method") == "DELETE" and status < 300:
            self._mcp_sessions.pop(session, None)

    def _tenant(self, headers: dict[str, str]) -> Tenant:
        tenant = self.cfg.tenant_for(_key(headers))
        if tenant is None:
            raise ApiError(401, "unauthenticated", "missing or unknown API key")
        return tenant

    def _lost_error(self, sid: str, headers: dict[str, str], path: str) -> ApiError | None:
        got = self.fleet.lost.get(sid)
        if got is None:
            return None
        tenant, node = got
        msg = f"sandbox {sid} was lost: its node {node!r} left the fleet, and the sandbox with it"
        family = family_of(path, headers)
        if family in (Family.OWN, Family.CONTROL):
            asker = self.cfg.tenant_for(_key(headers))
            if asker is None:
                return ApiError(401, "unauthenticated", "missing or unknown API key")
            if asker.name != tenant:
                return ApiError(404, "not_found", f"sandbox {sid} was not found")
            return ApiError(410, "sandbox.lost", msg, rule="fleet.node_lost")
        return ApiError(502, "unavailable", msg, rule="fleet.node_lost")

    async def _holder(self, sid: str, headers: dict[str, str], path: str) -> Node:
        node = self.fleet.where(sid)
        if node is None:
            lost = self._lost_error(sid, headers, path)
            if lost is not None:
                raise lost
            if time.monotonic() - self._resynced > RESYNC_EVERY_S:
                self._resynced = time.monotonic()
                await anyio.to_thread.run_sync(self.fleet.resync)
                node = self.fleet.where(sid)
        if node is None or not node.alive:
            lost = self._lost_error(sid, headers, path)
            if lost is not None:
                raise lost
            node = self._any_node()  # it answers the single host's "not found"
        return node

    def _any_node(self) -> Node:
        nodes = self.fleet.live_nodes()
        if not nodes:
            raise ApiError(503, "unavailable", "no node of the fleet is up", rule="fleet")
        return nodes[0]

    async def _forward_or_lost(
        self,
        node: Node,
        sid: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        path: str,
    ) -> int:
        try:
            return await self.forward(node, scope, receive, send)
        except NodeDown:
            alive = await anyio.to_thread.run_sync(self.fleet.check_agent, node.name)
            lost = self._lost_error(sid, headers, path)
            if lost is not None:
                raise lost from None
            raise ApiError(
                503,
                "unavailable",
                f"node {node.name!r} did not answer" + ("" if alive else " and has left"),
                rule="fleet",
            ) from None

    # -- create ----------------------------------------------------------------

    async def _create(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], path: str
    ) -> None:
        tenant = self._tenant(headers)
        body = await _read(receive, self.cfg.max_request_bytes)
        parsed = await anyio.to_thread.run_sync(self._parse, body, headers)
        e2b = path != "/v1/sandboxes"
        policy = policy_of(self.cfg, parsed, e2b=e2b) if isinstance(parsed, dict) else None
        backend = parsed.get("backend") if isinstance(parsed, dict) and not e2b else None
        slot = self._slot(tenant)
        if slot._busy() >= tenant.max_sandboxes:
            # deadlines end sandboxes on their nodes without telling us: ask them
            await anyio.to_thread.run_sync(self.fleet.resync, tenant.name)
        with slot:
            if policy is None:
                # A snapshot, or input the node must judge: the first node that
                # knows the snapshot (or any, for bad input) answers.
                await self._ask_each(
                    scope,
                    receive,
                    send,
                    body=body,
                    on_created=lambda got, node: self._admitted(got, node, tenant, None),
                )
                return
            template = template_of(self.cfg, parsed, e2b=e2b) if isinstance(parsed, dict) else None
            req = await anyio.to_thread.run_sync(
                lambda: requirement(policy, backend, declared(template))
            )
            pg, node_id, chosen = await anyio.to_thread.run_sync(self._place, req)
            try:
                await self._create_on(node_id, pg, tenant, scope, receive, send, body)
            finally:
                self._placed(chosen)

    async def _create_on(
        self,
        node_id: str,
        pg: Any,
        tenant: Tenant,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
    ) -> None:
        node = self.fleet.node_by_id(node_id)
        if node is None:
            self.fleet.placer.release(pg)
            raise ApiError(503, "unavailable", "the chosen node has no agent", rule="fleet")
        try:  # buffered: the table knows the sandbox before its client does
            status, hdrs, got = await self._buffered(node, scope, body)
        except NodeDown:
            self.fleet.placer.release(pg)
            await anyio.to_thread.run_sync(self.fleet.check_agent, node.name)
            raise ApiError(
                503, "unavailable", f"node {node.name!r} did not answer", rule="fleet"
            ) from None
        if status == 201:
            self._admitted(got, node, tenant, pg)
        else:
            self.fleet.placer.release(pg)
        await _answer_raw(send, status, hdrs, got)

    def _place(self, req: Any) -> tuple[Any, str, str | None]:
        """Place on the least loaded node that could hold it (Ray decides if it can)."""
        names = self.fleet.placer.candidates(req)
        live = {n.name for n in self.fleet.live_nodes()}
        with self._lock:
            order = sorted(
                (n for n in names if n in live),
                key=lambda n: self.fleet.load(n) + self._placing.get(n, 0),
            )
            if order:
                self._placing[order[0]] = self._placing.get(order[0], 0) + 1
        try:
            pg, node_id = self.fleet.placer.place(req, order)
        except BaseException:
            self._placed(order[0] if order else None)
            raise
        return pg, node_id, order[0] if order else None

    def _placed(self, name: str | None) -> None:
        """A create chosen for ``name`` is done (listed in the table, or failed)."""
        if name is not None:
            with self._lock:
                self._placing[name] -= 1

    def _admitted(self, got: bytes | None, node: Node, tenant: Tenant, pg: Any) -> None:
        try:
            info = json.loads(got or b"{}")
            sid = info.get("sandbox_id") or info.get("sandboxID")
        except (ValueError, AttributeError):
            sid = None
        if isinstance(sid, str):
            self.fleet.add(sid, node.name, tenant.name, pg)
        else:
            self.fleet.placer.release(pg)

    def _parse(self, body: bytes, headers: dict[str, str]) -> Any:
        enc = headers.get("content-encoding", "").strip().lower()
        try:
            if enc and enc != "identity":
                body = _inflate(body, enc, self.cfg.max_request_bytes)
            return strict_json(body) if body else {}
        except Exception:
            return None  # the node refuses it, in its own words

    class _SlotCtx:
        def __init__(self, front: FrontDoor, tenant: Tenant) -> None:
            self.front, self.tenant = front, tenant

        def __enter__(self) -> None:
            f, t = self.front, self.tenant
            with f._lock:  # checked and taken at once
                busy = self._busy()
                if busy >= t.max_sandboxes:
                    raise ApiError(
                        429,
                        "limit",
                        f"tenant {t.name!r} already has {busy} sandboxes across the fleet "
                        f"(max {t.max_sandboxes})",
                        rule="tenant.max_sandboxes",
                    )
                f._reserved[t.name] = f._reserved.get(t.name, 0) + 1

        def _busy(self) -> int:
            f = self.front
            with f._lock:
                return f.fleet.count(self.tenant.name) + f._reserved.get(self.tenant.name, 0)

        def __exit__(self, *exc: object) -> None:
            with self.front._lock:
                self.front._reserved[self.tenant.name] -= 1

    def _slot(self, tenant: Tenant) -> FrontDoor._SlotCtx:
        return FrontDoor._SlotCtx(self, tenant)

    # -- fan-out ---------------------------------------------------------------

    async def _merged(self, scope: Scope, receive: Receive, send: Send) -> None:
        nodes = self.fleet.live_nodes()
        if not nodes:
            raise ApiError(503, "unavailable", "no node of the fleet is up", rule="fleet")
        answers = await asyncio.gather(
            *(self._buffered(n, scope, b"") for n in nodes), return_exceptions=True
        )
        merged: list[Any] = []
        for a in answers:
            if isinstance(a, BaseException):
                continue  # a node that is going: the watcher marks it
            status, hdrs, data = a
            if status != 200:
                await _answer(send, status, data, hdrs.get("content-type", "application/json"))
                return
            try:
                items = json.loads(data)
            except ValueError:
                continue
            if isinstance(items, list):
                merged.extend(items)
        await _answer(send, 200, json.dumps(merged).encode(), "application/json")

    async def _ask_each(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes | None = None,
        on_created: Callable[[bytes, Node], None] | None = None,
    ) -> tuple[int, bytes | None, Node | None]:
        """Each node in turn until one knows what the request names (not 404)."""
        if body is None:
            body = await _read(receive, self.cfg.max_request_bytes)
        nodes = self.fleet.live_nodes()
        if not nodes:
            raise ApiError(503, "unavailable", "no node of the fleet is up", rule="fleet")
        last: tuple[int, dict[str, str], bytes] | None = None
        for n in nodes:
            try:
                last = await self._buffered(n, scope, body)
            except NodeDown:
                continue
            signed = scope.get("path") == "/files" and last[0] == 401
            if last[0] != 404 and not (signed and n is not nodes[-1]):
                if last[0] == 201 and on_created is not None:
                    on_created(last[2], n)
                await _answer_raw(send, *last)
                return last[0], last[2], n
        if last is None:
            raise ApiError(503, "unavailable", "no node of the fleet answered", rule="fleet")
        await _answer_raw(send, *last)
        return last[0], last[2], None

    async def _buffered(
        self, node: Node, scope: Scope, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        req = self._request(node, scope, body)
        try:
            resp = await self.client.send(req)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise NodeDown(str(exc)) from None
        hdrs = {k.lower(): v for k, v in resp.headers.items()}
        return resp.status_code, hdrs, resp.content

    # -- forwarding ------------------------------------------------------------

    def _request(
        self,
        node: Node,
        scope: Scope,
        body: bytes | AsyncIterator[bytes],
        base: str | None = None,
    ) -> httpx.Request:
        raw = scope.get("raw_path") or scope.get("path", "/").encode()
        target = raw.decode("latin-1")
        qs = scope.get("query_string", b"")
        if qs:
            target += "?" + qs.decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        if isinstance(body, bytes):
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        if base is not None:  # MCP: the node's own host (the SDK checks Host against it)
            headers = [(k, v) for k, v in headers if k.lower() != b"host"]
            headers.append((b"host", base.split("://", 1)[1].encode()))
        return self.client.build_request(
            scope.get("method", "GET"), (base or node.url) + target, headers=headers, content=body
        )

    async def forward(
        self,
        node: Node,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        body: bytes | None = None,
        base: str | None = None,
        on_start: Callable[[httpx.Response], None] | None = None,
    ) -> int:
        """Send the request to ``node`` (at ``base``: another of its servers) and
        its answer back, streamed; the status is returned.  ``on_start`` sees
        the answer's head before the client does.  NodeDown before an answer."""
        if body is None:
            body = await _read(receive, self.cfg.max_request_bytes, stream_over=True)
        req = self._request(node, scope, body, base)
        try:
            resp = await self.client.send(req, stream=True)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise NodeDown(str(exc)) from None
        try:
            if on_start is not None:
                on_start(resp)
            out = [(k, v) for k, v in resp.headers.raw if k.lower() not in _HOP | _OWN_HEADERS]
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            try:
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (httpx.HTTPError, OSError):
                log.warning("node %s: a streamed answer broke off", node.name)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()
        return resp.status_code


def _streaming(path: str) -> bool:
    from ..interfaces.http._edge import CONNECT_STREAMING

    return path.lstrip("/") in CONNECT_STREAMING


async def _read(receive: Receive, limit: int, *, stream_over: bool = False) -> Any:
    """The request body, whole.  Past ``limit``, refused (413) -- or, with
    ``stream_over``, passed on as a stream so the node refuses it in its words."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return b"".join(chunks)
        part = msg.get("body", b"")
        seen += len(part)
        chunks.append(part)
        if seen > limit:
            if not stream_over:
                raise ApiError(
                    413, "too_large", f"request body over {limit} bytes",
                    rule="serve.max_request_bytes",
                )  # fmt: skip
            return _rest(chunks, receive, msg.get("more_body", False))
        if not msg.get("more_body", False):
            return b"".join(chunks)


async def _rest(head: list[bytes], receive: Receive, more: bool) -> AsyncIterator[bytes]:
    for c in head:
        yield c
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        yield msg.get("body", b"")
        more = msg.get("more_body", False)


async def _answer(send: Send, status: int, body: bytes, ctype: str) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _answer_raw(send: Send, status: int, hdrs: dict[str, str], body: bytes) -> None:
    skip = {"content-length", "content-encoding", "transfer-encoding", "connection", "server",
            "date"}  # fmt: skip
    headers = [(k.encode(), v.encode()) for k, v in hdrs.items() if k not in skip]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
