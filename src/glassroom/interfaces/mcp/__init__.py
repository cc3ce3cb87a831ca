"""``glassroom mcp``: glassroom's sandboxes as MCP tools (official ``mcp`` SDK, 2.x).

Runs over stdio (``glassroom mcp``) or streamable HTTP (``glassroom mcp
--http --port N``).  Every tool has an ``outputSchema`` (from a pydantic
model) and returns ``structuredContent``; reads carry ``readOnlyHint``,
exec and kill ``destructiveHint``.  A sandbox failure (a denied exec, a
denied path, a limit) is an ``isError`` result whose text names the policy
rule.  When a session ends, every sandbox it created is destroyed; a
2026-07-28 client over HTTP has no session and gets a handle instead (see
``_Sessions`` in ``_server.py`` and docs/service.md, "MCP: sandbox lifetime").
Over HTTP, the tenant API keys of ``glassroom serve`` are required when
configured (and without them only loopback is served); one session holds at
most ``max_sandboxes_per_session`` sandboxes, forks included (docs/service.md,
"MCP: authentication and caps").  Snapshots (``sandbox_snapshot``) belong to
the session that made them, like its sandboxes, and are deleted when it ends;
a session-less client gets a snapshot handle (docs/snapshots.md).
"""

from __future__ import annotations

from ._server import (
    DEFAULT_IDLE_TTL_S,
    build_server,
    check_http_bind,
    check_idle_ttl,
    http_app,
    run_http,
    run_stdio,
)

__all__ = [
    "DEFAULT_IDLE_TTL_S",
    "build_server",
    "check_http_bind",
    "check_idle_ttl",
    "http_app",
    "run_http",
    "run_stdio",
]
