"""Helpers for the interface tests: a real ``glassroom serve`` on 127.0.0.1.

One server per test module (uvicorn in a thread of the test process, so leak
checks see its children), three tenants with fresh keys, and every log
record the server emitted kept, so a test can assert that no request raised
an unhandled exception.  The E2B SDKs are pointed at it the documented way:
``E2B_API_URL`` / ``E2B_SANDBOX_URL`` / ``E2B_API_KEY``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("fastapi", reason="glassroom[serve] is not installed")

import uvicorn

if TYPE_CHECKING:
    from mcp.types import CallToolResult

from glassroom.interfaces.http import SandboxService, ServeConfig, create_app, new_key

TENANTS = {"alice": 40, "bob": 40, "carol": 2}


@dataclass
class Server:
    url: str
    keys: dict[str, str]
    service: SandboxService
    cfg: ServeConfig
    logs: list[logging.LogRecord] = field(default_factory=list)

    def errors(self) -> list[str]:
        """Log lines that show an unhandled exception or a server error."""
        out = []
        for r in self.logs:
            if r.exc_info or r.levelno >= logging.ERROR:
                out.append(f"{r.name}: {r.getMessage()}")
        return out

    def headers(self, tenant: str = "alice") -> dict[str, str]:
        return {"X-API-Key": self.keys[tenant]}


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def add_keys(cfg: ServeConfig, caps: Mapping[str, int]) -> dict[str, str]:
    """A fresh key for each tenant of ``caps`` (tenant: its max_sandboxes)."""
    keys = {}
    for tenant, cap in caps.items():
        keys[tenant] = new_key()
        cfg.add_key(tenant, keys[tenant], max_sandboxes=cap)
    return keys


def start_server(data_dir: Path, **cfg_kw: Any) -> tuple[Server, uvicorn.Server, threading.Thread]:
    cfg = ServeConfig(data_dir=data_dir, **cfg_kw)
    keys = add_keys(cfg, TENANTS)
    svc = SandboxService(cfg)
    port = free_port()
    app = create_app(cfg, service=svc)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="info", access_log=False, lifespan="on"
        )
    )
    logs: list[logging.LogRecord] = []
    handler = _Keep(logs)
    for name in ("uvicorn", "uvicorn.error", "glassroom", "fastapi"):
        logging.getLogger(name).addHandler(handler)
    th = threading.Thread(target=server.run, name="test-serve", daemon=True)
    th.start()
    end = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < end, "glassroom serve did not start"
        assert th.is_alive(), "glassroom serve exited during start"
        time.sleep(0.02)
    return Server(f"http://127.0.0.1:{port}", keys, svc, cfg, logs), server, th


@contextmanager
def serving_e2b(data_dir: Path, **cfg_kw: Any) -> Iterator[Server]:
    """:func:`start_server`, with the E2B SDKs pointed at it the documented way
    (``E2B_API_URL`` / ``E2B_SANDBOX_URL`` / ``E2B_API_KEY``, tenant alice) until
    the block ends; then the environment is put back and the server stopped."""
    import os

    srv, server, th = start_server(data_dir, **cfg_kw)
    names = ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY", "E2B_DOMAIN")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.keys["alice"])
    try:
        yield srv
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.should_exit = True
        th.join(20)
        srv.service.close()


def wait_listening(proc: Any, port: int, timeout_s: float = 30.0) -> None:
    """Wait (bounded) until a server subprocess accepts on 127.0.0.1:``port``;
    fail with its stderr if it exited first, or when ``timeout_s`` runs out."""
    import socket
    import time

    end = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < end, f"the server did not start in {timeout_s:g} s"
            time.sleep(0.1)


class Tools:
    """One MCP client, whatever its kind (a session or a per-request client):
    ``call`` a tool, get the result."""

    def __init__(self, target: Any) -> None:
        self.target = target

    async def call(self, name: str, args: dict[str, Any]) -> CallToolResult:
        res: CallToolResult = await self.target.call_tool(name, args)
        return res


# -- glassroom mcp --http ------------------------------------------------------------


@dataclass
class Mcp:
    url: str
    keys: dict[str, str]
    svc: SandboxService


def start_mcp(
    cfg: ServeConfig, name: str = "test-mcp-http", caps: Mapping[str, int] | None = None
) -> tuple[Mcp, Callable[[], None]]:
    """The MCP app of ``glassroom mcp --http`` (``run_http``'s) on 127.0.0.1, in a
    thread named ``name``, with a fresh key for each tenant of ``caps`` (tenant: its
    max_sandboxes; none: no keys); returns it and a stop."""
    from glassroom.interfaces.mcp import _server, http_app

    keys = add_keys(cfg, caps or {})
    svc = _server._service(cfg)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            http_app(svc, host="127.0.0.1", idle_ttl_s=600),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
    )
    th = threading.Thread(target=server.run, name=name, daemon=True)
    th.start()
    end = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < end and th.is_alive(), "the MCP app did not start"
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        th.join(20)
        svc.close()

    return Mcp(f"http://127.0.0.1:{port}/mcp", keys, svc), stop


@asynccontextmanager
async def mcp_tools(mode: str, url: str, headers: dict[str, str]) -> AsyncIterator[Tools]:
    """An official-SDK MCP client of ``mode`` ("session": ``ClientSession`` with the
    handshake; "auto": session-less) at ``url``, sending ``headers``."""
    from mcp import Client, ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with create_mcp_http_client(headers=headers) as hc:
        transport = streamable_http_client(url, http_client=hc)
        if mode == "session":
            async with transport as streams, ClientSession(*streams[:2]) as s:
                await s.initialize()
                yield Tools(s)
        else:
            async with Client(transport, mode=mode) as c:
                yield Tools(c)


def tool_text(r: CallToolResult) -> str:
    """A tool result's text, all its text parts joined."""
    return " ".join(getattr(c, "text", "") for c in r.content)
