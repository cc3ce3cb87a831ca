"""The microVM tier's file audit: every file access and exec in the guest, logged.

In the guest a tracer (a fork of the agent: ``_sys/agent/tracer.c`` in the
compiled agent, ``_sys/tracer.py`` in the Python one; both are tested here)
follows each command and each Files-API operation; the agent forwards what
it saw, and the host logs each report through the shared schema, marked as
the guest's claim (``source: "guest agent (untrusted)"``, ``untrusted: true``).
The lies a guest could tell about it are in ``test_lying_guest.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from conftest import find_record
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


def _traced(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r["details"].get("source") == SOURCE]


def _has(flag: str) -> Any:
    return lambda f: isinstance(f, str) and flag in f.split("|")


def test_files_api_and_syscalls_level(audit_log: Path, init: str) -> None:
    """Files-API operations are traced too; ``syscalls`` adds the metadata calls."""
    policy = parse_policy('[audit]\nlevel = "syscalls"\n')
    with Sandbox(policy, backend="microvm", audit_log=audit_log) as sb:
        assert sb.walls["init"] == init and sb.walls["file_audit"]["level"] == "syscalls"
        sb.files.write("/workspace/api.txt", "data")
        assert sb.files.read("/workspace/api.txt") == b"data"
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the log says which
            sb.files.write("/usr/api.txt", "no")
        assert sb.run(["stat", "/workspace/api.txt"]).exit_code == 0
        sid = sb.id
    recs = [r for r in read_records(audit_log) if r["sandbox"] == sid]
    traced = _traced(recs)
    w = find_record(
        traced, "file.open", path="/workspace/api.txt", flags=_has("O_CREAT"), result="ok"
    )
    r = find_record(
        traced, "file.open", path="/workspace/api.txt", flags=_has("O_RDONLY"), result="ok"
    )
    denied = traced[find_record(traced, "file.open", path="/usr/api.txt")]
    assert w < r < traced.index(denied)
    assert (denied["decision"], denied["rule"]) == ("deny", "filesystem.write")
    find_record(traced, "file.stat", path="/workspace/api.txt", result="ok")
    # Each API op's reports come before the supervisor's own record of it.
    api_write = next(i for i, x in enumerate(recs) if x["event"] == "file.write")
    assert recs.index(traced[w]) < api_write
    assert verify(audit_log).ok


DAEMON = r"""
import os, time
if os.fork() == 0:
    os.setsid()           # leaves the command's process group
    time.sleep(0.3)
    open("/workspace/late", "w").close()
    time.sleep(60)
    os._exit(0)
"""


def test_escaped_descendant_is_followed_then_ended(audit_log: Path, init: str) -> None:
    """A descendant that left the process group is still traced, and it does not
    keep the command (or its tracer) alive past a short grace."""
    with Sandbox(FILES, backend="microvm", audit_log=audit_log) as sb:
        assert sb.walls["init"] == init
        t0 = time.monotonic()
        assert sb.run(["python3", "-c", DAEMON]).exit_code == 0
        took = time.monotonic() - t0
        left = sb.run(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"]).stdout
        sid = sb.id
    assert took < 10, took
    assert "sleep(60)" not in left, left
    recs = [r for r in read_records(audit_log) if r["sandbox"] == sid]
    late = find_record(recs, "file.open", path="/workspace/late", result="ok")
    ended = next(i for i, r in enumerate(recs) if r["event"] == "command.ended")
    assert late < ended


def test_many_calls_and_a_huge_argv(audit_log: Path, init: str) -> None:
    """Thousands of reports travel in bounded frames; a huge argv is cut, not fatal."""
    n = 3000
    loop = f"import os\nfor i in range({n}):\n    try: os.open('/workspace/none-%d' % i, 0)\n    except OSError: pass\n"
    with Sandbox(FILES, backend="microvm", audit_log=audit_log) as sb:
        assert sb.walls["init"] == init
        assert sb.run(["python3", "-c", loop]).exit_code == 0
        # The host's own exec frame is bounded, so the huge argv is built inside.
        # Control characters: six bytes each once JSON-escaped, the worst case.
        huge = "import os; os.execv('/usr/bin/true', ['true'] + ['\\x01' * 1000] * 300)"
        assert sb.run(["python3", "-c", huge]).exit_code == 0
        assert sb.run(["true"]).exit_code == 0  # still alive
        sid = sb.id
    recs = [r for r in read_records(audit_log) if r["sandbox"] == sid]
    misses = [r for r in recs if r["event"] == "file.open"
              and r["details"]["path"].startswith("/workspace/none-")]  # fmt: skip
    assert len(misses) == n
    assert [r["details"]["path"] for r in misses] == [f"/workspace/none-{i}" for i in range(n)]
    assert all(r["details"]["result"] == "ENOENT" and r["decision"] == "info" for r in misses)
    big = recs[find_record(recs, "exec", path="/usr/bin/true", argv=lambda a: a and len(a) > 2)]
    argv = big["details"]["argv"]
    assert argv[0] == "true" and "more arguments" in argv[-1] and len(argv) < 300
    assert not [r for r in recs if r["event"] == "anomaly"]
    assert verify(audit_log).ok


def test_actions_level_sends_no_reports(audit_log: Path) -> None:
    with Sandbox({"risk": "high"}, backend="microvm", audit_log=audit_log) as sb:
        assert sb.run(["python3", "-c", "open('/workspace/x', 'w')"]).exit_code == 0
        assert "file_audit" not in sb.walls
        sid = sb.id
    assert not _traced([r for r in read_records(audit_log) if r["sandbox"] == sid])
