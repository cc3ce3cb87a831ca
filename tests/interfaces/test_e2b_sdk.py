"""The unmodified official E2B SDKs (``e2b``, ``e2b-code-interpreter``) against a
real ``glassroom serve`` on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from .serve_helpers import Server

e2b = pytest.importorskip("e2b")
from e2b import CommandExitException, NotFoundException, Sandbox  # noqa: E402
from e2b.exceptions import SandboxNotRunningException  # noqa: E402

from glassroom.audit import read_records, verify  # noqa: E402


def test_commands_exit_code_stderr_background_and_kill(sbx) -> None:
    r = sbx.commands.run("echo hello; echo oops >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "hello\n", "oops\n")

    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo partial; exit 3")
    assert ei.value.exit_code == 3
    assert ei.value.stdout == "partial\n"

    # env and cwd reach the command; it runs through bash -l -c
    r = sbx.commands.run("echo $GREETING; pwd; echo $0", envs={"GREETING": "hi"}, cwd="/tmp")
    assert r.stdout.splitlines() == ["hi", "/tmp", "/bin/bash"]

    h = sbx.commands.run("echo started; sleep 60", background=True)
    assert h.pid > 0
    assert h.pid in [p.pid for p in sbx.commands.list()]
    assert h.kill() is True
    with pytest.raises(CommandExitException):
        h.wait()
    end = time.monotonic() + 5
    while h.pid in [p.pid for p in sbx.commands.list()]:
        assert time.monotonic() < end, "killed background process still listed"
        time.sleep(0.05)

    # stdin to a background process
    h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "abc\n")
    assert h.wait().stdout == "got:abc\n"


def test_denied_write_is_a_failed_command_with_clear_stderr(sbx) -> None:
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo pwned > /etc/passwd-evil")
    err = ei.value
    assert err.exit_code != 0
    assert "/etc/passwd-evil" in err.stderr
    assert "Read-only file system" in err.stderr or "Permission denied" in err.stderr
    # a tool the policy does not allow: the exec is refused inside the sandbox
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("/usr/bin/perl -e 1")
    assert ei.value.exit_code == 126
    assert "Permission denied" in ei.value.stderr


def test_files(sbx) -> None:
    info = sbx.files.write("/workspace/a.txt", "alpha")
    assert info.path == "/workspace/a.txt"
    assert sbx.files.read("/workspace/a.txt") == "alpha"
    assert sbx.files.read("/workspace/a.txt", format="bytes") == b"alpha"
    sbx.files.write("rel.txt", b"\x00\x01binary")  # relative: the home dir, /workspace
    assert sbx.files.read("/workspace/rel.txt", format="bytes") == b"\x00\x01binary"
    # several files in one multipart upload
    sbx.files.write_files(
        [{"path": "/workspace/m1", "data": "1"}, {"path": "/workspace/m2", "data": "2"}]
    )
    # octet-stream upload (a file-like object)
    import io

    sbx.files.write("/workspace/stream.bin", io.BytesIO(b"x" * 100000))
    assert len(sbx.files.read("/workspace/stream.bin", format="bytes")) == 100000

    assert sbx.files.make_dir("/workspace/d/e") is True
    assert sbx.files.make_dir("/workspace/d/e") is False
    assert sbx.files.exists("/workspace/d/e")
    assert not sbx.files.exists("/workspace/nope")
    names = {e.name: e.type.value for e in sbx.files.list("/workspace")}
    assert names["a.txt"] == "file" and names["d"] == "dir"
    assert {"m1", "m2", "rel.txt", "stream.bin"} <= set(names)
    deep = {e.path for e in sbx.files.list("/workspace/d", depth=2)}
    assert deep == {"/workspace/d/e"}
    st = sbx.files.get_info("/workspace/a.txt")
    assert st.size == 5 and st.type.value == "file"
    sbx.files.rename("/workspace/a.txt", "/workspace/b.txt")
    assert sbx.files.exists("/workspace/b.txt") and not sbx.files.exists("/workspace/a.txt")
    sbx.files.remove("/workspace/d")
    assert not sbx.files.exists("/workspace/d")
    with pytest.raises(NotFoundException):
        sbx.files.read("/workspace/missing")
    # the policy's walls hold for file calls too: /etc/shadow is not in the sandbox's view
    with pytest.raises(Exception) as ei:
        sbx.files.write("/etc/evil", "x")
    assert "filesystem.write" in str(ei.value)
    # the command sees what the file API wrote
    assert sbx.commands.run("cat /workspace/b.txt").stdout == "alpha"


def test_lifecycle_timeout_info_connect_list_kill(serve: Server) -> None:
    sb = Sandbox.create(timeout=30, metadata={"job": "lifecycle"}, envs={"FROM_CREATE": "yes"})
    try:
        info = sb.get_info()
        assert info.sandbox_id == sb.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"job": "lifecycle"}
        left = (info.end_at - info.started_at).total_seconds()
        assert 29 <= left <= 31
        sb.set_timeout(200)
        info2 = sb.get_info()
        assert (info2.end_at - info.started_at).total_seconds() > 190
        # beyond the policy's max runtime (3600 s for the built-in templates): refused, with the rule
        with pytest.raises(Exception) as ei:
            sb.set_timeout(100000)
        assert "resources.max_runtime_s" in str(ei.value)

        assert sb.commands.run("echo $FROM_CREATE").stdout == "yes\n"
        again = Sandbox.connect(sb.sandbox_id)
        assert again.commands.run("echo via-connect").stdout == "via-connect\n"

        listed = Sandbox.list(query=None).next_items()
        assert sb.sandbox_id in [s.sandbox_id for s in listed]
        from e2b import SandboxQuery

        mine = Sandbox.list(query=SandboxQuery(metadata={"job": "lifecycle"})).next_items()
        assert [s.sandbox_id for s in mine] == [sb.sandbox_id]
        # another tenant sees nothing of it
        other = Sandbox.list(api_key=serve.keys["bob"]).next_items()
        assert sb.sandbox_id not in [s.sandbox_id for s in other]
        with pytest.raises(e2b.SandboxNotFoundException):
            Sandbox.connect(sb.sandbox_id, api_key=serve.keys["bob"])
    finally:
        assert sb.kill() is True
    assert Sandbox.kill(sb.sandbox_id) is False  # already gone
    with pytest.raises(SandboxNotRunningException):
        sb.commands.run("echo after-kill")
    with pytest.raises(SandboxNotRunningException):
        sb.files.read("/workspace/x")


def test_deadline_is_exact_and_reaped_with_an_audit_record(serve: Server) -> None:
    sb = Sandbox.create(timeout=2)
    sid = sb.sandbox_id
    t0 = time.monotonic()
    sb.set_timeout(3)  # extending works: the new deadline is 3 s from now
    while True:
        try:
            sb.commands.run("true")
        except SandboxNotRunningException:
            break
        assert time.monotonic() - t0 < 6
        time.sleep(0.1)
    took = time.monotonic() - t0
    assert 2.8 <= took <= 4.5, took
    end = time.monotonic() + 10  # teardown finishes just after the sandbox stops answering
    while True:
        recs = [r for r in read_records(serve.cfg.audit_log) if r.get("sandbox") == sid]
        if any(r["event"] == "sandbox.destroyed" for r in recs) or time.monotonic() > end:
            break
        time.sleep(0.05)
    expired = [r for r in recs if r["event"] == "sandbox.expired"]
    assert expired and expired[0]["rule"] == "lifecycle.timeout"
    destroyed = [r for r in recs if r["event"] == "sandbox.destroyed"]
    assert destroyed and destroyed[0]["details"]["clean"] is True
    assert verify(serve.cfg.audit_log).ok


def test_code_interpreter_keeps_state(serve: Server) -> None:
    ci_mod = pytest.importorskip("e2b_code_interpreter")
    sb = ci_mod.Sandbox.create(timeout=120)
    try:
        assert sb.run_code("x = 41").error is None
        ex = sb.run_code("print('hi'); x + 1")
        assert ex.logs.stdout == ["hi\n"]
        assert ex.text == "42"
        ex = sb.run_code("import sys; print('warn', file=sys.stderr); 1/0")
        assert ex.logs.stderr == ["warn\n"]
        assert ex.error is not None and ex.error.name == "ZeroDivisionError"
        assert "ZeroDivisionError" in ex.error.traceback
        assert sb.run_code("x").text == "41"  # state survived the error

        ctx = sb.create_code_context()
        assert sb.run_code("y = 'own'", context=ctx).error is None
        assert sb.run_code("y", context=ctx).text == "'own'"
        assert sb.run_code("'y' in dir()").text == "False"  # the default context has no y
        assert ctx.id in [c.id for c in sb.list_code_contexts()]
        # the kernel runs under the sandbox's walls
        ex = sb.run_code("open('/etc/evil', 'w')")
        assert ex.error is not None and ex.error.name in ("OSError", "PermissionError")
    finally:
        sb.kill()


# -- E2B parity (issue 16): what E2B's own SDK tests found ---------------------------


def test_home_user_is_the_home_and_default_workdir(sbx) -> None:
    """/home/user is E2B's home and workdir: a link to /workspace on every tier."""
    r = sbx.commands.run("pwd; echo $HOME; cd ~ && pwd")
    assert r.stdout.splitlines() == ["/home/user", "/home/user", "/home/user"]
    info = sbx.files.write("notes/a.txt", "alpha")  # relative: under the home
    assert info.path == "/home/user/notes/a.txt"
    assert sbx.files.read("/home/user/notes/a.txt") == "alpha"
    assert sbx.files.read("/workspace/notes/a.txt") == "alpha"  # the same file
    assert sbx.commands.run("cat /home/user/notes/a.txt").stdout == "alpha"
    r = sbx.commands.run("pwd; ls", cwd="/home/user/notes")
    assert r.stdout.splitlines() == ["/home/user/notes", "a.txt"]
    assert [e.path for e in sbx.files.list("/home/user/notes")] == ["/home/user/notes/a.txt"]
    assert [e.path for e in sbx.files.list("/workspace/notes")] == ["/workspace/notes/a.txt"]
    # the link is no way around the walls: /home/user/.. is not the host's /home
    with pytest.raises(Exception) as ei:
        sbx.files.write("/home/evil", "x")
    assert "filesystem.write" in str(ei.value)


def test_health_is_502_for_a_killed_or_unknown_sandbox(serve: Server) -> None:
    import httpx

    sb = Sandbox.create(timeout=60)
    assert sb.is_running() is True
    headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49983",
               "X-Access-Token": sb._envd_access_token or ""}  # fmt: skip
    assert httpx.get(f"{serve.url}/health", headers=headers).status_code == 204
    sb.kill()
    assert sb.is_running() is False
    r = httpx.get(f"{serve.url}/health", headers=headers)
    assert r.status_code == 502 and "was not found" in r.json()["message"]
    r = httpx.get(f"{serve.url}/health", headers={**headers, "E2b-Sandbox-Id": "sb-nope"})
    assert r.status_code == 502 and r.json()["code"] == 502
    assert not serve.errors()


def test_killing_the_sandbox_ends_a_running_command_as_not_running(serve: Server) -> None:
    sb = Sandbox.create(timeout=60)
    h = sb.commands.run("sleep 60", background=True)
    sb.kill()
    with pytest.raises(SandboxNotRunningException) as ei:
        h.wait()
    assert "killed" in str(ei.value)


def test_write_creates_parents_and_removing_a_missing_path_is_done(sbx) -> None:
    info = sbx.files.write("/workspace/new/deeper/f.txt", "x")
    assert info.path == "/workspace/new/deeper/f.txt"
    assert sbx.files.read("/workspace/new/deeper/f.txt") == "x"
    sbx.files.write_files([{"path": "/tmp/m/n/o.txt", "data": "o"}])
    assert sbx.files.read("/tmp/m/n/o.txt") == "o"
    sbx.files.remove("/workspace/not-there")  # envd: a no-op, not an error
    sbx.files.remove("/workspace/new")
    assert not sbx.files.exists("/workspace/new")
    # creating parents goes through the same walls: outside them it is still refused
    with pytest.raises(Exception) as ei:
        sbx.files.write("/etc/newdir/f", "x")
    assert "filesystem.write" in str(ei.value)


def test_stat_gives_real_metadata_and_follows_symlinks(sbx) -> None:
    from datetime import UTC, datetime

    from e2b import FileType

    sbx.files.write("d/t.txt", "hello")
    sbx.commands.run("touch -d @1000000000 d/t.txt && chmod 640 d/t.txt && ln -s t.txt d/l",
                     cwd="/home/user")  # fmt: skip
    st = sbx.files.get_info("d/t.txt")
    assert (st.type, st.size, st.mode, st.permissions) == (FileType.FILE, 5, 0o640, "-rw-r-----")
    assert (st.owner, st.group) == ("user", "user")
    assert st.modified_time == datetime.fromtimestamp(1_000_000_000, UTC)
    assert st.symlink_target is None
    # newer envd: the link is marked (is_symlink; e2b >= 2.5x shows SYMLINK) and the
    # rest describes its target, followed
    link = sbx.files.get_info("/home/user/d/l")
    assert link.type == FileType.SYMLINK and link.size == 5 and link.mode == 0o640
    assert link.symlink_target == "/home/user/d/t.txt"
    listed = {e.name: e for e in sbx.files.list("d")}
    assert listed["l"].symlink_target == "/home/user/d/t.txt"
    assert listed["t.txt"].modified_time == st.modified_time
    d = sbx.files.get_info("d")
    assert (d.type, d.mode, d.permissions) == (FileType.DIR, 0o755, "drwxr-xr-x")


def test_connect_timeout_ms_ends_the_command_with_a_timeout(serve: Server) -> None:
    import asyncio
    import json

    import httpx
    from e2b import AsyncSandbox, TimeoutException

    async def run() -> None:
        sb = await AsyncSandbox.create(timeout=60)
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutException):
                await sb.commands.run("sleep 30", timeout=1)
            assert time.monotonic() - t0 < 10
            # the command the stream started is killed with it
            end = time.monotonic() + 5
            while [p for p in await sb.commands.list() if "sleep" in p.cmd + " ".join(p.args)]:
                assert time.monotonic() < end, "timed-out command still running"
                await asyncio.sleep(0.1)
            headers = {"E2b-Sandbox-Id": sb.sandbox_id, "X-Access-Token": sb._envd_access_token,
                       "Content-Type": "application/connect+json",
                       "connect-timeout-ms": "soon"}  # fmt: skip
            body = json.dumps({"process": {"cmd": "true"}}).encode()
            r = httpx.post(f"{serve.url}/process.Process/Start", headers=headers,
                           content=b"\0" + len(body).to_bytes(4, "big") + body)  # fmt: skip
            assert r.status_code == 200 and r.content[0] == 2
            err = json.loads(r.content[5:])["error"]
            assert err["code"] == "invalid_argument" and "connect-timeout-ms" in err["message"]
        finally:
            await sb.kill()

    asyncio.run(run())
    assert not serve.errors()


def test_set_timeout_zero_ends_the_sandbox_now(serve: Server) -> None:
    sb = Sandbox.create(timeout=60)
    with pytest.raises(Exception) as ei:  # below 0 is still bad input, named
        sb.set_timeout(-1)
    assert "timeout" in str(ei.value) and "from 0" in str(ei.value)
    sb.set_timeout(0)  # E2B: expire now
    end = time.monotonic() + 10
    while sb.is_running():
        assert time.monotonic() < end, "set_timeout(0) did not end the sandbox"
        time.sleep(0.1)


def test_list_pages_order_and_filters(serve: Server) -> None:
    """``Sandbox.list`` with ``limit`` and its paginator (``nextToken``) and a
    metadata filter; ``startedAfter`` filters; a forged token and a bad
    ``startedAfter`` are a 400 naming the field."""
    import httpx
    from e2b import SandboxQuery

    made = [Sandbox.create(timeout=60, metadata={"job": "pages"}) for _ in range(3)]
    try:
        pages = Sandbox.list(query=SandboxQuery(metadata={"job": "pages"}), limit=2)
        first = pages.next_items()
        assert len(first) == 2 and pages.has_next
        second = pages.next_items()
        assert len(second) == 1 and not pages.has_next
        assert {s.sandbox_id for s in first + second} == {s.sandbox_id for s in made}
        h = {"X-API-Key": serve.keys["alice"]}
        r = httpx.get(f"{serve.url}/v2/sandboxes", params={"nextToken": "forged"}, headers=h)
        assert r.status_code == 400
        assert r.json()["message"] == "nextToken: not a token this server gave"
        r = httpx.get(f"{serve.url}/v2/sandboxes", params={"startedAfter": "yesterday"}, headers=h)
        assert r.status_code == 400
        assert r.json()["message"] == "startedAfter: must be an RFC 3339 time"
        later = httpx.get(
            f"{serve.url}/v2/sandboxes",
            params={"startedAfter": "2999-01-01T00:00:00Z", "metadata": "job=pages"},
            headers=h,
        )
        assert later.status_code == 200 and later.json() == []
    finally:
        for sb in made:
            sb.kill()
