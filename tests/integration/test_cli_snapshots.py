"""``glassroom snapshot list|show|rm|verify`` and ``glassroom run --from-snapshot``,
driven as a subprocess exactly as a user runs them (docs/snapshots.md).

The snapshots are made with the SDK in this process, on the namespaces tier
(the default), into a store under the test's tmp dir; the CLI reads that store
through ``--dir`` or ``$GLASSROOM_SNAPSHOT_DIR``.  Every refusal is glassroom's
contract: exit 125 and one ``glassroom: `` line that names the rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glassroom import Sandbox
from glassroom.lifecycle.snapshots import SnapshotInfo, SnapshotStore

CLI = [sys.executable, "-m", "glassroom.interfaces.cli"]
INFO_KEYS = {
    "id", "names", "kind", "tenant", "sandbox_id", "tier", "memory", "memory_refused",
    "size_bytes", "created_at",
}  # fmt: skip


def cli(
    *args: str, log: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, GLASSROOM_AUDIT_LOG=str(log), **(env or {}))
    return subprocess.run(
        [*CLI, *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )


def refused(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert the refusal contract (125 + one 'glassroom: ' line with each needle)."""
    assert proc.returncode == 125, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("glassroom: "), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    d = tmp_path / "snapshots"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def saved(store_dir: Path, audit_log: Path) -> Iterator[SnapshotInfo]:
    """A named files-only snapshot of a sandbox whose /workspace holds two files."""
    store = SnapshotStore(store_dir)
    with Sandbox(backend="namespaces", audit_log=audit_log, store=store) as sb:
        sb.files.write("/workspace/state.txt", "made before the snapshot\n")
        r = sb.run(["sh", "-c", "mkdir -p sub && echo 42 > sub/answer"])
        assert r.ok, r.stderr
        info = sb.snapshot(name="after-setup")
    yield info


def _tamper(store_dir: Path, info: SnapshotInfo) -> Path:
    """Change one byte of one stored file of the snapshot; returns that file."""
    files = [p for p in (store_dir / info.id).rglob("*") if p.is_file()]
    victim = next(p for p in files if p.name not in ("manifest.json", "manifest.sig"))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return victim


# --- list / show ---------------------------------------------------------------------


def test_list_and_show_text_and_json(saved: SnapshotInfo, store_dir: Path, audit_log: Path) -> None:
    p = cli("snapshot", "list", "--dir", str(store_dir), log=audit_log)
    assert p.returncode == 0, p.stderr
    assert saved.id in p.stdout and "after-setup" in p.stdout and "files only" in p.stdout

    p = cli("snapshot", "list", "--dir", str(store_dir), "--json", log=audit_log)
    assert p.returncode == 0, p.stderr
    items = json.loads(p.stdout)
    assert [i["id"] for i in items] == [saved.id]
    assert set(items[0]) == INFO_KEYS
    assert items[0] == json.loads(json.dumps(saved.as_dict()))
    # the namespaces tier saves files only, and says why
    assert items[0]["memory"] is False and items[0]["memory_refused"]
    assert items[0]["tier"] == "namespaces" and items[0]["kind"] == "snapshot"

    p = cli("snapshot", "show", saved.id, "--dir", str(store_dir), log=audit_log)
    assert p.returncode == 0, p.stderr
    assert f"id: {saved.id}" in p.stdout and "memory_refused:" in p.stdout
    assert f"sandbox_id: {saved.sandbox_id}" in p.stdout
    p = cli("snapshot", "show", saved.id, "--dir", str(store_dir), "--json", log=audit_log)
    assert json.loads(p.stdout) == json.loads(json.dumps(saved.as_dict()))


def test_list_filters_by_sandbox_and_name(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    def ids(*extra: str) -> list[str]:
        p = cli("snapshot", "list", "--dir", str(store_dir), "--json", *extra, log=audit_log)
        assert p.returncode == 0, p.stderr
        return [i["id"] for i in json.loads(p.stdout)]

    assert ids("--name", "after-setup") == [saved.id]
    assert ids("--name", "other") == []
    assert ids("--sandbox", saved.sandbox_id) == [saved.id]
    assert ids("--sandbox", "sb-000000000000") == []


def test_default_store_is_glassroom_snapshot_dir(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    env = {"GLASSROOM_SNAPSHOT_DIR": str(store_dir)}
    p = cli("snapshot", "list", "--json", log=audit_log, env=env)
    assert p.returncode == 0, p.stderr
    assert [i["id"] for i in json.loads(p.stdout)] == [saved.id]


def test_an_empty_store_lists_nothing(tmp_path: Path, audit_log: Path) -> None:
    empty = tmp_path / "none"
    p = cli("snapshot", "list", "--dir", str(empty), log=audit_log)
    assert p.returncode == 0, p.stderr
    assert "no snapshots" in p.stdout
    p = cli("snapshot", "list", "--dir", str(empty), "--json", log=audit_log)
    assert json.loads(p.stdout) == []


# --- verify ----------------------------------------------------------------------------


def test_verify_ok_then_a_changed_file_is_refused(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    p = cli("snapshot", "verify", saved.id, "--dir", str(store_dir), log=audit_log)
    assert p.returncode == 0, p.stderr
    assert "ok" in p.stdout
    p = cli("snapshot", "verify", saved.id, "--dir", str(store_dir), "--json", log=audit_log)
    out = json.loads(p.stdout)
    assert out["ok"] is True and out["id"] == saved.id

    _tamper(store_dir, saved)
    for extra in ((), ("--json",)):
        p = cli("snapshot", "verify", saved.id, "--dir", str(store_dir), *extra, log=audit_log)
        refused(p, saved.id, "snapshot.integrity")
        assert p.stdout == ""


def test_verify_refuses_an_extra_file(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    (store_dir / saved.id / "data" / "planted").write_text("not saved by glassroom")
    p = cli("snapshot", "verify", saved.id, "--dir", str(store_dir), log=audit_log)
    refused(p, "snapshot.integrity", "planted")


# --- rm ---------------------------------------------------------------------------------


def test_rm_deletes_and_a_second_rm_is_refused(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    p = cli("snapshot", "rm", saved.id, "--dir", str(store_dir), log=audit_log)
    assert p.returncode == 0, p.stderr
    assert "deleted" in p.stdout
    assert not (store_dir / saved.id).exists()
    p = cli("snapshot", "list", "--dir", str(store_dir), "--json", log=audit_log)
    assert json.loads(p.stdout) == []
    p = cli("snapshot", "rm", saved.id, "--dir", str(store_dir), log=audit_log)
    refused(p, saved.id, "snapshot.not_found")


@pytest.mark.parametrize("verb", ["show", "rm", "verify"])
@pytest.mark.parametrize("bad", ["snap-0123456789abcdef", "../../etc", "snap-x/..", ""])
def test_unknown_or_malformed_ids_are_refused(
    verb: str, bad: str, store_dir: Path, audit_log: Path, saved: SnapshotInfo
) -> None:
    """A missing id, or one that tries to be a path, is 'not found', and touches nothing."""
    p = cli("snapshot", verb, bad, "--dir", str(store_dir), log=audit_log)
    refused(p, "snapshot.not_found")
    assert (store_dir / saved.id).is_dir()


def test_snapshot_without_a_verb_is_usage(audit_log: Path) -> None:
    p = cli("snapshot", log=audit_log)
    assert p.returncode == 125
    assert "usage" in p.stderr


# --- run --from-snapshot ------------------------------------------------------------


def test_run_from_snapshot_has_the_files(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    p = cli(
        "run", "--from-snapshot", saved.id, "--snapshot-dir", str(store_dir), "--",
        "sh", "-c", "cat state.txt sub/answer; exit 7", log=audit_log,
    )  # fmt: skip
    assert p.returncode == 7, p.stderr
    assert p.stdout == "made before the snapshot\n42\n"

    # --json, and the store from the environment
    p = cli(
        "run", "--json", "--from-snapshot", saved.id, "--", "cat", "state.txt",
        log=audit_log, env={"GLASSROOM_SNAPSHOT_DIR": str(store_dir)},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    assert out["stdout"] == "made before the snapshot\n"
    assert out["sandbox_id"] != saved.sandbox_id  # a new sandbox, with its own id
    assert out["backend"] == "namespaces"
    # its trail names where it came from
    created = [
        json.loads(line)
        for line in audit_log.read_text().splitlines()
        if json.loads(line).get("sandbox") == out["sandbox_id"]
        and json.loads(line).get("event") == "sandbox.created"
    ]
    assert created and created[0]["details"].get("snapshot") == saved.id, created
    assert created[0]["details"].get("parent") == saved.sandbox_id, created


def test_run_from_snapshot_keeps_the_snapshots_policy(
    store_dir: Path, audit_log: Path, tmp_path: Path
) -> None:
    """The restored sandbox runs under the policy the snapshot was made with:
    a tool its policy does not allow is still refused there."""
    store = SnapshotStore(store_dir)
    narrow = 'risk = "low"\n[tools]\nallow = ["sh", "cat", "tar"]\n'
    with Sandbox(narrow, backend="namespaces", audit_log=audit_log, store=store) as sb:
        sb.files.write("/workspace/f", "x")
        info = sb.snapshot()
    p = cli(
        "run", "--from-snapshot", info.id, "--snapshot-dir", str(store_dir), "--",
        "ls", "/workspace", log=audit_log,
    )  # fmt: skip
    assert p.returncode == 126, (p.returncode, p.stdout, p.stderr)
    assert "tools.allow" in p.stderr
    pol = tmp_path / "p.toml"
    pol.write_text('risk = "low"\n')
    p = cli(
        "run", "--from-snapshot", info.id, "--snapshot-dir", str(store_dir),
        "--policy", str(pol), "--", "true", log=audit_log,
    )  # fmt: skip
    refused(p, "--policy", "--from-snapshot")


def test_run_from_a_missing_snapshot_is_refused(store_dir: Path, audit_log: Path) -> None:
    p = cli(
        "run", "--from-snapshot", "snap-0123456789abcdef", "--snapshot-dir", str(store_dir),
        "--", "true", log=audit_log,
    )  # fmt: skip
    refused(p, "snap-0123456789abcdef", "snapshot.not_found")


def test_run_from_a_changed_snapshot_is_refused_and_nothing_runs(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path, tmp_path: Path
) -> None:
    _tamper(store_dir, saved)
    marker = tmp_path / "ran"
    p = cli(
        "run", "--from-snapshot", saved.id, "--snapshot-dir", str(store_dir), "--",
        "sh", "-c", f"echo ran > {marker}", log=audit_log,
    )  # fmt: skip
    refused(p, "snapshot.integrity")
    assert p.stdout == "" and not marker.exists()


def test_run_from_snapshot_on_another_tier_is_refused(
    saved: SnapshotInfo, store_dir: Path, audit_log: Path
) -> None:
    """Only the tier that saved a snapshot restores it: never a silent switch."""
    p = cli(
        "run", "--from-snapshot", saved.id, "--snapshot-dir", str(store_dir),
        "--backend", "gvisor", "--", "true", log=audit_log,
    )  # fmt: skip
    line = refused(p)
    assert "namespaces" in line and "gvisor" in line, line
    p = cli(
        "run", "--from-snapshot", saved.id, "--snapshot-dir", str(store_dir),
        "--backend", "namespaces", "--", "cat", "state.txt", log=audit_log,
    )  # fmt: skip
    assert (p.returncode, p.stdout) == (0, "made before the snapshot\n"), p.stderr
