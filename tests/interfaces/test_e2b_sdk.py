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


@pytest.fixture
def sbx(serve: Server):
    sb = Sandbox.create(timeout=120)
    yield sb
    try:
        sb.kill()
    except Exception:
        pass


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
