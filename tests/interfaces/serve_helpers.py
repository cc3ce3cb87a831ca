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


def start_server(data_dir: Path, **cfg_kw: Any) -> tuple[Server, uvicorn.Server, threading.Thread]:
    cfg = ServeConfig(data_dir=data_dir, **cfg_kw)
    keys = {}
    for tenant, cap in TENANTS.items():
        keys[tenant] = new_key()
        cfg.add_key(tenant, keys[tenant], max_sandboxes=cap)
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
