"""``[audit] level = "files"`` on gvisor: every file access and exec inside, in order.

runsc's ``--strace`` records become the same ``file.*`` / ``exec`` events as
on every tier (``audit/_events.py``).  Runs wherever the suite runs: CI
installs runsc, and gvisor is a required backend (tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from glassroom import Sandbox, parse_policy
from glassroom.audit import read_records, verify
from glassroom.audit._events import syscalls_for
from glassroom.backends import _gvisor_spec as spec
from glassroom.policy._defaults import DEFAULT_TOOLS

#: Readable (it is under /usr) but not an allowed tool: its exec is refused.
NOT_A_TOOL = "/usr/bin/od"

SCRIPT = f"""
import os, subprocess
with open("/workspace/a.txt", "w") as f:
    f.write("hello")
with open("/workspace/a.txt") as f:
    f.read()
os.rename("/workspace/a.txt", "/workspace/b.txt")
os.unlink("/workspace/b.txt")
subprocess.run(["ls", "/workspace"], check=True)
try:
    open("/usr/x", "w")
except OSError as e:
    print("write", e.errno)
try:
    subprocess.run([{NOT_A_TOOL!r}, "/dev/null"])
except OSError as e:
    print("exec", e.errno)
"""


def _find(recs: list[dict[str, Any]], start: int, event: str, **details: Any) -> int:
    """Index of the first record from ``start`` on with ``event`` and these details."""
    for i in range(start, len(recs)):
        r = recs[i]
        if r["event"] == event and all(r["details"].get(k) == v for k, v in details.items()):
            return i
    seen = [(r["event"], r["details"].get("path"), r["details"].get("result")) for r in recs]
    raise AssertionError(f"no {event} {details} after record {start}; records: {seen}")


def test_file_accesses_and_execs_are_logged_in_order(tmp_path: Path) -> None:
    assert "od" not in DEFAULT_TOOLS and os.path.exists(NOT_A_TOOL)
    log = tmp_path / "audit.jsonl"
    with Sandbox(parse_policy('[audit]\nlevel = "files"\n'), backend="gvisor",
                 audit_log=log) as sb:  # fmt: skip
        res = sb.run(["python3", "-c", SCRIPT])
        sid = sb.id
    assert res.exit_code == 0, res
    assert res.stdout.splitlines()[-2:] == ["write 13", "exec 13"], res.stdout

    recs = [r for r in read_records(log) if r.get("sandbox") == sid]
    ok = {"result": "ok", "source": "runsc strace"}
    i = _find(recs, 0, "file.open", path="/workspace/a.txt",
              flags="O_WRONLY|O_CREAT|O_TRUNC", **ok)  # fmt: skip
    i = _find(recs, i + 1, "file.open", path="/workspace/a.txt", flags="O_RDONLY", **ok)
    i = _find(recs, i + 1, "file.rename", path="/workspace/a.txt", path2="/workspace/b.txt", **ok)
    i = _find(recs, i + 1, "file.unlink", path="/workspace/b.txt", **ok)
    i = _find(recs, i + 1, "exec", path="/usr/bin/ls", argv=["ls", "/workspace"], **ok)
    assert recs[i]["decision"] == "allow" and recs[i]["details"]["parent"] == "python3"
    assert isinstance(recs[i]["details"].get("ppid"), int)
    w = _find(recs, i + 1, "file.open", path="/usr/x")
    assert recs[w]["decision"] == "deny" and recs[w]["rule"] == "filesystem.write"
    assert recs[w]["details"]["result"] in ("EACCES", "EROFS")
    x = _find(recs, w + 1, "exec", path=NOT_A_TOOL)
    assert recs[x]["decision"] == "deny" and recs[x]["rule"] == "tools.allow"
    assert recs[x]["details"]["result"] == "EACCES"

    # Reads are logged too, with their results; and all of it before the sandbox's end.
    reads = [r for r in recs if r["event"] == "file.open" and r["details"]["flags"] == "O_RDONLY"]
    assert {r["details"]["result"] for r in reads} >= {"ok", "ENOENT"}
    events = [r["event"] for r in recs]
    assert events[-1] == "sandbox.destroyed"
    created = next(r for r in recs if r["event"] == "sandbox.created")
    walls = created["details"]["walls"]["file_audit"]
    assert walls["level"] == "files" and "openat" in walls["syscalls"]
    # runsc's strace knows only some names: the others are listed, never silently dropped.
    assert set(walls["syscalls"]) | set(walls["not_traceable"]) == set(syscalls_for("files"))
    assert set(walls["not_traceable"]) <= set(spec.STRACE_MAYBE_UNKNOWN)
    assert verify(log).ok
