"""Directory watch (envd's WatchDir / CreateWatcher) with the unmodified e2b SDK,
sync and async, against a real ``glassroom serve``: events for changes made
through the files API and by commands inside the sandbox, the policy's walls
(a watch of a path the sandbox cannot see is refused, and audited), and the
bounds (watchers per sandbox, tree size, events buffered, the sandbox's end)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from .serve_helpers import Server

e2b = pytest.importorskip("e2b")
from e2b import (  # noqa: E402
    AsyncSandbox,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    SandboxException,
)

from glassroom.audit import read_records  # noqa: E402
from glassroom.interfaces.e2b import _watch  # noqa: E402

C, W, R, D, M = (
    FilesystemEventType.CREATE,
    FilesystemEventType.WRITE,
    FilesystemEventType.REMOVE,
    FilesystemEventType.RENAME,
    FilesystemEventType.CHMOD,
)


def _events_until(handle: Any, want: set[tuple[Any, str]], bound_s: float = 20.0) -> list[Any]:
    """Events from ``handle`` until all of ``want`` (type, name) came, or the bound ran out."""
    got: list[Any] = []
    end = time.monotonic() + bound_s
    while time.monotonic() < end:
        got += handle.get_new_events()
        if want <= {(e.type, e.name) for e in got}:
            break
        time.sleep(0.1)
    return got


def test_sync_watch_sees_api_writes_and_commands_inside(sbx: Any) -> None:
    sbx.files.make_dir("w")
    sbx.files.write("w/old.txt", "one")
    h = sbx.files.watch_dir("w", include_entry=True)
    # a write through the files API is in the very next answer
    sbx.files.write("w/new.txt", "hello")
    evs = h.get_new_events()
    assert [(e.type, e.name) for e in evs] == [(C, "new.txt"), (M, "new.txt"), (W, "new.txt")]
    assert evs[0].entry is not None and evs[0].entry.path == "/home/user/w/new.txt"
    assert evs[0].entry.type == FileType.FILE
    # changes made by a command inside the sandbox are found by the poll
    sbx.commands.run("cd /home/user/w && echo more >> new.txt && mv old.txt moved.txt")
    evs = _events_until(h, {(W, "new.txt"), (D, "old.txt"), (C, "moved.txt")})
    # the append and the rename may fall in one scan or two: their order is the diff's
    assert sorted((e.type.value, e.name) for e in evs) == [
        ("create", "moved.txt"),
        ("rename", "old.txt"),
        ("write", "new.txt"),
    ]
    sbx.commands.run("chmod 600 /home/user/w/moved.txt && rm /home/user/w/new.txt")
    evs = _events_until(h, {(R, "new.txt"), (M, "moved.txt")})
    assert {(e.type, e.name) for e in evs} == {(R, "new.txt"), (M, "moved.txt")}
    assert next(e for e in evs if e.type == R).entry is None  # gone: no entry
    h.stop()
    with pytest.raises(SandboxException):
        h.get_new_events()


def test_sync_watch_recursive_and_not(sbx: Any) -> None:
    sbx.files.make_dir("r/sub")
    flat = sbx.files.watch_dir("r")
    deep = sbx.files.watch_dir("r", recursive=True)
    sbx.files.write("r/sub/f.txt", "x")
    first = deep.get_new_events()[0]
    assert (first.type, first.name) == (C, "sub/f.txt")
    assert flat.get_new_events() == []  # not recursive: the subdirectory's contents are not watched
    # a directory moved with what is in it: one rename, not one per entry
    sbx.commands.run("mv /home/user/r/sub /home/user/r/sub2")
    evs = _events_until(deep, {(D, "sub"), (C, "sub2")})
    assert [(e.type, e.name) for e in evs] == [(D, "sub"), (C, "sub2")]
    flat.stop()
    deep.stop()


def test_watch_of_an_allowed_dir_works_and_of_a_denied_dir_is_refused(
    serve: Server, sbx: Any
) -> None:
    sbx.files.make_dir("/workspace/ok")
    sbx.files.watch_dir("/workspace/ok").stop()
    # /var is outside the policy: not in the sandbox's view, envd's "not found"
    with pytest.raises(FileNotFoundException) as ei:
        sbx.files.watch_dir("/var")
    assert "filesystem.read" in str(ei.value)
    with pytest.raises(FileNotFoundException):
        sbx.files.watch_dir("missing-dir")
    sbx.files.write("plain.txt", "x")
    with pytest.raises(SandboxException) as ei2:
        sbx.files.watch_dir("plain.txt")
    assert "not a directory" in str(ei2.value)
    recs = [r for r in read_records(serve.cfg.audit_log) if r.get("sandbox") == sbx.sandbox_id]
    # the reads are in the audit log like any file op, the refused one as blocked
    assert any(r["event"] == "file.list" and r["details"]["path"] == "/workspace/ok" for r in recs)
    assert any(
        r["event"] == "command.started" and r["details"]["argv"][:2] == ["find", "/workspace/ok"]
        for r in recs
    )
    blocked = [r for r in recs if r["event"] == "blocked" and r["details"]["target"] == "/var"]
    assert blocked and blocked[0]["rule"] == "filesystem.read"
    assert blocked[0]["decision"] == "deny"


def test_a_watch_ends_when_its_directory_is_removed(sbx: Any) -> None:
    sbx.files.write("doomed/f.txt", "x")
    h = sbx.files.watch_dir("doomed")
    sbx.commands.run("rm -r /home/user/doomed")
    evs: list[Any] = []
    end = time.monotonic() + 20
    with pytest.raises(SandboxException) as ei:
        while time.monotonic() < end:
            evs += h.get_new_events()
            time.sleep(0.1)
    assert [(e.type, e.name) for e in evs] == [(R, "f.txt")]
    assert "is gone" in str(ei.value)


def test_async_watch_stream(serve: Server) -> None:
    async def run() -> None:
        sb = await AsyncSandbox.create(timeout=120)
        try:
            await sb.files.make_dir("a")
            got: list[Any] = []
            seen = asyncio.Event()

            def on_event(ev: Any) -> None:
                got.append(ev)
                if (ev.type, ev.name) == (W, "deep/f.txt"):
                    seen.set()

            h = await sb.files.watch_dir("a", on_event=on_event, recursive=True)
            # made by a command: only the poll can see it
            await sb.commands.run("mkdir -p /home/user/a/deep && echo hi > /home/user/a/deep/f.txt")
            await asyncio.wait_for(seen.wait(), 20)
            assert (C, "deep") in {(e.type, e.name) for e in got}
            await h.stop()
            # the stream's end ends its watcher on the server (bounded wait: the
            # server sees the client's close a moment after stop() returns)
            end = time.monotonic() + _watch.ORPHAN_S + 10
            while [w for w in _live(serve) if w.entry.id == sb.sandbox_id]:
                assert time.monotonic() < end, "the watcher outlived its stream"
                await asyncio.sleep(0.1)
            with pytest.raises(FileNotFoundException):
                await sb.files.watch_dir("/var", on_event=lambda e: None)
        finally:
            await sb.kill()

    asyncio.run(run())


def _live(serve: Server) -> list[Any]:
    hub = _watch._HUBS.get(serve.service)
    return [] if hub is None else list(hub._by_id.values())


def test_watchers_are_bounded_and_end_with_the_sandbox(serve: Server, sbx: Any) -> None:
    sbx.files.make_dir("b")
    handles = [sbx.files.watch_dir("b") for _ in range(_watch.MAX_WATCHERS_PER_SANDBOX)]
    with pytest.raises(SandboxException) as ei:
        sbx.files.watch_dir("b")
    assert "at most" in str(ei.value)
    handles.pop().stop()
    handles.append(sbx.files.watch_dir("b"))  # a slot freed is usable again
    mine = [w for w in _live(serve) if w.entry.id == sbx.sandbox_id]
    assert len(mine) == _watch.MAX_WATCHERS_PER_SANDBOX
    sbx.kill()
    assert [w for w in _live(serve) if w.entry.id == sbx.sandbox_id] == []
    assert all(w.ended is not None for w in mine)


def test_tree_and_buffer_bounds(serve: Server, sbx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sbx.commands.run("mkdir -p /home/user/big && touch /home/user/big/f{1..6}")
    monkeypatch.setattr(_watch, "MAX_TREE_ENTRIES", 4)
    with pytest.raises(SandboxException) as ei:
        sbx.files.watch_dir("big")
    assert "more than 4 entries" in str(ei.value)
    monkeypatch.setattr(_watch, "MAX_TREE_ENTRIES", 10_000)
    monkeypatch.setattr(_watch, "MAX_BUFFERED", 5)
    h = sbx.files.watch_dir("big")
    sbx.commands.run("rm /home/user/big/f*")
    # the events held are delivered; then the overflow is reported and the watch is over
    evs: list[Any] = []
    end = time.monotonic() + 20
    with pytest.raises(SandboxException) as ei:
        while time.monotonic() < end:
            evs += h.get_new_events()
            time.sleep(0.1)
    assert "more than 5 events" in str(ei.value)
    assert [e.type for e in evs] == [R] * 5


@pytest.mark.parametrize("risk", ["low", "medium", "high"])
def test_watch_works_on_every_tier(
    serve: Server, risk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """namespaces, gVisor, microVM: the poll goes through the instance's own exec
    and file ops, so the same watch works the same on each (no host inotify)."""
    from glassroom.policy import default_policy, validate_policy

    raw = default_policy().model_dump()
    raw["risk"] = risk
    raw["resources"]["max_runtime_s"] = 600
    monkeypatch.setitem(serve.cfg.templates, f"watch-{risk}", validate_policy(raw))
    sb = e2b.Sandbox.create(f"watch-{risk}", timeout=300)
    try:
        sb.files.make_dir("t")
        h = sb.files.watch_dir("t", recursive=True)
        sb.files.write("t/api.txt", "a")
        assert (C, "api.txt") in {(e.type, e.name) for e in h.get_new_events()}
        sb.commands.run("mkdir /home/user/t/d && echo x > /home/user/t/d/cmd.txt")
        evs = _events_until(h, {(C, "d"), (W, "d/cmd.txt")}, bound_s=60)
        assert {(C, "d"), (W, "d/cmd.txt")} <= {(e.type, e.name) for e in evs}
        h.stop()
        with pytest.raises(FileNotFoundException):
            sb.files.watch_dir("/var")
    finally:
        sb.kill()


def test_zz_no_watcher_or_thread_left_and_no_server_errors(serve: Server) -> None:
    """Every watcher above was stopped or ended with its sandbox: none is left,
    the polling thread ended with the last one, and no request raised."""
    hub = _watch._HUBS.get(serve.service)
    assert hub is not None
    end = time.monotonic() + 10
    while _live(serve) or hub._thread is not None:
        assert time.monotonic() < end, [w.id for w in _live(serve)]
        time.sleep(0.05)
    assert not serve.errors(), serve.errors()[:5]
