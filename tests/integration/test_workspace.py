"""Workspace in and out (``glassroom run --workspace/--out``, ``sb.copy_in/copy_out``).

Harmless: a host tree goes in with its exec bits, the task reads it and writes
results, and they come back out.  Malicious: a host tree holding a symlink
(to a host secret) is refused whole, before anything is copied; links and
FIFOs the sandbox plants in ``/workspace`` are left behind, listed and
audited, and never become host paths; an occupied ``--out`` is refused
before the task runs.  On every tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import records
from glassroom import Sandbox, SandboxError

CLI = [sys.executable, "-m", "glassroom.interfaces.cli"]
POLICY = {"tools": {"allow": ["sh", "cat", "ln", "mkfifo", "mkdir", "ls", "cut", "wc"]}}


def _tree(root: Path) -> Path:
    (root / "src" / "deep").mkdir(parents=True)
    (root / "src" / "data.txt").write_text("42\n")
    (root / "src" / "deep" / "x.bin").write_bytes(bytes(range(256)))
    run = root / "src" / "run.sh"
    run.write_text("#!/bin/sh\necho ran\n")
    run.chmod(0o755)
    return root / "src"


def test_copy_in_and_out_on_every_tier(backend: str, tmp_path: Path, audit_log: Path) -> None:
    src = _tree(tmp_path)
    out = tmp_path / "out"
    with Sandbox(POLICY, backend=backend, audit_log=audit_log) as sb:
        rep = sb.copy_in(src)
        assert (rep.files, rep.dirs, rep.bytes) == (3, 1, 3 + 256 + len("#!/bin/sh\necho ran\n"))
        # ./run.sh itself may not run (tools.allow); its exec bit came in all the same
        r = sb.run(["sh", "-c", "ls -l run.sh | cut -c1-10 && sh run.sh && "
                    "cat data.txt deep/x.bin | wc -c && "
                    "mkdir res && echo done > res/r.txt && "
                    "ln -s /etc/passwd res/link && mkfifo res/fifo"])  # fmt: skip
        assert r.exit_code == 0, r.stderr
        assert r.stdout.split() == ["-rwxr-xr-x", "ran", "259"]
        got = sb.copy_out(out)
        sid = sb.id
    assert (out / "res" / "r.txt").read_text() == "done\n"
    assert (out / "data.txt").read_text() == "42\n"
    assert (out / "deep" / "x.bin").read_bytes() == bytes(range(256))
    # planted by the sandbox: not copied, listed, audited
    assert not os.path.lexists(out / "res" / "link") and not os.path.lexists(out / "res" / "fifo")
    assert sorted(got.refused) == [
        ("/workspace/res/fifo", "a special file: not copied out"),
        ("/workspace/res/link", "a symlink: not copied out"),
    ]
    recs = {r["event"]: r for r in records(audit_log, sid)}
    assert recs["workspace.copied_in"]["decision"] == "allow"
    outrec = recs["workspace.copied_out"]
    assert (outrec["decision"], outrec["rule"]) == ("deny", "workspace.special_files")
    assert len(outrec["details"]["refused"]) == 2


def test_copy_in_refuses_a_tree_with_a_symlink(backend: str, tmp_path: Path) -> None:
    src = _tree(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_text("do not copy me")
    (src / "deep" / "key").symlink_to(secret)
    with Sandbox(POLICY, backend=backend) as sb:
        with pytest.raises(SandboxError) as info:
            sb.copy_in(src)
        assert info.value.rule == "workspace.in"
        assert str(info.value).startswith(f"workspace: {src / 'deep' / 'key'} is a symlink")
        # all or nothing: not even the files before the link went in
        assert sb.files.list("/workspace") == []


def test_copy_out_only_listed_paths_and_never_over_host_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("host file")
    with Sandbox(POLICY) as sb:
        sb.run(["sh", "-c", "mkdir -p a/b && echo 1 > a/b/one && echo 2 > two"])
        with pytest.raises(SandboxError, match="is not empty"):
            sb.copy_out(out)
        assert (out / "keep.txt").read_text() == "host file"
        fresh = tmp_path / "fresh"
        rep = sb.copy_out(fresh, ["a/b/one"])
        assert rep.files == 1 and (fresh / "a" / "b" / "one").read_text() == "1\n"
        assert not (fresh / "two").exists()
        with pytest.raises(SandboxError, match="is not a path under /workspace"):
            sb.copy_out(tmp_path / "x", ["../etc/passwd"])


def _cli(*args: str, log: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GLASSROOM_AUDIT_LOG=str(log))
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_cli_workspace_and_out(tmp_path: Path, audit_log: Path) -> None:
    src = _tree(tmp_path)
    pol = tmp_path / "p.toml"
    pol.write_text('[tools]\nallow = ["sh", "cat", "ln"]\n')
    out = tmp_path / "out"
    r = _cli("run", "--policy", str(pol), "--workspace", str(src), "--out", str(out), "--json",
             "--", "sh", "-c", "cat data.txt > copy.txt; ln -s /etc/shadow s", log=audit_log)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["out"]["files"] == 4 and res["out"]["refused"] == [
        {"path": "/workspace/s", "why": "a symlink: not copied out"}
    ]
    assert (out / "copy.txt").read_text() == "42\n"
    assert "--out: left /workspace/s behind: a symlink" in r.stderr
    # an occupied --out is refused before any sandbox starts
    r = _cli("run", "--out", str(out), "--", "true", log=tmp_path / "b.jsonl")
    assert r.returncode == 125
    assert "must be a new or empty directory" in r.stderr
    assert not (tmp_path / "b.jsonl").exists() or not records(tmp_path / "b.jsonl")
    (src / "link").symlink_to("/etc/passwd")
    r = _cli("run", "--policy", str(pol), "--workspace", str(src), "--", "true",
             log=tmp_path / "c.jsonl")  # fmt: skip
    assert r.returncode == 125
    assert f"workspace: {src / 'link'} is a symlink" in r.stderr
