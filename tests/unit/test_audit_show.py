"""``glassroom audit show``: --type, --blocked, --json (JSONL as stored) and --timeline.

Every log here is written by the real :class:`AuditLog`; traced events come
from the shared schema in ``glassroom.audit._events`` (``to_record``), as a
tier would produce them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from glassroom._errors import AuditError
from glassroom.audit import (
    AuditLog,
    format_timeline,
    read_records,
    record_type,
    select,
)
from glassroom.audit._events import to_record
from glassroom.interfaces.cli import main

SB1, SB2 = "sb-111111aaaaaa", "sb-222222bbbbbb"


#: Every test gets its own state dir (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("state")


def traced(**raw: Any) -> tuple[str, dict[str, Any], str, str | None]:
    return to_record(raw, "ptrace")


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """Two sandboxes' worth of every kind of record, plus one unreadable line."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, fsync=False) as w:
        w.append("-", "supervisor.started", {"pid": 1})
        w.append(SB1, "sandbox.created", {"backend": "namespaces"}, decision="allow")
        w.append(SB1, "command.started", {"argv": ["python3", "agent.py"], "cwd": "/workspace"})
        w.append_many(
            SB1,
            [
                traced(syscall="execve", path="/usr/bin/python3", argv=["python3", "agent.py"],
                       result="ok", pid=2, ppid=1),
                traced(syscall="openat", path="/workspace/out.txt", flags="O_WRONLY|O_CREAT",
                       result="ok", pid=2),
                traced(syscall="openat", path="/etc/passwd", flags="O_WRONLY|O_CREAT",
                       result="EROFS", pid=2),
                traced(syscall="renameat2", path="/workspace/a", path2="/workspace/b",
                       result="ENOENT", pid=2),
                traced(syscall="execve", path="/usr/bin/curl", argv=["curl", "x"],
                       result="EACCES", pid=3, ppid=2),
            ],
        )  # fmt: skip
        w.append(SB1, "network.request",
                 {"kind": "https", "method": "CONNECT", "host": "evil.example", "port": 443,
                  "path": None, "status": 403}, decision="deny", rule="network.allow")  # fmt: skip
        w.append(SB1, "command.ended", {"argv0": "python3", "exit_code": 1},
                 decision="deny", rule="tools.allow")  # fmt: skip
        w.append(SB2, "file.write", {"path": "/workspace/ok.txt"}, decision="allow")
        w.append(SB2, "blocked",
                 {"action": "read", "target": "/etc/shadow", "error": "outside the sandbox"},
                 decision="deny", rule="filesystem.read")  # fmt: skip
        w.append(SB2, "blocked", {"action": "exec", "target": "cat"}, decision="deny",
                 rule="tools.allow")  # fmt: skip
        w.append(SB2, "network.direct", {"syscall": "connect", "family": 2,
                                          "address": "1.1.1.1", "port": 53},
                 decision="deny", rule="network.direct")  # fmt: skip
        w.append(SB2, "blocked", {"action": "limit", "target": "memory"}, decision="deny",
                 rule="resources.memory_mib")  # fmt: skip
    with open(path, "ab") as f:
        f.write(b"junk\n")
    return path


def events(recs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["sandbox"], r["event"]) for r in recs]


# --------------------------------------------------------------------------- select(types=)


def test_type_file(log: Path) -> None:
    recs = select(read_records(log), types=["file"])
    assert events(recs) == [
        (SB1, "file.open"), (SB1, "file.open"), (SB1, "file.rename"),
        (SB2, "file.write"), (SB2, "blocked"),
    ]  # fmt: skip
    # the blocked record kept is the file-API one; exec/limit refusals are not file accesses
    assert recs[-1]["details"]["action"] == "read"


def test_type_exec(log: Path) -> None:
    recs = select(read_records(log), types=["exec"])
    assert events(recs) == [
        (SB1, "command.started"), (SB1, "exec"), (SB1, "exec"), (SB1, "command.ended"),
    ]  # fmt: skip


def test_type_net(log: Path) -> None:
    recs = select(read_records(log), types=["net"])
    assert events(recs) == [(SB1, "network.request"), (SB2, "network.direct")]


def test_type_repeated_blocked_and_sandbox_combine(log: Path) -> None:
    recs = list(read_records(log))
    both = select(recs, types=["file", "net"])
    assert {record_type(r) for r in both} == {"file", "net"}
    assert len(both) == 7
    denied = select(recs, types=["file", "exec"], blocked=True)
    assert [(r["event"], r["rule"]) for r in denied] == [
        ("file.open", "filesystem.write"), ("exec", "tools.allow"),
        ("command.ended", "tools.allow"), ("blocked", "filesystem.read"),
    ]  # fmt: skip
    assert events(select(recs, types=["file"], sandbox="sb-2222")) == [
        (SB2, "file.write"), (SB2, "blocked"),
    ]  # fmt: skip
    # _error lines cannot be attributed: only kept when nothing is filtered
    assert not [r for r in both if "_error" in r]
    errors = [r for r in select(recs) if "_error" in r]
    assert [e["_line"] for e in errors] == [16]
    assert errors[0]["_error"].startswith("unparseable record (not JSON")


def test_unknown_type_is_an_error(log: Path) -> None:
    with pytest.raises(AuditError, match=r"unknown record type 'disk': expected file, exec or net"):
        select(read_records(log), types=["file", "disk"])
    assert select(read_records(log), types=[]) == []


# --------------------------------------------------------------------------- CLI --json


def test_cli_json_prints_the_stored_lines(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = log.read_text().splitlines()
    assert main(["audit", "show", str(log), "--type", "file", "--type", "exec", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    # exactly as stored: the same bytes as the lines of the file
    wanted = [ln for ln in stored if ln != "junk" and json.loads(ln)["event"] != "sandbox.created"
              and record_type(json.loads(ln)) in ("file", "exec")]  # fmt: skip
    assert out == wanted and len(out) == 9
    assert main(["audit", "show", str(log), "--sandbox", SB2, "--blocked", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(ln)["rule"] for ln in out] == [
        "filesystem.read", "tools.allow", "network.direct", "resources.memory_mib",
    ]  # fmt: skip
    assert all(ln in stored for ln in out)


def test_cli_rejects_bad_options(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "show", str(log), "--type", "disk"]) == 125
    assert main(["audit", "show", str(log), "--json", "--timeline"]) == 125
    err = capsys.readouterr().err
    assert "invalid choice: 'disk'" in err and "not allowed with argument" in err


# --------------------------------------------------------------------------- --timeline


def test_timeline_groups_by_sandbox_with_offsets_and_marks(log: Path) -> None:
    recs = list(read_records(log))
    text = format_timeline(select(recs, sandbox="sb-"))
    lines = text.splitlines()
    headers = [ln for ln in lines if ln.startswith("sandbox ")]
    assert [h.split()[1] for h in headers] == [SB1, SB2]
    first_ts = next(r["ts"] for r in recs if r.get("sandbox") == SB1)
    assert headers[0] == f"sandbox {SB1}  (9 records, from {first_ts})"
    body = [ln for ln in lines if ln.startswith("  ")]
    assert len(body) == 14
    assert all(re.match(r"^  +\+\d+\.\d{3}s  [✓✗·] ", ln) for ln in body), body
    assert body[0].strip().startswith("+0.000s  ✓ sandbox.created")
    # the offset is the time since the sandbox's first record
    start = datetime.strptime(first_ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    deny = next(r for r in recs if r.get("details", {}).get("result") == "EROFS")
    when = datetime.strptime(deny["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    offset = f"+{(when - start).total_seconds():.3f}s"

    # Ops are padded to a common width (at most 12): compare with the padding squeezed.
    rows = [re.sub(r"(?<=\S) {2,}", "  ", ln.strip()) for ln in body]
    by_op = {r.split()[2]: r for r in rows if r.split()[1] != "·"}
    assert f"{offset}  ✗ open  /etc/passwd  O_WRONLY|O_CREAT  → EROFS  [filesystem.write]" in rows
    assert any(r.endswith("✓ open  /workspace/out.txt  O_WRONLY|O_CREAT  → ok")
               for r in rows)  # fmt: skip
    assert any(r.endswith("· rename  /workspace/a -> /workspace/b  → ENOENT")
               for r in rows)  # fmt: skip
    assert any(r.endswith("✗ exec  curl x  → EACCES  [tools.allow]") for r in rows)
    assert any(r.endswith("✓ exec  python3 agent.py  → ok") for r in rows)
    assert any(r.endswith("· run  python3 agent.py") for r in rows)
    assert any(r.endswith("✗ exit  python3  → exit 1  [tools.allow]") for r in rows)
    assert any(r.endswith("✗ CONNECT  evil.example:443  → 403  [network.allow]")
               for r in rows)  # fmt: skip
    assert by_op["read"].endswith("✗ read  /etc/shadow  → blocked  [filesystem.read]")
    assert by_op["write"].endswith("✓ write  /workspace/ok.txt")
    assert by_op["connect"].endswith("✗ connect  1.1.1.1:53  [network.direct]")


def test_timeline_exact_line(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    with AuditLog(path, fsync=False) as w:
        w.append_many(
            "sb-x",
            [
                traced(syscall="openat", path="/etc/passwd", flags="O_WRONLY|O_CREAT",
                       result="EROFS", pid=2),
            ],
        )  # fmt: skip
    assert format_timeline(read_records(path)) == "\n".join(
        [
            f"sandbox sb-x  (1 record, from {next(read_records(path))['ts']})",
            "  +0.000s  ✗ open  /etc/passwd  O_WRONLY|O_CREAT  → EROFS  [filesystem.write]",
        ]
    )


def test_timeline_escapes_sandbox_controlled_text(tmp_path: Path) -> None:
    path = tmp_path / "evil.jsonl"
    with AuditLog(path, fsync=False) as w:
        w.append_many(
            "sb-\x1b[31m",
            [
                traced(syscall="openat", path="/tmp/\x1b[2J\u202eevil\n", flags="O_RDONLY",
                       result="EACCES\x07", pid=2),
                traced(syscall="execve", path="/bin/x", argv=["x", "\x1b]0;title\x07"],
                       result="ok", pid=3),
            ],
        )  # fmt: skip
    text = format_timeline(read_records(path))
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "/tmp/\\x1b[2J\\u202eevil\\x0a" in text
    assert "sb-\\x1b[31m" in text
    assert "→ EACCES\\x07" in text
    assert len(text.splitlines()) == 3


def test_timeline_cuts_long_targets_and_lists_bad_lines(log: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    with AuditLog(path, fsync=False) as w:
        w.append_many("sb", [traced(syscall="unlink", path="/w/" + "a" * 900, result="ok", pid=1)])
    with open(path, "ab") as f:
        f.write(b"{torn")
    lines = format_timeline(read_records(path)).splitlines()
    assert "/w/" + "a" * 92 + "…  → ok" in lines[1]
    assert lines[-2:] == ["unreadable lines", "  line 2: torn record (no trailing newline)"]
    assert format_timeline([]) == "(no records)"


def test_cli_timeline(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "show", str(log), "--timeline", "--type", "file", "--blocked"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"sandbox {SB1}  (1 record, from ")
    assert "✗ open  /etc/passwd  O_WRONLY|O_CREAT  → EROFS  [filesystem.write]" in out
    assert "✗ read  /etc/shadow  → blocked  [filesystem.read]" in out
    assert "✓" not in out and "·" not in out


def test_timeline_shows_what_ran_when_argv0_names_something_else() -> None:
    """argv[0] is the caller's choice: a spoofed one cannot hide the binary."""
    from glassroom.audit._query import timeline_fields

    rec = {"event": "exec", "details": {"path": "/usr/bin/od", "argv": ["ls", "-la"],
                                        "result": "ok"}}  # fmt: skip
    assert timeline_fields(rec)[1] == "/usr/bin/od ← ls -la"
    rec["details"]["argv"] = ["od", "-c"]
    assert timeline_fields(rec)[1] == "od -c"
