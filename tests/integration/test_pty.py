"""Commands on a pseudo-terminal (``Sandbox.spawn(pty=(rows, cols))``), on every backend.

The terminal is made inside the sandbox by the tier's init, so these check
both halves: it is a real controlling terminal that can be typed into and
resized, and it is no way around a wall: a write a plain command cannot make
fails the same way on it, a tool the policy leaves out is refused (and
logged), and ``TIOCSTI`` (pushing input into a terminal) is refused by the
seccomp profile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom import SandboxError

#: What the terminal's command prints about its terminal.
PROBE = (
    "import os, sys\n"
    "print('tty', os.isatty(0), os.isatty(1), os.isatty(2))\n"
    "print('ctty', os.tcgetpgrp(0) == os.getpgrp(), os.getsid(0) == os.getpid())\n"
    "print('size', *os.get_terminal_size(0))\n"
)
#: Prints the terminal's size each time a line is typed.
SIZES = "import os\nwhile True:\n    input()\n    print('size', *os.get_terminal_size(0))\n"
TIOCSTI = (
    "import fcntl, termios\n"
    "print('winsz', len(fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))))\n"
    "try:\n"
    "    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
    "    print('TIOCSTI allowed')\n"
    "except OSError as e:\n"
    "    print('TIOCSTI refused', e.errno)\n"
)


def _output(p: Any) -> str:
    return b"".join(d for _s, d in p.events).decode(errors="replace").replace("\r\n", "\n")


def _until(p: Any, text: str, timeout_s: float = 60.0) -> str:
    """The terminal's output once ``text`` is in it (bounded in time)."""
    end = time.monotonic() + timeout_s
    idx = 0
    while text not in _output(p):
        assert time.monotonic() < end, f"{text!r} never came; got {_output(p)!r}"
        _new, idx, done = p.events_since(idx, 0.5)
        if done:
            break
    return _output(p)


def test_a_pty_is_the_commands_controlling_terminal(make_sandbox: Any) -> None:
    sb = make_sandbox()
    p = sb.spawn(["python3", "-c", PROBE], pty=(24, 80))
    res = p.wait(60)
    assert res is not None and res.exit_code == 0, _output(p)
    assert {s for s, _d in p.events} == {"pty"}  # one stream: the terminal
    out = _output(p)
    assert "tty True True True" in out
    assert "ctty True True" in out
    assert "size 80 24" in out


def test_typing_resizing_and_the_exit_status(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox()
    p = sb.spawn(["bash", "--norc", "-i"], pty=(24, 80), env={"ABC": "123"})
    p.write_stdin(b"echo got-$ABC\n")
    assert "got-123" in _until(p, "got-123")
    p.write_stdin(b"exit 7\n")
    res = p.wait(60)
    assert res is not None and res.exit_code == 7

    q = sb.spawn(["python3", "-c", SIZES], pty=(24, 80))
    q.write_stdin(b"\n")
    _until(q, "size 80 24")
    q.resize(30, 100)
    for _ in range(50):  # the resize and the typing go different ways: ask until seen
        q.write_stdin(b"\n")
        if "size 100 30" in _until(q, "size", 5):
            break
        time.sleep(0.1)
    assert "size 100 30" in _output(q)
    q.signal(9)
    res = q.wait(60)
    assert res is not None and res.signal == 9

    started = [r for r in records(audit_log) if r["event"] == "command.started"]
    assert [r["details"].get("pty") for r in started] == [[24, 80], [24, 80]]


def test_resize_needs_a_pty_and_a_sane_size(make_sandbox: Any) -> None:
    sb = make_sandbox()
    plain = sb.spawn(["sleep", "30"])
    with pytest.raises(SandboxError, match="no pty to resize"):
        plain.resize(24, 80)
    plain.signal(9)
    with pytest.raises(SandboxError, match="rows must be a whole number from 1 to 65535"):
        sb.spawn(["sleep", "1"], pty=(0, 80))
    p = sb.spawn(["sleep", "30"], pty=(24, 80))
    with pytest.raises(SandboxError, match="cols must be a whole number from 1 to 65535"):
        p.resize(24, 70000)
    p.signal(9)
    assert p.wait(60) is not None


def test_a_pty_cannot_write_what_a_plain_command_cannot(make_sandbox: Any) -> None:
    sb = make_sandbox()
    before = sb.run(["cat", "/etc/passwd"]).stdout
    plain = sb.run(["bash", "-c", "echo x >> /etc/passwd"])
    assert plain.exit_code == 1
    denied = plain.stderr.strip().rsplit(": ", 1)[-1]  # "Read-only file system", ...
    assert denied

    p = sb.spawn(["bash", "--norc", "-i"], pty=(24, 80))
    p.write_stdin(b"echo hi > /workspace/ok; cat /workspace/ok\n")
    p.write_stdin(b"echo x >> /etc/passwd; echo rc=$?\nexit\n")
    res = p.wait(60)
    assert res is not None and res.exit_code == 0
    out = _output(p)
    assert "\nhi\n" in out  # the harmless write works
    assert f"/etc/passwd: {denied}" in out and "rc=1" in out
    assert sb.run(["cat", "/etc/passwd"]).stdout == before  # and changed nothing


def test_a_tool_the_policy_leaves_out_is_refused_on_a_pty(
    make_sandbox: Any, audit_log: Path
) -> None:
    sb = make_sandbox()
    p = sb.spawn(["stty", "size"], pty=(24, 80))  # stty is not in the default tools
    res = p.wait(60)
    assert res is not None and res.exit_code == 126
    assert res.exec_errno == 13
    blocked = [r for r in records(audit_log) if r["event"] == "blocked"]
    assert [(r["details"]["target"], r["rule"]) for r in blocked] == [("stty", "tools.allow")]


def test_tiocsti_is_refused_on_a_pty(make_sandbox: Any) -> None:
    sb = make_sandbox()
    p = sb.spawn(["python3", "-c", TIOCSTI], pty=(24, 80))
    res = p.wait(60)
    assert res is not None and res.exit_code == 0, _output(p)
    out = _output(p)
    assert "winsz 8" in out  # an ordinary terminal ioctl works
    assert "TIOCSTI refused 1" in out  # EPERM, from the seccomp profile
