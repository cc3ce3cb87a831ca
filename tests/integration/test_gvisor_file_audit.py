"""``[audit] level = "files"`` on gvisor: every file access and exec inside, in order.

runsc's ``--strace`` records become the same ``file.*`` / ``exec`` events as
on every tier (``audit/_events.py``).  Runs wherever the suite runs: CI
installs runsc, and gvisor is a required backend (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

from glassroom import Sandbox, parse_policy
from glassroom.audit import read_records, verify
from glassroom.audit._events import syscalls_for
from glassroom.backends import _gvisor_spec as spec


def test_reads_are_logged_and_untraceable_names_are_listed(tmp_path: Path) -> None:
    """What only gVisor needs checking; the scripted task of every tier is in
    tests/integration/test_file_audit.py."""
    log = tmp_path / "audit.jsonl"
    with Sandbox(parse_policy('[audit]\nlevel = "files"\n'), backend="gvisor",
                 audit_log=log) as sb:  # fmt: skip
        res = sb.run(["python3", "-c", "open('/workspace/a', 'w').close(); open('/workspace/a')"])
        sid = sb.id
    assert res.exit_code == 0, res
    recs = [r for r in read_records(log) if r.get("sandbox") == sid]
    reads = [r for r in recs if r["event"] == "file.open" and r["details"]["flags"] == "O_RDONLY"]
    assert {r["details"]["result"] for r in reads} >= {"ok", "ENOENT"}
    assert all(r["details"]["source"] == "runsc strace" for r in reads)
    assert recs[-1]["event"] == "sandbox.destroyed"
    created = next(r for r in recs if r["event"] == "sandbox.created")
    walls = created["details"]["walls"]["file_audit"]
    assert walls["level"] == "files" and "openat" in walls["syscalls"]
    # runsc's strace knows only some names: the others are listed, never silently dropped.
    assert set(walls["syscalls"]) | set(walls["not_traceable"]) == set(syscalls_for("files"))
    assert set(walls["not_traceable"]) <= set(spec.STRACE_MAYBE_UNKNOWN)
    assert verify(log).ok
