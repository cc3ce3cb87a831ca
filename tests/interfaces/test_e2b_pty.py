"""``sandbox.pty`` of the unmodified e2b SDK against a real ``glassroom serve``:
a real terminal inside the sandbox, under the same walls as any command."""

from __future__ import annotations

import pytest

from .serve_helpers import Server

e2b = pytest.importorskip("e2b")
from e2b.sandbox.commands.command_handle import PtySize  # noqa: E402

from glassroom.audit import read_records  # noqa: E402


def _run(sbx, keys: bytes) -> tuple[int, str]:
    term = sbx.pty.create(PtySize(rows=24, cols=80), envs={"ABC": "123"})
    sbx.pty.send_stdin(term.pid, keys)
    out: list[bytes] = []
    res = term.wait(on_pty=out.append)
    return res.exit_code, b"".join(out).decode(errors="replace")


def test_pty_types_resizes_and_is_audited(sbx, serve: Server) -> None:
    code, out = _run(sbx, b"echo got-$ABC; tput cols\nexit\n")
    assert code == 0 and "got-123" in out and "80" in out
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=120))
    sbx.pty.send_stdin(term.pid, b"tput cols; tput lines\nexit\n")
    out2: list[bytes] = []
    assert term.wait(on_pty=out2.append).exit_code == 0
    assert "120" in b"".join(out2).decode() and "30" in b"".join(out2).decode()
    started = [r for r in read_records(serve.cfg.audit_log)
               if r.get("sandbox") == sbx.sandbox_id and r["event"] == "command.started"
               and r["details"].get("pty")]  # fmt: skip
    assert [r["details"]["pty"] for r in started] == [[24, 80], [24, 80]]


def test_pty_cannot_do_what_a_plain_command_cannot(sbx) -> None:
    plain = sbx.commands.run("echo x >> /etc/passwd; echo rc=$?")
    code, out = _run(sbx, b"echo x >> /etc/passwd; echo rc=$?\n"
                          b"python3 -c 'import fcntl,termios; fcntl.ioctl(0, termios.TIOCSTI, b\"x\")'"
                          b" 2>&1 | tail -1\nexit\n")  # fmt: skip
    assert code == 0
    assert "rc=1" in plain.stdout and "rc=1" in out
    assert plain.stderr.strip().rsplit(": ", 1)[-1] in out  # the same refusal
    assert "PermissionError: [Errno 1] Operation not permitted" in out  # TIOCSTI: seccomp


def test_pty_calls_on_a_plain_process_are_refused(sbx) -> None:
    h = sbx.commands.run("sleep 30", background=True)
    with pytest.raises(e2b.SandboxException, match="has no pty to resize"):
        sbx.pty.resize(h.pid, PtySize(rows=24, cols=80))
    with pytest.raises(e2b.SandboxException, match="has no pty"):
        sbx.pty.send_stdin(h.pid, b"x")
    assert h.kill() is True
    assert sbx.pty.kill(999999) is False
