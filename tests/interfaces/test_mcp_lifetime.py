"""A sandbox made through MCP lives as long as its session, not one request.

With the 2026-07-28 protocol (``mcp.Client(mode="auto")``, the default of
openai-agents and pydantic-ai/fastmcp) the SDK builds a connection object per
request; cleanup tied to it destroyed every sandbox as soon as
``create_sandbox`` returned.  Each client mode is run over stdio and
streamable HTTP, with the official SDK's own clients:

* ``session``: ``ClientSession`` with the ``initialize`` handshake;
* ``auto``: ``mcp.Client(mode="auto")``, the per-request protocol;
* ``legacy``: ``mcp.Client(mode="legacy")``.

Each pair: create, then use it in a later call (harmless path), and the
same sandbox refused to a second client (the other session), with kill, the
end of the session, and (HTTP, where 2026-07-28 has no session) the idle TTL.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from .serve_helpers import Tools, free_port, wait_listening

pytest.importorskip("mcp")
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from glassroom.audit import read_records, verify

MODES = ["session", "auto", "legacy"]
#: The HTTP server's idle TTL: long enough for a loaded 2-core host between two
#: calls of one test, short enough to wait for.
HTTP_IDLE_TTL = 8.0


def _env(data: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "GLASSROOM_STATE_DIR", "GLASSROOM_CGROUP_PARENT", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["GLASSROOM_AUDIT_LOG"] = str(data / "unused.jsonl")
    return env


def _argv(data: Path, *extra: str) -> list[str]:
    return ["-m", "glassroom.interfaces.cli", "mcp", "--data-dir", str(data), *extra]


@asynccontextmanager
async def connect(mode: str, where: StdioServerParameters | str) -> AsyncIterator[Tools]:
    """A client of ``mode`` to a stdio command or an HTTP URL."""
    if mode == "session":
        if isinstance(where, str):
            async with streamable_http_client(where) as streams, ClientSession(
                *streams[:2]
            ) as s:
                await s.initialize()
                yield Tools(s)
        else:
            async with stdio_client(where) as (read, write), ClientSession(read, write) as s:
                await s.initialize()
                yield Tools(s)
    else:
        async with Client(where, mode=mode) as c:
            yield Tools(c)


def _events(log: Path, sid: str) -> list[str]:
    if not log.exists():
        return []
    return [str(r.get("event")) for r in read_records(log) if r.get("sandbox") == sid]


def _wait_destroyed(log: Path, sid: str, timeout: float) -> float:
    """Seconds until ``sid`` has its ``sandbox.destroyed`` record; fails after ``timeout``."""
    t0 = time.monotonic()
    while "sandbox.destroyed" not in _events(log, sid):
        assert time.monotonic() - t0 < timeout, (sid, _events(log, sid))
        time.sleep(0.1)
    return time.monotonic() - t0


async def _pair(a: Tools, b: Tools) -> dict[str, str]:
    """The harmless and the refused half, for clients ``a`` and ``b`` (another session)."""
    r = await a.call("create_sandbox", {"template": "base", "timeout_s": 120})
    assert not r.is_error, r.content
    sid = r.structured_content["sandbox_id"]
    real = sid.partition(".")[0]
    # a later call (a new request, and on 2026-07-28 a new connection object) still has it
    r = await a.call("execute_command", {"sandbox_id": sid, "command": "echo one > f; cat f"})
    assert not r.is_error, r.content
    assert r.structured_content["stdout"] == "one\n"
    r = await a.call("execute_command", {"sandbox_id": sid, "argv": ["cat", "f"]})
    assert (r.is_error, r.structured_content["stdout"]) == (False, "one\n"), r.content
    r = await a.call("read_file", {"sandbox_id": sid, "path": "/workspace/f"})
    assert r.structured_content["content"] == "one\n"

    # the other session: cannot list, use, audit or kill it, by bare id or forged handle
    r = await b.call("list_sandboxes", {})
    assert real not in {x["sandbox_id"] for x in r.structured_content["sandboxes"]}
    for guess in {real, sid, real + ".forged-secret"} - ({sid} if "." in sid else set()):
        for name, args in (
            ("execute_command", {"command": "cat f"}),
            ("read_file", {"path": "/workspace/f"}),
            ("get_audit", {}),
            ("kill_sandbox", {}),
        ):
            r = await b.call(name, {"sandbox_id": guess, **args})
            assert r.is_error and "not found" in r.content[0].text, (name, guess, r.content)
    r = await a.call("execute_command", {"sandbox_id": sid, "argv": ["cat", "f"]})
    assert r.structured_content["stdout"] == "one\n", "the refused calls touched it"

    # kill works, and afterwards the id is gone (but its audit trail is still readable)
    r = await a.call("kill_sandbox", {"sandbox_id": sid})
    assert not r.is_error and r.structured_content["clean"] is True, r.content
    r = await a.call("execute_command", {"sandbox_id": sid, "command": "true"})
    assert r.is_error and "not found" in r.content[0].text
    r = await a.call("get_audit", {"sandbox_id": sid})
    assert "sandbox.destroyed" in {x["event"] for x in r.structured_content["records"]}

    # one more, left for the end of the session (or the idle TTL) to destroy
    r = await a.call("create_sandbox", {})
    assert not r.is_error, r.content
    left = r.structured_content["sandbox_id"]
    r = await a.call("execute_command", {"sandbox_id": left, "command": "true"})
    assert not r.is_error, r.content
    return {"killed": real, "left": left.partition(".")[0], "left_handle": left}


# -- stdio ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_mcp_stdio_sandbox_lives_for_the_session(mode: str, tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"

    def params(data: Path) -> StdioServerParameters:
        return StdioServerParameters(command=sys.executable, args=_argv(data), env=_env(data))

    async def main() -> dict[str, str]:
        async with connect(mode, params(a_dir)) as a, connect(mode, params(b_dir)) as b:
            seen = await _pair(a, b)
            # still alive while the session is open
            assert "sandbox.destroyed" not in _events(a_dir / "audit.jsonl", seen["left"])
            return seen

    seen = anyio.run(main)
    log = a_dir / "audit.jsonl"
    # the client closed the pipe: the session (and the process) ended, its sandboxes went
    _wait_destroyed(log, seen["left"], 20)
    assert verify(log).ok
    assert "sandbox.idle" not in _events(log, seen["left"])


# -- streamable HTTP -------------------------------------------------------------


@dataclass
class HttpServer:
    url: str
    log: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    data = tmp_path_factory.mktemp("mcp-http")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *_argv(data, "--http", "--port", str(port),
                                "--idle-ttl", str(HTTP_IDLE_TTL))],
        env=_env(data),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_listening(proc, port, 30)
        yield HttpServer(f"http://127.0.0.1:{port}/mcp", data / "audit.jsonl", proc)
    finally:
        proc.terminate()
        try:
            err = proc.communicate(timeout=20)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    assert verify(data / "audit.jsonl").ok


@pytest.mark.parametrize("mode", MODES)
def test_mcp_http_sandbox_lives_for_the_session(mode: str, http_server: HttpServer) -> None:
    url, log = http_server.url, http_server.log

    async def main() -> tuple[dict[str, str], float]:
        async with connect(mode, url) as a, connect(mode, url) as b:
            seen = await _pair(a, b)
        return seen, time.monotonic()

    seen, closed_at = anyio.run(main)
    assert http_server.proc.poll() is None
    left = seen["left"]
    if mode == "auto":
        # 2026-07-28 over HTTP has no session: a handle, alive after the client left,
        # until its idle TTL (or kill / its timeout) ends it
        assert "." in seen["left_handle"]
        assert "sandbox.destroyed" not in _events(log, left)
        _wait_destroyed(log, left, HTTP_IDLE_TTL + 10)
        assert time.monotonic() - closed_at > HTTP_IDLE_TTL - 3
        idle = [r for r in read_records(log) if r.get("sandbox") == left
                and r.get("event") == "sandbox.idle"]  # fmt: skip
        assert idle and idle[0]["rule"] == "mcp.idle_ttl_s", _events(log, left)
    else:
        # a handshake session: the client deleted it on the way out, its sandboxes went
        assert "." not in seen["left_handle"]
        waited = _wait_destroyed(log, left, HTTP_IDLE_TTL - 2)
        assert waited < HTTP_IDLE_TTL - 2
        assert "sandbox.idle" not in _events(log, left)
    assert verify(log).ok


def test_mcp_http_auto_handle_kept_across_clients_and_bad_ids(http_server: HttpServer) -> None:
    """A 2026-07-28 handle is the only key: the same client object is not needed,
    and a malformed or empty id is a clear "not found", never a crash."""
    url = http_server.url

    async def main() -> None:
        async with Client(url, mode="auto") as a:
            r = await a.call_tool("create_sandbox", {})
            handle = r.structured_content["sandbox_id"]
        async with Client(url, mode="auto") as later:  # a new client, same agent context
            r = await later.call_tool("execute_command", {"sandbox_id": handle, "command": "echo ok"})
            assert (r.is_error, r.structured_content["stdout"]) == (False, "ok\n"), r.content
            real = handle.partition(".")[0]
            forged = (real + ".é", real + ".", real + "." + "A" * 10000)
            for bad in ("", ".", "sb-x.", ".secret", "sb-" + "0" * 12 + "." + "A" * 24, *forged):
                r = await later.call_tool("execute_command", {"sandbox_id": bad, "command": "true"})
                assert r.is_error and "not found" in r.content[0].text, (bad, r.content)
            r = await later.call_tool("kill_sandbox", {"sandbox_id": handle})
            assert not r.is_error and r.structured_content["clean"] is True

    anyio.run(main)


@pytest.mark.parametrize("bad", ["nan", "inf", "0", "-5", "1e9", "soon"])
def test_mcp_idle_ttl_is_checked(bad: str, tmp_path: Path) -> None:
    """A TTL that means "never" or "at once" is refused before anything starts."""
    r = subprocess.run(
        [sys.executable, *_argv(tmp_path, "--idle-ttl", bad)],
        env=_env(tmp_path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    err = r.stderr.decode(errors="replace")
    assert r.returncode != 0 and "--idle-ttl" in err and "Traceback" not in err, err
    assert not (tmp_path / "audit.jsonl").exists()



def test_mcp_http_sigterm_with_open_sessions_stops_in_bound(tmp_path: Path) -> None:
    """A handshake session's open GET stream must not hold a SIGTERM up, and
    every sandbox (session-owned or handle) is destroyed on the way out."""
    import signal

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *_argv(tmp_path, "--http", "--port", str(port))],
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    log = tmp_path / "audit.jsonl"
    try:
        wait_listening(proc, port, 30)

        seen: dict[str, Any] = {"made": []}

        async def main() -> None:
            with anyio.fail_after(60):
                async with connect("session", url) as a, connect("auto", url) as b:
                    for c in (a, b):
                        r = await c.call("create_sandbox", {})
                        seen["made"].append(r.structured_content["sandbox_id"].partition(".")[0])
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGTERM)
                    while proc.poll() is None and time.monotonic() - t0 < 15:
                        await anyio.sleep(0.05)
                    seen["took"] = time.monotonic() - t0

        # the clients' own teardown fails (the server is gone mid-session): not the point
        with contextlib.suppress(BaseExceptionGroup, Exception):
            anyio.run(main)
        assert proc.wait(15) is not None
        assert len(seen["made"]) == 2, seen
        assert seen.get("took", 99) < 10.0, seen
        for sid in seen["made"]:
            assert "sandbox.destroyed" in _events(log, sid), _events(log, sid)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate(timeout=20)[1].decode(errors="replace")
    assert "Traceback" not in err, err[-3000:]
    assert verify(log).ok


def _pids_naming(needle: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle.encode() in f.read() and int(pid) != os.getpid():
                    out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("mode", ["session", "auto"])
def test_mcp_stdio_sigterm_ends_the_session_cleanly(mode: str, tmp_path: Path) -> None:
    """SIGTERM to a stdio server (a supervisor's stop, or the SDK's own escalation)
    is the end of the session: its sandboxes are destroyed before it exits."""
    import signal

    data = tmp_path / "data"
    params = StdioServerParameters(command=sys.executable, args=_argv(data), env=_env(data))
    seen: dict[str, Any] = {}

    async def main() -> None:
        with anyio.fail_after(60):
            async with connect(mode, params) as a:
                r = await a.call("create_sandbox", {})
                seen["sid"] = r.structured_content["sandbox_id"]
                pids = _pids_naming(f"--data-dir\0{data}")
                assert len(pids) == 1, pids
                t0 = time.monotonic()
                os.kill(pids[0], signal.SIGTERM)
                while _pids_naming(f"--data-dir\0{data}") and time.monotonic() - t0 < 15:
                    await anyio.sleep(0.05)
                seen["took"] = time.monotonic() - t0

    with contextlib.suppress(BaseExceptionGroup, Exception):  # the server left mid-session
        anyio.run(main)
    assert "sid" in seen and seen.get("took", 99) < 10.0, seen
    assert "sandbox.destroyed" in _events(data / "audit.jsonl", seen["sid"])
    assert verify(data / "audit.jsonl").ok


# -- a busy sandbox, and a session that ends while a call works in it ------------


def test_mcp_http_busy_sandbox_is_not_idle(http_server: HttpServer) -> None:
    """The idle TTL counts from the end of the last call: a command that runs
    longer than the TTL is not killed as idle half-way (it was: exit 137)."""
    url, log = http_server.url, http_server.log

    async def main() -> str:
        with anyio.fail_after(90):
            async with Client(url, mode="auto") as a:
                r = await a.call_tool("create_sandbox", {"timeout_s": 120})
                handle = r.structured_content["sandbox_id"]
                long = HTTP_IDLE_TTL + 4
                r = await a.call_tool(
                    "execute_command",
                    {"sandbox_id": handle, "command": f"sleep {long}; echo done",
                     "timeout_s": long + 30},
                )  # fmt: skip
                assert not r.is_error, r.content
                assert (r.structured_content["exit_code"], r.structured_content["stdout"]) == (
                    0,
                    "done\n",
                ), r.content
                # and right after it, the sandbox is still there (the TTL starts now)
                r = await a.call_tool("execute_command", {"sandbox_id": handle, "command": "true"})
                assert not r.is_error, r.content
                r = await a.call_tool("kill_sandbox", {"sandbox_id": handle})
                assert not r.is_error, r.content
                return str(handle.partition(".")[0])

    sid = anyio.run(main)
    assert "sandbox.idle" not in _events(log, sid)


def test_mcp_http_session_end_does_not_wait_for_running_commands(
    http_server: HttpServer,
) -> None:
    """A handshake session deleted while a command runs: its sandboxes go at once,
    not when the command ends (they stayed as long as it ran); and a throwaway
    ``run_code`` sandbox whose request is cancelled is destroyed, not left to its
    120 s timeout."""
    url, log = http_server.url, http_server.log
    seen: dict[str, Any] = {}

    async def main() -> None:
        # Raw HTTP, so that the session ends by DELETE alone: an SDK client that
        # cancels its call first sends notifications/cancelled, which races the
        # DELETE inside the SDK's server transport (a 500 after a 202, logged).
        import httpx

        with anyio.fail_after(60):
            async with httpx.AsyncClient(timeout=30) as h:
                head = {"Accept": "application/json, text/event-stream"}
                r = await h.post(url, headers=head, json=_rpc(1, "initialize", {
                    "protocolVersion": "2025-06-18", "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"}}))  # fmt: skip
                head |= {"Mcp-Session-Id": r.headers["mcp-session-id"],
                         "MCP-Protocol-Version": "2025-06-18"}  # fmt: skip
                await h.post(url, headers=head, json=_rpc(None, "notifications/initialized"))
                r = await h.post(url, headers=head, json=_rpc(2, "tools/call", {
                    "name": "create_sandbox", "arguments": {}}))  # fmt: skip
                seen["sid"] = sid = _sse_result(r.text)["structuredContent"]["sandbox_id"]
                async with anyio.create_task_group() as tg:

                    async def run() -> None:
                        with contextlib.suppress(httpx.HTTPError):
                            await h.post(url, headers=head, json=_rpc(3, "tools/call", {
                                "name": "execute_command", "arguments": {
                                    "sandbox_id": sid, "command": "sleep 60",
                                    "timeout_s": 90}}))  # fmt: skip

                    tg.start_soon(run)
                    end = time.monotonic() + 20
                    while "command.started" not in _events(log, sid):
                        assert time.monotonic() < end, _events(log, sid)
                        await anyio.sleep(0.05)
                    r = await h.delete(url, headers=head)
                    assert r.status_code in (200, 204), r.text
                    t0 = time.monotonic()
                    while "sandbox.destroyed" not in _events(log, sid):
                        assert time.monotonic() - t0 < 20, _events(log, sid)
                        await anyio.sleep(0.1)
                    seen["took"] = time.monotonic() - t0
                    tg.cancel_scope.cancel()
            seen["closed"] = time.monotonic()
            before = set(_created(log))
            async with Client(url, mode="auto") as c:
                with anyio.move_on_after(4):  # the client gives up on a long run_code
                    await c.call_tool("run_code", {"code": "import time; time.sleep(60)"})
            seen["throwaway"] = sorted(set(_created(log)) - before)

    anyio.run(main)
    assert seen["took"] < 20, seen  # it used to wait for the command: 60 s
    assert len(seen["throwaway"]) == 1, seen
    _wait_destroyed(log, seen["throwaway"][0], 20)
    assert "command.ended" in _events(log, seen["throwaway"][0])


def _rpc(rid: int | None, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        msg["id"] = rid
    if params is not None:
        msg["params"] = params
    return msg


def _sse_result(body: str) -> Any:
    """The ``result`` of the JSON-RPC response in an SSE (or plain JSON) body."""
    import json

    for line in body.splitlines():
        data = line.removeprefix("data:").strip()
        if data.startswith("{"):
            msg = json.loads(data)
            if "result" in msg or "error" in msg:
                assert "result" in msg, msg
                return msg["result"]
    raise AssertionError(body[:2000])


def _created(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [str(r["sandbox"]) for r in read_records(log) if r.get("event") == "service.created"]


@pytest.mark.parametrize("how", ["eof", "sigint"])
def test_mcp_stdio_end_does_not_wait_for_running_commands(how: str, tmp_path: Path) -> None:
    """A stdio client that closes the pipe (and does not escalate to SIGTERM, as
    the SDK's own client does after 2 s), or a Ctrl-C, while a command runs: the
    server destroys its sandboxes and exits at once, not when the command ends."""
    import json
    import queue
    import signal
    import threading

    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, *_argv(data)],
        env=_env(data),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def send(msg: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps({"jsonrpc": "2.0", **msg}) + "\n").encode())
        proc.stdin.flush()

    lines: queue.Queue[bytes] = queue.Queue()
    out = proc.stdout
    threading.Thread(target=lambda: [lines.put(x) for x in iter(out.readline, b"")],
                     daemon=True).start()  # fmt: skip

    def reply(rid: int) -> dict[str, Any]:
        for _ in range(50):  # bounded: a few lines, each within 60 s
            msg: dict[str, Any] = json.loads(lines.get(timeout=60))
            if msg.get("id") == rid:
                return msg
        raise AssertionError(f"no reply to {rid}")

    log = data / "audit.jsonl"
    try:
        send({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}})  # fmt: skip
        reply(1)
        send({"method": "notifications/initialized"})
        send({"id": 2, "method": "tools/call",
              "params": {"name": "create_sandbox", "arguments": {}}})  # fmt: skip
        sid = reply(2)["result"]["structuredContent"]["sandbox_id"]
        send({"id": 3, "method": "tools/call", "params": {"name": "execute_command",
              "arguments": {"sandbox_id": sid, "command": "sleep 60", "timeout_s": 90}}})  # fmt: skip
        end = time.monotonic() + 20
        while "command.started" not in _events(log, sid):
            assert time.monotonic() < end, _events(log, sid)
            time.sleep(0.05)
        t0 = time.monotonic()
        if how == "eof":
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(20)  # it used to stay until the command ended (60 s)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdin is not None and proc.stdin.closed:
            proc.stdin = None  # closed above: communicate() must not flush it
        err = proc.communicate(timeout=20)[1].decode(errors="replace")
    assert took < 10, took
    assert code == (0 if how == "eof" else 128 + signal.SIGINT), (code, err[-2000:])
    assert "sandbox.destroyed" in _events(log, sid), _events(log, sid)
    assert "Traceback" not in err, err[-3000:]
    assert verify(log).ok


def test_mcp_handles_of_live_sandboxes_are_never_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handle table is bounded, but only handles of sandboxes already gone are
    dropped: a client that creates and kills many sandboxes used to push out the
    oldest handle even while its sandbox lived, locking its client out of it."""
    from types import SimpleNamespace

    from mcp_types.version import MODERN_PROTOCOL_VERSIONS

    from glassroom.interfaces.mcp import _server

    monkeypatch.setattr(_server, "GONE_MEMORY", 5)

    class Svc:  # just what _Sessions uses of the service
        def __init__(self) -> None:
            self.gone: list[Any] = []

        def tenant(self, name: str) -> Any:
            return SimpleNamespace(name=name)

        def on_destroy(self, cb: Any) -> None:
            self.forget = cb

    svc = Svc()
    sessions = _server._Sessions(svc, process_session=False, idle_ttl_s=600)  # type: ignore[arg-type]
    try:
        modern = next(iter(MODERN_PROTOCOL_VERSIONS))
        ctx: Any = SimpleNamespace(request_context=SimpleNamespace(protocol_version=modern))

        def entry(i: int) -> Any:
            return SimpleNamespace(id=f"sb-{i:012x}")

        victim = sessions.add(ctx, entry(0))  # lives all along
        for i in range(1, 30):  # another client: create, kill, create, kill, ...
            e = entry(i)
            sessions.add(ctx, e)
            svc.forget(e)  # what SandboxService.destroy calls back
        assert sessions.resolve(ctx, victim)[0] == "sb-" + "0" * 12
        assert len(sessions._handles) <= 5
    finally:
        sessions.close()
