"""A hostile command against the guest's file audit, on both guest agents.

Each test is a pair: the harmless exec is logged with its whole argv, and
the hostile one must be too.

The hostile exec (found in review): arguments longer than MAX_ARG (1024)
bytes of bytes that are not UTF-8.  The argv read from memory was cut at
1024 *bytes* (4096 characters of ``\\xNN`` text) while /proc/PID/cmdline was
cut at 1024 *characters*, so the two "differed", the whole memory argv was
kept as ``argv_arg`` (never cut for a guest frame), the report passed 32 KiB,
and the guest kept only its syscall, path, result and pid: the command line
was gone from the audit log.  Now both readings are cut alike, and every
name and both argv lists are cut to fit a frame.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from glassroom import Sandbox
from glassroom.audit import read_records, verify
from glassroom.backends.microvm import qemu
from glassroom.policy import parse_policy

FILES = parse_policy('[audit]\nlevel = "files"\n')
SOURCE = "guest agent (untrusted)"


@pytest.fixture(autouse=True)
def _need_qemu() -> None:
    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")


def _execs(audit_log: Path, sid: str, path: str) -> list[dict[str, Any]]:
    return [
        r["details"]
        for r in read_records(audit_log)
        if r["sandbox"] == sid
        and r["event"] == "exec"
        and r["details"].get("source") == SOURCE
        and r["details"].get("path") == path
    ]


def _run_sh(audit_log: Path, init: str, marker: str, extra: str) -> list[dict[str, Any]]:
    code = (
        "import subprocess\n"
        f"subprocess.run(['/bin/sh', '-c', 'echo {marker} >/dev/null'] + {extra})\n"
    )
    with Sandbox(FILES, backend="microvm", audit_log=audit_log) as sb:
        assert sb.walls["init"] == init
        assert sb.run(["python3", "-c", code], timeout_s=120).exit_code == 0
        sid = sb.id
    assert verify(audit_log).ok
    return _execs(audit_log, sid, "/bin/sh")


def test_exec_argv_logged_harmless(audit_log: Path, init: str) -> None:
    recs = _run_sh(audit_log, init, "HARMLESS-CMD", "[b'x' * 100] * 8")
    assert recs, "the exec of /bin/sh is not in the log"
    assert any(r.get("argv", [])[:3] == ["/bin/sh", "-c", "echo HARMLESS-CMD >/dev/null"]
               and len(r["argv"]) == 11 for r in recs), recs  # fmt: skip


def test_exec_argv_logged_with_long_non_utf8_args(audit_log: Path, init: str) -> None:
    recs = _run_sh(audit_log, init, "HIDDEN-CMD", "[b'\\xfe' * 1100] * 8")
    assert recs, "the exec of /bin/sh is not in the log"
    # Before the fix: [{"path": "/bin/sh", "pid": N, "result": "ok", "syscall": "execve", ...}]
    assert any(r.get("argv", [])[:3] == ["/bin/sh", "-c", "echo HIDDEN-CMD >/dev/null"]
               for r in recs), recs  # fmt: skip


def test_exec_argv_single_long_arg_no_spurious_argv_arg(audit_log: Path, init: str) -> None:
    """Memory and the kernel agree here: no ``argv_arg`` (the memory/cmdline cut mismatch)."""
    recs = _run_sh(audit_log, init, "ONE-LONG", "[b'\\xfe' * 1100]")
    assert recs
    assert all("argv_arg" not in r for r in recs), [sorted(r) for r in recs]
