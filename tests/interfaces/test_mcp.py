"""``glassroom mcp`` driven by the official MCP client, over stdio and streamable HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from .serve_helpers import free_port, wait_listening

pytest.importorskip("mcp")
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from glassroom.audit import read_records, verify

TOOLS = {
    "create_sandbox",
    "execute_command",
    "run_code",
    "write_file",
    "read_file",
    "list_files",
    "get_audit",
    "list_sandboxes",
    "set_timeout",
    "kill_sandbox",
    "list_approvals",
    "decide_approval",
    "sandbox_pause",
    "sandbox_resume",
    "sandbox_snapshot",
    "sandbox_fork",
    "snapshot_list",
    "snapshot_delete",
}
READ_ONLY = {"read_file", "list_files", "get_audit", "list_sandboxes", "list_approvals",
             "snapshot_list"}  # fmt: skip
DESTRUCTIVE = {"execute_command", "run_code", "kill_sandbox", "sandbox_pause", "snapshot_delete"}


def _env(data: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "GLASSROOM_STATE_DIR", "GLASSROOM_CGROUP_PARENT", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["GLASSROOM_AUDIT_LOG"] = str(data / "unused.jsonl")
    return env


async def _task(s: ClientSession) -> dict[str, Any]:
    """A whole agent task, including a denied action; returns what it saw."""
    await s.initialize()
    tools = (await s.list_tools()).tools
    assert {t.name for t in tools} == TOOLS
    for t in tools:
        assert t.output_schema and t.output_schema.get("type") == "object", t.name
        assert t.annotations is not None, t.name
        assert t.annotations.read_only_hint is (t.name in READ_ONLY), t.name
        if t.name in DESTRUCTIVE:
            assert t.annotations.destructive_hint is True, t.name

    r = await s.call_tool("create_sandbox", {"template": "base", "timeout_s": 120})
    assert not r.is_error, r.content
    sid = r.structured_content["sandbox_id"]
    assert r.structured_content["tier"] == "low"

    r = await s.call_tool(
        "write_file",
        {
            "sandbox_id": sid,
            "path": "/workspace/job.py",
            "content": "print(sum(range(10)))\nopen('out.txt','w').write('45')",
        },
    )
    assert not r.is_error and r.structured_content["size"] > 0
    r = await s.call_tool("execute_command", {"sandbox_id": sid, "argv": ["python3", "job.py"]})
    assert not r.is_error, r.content
    out = r.structured_content
    assert (out["exit_code"], out["stdout"], out["timed_out"]) == (0, "45\n", False)
    assert out["duration_ms"] > 0 and out["truncated"] is False
    r = await s.call_tool("read_file", {"sandbox_id": sid, "path": "/workspace/out.txt"})
    assert r.structured_content["content"] == "45"
    r = await s.call_tool("list_files", {"sandbox_id": sid})
    assert {e["name"] for e in r.structured_content["entries"]} == {"job.py", "out.txt"}

    # truncation says what it cut
    r = await s.call_tool(
        "execute_command",
        {
            "sandbox_id": sid,
            "argv": ["python3", "-c", "print('x' * 5000)"],
            "max_output_bytes": 100,
        },
    )
    assert r.structured_content["truncated"] is True
    assert "stdout cut from" in r.structured_content["truncation"]

    # denied actions: isError results that name the policy rule
    r = await s.call_tool(
        "write_file", {"sandbox_id": sid, "path": "/etc/cron.d/evil", "content": "x"}
    )
    assert r.is_error and "filesystem.write" in r.content[0].text
    r = await s.call_tool(
        "execute_command", {"sandbox_id": sid, "argv": ["/usr/bin/perl", "-e", "1"]}
    )
    assert r.is_error and "tools.allow" in r.content[0].text
    assert r.structured_content["exit_code"] == 126

    r = await s.call_tool("get_audit", {"sandbox_id": sid, "blocked_only": True})
    rules = {rec["rule"] for rec in r.structured_content["records"]}
    assert {"filesystem.write", "tools.allow"} <= rules

    r = await s.call_tool("set_timeout", {"sandbox_id": sid, "timeout_s": 300})
    assert r.structured_content["timeout_s"] > 290
    r = await s.call_tool("set_timeout", {"sandbox_id": sid, "timeout_s": 99999})
    assert r.is_error and "resources.max_runtime_s" in r.content[0].text
    r = await s.call_tool("list_sandboxes", {})
    assert [x["sandbox_id"] for x in r.structured_content["sandboxes"]] == [sid]
    r = await s.call_tool("list_approvals", {})
    assert r.structured_content == {"approvals": []}
    r = await s.call_tool("decide_approval", {"approval_id": "ap-x", "decision": "approve"})
    assert r.is_error

    r = await s.call_tool("run_code", {"code": "import os; print(6*7, os.getcwd())"})
    assert not r.is_error and r.structured_content["stdout"] == "42 /workspace\n"
    assert r.structured_content["sandbox_id"] is None

    # a second sandbox, left for the session's end to destroy
    r = await s.call_tool("create_sandbox", {})
    left = r.structured_content["sandbox_id"]
    r = await s.call_tool("kill_sandbox", {"sandbox_id": sid})
    assert r.structured_content["clean"] is True
    r = await s.call_tool("execute_command", {"sandbox_id": sid, "command": "true"})
    assert r.is_error and "not found" in r.content[0].text
    return {"killed": sid, "left": left}


def _destroyed(log: Path, sid: str) -> bool:
    return log.exists() and any(
        r.get("sandbox") == sid and r.get("event") == "sandbox.destroyed" for r in read_records(log)
    )


def test_mcp_over_stdio(tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "glassroom.interfaces.cli", "mcp", "--data-dir", str(tmp_path)],
        env=_env(tmp_path),
    )

    async def main() -> dict[str, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            return await _task(s)

    seen = anyio.run(main)
    log = tmp_path / "audit.jsonl"
    end = time.monotonic() + 15
    while not _destroyed(log, seen["left"]):  # the session ended: its sandboxes go
        assert time.monotonic() < end, "sandbox outlived the MCP session"
        time.sleep(0.1)
    assert verify(log).ok


def test_mcp_over_streamable_http(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glassroom.interfaces.cli",
            "mcp",
            "--http",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path),
        ],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    log = tmp_path / "audit.jsonl"
    try:

        wait_listening(proc, port, 20)

        async def main() -> dict[str, Any]:
            async with streamable_http_client(url) as streams, ClientSession(*streams[:2]) as s:
                return await _task(s)

        seen = anyio.run(main)
        # the client closed its session (DELETE): the server is still up, the sandbox is gone
        end = time.monotonic() + 15
        while not _destroyed(log, seen["left"]):
            assert time.monotonic() < end, "sandbox outlived its streamable-HTTP session"
            time.sleep(0.1)
        assert proc.poll() is None
        assert verify(log).ok
    finally:
        proc.terminate()
        try:
            err = proc.communicate(timeout=20)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    # no keys configured: served on loopback only, and said so at startup
    assert "MCP over HTTP without authentication" in err, err[-3000:]
    assert json.dumps(seen)
