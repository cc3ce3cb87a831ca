"""The MCP snapshot tools (sandbox_pause, sandbox_resume, sandbox_snapshot,
sandbox_fork, snapshot_list, snapshot_delete, create_sandbox's ``snapshot``),
driven by the official MCP client over streamable HTTP with tenant keys.

What is checked: the tools do what docs/snapshots.md says on the namespaces
tier; a fork belongs to the session that made it and counts toward its caps;
a snapshot is its session's (or, without a session, reached by its handle
only), so another session, another tenant or a guessed id never reaches it;
and a session's snapshots go when the session ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import pytest

from .serve_helpers import Mcp, Tools, mcp_tools, start_mcp
from .serve_helpers import tool_text as _text

pytest.importorskip("mcp")
from mcp.types import CallToolResult

from glassroom.interfaces.http import ServeConfig

#: One tenant per test, so one test's teardown never counts against another's caps.
TENANTS = ("alice", "bob", "carol", "dave", "erin", "frank", "gina")
PER_SESSION = 3
HANDLES = 4
TENANT_CAP = 8
NEW_TOOLS = {
    "sandbox_pause": "destructive",
    "sandbox_resume": "write",
    "sandbox_snapshot": "write",
    "sandbox_fork": "write",
    "snapshot_list": "read",
    "snapshot_delete": "destructive",
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mcp]:
    """The MCP app of ``glassroom mcp --http`` on 127.0.0.1, in a thread, with keys."""
    cfg = ServeConfig(
        data_dir=tmp_path_factory.mktemp("mcp-snapshots"),
        max_sandboxes_per_session=PER_SESSION,
        max_handle_sandboxes=HANDLES,
    )
    mcp, stop = start_mcp(cfg, "test-mcp-snapshots", dict.fromkeys(TENANTS, TENANT_CAP))
    try:
        yield mcp
    finally:
        stop()


def connect(mode: str, m: Mcp, tenant: str) -> AbstractAsyncContextManager[Tools]:
    """An SDK client of ``mode`` ("session", or "auto": no session) as ``tenant``."""
    return mcp_tools(mode, m.url, {"X-API-Key": m.keys[tenant]})


def ok(r: CallToolResult) -> Any:
    assert not r.is_error, _text(r)
    return r.structured_content


def refused(r: CallToolResult, *needles: str) -> str:
    assert r.is_error, r.structured_content
    text = _text(r)
    for n in needles:
        assert n in text, (n, text)
    return text


async def _sandbox(c: Tools, **args: Any) -> str:
    sid: str = ok(await c.call("create_sandbox", {"timeout_s": 300, **args}))["sandbox_id"]
    return sid


async def _write(c: Tools, sid: str, path: str, content: str) -> None:
    ok(await c.call("write_file", {"sandbox_id": sid, "path": path, "content": content}))


async def _run(c: Tools, sid: str, command: str) -> str:
    out: str = ok(await c.call("execute_command", {"sandbox_id": sid, "command": command}))[
        "stdout"
    ]
    return out


# -- the tools ---------------------------------------------------------------------


def test_tools_are_listed_with_their_hints(keyed: Mcp) -> None:
    async def main() -> None:
        async with connect("session", keyed, "alice") as a:
            tools = {t.name: t for t in (await a.target.list_tools()).tools}
            for name, kind in NEW_TOOLS.items():
                t = tools[name]
                assert t.output_schema and t.output_schema.get("type") == "object", name
                assert t.annotations is not None, name
                assert t.annotations.read_only_hint is (kind == "read"), name
                assert t.annotations.destructive_hint is (kind == "destructive"), name
            props = tools["create_sandbox"].input_schema["properties"]
            assert "snapshot" in props

    anyio.run(main)


def test_pause_resume_snapshot_restore_fork_delete(keyed: Mcp) -> None:
    """One session does the whole round, on the namespaces tier."""

    async def main() -> None:
        with anyio.fail_after(180):
            async with connect("session", keyed, "alice") as a:
                sid = await _sandbox(a)
                await _write(a, sid, "/workspace/f", "one")
                info = ok(await a.call("sandbox_pause", {"sandbox_id": sid}))
                assert (info["sandbox_id"], info["state"]) == (sid, "paused")
                r = await a.call("execute_command", {"sandbox_id": sid, "command": "true"})
                refused(r, "snapshot.state")
                refused(await a.call("sandbox_pause", {"sandbox_id": sid}), "snapshot.state")
                listed = ok(await a.call("list_sandboxes", {}))["sandboxes"]
                assert [x["state"] for x in listed] == ["paused"]
                info = ok(await a.call("sandbox_resume", {"sandbox_id": sid, "timeout_s": 200}))
                assert info["state"] == "running" and 150 < info["timeout_s"] <= 200
                assert await _run(a, sid, "cat f") == "one"
                refused(await a.call("sandbox_resume", {"sandbox_id": sid}), "snapshot.state")

                # files only on namespaces, and it says why; memory=true is refused
                snap = ok(await a.call("sandbox_snapshot", {"sandbox_id": sid, "name": "s1"}))
                snap_id = snap["snapshot_id"]
                assert snap_id.startswith("snap-") and "." not in snap_id
                assert snap["names"] == ["s1"] and snap["sandbox_id"] == sid
                assert snap["tier"] == "namespaces"
                assert snap["memory"] is False and snap["memory_refused"]
                r = await a.call("sandbox_snapshot", {"sandbox_id": sid, "memory": True})
                refused(r, "snapshot.memory")
                r = await a.call("sandbox_snapshot", {"sandbox_id": sid, "name": "bad name!"})
                assert r.is_error, r.content

                listed = ok(await a.call("snapshot_list", {}))["snapshots"]
                assert [x["snapshot_id"] for x in listed] == [snap_id]
                assert ok(await a.call("snapshot_list", {"name": "s1"}))["snapshots"]
                assert ok(await a.call("snapshot_list", {"name": "nope"}))["snapshots"] == []
                by_sb = ok(await a.call("snapshot_list", {"sandbox_id": sid}))["snapshots"]
                assert [x["snapshot_id"] for x in by_sb] == [snap_id]

                # a new sandbox from the snapshot: its own id, the files
                again = await _sandbox(a, snapshot=snap_id)
                assert again != sid
                assert await _run(a, again, "cat f") == "one"
                r = await a.call("create_sandbox", {"snapshot": snap_id, "template": "base"})
                refused(r, "snapshot")
                ok(await a.call("kill_sandbox", {"sandbox_id": again}))

                # a fork: a sandbox of this session, separate from its parent
                kids = ok(await a.call("sandbox_fork", {"sandbox_id": sid}))["sandboxes"]
                assert len(kids) == 1 and kids[0]["state"] == "running"
                kid = kids[0]["sandbox_id"]
                assert kid != sid and kids[0]["parent"] == sid
                listed = ok(await a.call("list_sandboxes", {}))["sandboxes"]
                assert {x["sandbox_id"] for x in listed} == {sid, kid}
                assert await _run(a, kid, "cat f; echo two > g") == "one"
                r = await a.call("execute_command", {"sandbox_id": sid, "command": "test -e g"})
                assert r.structured_content["exit_code"] == 1
                audit = ok(await a.call("get_audit", {"sandbox_id": kid}))["records"]
                assert "sandbox.forked" in {x["event"] for x in audit}
                for bad in (0, -1, True, "2"):
                    r = await a.call("sandbox_fork", {"sandbox_id": sid, "count": bad})
                    assert r.is_error, (bad, r.content)

                r = ok(await a.call("snapshot_delete", {"snapshot_id": snap_id}))
                assert r == {"snapshot_id": snap_id, "deleted": True}
                assert ok(await a.call("snapshot_list", {}))["snapshots"] == []
                refused(await a.call("snapshot_delete", {"snapshot_id": snap_id}), "not found")
                refused(await a.call("create_sandbox", {"snapshot": snap_id}), "not found")

    anyio.run(main)
    tenant = keyed.svc.tenant("alice")
    assert keyed.svc.list_snapshots(tenant) == []


# -- caps ---------------------------------------------------------------------------


def test_forks_count_toward_the_session_cap(keyed: Mcp) -> None:
    """A fork is a sandbox of the session: count forks that would pass
    max_sandboxes_per_session are refused before any is made."""

    async def main() -> None:
        with anyio.fail_after(180):
            async with connect("session", keyed, "bob") as b:
                sid = await _sandbox(b)
                r = await b.call("sandbox_fork", {"sandbox_id": sid, "count": PER_SESSION})
                refused(r, "max_sandboxes_per_session = 3", "mcp.max_sandboxes_per_session")
                assert len(keyed.svc.list(keyed.svc.tenant("bob"))) == 1  # nothing was made
                kids = ok(await b.call("sandbox_fork", {"sandbox_id": sid, "count": 2}))
                ids = [k["sandbox_id"] for k in kids["sandboxes"]]
                assert len(set(ids) | {sid}) == 3
                r = await b.call("sandbox_fork", {"sandbox_id": sid})
                refused(r, "mcp.max_sandboxes_per_session")
                r = await b.call("create_sandbox", {})
                refused(r, "mcp.max_sandboxes_per_session")
                ok(await b.call("kill_sandbox", {"sandbox_id": ids[0]}))
                ok(await b.call("sandbox_fork", {"sandbox_id": sid}))

    anyio.run(main)


def test_handle_forks_count_toward_the_handle_cap(keyed: Mcp) -> None:
    async def main() -> None:
        with anyio.fail_after(180):
            async with connect("auto", keyed, "carol") as c:
                handle = await _sandbox(c)
                assert "." in handle
                r = await c.call("sandbox_fork", {"sandbox_id": handle, "count": HANDLES})
                refused(r, "mcp.max_handle_sandboxes")
                kids = ok(await c.call("sandbox_fork", {"sandbox_id": handle, "count": 3}))
                handles = [k["sandbox_id"] for k in kids["sandboxes"]]
                assert all("." in h for h in handles)
                assert await _run(c, handles[0], "echo in-the-fork") == "in-the-fork\n"
                refused(await c.call("sandbox_fork", {"sandbox_id": handle}), "max_handle")
                for h in (handle, *handles):
                    ok(await c.call("kill_sandbox", {"sandbox_id": h}))

    anyio.run(main)


# -- who sees what ------------------------------------------------------------------


def test_snapshots_are_the_sessions_own(keyed: Mcp) -> None:
    """Another session of the same tenant, a session-less client of it, and
    another tenant: none lists, restores or deletes the snapshot."""

    async def main() -> None:
        with anyio.fail_after(180):
            async with (
                connect("session", keyed, "dave") as a,
                connect("session", keyed, "dave") as a2,
                connect("auto", keyed, "dave") as ah,
                connect("session", keyed, "erin") as e,
                connect("auto", keyed, "erin") as eh,
            ):
                sid = await _sandbox(a)
                snap = ok(await a.call("sandbox_snapshot", {"sandbox_id": sid, "name": "mine"}))
                snap_id = snap["snapshot_id"]
                for other in (a2, ah, e, eh):
                    assert ok(await other.call("snapshot_list", {}))["snapshots"] == []
                    r = await other.call("snapshot_list", {"name": "mine"})
                    assert ok(r)["snapshots"] == []
                    for guess in (snap_id, snap_id + ".forged", snap_id + "."):
                        r = await other.call("create_sandbox", {"snapshot": guess})
                        refused(r, "not found")
                        r = await other.call("snapshot_delete", {"snapshot_id": guess})
                        refused(r, "not found")
                    # nor by naming the sandbox it came from
                    r = await other.call("snapshot_list", {"sandbox_id": sid})
                    refused(r, "not found")
                # still there, still the owner's
                listed = ok(await a.call("snapshot_list", {}))["snapshots"]
                assert [x["snapshot_id"] for x in listed] == [snap_id]
                ok(await a.call("snapshot_delete", {"snapshot_id": snap_id}))

    anyio.run(main)


def test_session_less_clients_reach_snapshots_by_handle_only(keyed: Mcp) -> None:
    async def main() -> None:
        with anyio.fail_after(180):
            async with (
                connect("auto", keyed, "frank") as f,
                connect("auto", keyed, "frank") as later,
                connect("auto", keyed, "erin") as other,
            ):
                handle = await _sandbox(f)
                await _write(f, handle, "/workspace/h", "H")
                snap = ok(await f.call("sandbox_snapshot", {"sandbox_id": handle}))
                snap_handle = snap["snapshot_id"]
                bare = snap_handle.partition(".")[0]
                assert "." in snap_handle and bare.startswith("snap-")
                # never listed without naming the sandbox; listed with its handle
                assert ok(await f.call("snapshot_list", {}))["snapshots"] == []
                r = ok(await later.call("snapshot_list", {"sandbox_id": handle}))
                assert [x["snapshot_id"] for x in r["snapshots"]] == [snap_handle]
                # the bare id is not enough; the handle is, from a new client too
                refused(await f.call("create_sandbox", {"snapshot": bare}), "not found")
                again = await _sandbox(later, snapshot=snap_handle)
                assert "." in again and await _run(later, again, "cat h") == "H"
                # another tenant with the very handle: not found
                refused(await other.call("create_sandbox", {"snapshot": snap_handle}), "not found")
                r = await other.call("snapshot_delete", {"snapshot_id": snap_handle})
                refused(r, "not found")
                r = ok(await later.call("snapshot_delete", {"snapshot_id": snap_handle}))
                assert r["deleted"] is True
                for h in (handle, again):
                    ok(await f.call("kill_sandbox", {"sandbox_id": h}))

    anyio.run(main)


def test_a_sessions_snapshots_go_when_it_ends(keyed: Mcp) -> None:
    """No other session can name them: kept, they would only use up the
    tenant's snapshot limits, so the session's end deletes them."""
    made: dict[str, str] = {}

    async def main() -> None:
        with anyio.fail_after(120):
            async with connect("session", keyed, "gina") as g:
                sid = await _sandbox(g)
                snap = ok(await g.call("sandbox_snapshot", {"sandbox_id": sid}))
                made["id"] = snap["snapshot_id"]

    anyio.run(main)
    tenant = keyed.svc.tenant("gina")
    end = time.monotonic() + 20
    while made["id"] in {i.id for i in keyed.svc.list_snapshots(tenant)}:
        assert time.monotonic() < end, "the snapshot outlived its MCP session"
        time.sleep(0.1)
