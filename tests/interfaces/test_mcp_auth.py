"""``glassroom mcp --http``: API keys, tenants kept apart, and the caps.

The server runs in this process (uvicorn in a thread on 127.0.0.1, the very
app ``run_http`` serves), so a test can hold a ``network.ask`` approval
the way tests/interfaces/test_own_api.py does; the clients are the official
SDK's (``ClientSession`` with the handshake, ``Client(mode="auto")`` for
the session-less 2026-07-28 protocol), and raw httpx for the 401s.  The CLI
checks (loopback only without keys, the cap options) run ``glassroom mcp``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .serve_helpers import Mcp, Tools, free_port, mcp_tools, start_mcp, wait_listening
from .serve_helpers import tool_text as _text

pytest.importorskip("mcp")
from mcp import Client

from glassroom._errors import PolicyError
from glassroom.interfaces.http import SandboxService, ServeConfig, new_key
from glassroom.interfaces.mcp import _server, check_http_bind

#: One tenant per test, so one test's teardown (a session's sandboxes are
#: destroyed in threads after it ends) never counts against another's cap.
TENANTS = ("alice", "bob", "carol", "dave", "erin", "frank")
PER_SESSION = 2
HANDLES = 2
TENANT_CAP = 4
HEAD = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mcp]:
    cfg = ServeConfig(
        data_dir=tmp_path_factory.mktemp("mcp-auth"),
        max_sandboxes_per_session=PER_SESSION,
        max_handle_sandboxes=HANDLES,
    )
    mcp, stop = start_mcp(cfg, caps=dict.fromkeys(TENANTS, TENANT_CAP))
    try:
        yield mcp
    finally:
        stop()


def connect(
    mode: str, url: str, key: str, *, bearer: bool = False
) -> AbstractAsyncContextManager[Tools]:
    """An SDK client of ``mode`` ("session" or "auto") sending ``key``."""
    head = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
    return mcp_tools(mode, url, head)


def _state(svc: SandboxService, approval_id: str, wait: float) -> str | None:
    a = svc.approvals.wait(approval_id, wait)
    return None if a is None else a.state


# -- authentication --------------------------------------------------------------


def test_mcp_http_requires_a_tenant_key(keyed: Mcp) -> None:
    """No key, a wrong key, a key in the wrong scheme: 401 with a message that
    says how to send one; the right key, either header: the handshake works."""
    with httpx.Client(timeout=30) as h:
        r = h.post(keyed.url, headers=HEAD, json=INIT)
        assert r.status_code == 401, r.text
        msg = r.json()["message"]
        assert "no API key" in msg and "Authorization: Bearer" in msg and "X-API-Key" in msg
        assert r.headers["www-authenticate"].startswith("Bearer")
        for bad in (
            {"X-API-Key": "e2b_" + "0" * 40},
            {"Authorization": "Bearer " + "e2b_" + "0" * 40},
            {"Authorization": "Bearer " + keyed.keys["alice"] + "x"},
            {"Authorization": "Basic " + keyed.keys["alice"]},  # not a scheme we take
            {"Authorization": "Bearer"},
        ):
            r = h.post(keyed.url, headers=HEAD | bad, json=INIT)
            assert r.status_code == 401, (bad, r.text)
            assert r.json()["error"] == "unauthenticated", r.text
        # a GET or DELETE without a key is refused the same way (nothing reaches the SDK)
        assert h.get(keyed.url, headers=HEAD).status_code == 401
        assert h.delete(keyed.url, headers=HEAD).status_code == 401
        for good in (
            {"X-API-Key": keyed.keys["alice"]},
            {"Authorization": "Bearer " + keyed.keys["alice"]},
            {"authorization": "bearer " + keyed.keys["alice"]},
        ):
            r = h.post(keyed.url, headers=HEAD | good, json=INIT)
            assert r.status_code == 200, (good, r.text)
            assert "mcp-session-id" in r.headers


def test_mcp_http_sdk_clients_with_a_key(keyed: Mcp) -> None:
    """Both SDK client kinds, with either header, do a whole create/run/kill."""

    async def main() -> None:
        with anyio.fail_after(90):
            for mode, bearer in (("session", False), ("auto", True)):
                async with connect(mode, keyed.url, keyed.keys["alice"], bearer=bearer) as a:
                    r = await a.call("create_sandbox", {"timeout_s": 120})
                    assert not r.is_error, r.content
                    sid = r.structured_content["sandbox_id"]
                    assert ("." in sid) is (mode == "auto")
                    r = await a.call("execute_command", {"sandbox_id": sid, "command": "echo ok"})
                    assert r.structured_content["stdout"] == "ok\n", r.content
                    r = await a.call("kill_sandbox", {"sandbox_id": sid})
                    assert not r.is_error and r.structured_content["clean"] is True

    anyio.run(main)


def test_mcp_http_tenants_never_see_each_other(keyed: Mcp) -> None:
    """Tenant bob cannot list, use, audit or kill alice's sandboxes (session or
    handle), nor ride alice's session id with his own key."""
    seen: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(120):
            async with (
                connect("session", keyed.url, keyed.keys["alice"]) as a,
                connect("auto", keyed.url, keyed.keys["alice"]) as ah,
                connect("session", keyed.url, keyed.keys["bob"]) as b,
                connect("auto", keyed.url, keyed.keys["bob"]) as bh,
            ):
                r = await a.call("create_sandbox", {"timeout_s": 120})
                sid = r.structured_content["sandbox_id"]
                r = await ah.call("create_sandbox", {"timeout_s": 120})
                handle = r.structured_content["sandbox_id"]
                seen["alice"] = [sid, handle.partition(".")[0]]
                for e in keyed.svc.list(keyed.svc.tenant("alice")):
                    assert e.tenant == "alice"
                r = await b.call("list_sandboxes", {})
                assert r.structured_content["sandboxes"] == [], r.content
                for c in (b, bh):
                    for guess in (sid, handle, handle.partition(".")[0]):
                        for name, args in (
                            ("execute_command", {"command": "true"}),
                            ("get_audit", {}),
                            ("kill_sandbox", {}),
                            ("list_approvals", {}),
                        ):
                            r = await c.call(name, {"sandbox_id": guess, **args})
                            assert r.is_error and "not found" in _text(r), (name, guess, r.content)
                # alice's own clients still have both
                for c, x in ((a, sid), (ah, handle)):
                    r = await c.call("execute_command", {"sandbox_id": x, "command": "echo a"})
                    assert r.structured_content["stdout"] == "a\n", r.content

                # bob, with alice's session id (a secret, but not the credential): refused
                async with httpx.AsyncClient(timeout=30) as h:
                    as_alice = HEAD | {"X-API-Key": keyed.keys["alice"]}
                    hr = await h.post(keyed.url, headers=as_alice, json=INIT)
                    sess = {
                        "Mcp-Session-Id": hr.headers["mcp-session-id"],
                        "MCP-Protocol-Version": "2025-06-18",
                    }
                    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                    await h.post(keyed.url, headers=as_alice | sess, json=note)
                    call: dict[str, Any] = {
                        "jsonrpc": "2.0",
                        "id": 2,
                        "method": "tools/call",
                        "params": {"name": "create_sandbox", "arguments": {}},
                    }
                    hr = await h.post(keyed.url, json=call, headers=as_alice | sess)
                    assert '"isError":false' in hr.text.replace(" ", ""), hr.text
                    as_bob = HEAD | sess | {"X-API-Key": keyed.keys["bob"]}
                    for name in ("list_sandboxes", "create_sandbox"):
                        call = call | {"id": 3, "params": {"name": name, "arguments": {}}}
                        hr = await h.post(keyed.url, json=call, headers=as_bob)
                        assert "another tenant" in hr.text and "mcp.auth" in hr.text, hr.text
                    hr = await h.delete(keyed.url, headers=as_alice | sess)
                    assert hr.status_code in (200, 204), hr.text
                r = await ah.call("kill_sandbox", {"sandbox_id": handle})
                assert not r.is_error, r.content

    anyio.run(main)
    assert not [e for e in keyed.svc.list(keyed.svc.tenant("bob"))]


# -- caps ---------------------------------------------------------------------


def test_mcp_http_per_session_cap(keyed: Mcp) -> None:
    """A session at max_sandboxes_per_session is refused, with the rule, while
    another session of the same tenant still creates; the tenant's own cap
    (max_sandboxes) still holds over all its sessions."""

    async def main() -> None:
        key = keyed.keys["carol"]
        with anyio.fail_after(180):
            async with (
                connect("session", keyed.url, key) as a,
                connect("session", keyed.url, key) as b,
                connect("session", keyed.url, key) as c,
            ):
                made = []
                for _ in range(PER_SESSION):
                    r = await a.call("create_sandbox", {"timeout_s": 120})
                    assert not r.is_error, r.content
                    made.append(r.structured_content["sandbox_id"])
                r = await a.call("create_sandbox", {"timeout_s": 120})
                assert r.is_error, r.content
                text = _text(r)
                assert "max_sandboxes_per_session = 2" in text, text
                assert "(policy rule: mcp.max_sandboxes_per_session)" in text, text
                # a throwaway run_code takes a slot too
                r = await a.call("run_code", {"code": "print(1)"})
                assert r.is_error and "mcp.max_sandboxes_per_session" in _text(r), r.content
                # the other session is not locked out
                r = await b.call("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                r = await b.call("run_code", {"code": "print(6*7)"})
                assert r.structured_content["stdout"] == "42\n", r.content
                # a kill frees the slot
                r = await a.call("kill_sandbox", {"sandbox_id": made[0]})
                assert not r.is_error, r.content
                r = await a.call("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                # carol now has 2 + 1 live; one more fills max_sandboxes (4) ...
                r = await b.call("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                # ... and a third session, under its own cap, meets the tenant's
                r = await c.call("create_sandbox", {"timeout_s": 120})
                assert r.is_error and "tenant.max_sandboxes" in _text(r), r.content

    anyio.run(main)


def test_mcp_http_handle_cap_is_per_tenant(keyed: Mcp) -> None:
    """Session-less clients of one tenant share max_handle_sandboxes: a new
    client object does not get round it, and another tenant is not affected."""

    async def main() -> None:
        with anyio.fail_after(120):
            async with (
                connect("auto", keyed.url, keyed.keys["dave"]) as a,
                connect("auto", keyed.url, keyed.keys["dave"]) as a2,
                connect("auto", keyed.url, keyed.keys["erin"]) as e,
            ):
                handles = []
                for _ in range(HANDLES):
                    r = await a.call("create_sandbox", {"timeout_s": 120})
                    assert not r.is_error, r.content
                    handles.append(r.structured_content["sandbox_id"])
                for c in (a, a2):
                    r = await c.call("create_sandbox", {"timeout_s": 120})
                    assert r.is_error, r.content
                    text = _text(r)
                    assert "max_handle_sandboxes = 2" in text and "'dave'" in text, text
                    assert "(policy rule: mcp.max_handle_sandboxes)" in text, text
                r = await e.call("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                await e.call("kill_sandbox", {"sandbox_id": r.structured_content["sandbox_id"]})
                r = await a2.call("kill_sandbox", {"sandbox_id": handles[0]})
                assert not r.is_error, r.content
                r = await a2.call("create_sandbox", {"timeout_s": 120})
                assert not r.is_error, r.content
                for h in (handles[1], r.structured_content["sandbox_id"]):
                    await a.call("kill_sandbox", {"sandbox_id": h})

    anyio.run(main)


def test_mcp_http_without_keys_handles_have_their_own_budget(tmp_path: Path) -> None:
    """Loopback without keys: handle sandboxes (they outlive their client) are
    capped apart from the sessions' tenant, so they cannot lock sessions out."""
    mcp, stop = start_mcp(ServeConfig(data_dir=tmp_path, max_handle_sandboxes=1))
    try:

        async def main() -> None:
            with anyio.fail_after(120):
                async with Client(mcp.url, mode="auto") as h, Client(mcp.url, mode="auto") as h2:
                    r = await h.call_tool("create_sandbox", {"timeout_s": 120})
                    assert not r.is_error, r.content
                    r2 = await h2.call_tool("create_sandbox", {"timeout_s": 120})
                    assert r2.is_error and "mcp.max_handle_sandboxes" in _text(r2), r2.content
                    assert "unauthenticated clients" in _text(r2), r2.content
                    async with Client(mcp.url, mode="legacy") as s:  # a session: unaffected
                        r3 = await s.call_tool("create_sandbox", {"timeout_s": 120})
                        assert not r3.is_error, r3.content
                        sid = r3.structured_content["sandbox_id"]
                        assert [e.id for e in mcp.svc.list(mcp.svc.tenant("mcp"))] == [sid]
                    handle = r.structured_content["sandbox_id"]
                    real = handle.partition(".")[0]
                    got = [e.id for e in mcp.svc.list(mcp.svc.tenant(_server.MCP_HANDLE_TENANT))]
                    assert got == [real]
                    await h.call_tool("kill_sandbox", {"sandbox_id": handle})

        anyio.run(main)
    finally:
        stop()


# -- approvals for handle clients --------------------------------------------------


def test_mcp_http_handle_client_decides_its_approval(keyed: Mcp) -> None:
    """A session-less client sees and decides a network.ask approval of its
    sandbox through the handle; another tenant, a forged handle, or no handle
    does not see it."""
    key = keyed.keys["frank"]

    async def main() -> None:
        with anyio.fail_after(120):
            async with (
                connect("auto", keyed.url, key) as a,
                connect("auto", keyed.url, keyed.keys["bob"]) as other,
            ):
                r = await a.call("create_sandbox", {"timeout_s": 120})
                handle = r.structured_content["sandbox_id"]
                real = handle.partition(".")[0]
                ap = keyed.svc.approvals.request(real, "connect", "ask.test:443", "network.ask[0]")
                # without the handle: no session, so nothing to show
                r = await a.call("list_approvals", {})
                assert r.structured_content == {"approvals": []}, r.content
                r = await a.call("list_approvals", {"sandbox_id": handle})
                assert [x["approval_id"] for x in r.structured_content["approvals"]] == [
                    ap.approval_id
                ], r.content
                for bad in (real, real + ".forged", ""):
                    r = await a.call("list_approvals", {"sandbox_id": bad})
                    assert bad == "" or (r.is_error and "not found" in _text(r)), (bad, r.content)
                    r = await a.call("decide_approval", {"approval_id": ap.approval_id,
                                                         "decision": "approve", "sandbox_id": bad})  # fmt: skip
                    assert r.is_error and "not found" in _text(r), (bad, r.content)
                for args in ({"sandbox_id": handle}, {}):
                    r = await other.call("list_approvals", args)
                    assert r.is_error or r.structured_content == {"approvals": []}, r.content
                    r = await other.call("decide_approval", {"approval_id": ap.approval_id,
                                                             "decision": "deny", **args})  # fmt: skip
                    assert r.is_error and "not found" in _text(r), r.content
                assert _state(keyed.svc, ap.approval_id, 0) == "pending"
                r = await a.call("decide_approval", {"approval_id": ap.approval_id,
                                                     "decision": "approve", "sandbox_id": handle})  # fmt: skip
                assert not r.is_error and r.structured_content["state"] == "approved", r.content
                assert _state(keyed.svc, ap.approval_id, 1) == "approved"
                r = await a.call("decide_approval", {"approval_id": ap.approval_id,
                                                     "decision": "deny", "sandbox_id": handle})  # fmt: skip
                assert r.is_error and "already approved" in _text(r), r.content
                await a.call("kill_sandbox", {"sandbox_id": handle})

    anyio.run(main)


def test_mcp_http_session_client_decides_its_approval(keyed: Mcp) -> None:
    """The handshake session's pair: no sandbox_id needed, a bare id works too."""

    async def main() -> None:
        with anyio.fail_after(120):
            async with connect("session", keyed.url, keyed.keys["frank"]) as a:
                r = await a.call("create_sandbox", {"timeout_s": 120})
                sid = r.structured_content["sandbox_id"]
                ap = keyed.svc.approvals.request(sid, "connect", "ask.test:443", "network.ask[0]")
                for args in ({}, {"sandbox_id": sid}):
                    r = await a.call("list_approvals", args)
                    assert [x["approval_id"] for x in r.structured_content["approvals"]] == [
                        ap.approval_id
                    ], r.content
                r = await a.call("decide_approval", {"approval_id": ap.approval_id,
                                                     "decision": "deny"})  # fmt: skip
                assert r.structured_content["state"] == "denied", r.content
                await a.call("kill_sandbox", {"sandbox_id": sid})

    anyio.run(main)


# -- the CLI and the config ------------------------------------------------------------


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    import os

    keep = ("PATH", "HOME", "GLASSROOM_STATE_DIR", "GLASSROOM_CGROUP_PARENT", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["GLASSROOM_AUDIT_LOG"] = str(tmp_path / "unused.jsonl")
    return subprocess.run(
        [sys.executable, "-m", "glassroom.interfaces.cli", "mcp", "--data-dir", str(tmp_path),
         *args],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )  # fmt: skip


def test_mcp_http_without_keys_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    r = _cli(tmp_path, "--http", "--host", "0.0.0.0", "--port", str(free_port()))
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0 and "Traceback" not in err, err
    assert "--host 0.0.0.0" in err and "api_keys_sha256" in err and "GLASSROOM_API_KEY" in err
    assert not (tmp_path / "audit.jsonl").exists()
    cfg = ServeConfig(data_dir=tmp_path)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        check_http_bind(cfg, host)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ValueError, match="not a loopback address"):
            check_http_bind(cfg, host)
    cfg.add_key("alice", new_key())
    check_http_bind(cfg, "0.0.0.0")  # with keys, any address


@pytest.mark.parametrize("bad", ["0", "-1", "1001", "true", "1.5", '"10"'])
def test_mcp_caps_are_checked_in_the_config(bad: str, tmp_path: Path) -> None:
    for name in ("max_sandboxes_per_session", "max_handle_sandboxes"):
        p = tmp_path / "serve.toml"
        p.write_text(f"{name} = {bad}\n")
        with pytest.raises(PolicyError) as ei:
            ServeConfig.load(p)
        assert ei.value.field == name and name in str(ei.value), str(ei.value)
    p.write_text("max_sandboxes_per_session = 3\nmax_handle_sandboxes = 7\n")
    cfg = ServeConfig.load(p)
    assert (cfg.max_sandboxes_per_session, cfg.max_handle_sandboxes) == (3, 7)


def test_mcp_cap_options_are_checked(tmp_path: Path) -> None:
    for flag in ("--max-sandboxes-per-session", "--max-handle-sandboxes"):
        r = _cli(tmp_path, "--http", flag, "0")
        err = r.stderr.decode(errors="replace")
        assert r.returncode != 0 and flag in err and "Traceback" not in err, err
        assert "from 1 to 1000" in err, err
    p = tmp_path / "serve.toml"
    p.write_text("max_sandboxes_per_session = 0\n")
    r = _cli(tmp_path, "--http", "--config", str(p))
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0 and "max_sandboxes_per_session" in err and "Traceback" not in err
    assert not (tmp_path / "audit.jsonl").exists()


def test_mcp_http_cli_with_a_key(tmp_path: Path) -> None:
    """``glassroom mcp --http`` with GLASSROOM_API_KEY: the key is required, and
    the startup line says so (the path ``run_http`` takes, not just the app)."""
    import os

    key = new_key()
    keep = ("PATH", "HOME", "GLASSROOM_STATE_DIR", "GLASSROOM_CGROUP_PARENT", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env |= {"GLASSROOM_AUDIT_LOG": str(tmp_path / "unused.jsonl"), "GLASSROOM_API_KEY": key}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "glassroom.interfaces.cli", "mcp", "--data-dir", str(tmp_path),
         "--http", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        wait_listening(proc, port, 30)
        with httpx.Client(timeout=30) as h:
            r = h.post(url, headers=HEAD, json=INIT)
            assert r.status_code == 401 and "no API key" in r.json()["message"], r.text
            r = h.post(url, headers=HEAD | {"X-API-Key": new_key()}, json=INIT)
            assert r.status_code == 401 and "unknown API key" in r.json()["message"], r.text
            r = h.post(url, headers=HEAD | {"Authorization": f"Bearer {key}"}, json=INIT)
            assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        try:
            err = proc.communicate(timeout=20)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
    assert "API keys required (1 tenant(s))" in err, err[-3000:]
    assert "without authentication" not in err and "Traceback" not in err, err[-3000:]
