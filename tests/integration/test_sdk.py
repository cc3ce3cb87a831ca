"""The Python SDK end to end, on every backend in conftest.BACKENDS.

No test asserts on timing: durations are only checked to be present and
non-negative, and timeouts only by their outcome (timed_out, 137, the rule).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

import glassroom
from conftest import assert_blocked, records
from glassroom import (
    Blocked,
    Policy,
    PolicyError,
    Receipt,
    RunResult,
    SandboxClosed,
    SandboxPathError,
    parse_policy,
)
from glassroom.audit import verify

SECRET = "s3cr3t-value"

#: A policy whose tool list leaves out ``cat``, which exists on every host.
NARROW_TOOLS = """\
risk = "low"
[tools]
allow = ["sh", "echo", "env"]
"""


# --- run ---------------------------------------------------------------------


def test_run_returns_result_fields(make_sandbox: Any) -> None:
    sb = make_sandbox()
    r = sb.run(["echo", "hi"])
    assert isinstance(r, RunResult)
    assert r.exit_code == 0
    assert r.stdout == "hi\n"
    assert r.stderr == ""
    assert isinstance(r.duration_ms, float) and r.duration_ms >= 0
    assert r.truncated is False
    assert r.timed_out is False
    assert r.blocked == []
    assert r.ok


def test_nonzero_exit_and_stderr_pass_through(make_sandbox: Any) -> None:
    sb = make_sandbox()
    r = sb.run(["sh", "-c", "echo oops >&2; exit 7"])
    assert r.exit_code == 7
    assert r.stderr == "oops\n"
    assert r.stdout == ""
    assert not r.ok
    assert r.blocked == []


def test_string_command_runs_via_sh_c(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox()
    r = sb.run("echo a; echo b | tr b c; exit 3")
    assert r.exit_code == 3
    assert r.stdout == "a\nc\n"
    started = [x for x in records(audit_log, sb.id) if x["event"] == "command.started"]
    assert started[-1]["details"]["argv"] == ["sh", "-c", "echo a; echo b | tr b c; exit 3"]


@pytest.mark.parametrize("stdin", ["line1\nline2\n", b"\x00\x01binary\xff"])
def test_stdin(make_sandbox: Any, stdin: str | bytes) -> None:
    sb = make_sandbox()
    r = sb.run(["cat"], stdin=stdin)
    assert r.exit_code == 0
    expected = stdin.encode() if isinstance(stdin, str) else stdin
    assert r.stdout_bytes == expected


def test_env_passed_and_host_env_not_visible(
    make_sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "glassroom-host-canary-7f3a"
    monkeypatch.setenv("GLASSROOM_TEST_CANARY", canary)
    sb = make_sandbox()
    r = sb.run(["env"], env={"FOO": "bar baz"})
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert "FOO=bar baz" in lines
    assert canary not in r.stdout
    assert "GLASSROOM_TEST_CANARY" not in r.stdout
    # Nothing of the supervisor's own configuration leaks in either.
    assert "GLASSROOM_" not in r.stdout
    # A later run without env= does not keep the earlier run's variables.
    assert "FOO=" not in sb.run(["env"]).stdout


def test_commands_in_one_sandbox_share_workspace(make_sandbox: Any) -> None:
    sb = make_sandbox()
    assert sb.run("echo first > notes.txt").exit_code == 0
    assert sb.run(["sh", "-c", "echo second >> /workspace/notes.txt"]).exit_code == 0
    r = sb.run(["cat", "notes.txt"])
    assert r.stdout == "first\nsecond\n"
    assert sb.files.read("/workspace/notes.txt") == b"first\nsecond\n"


def test_cwd(make_sandbox: Any) -> None:
    sb = make_sandbox()
    assert sb.run(["pwd"]).stdout == "/workspace\n"
    sb.files.make_dir("/workspace/sub")
    assert sb.run(["pwd"], cwd="/workspace/sub").stdout == "/workspace/sub\n"
    assert sb.run(["pwd"], cwd="/tmp").stdout == "/tmp\n"
    sb.run("echo here > f", cwd="/workspace/sub")
    assert sb.files.read("/workspace/sub/f") == b"here\n"


# --- per-run timeout -------------------------------------------------------------


def test_run_timeout_kills_command_and_sandbox_stays_usable(
    make_sandbox: Any, audit_log: Path
) -> None:
    sb = make_sandbox()
    r = sb.run(["sleep", "5"], timeout_s=0.5)
    assert r.timed_out is True
    assert r.exit_code == 137
    assert Blocked("timeout", "0.5s", "run.timeout_s") in r.blocked
    hits = assert_blocked(audit_log, sb.id, "run.timeout_s")
    assert any(h["event"] == "blocked" for h in hits)
    # Only the command was killed, not the sandbox.
    after = sb.run(["echo", "still here"])
    assert after.exit_code == 0
    assert after.stdout == "still here\n"
    assert after.timed_out is False


# --- files -------------------------------------------------------------------------


def test_files_roundtrip_text_and_binary(make_sandbox: Any) -> None:
    sb = make_sandbox()
    data = bytes(range(256)) * 1000
    assert not sb.files.exists("/workspace/dir")
    sb.files.make_dir("/workspace/dir")
    assert sb.files.exists("/workspace/dir")
    sb.files.write("/workspace/dir/blob.bin", data)
    sb.files.write("/workspace/dir/t.txt", "héllo\n")
    assert sb.files.read("/workspace/dir/blob.bin") == data
    assert sb.files.read_text("/workspace/dir/t.txt") == "héllo\n"
    entries = {e.name: e for e in sb.files.list("/workspace/dir")}
    assert set(entries) == {"blob.bin", "t.txt"}
    assert entries["blob.bin"].type == "file"
    assert entries["blob.bin"].size == len(data)
    assert isinstance(entries["t.txt"], glassroom.FileEntry)
    # What the file API wrote, the sandbox's commands see, byte for byte.
    r = sb.run(["wc", "-c", "/workspace/dir/blob.bin"])
    assert r.stdout.split()[0] == str(len(data))
    sb.files.remove("/workspace/dir/blob.bin")
    assert not sb.files.exists("/workspace/dir/blob.bin")
    sb.files.remove("/workspace/dir/t.txt")
    sb.files.remove("/workspace/dir")
    assert not sb.files.exists("/workspace/dir")
    assert sb.files.list("/workspace") == []


def test_relative_file_paths_are_in_the_workspace(make_sandbox: Any) -> None:
    sb = make_sandbox()
    sb.files.write("rel.txt", "x")
    assert sb.files.read("/workspace/rel.txt") == b"x"


@pytest.mark.parametrize("path", ["/root/x", "/etc/shadow", "/proc/1/root/etc/shadow"])
def test_read_outside_view_raises_path_error(make_sandbox: Any, audit_log: Path, path: str) -> None:
    sb = make_sandbox()
    with pytest.raises(SandboxPathError) as info:
        sb.files.read(path)
    assert path in str(info.value)
    hits = assert_blocked(audit_log, sb.id, "filesystem.read")
    assert any(h["event"] == "blocked" and h["details"]["target"] == path for h in hits)


def test_write_to_usr_is_refused(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox()
    with pytest.raises(SandboxPathError) as info:
        sb.files.write("/usr/x", "x")
    assert "/usr/x" in str(info.value)
    assert getattr(info.value, "errno", None) in (errno.EROFS, errno.EACCES)
    assert info.value.rule is not None and info.value.rule.startswith("filesystem.")
    blocked = [
        r
        for r in records(audit_log, sb.id)
        if r["event"] == "blocked" and r["details"].get("target") == "/usr/x"
    ]
    assert len(blocked) == 1
    assert blocked[0]["decision"] == "deny"
    assert blocked[0]["rule"].startswith("filesystem.")
    assert not Path("/usr/x").exists()


def test_write_into_read_only_policy_path_is_refused(make_sandbox: Any, audit_log: Path) -> None:
    policy = {"filesystem": {"read": ["/usr", "/etc/ssl/certs"], "write": []}}
    sb = make_sandbox(policy)
    target = "/etc/ssl/certs/glassroom-test-x"
    # Visible (read rule) ...
    assert sb.files.exists("/etc/ssl/certs")
    # ... but not writable.
    with pytest.raises(SandboxPathError) as info:
        sb.files.write(target, "x")
    assert target in str(info.value)
    assert getattr(info.value, "errno", None) in (errno.EROFS, errno.EACCES)
    r = sb.run(["sh", "-c", f"echo x > {target}"])
    assert r.exit_code != 0
    assert not Path(target).exists()
    hits = assert_blocked(audit_log, sb.id, "filesystem.write")
    assert any(h["event"] == "blocked" and h["details"]["target"] == target for h in hits)


def test_symlink_to_host_file_is_not_followed(make_sandbox: Any) -> None:
    host = Path("/etc/shadow").read_bytes() if Path("/etc/shadow").exists() else b""
    sb = make_sandbox()
    assert sb.run(["ln", "-s", "/etc/shadow", "/workspace/s"]).exit_code == 0
    with pytest.raises(SandboxPathError) as info:
        out = sb.files.read("/workspace/s")
        # Only reached if the read did not raise: make the failure say what leaked.
        assert not (host and host[:16] in out), "host /etc/shadow content was returned"
    assert "/workspace/s" in str(info.value)
    # The sandbox's own commands do not get host content through it either.
    r = sb.run(["cat", "/workspace/s"])
    assert r.exit_code != 0
    if host:
        assert host.splitlines()[0] not in r.stdout_bytes


# --- destroy -------------------------------------------------------------------------


def test_destroy_receipt_and_closed_afterwards(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox()
    assert sb.run(["true"]).exit_code == 0
    receipt = sb.destroy()
    assert isinstance(receipt, Receipt)
    assert receipt.clean is True
    assert receipt.sandbox_id == sb.id
    d = receipt.as_dict()
    assert d["clean"] is True
    assert d["sandbox_id"] == sb.id
    cgroups = d["removed"]["cgroups"]
    assert cgroups, d
    for path in cgroups:
        assert sb.id in path
        assert not Path(path).exists(), path
    assert not any(d["leftovers"].values())
    # Idempotent: the same receipt, and no second destroyed record.
    again = sb.destroy()
    assert again is receipt or again == receipt
    destroyed = [r for r in records(audit_log, sb.id) if r["event"] == "sandbox.destroyed"]
    assert len(destroyed) == 1
    with pytest.raises(SandboxClosed):
        sb.run(["true"])
    with pytest.raises(SandboxClosed):
        sb.files.read("/workspace/x")


def test_context_manager_destroys(backend: str, audit_log: Path) -> None:
    with glassroom.Sandbox(backend=backend, audit_log=audit_log) as sb:
        assert sb.run(["true"]).exit_code == 0
    with pytest.raises(SandboxClosed):
        sb.run(["true"])
    assert sb.destroy().clean is True


# --- policy inputs --------------------------------------------------------------------

POLICY_TOML = """\
risk = "low"
[tools]
allow = ["sh", "echo", "cat"]
[resources]
max_output_bytes = 4096
"""


def _policy_inputs(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "agent.toml"
    path.write_text(POLICY_TOML)
    return {
        "Policy": parse_policy(POLICY_TOML),
        "toml-text": POLICY_TOML,
        "dict": {
            "risk": "low",
            "tools": {"allow": ["sh", "echo", "cat"]},
            "resources": {"max_output_bytes": 4096},
        },  # fmt: skip
        "Path": path,
        "str-path": str(path),
    }


@pytest.mark.parametrize("kind", ["Policy", "toml-text", "dict", "Path", "str-path"])
def test_policy_inputs(make_sandbox: Any, tmp_path: Path, kind: str) -> None:
    sb = make_sandbox(_policy_inputs(tmp_path)[kind])
    assert isinstance(sb.policy, Policy)
    assert sb.policy.resources.max_output_bytes == 4096
    assert sb.policy.tools.allow == ["sh", "echo", "cat"]
    assert sb.run(["echo", "ok"]).stdout == "ok\n"
    # The policy is really applied: ls is not in this allowlist.
    assert sb.run(["ls"]).exit_code == 126


def test_default_policy_when_none(make_sandbox: Any) -> None:
    sb = make_sandbox(None)
    assert sb.policy == glassroom.default_policy()


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"resources": {"pids": "many"}}, "resources.pids"),
        ({"filesystem": {"raed": ["/usr"]}}, "filesystem.raed"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_policy_dict_raises_policy_error(
    backend: str, audit_log: Path, bad: dict[str, Any], field: str
) -> None:
    with pytest.raises(PolicyError) as info:
        glassroom.Sandbox(bad, backend=backend, audit_log=audit_log)
    assert field in str(info.value)
    assert isinstance(info.value, glassroom.GlassroomError)


# --- tools.allow ----------------------------------------------------------------------------


def test_exec_not_allowed_is_126_and_blocked(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox(NARROW_TOOLS)
    r = sb.run(["cat", "/dev/null"])
    assert r.exit_code == 126
    assert Blocked("exec", "cat", "tools.allow") in r.blocked
    hits = assert_blocked(audit_log, sb.id, "tools.allow")
    blocked = [h for h in hits if h["event"] == "blocked"]
    assert blocked and blocked[0]["details"] == {"action": "exec", "target": "cat"}


def test_missing_command_is_127_and_not_a_tools_block(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox()
    r = sb.run(["glassroom-no-such-tool-xyz"])
    assert r.exit_code == 127
    assert r.blocked == []
    assert not [x for x in records(audit_log, sb.id) if x["rule"] == "tools.allow"]


# --- audit trail ----------------------------------------------------------------------------


def test_audit_trail_of_a_sandbox(backend: str, audit_log: Path) -> None:
    with glassroom.Sandbox(backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["env"], env={"TOKEN": SECRET})
        assert f"TOKEN={SECRET}" in r.stdout.splitlines()  # it was really injected
        sid = sb.id
    all_recs = records(audit_log, sid)
    # gVisor also logs what runsc's strace saw inside (here: the exec of env).
    traced = [x for x in all_recs if x["details"].get("source") == "runsc strace"]
    assert [x["event"] for x in traced] == (["exec"] if backend == "gvisor" else [])
    recs = [x for x in all_recs if x not in traced]
    events = [x["event"] for x in recs]
    assert events == ["sandbox.created", "command.started", "command.ended", "sandbox.destroyed"]
    assert [x["seq"] for x in recs] == sorted(x["seq"] for x in recs)

    created = recs[0]["details"]
    assert created["backend"] == backend
    walls = created["walls"]
    if backend == "gvisor":  # no Landlock in gVisor: noexec + per-tool binds instead
        assert walls["tools"]["executable"] and walls["platform"]
    else:
        assert isinstance(walls["landlock"]["abi"], int) and walls["landlock"]["abi"] >= 1
    assert walls["seccomp"]
    assert walls["cgroups"]

    started = recs[1]["details"]
    assert started["argv"] == ["env"]
    assert "TOKEN" in started["env"]
    assert all("=" not in name for name in started["env"]), started["env"]

    ended = recs[2]["details"]
    assert ended["exit_code"] == 0

    destroyed = recs[3]
    assert destroyed["details"]["clean"] is True

    assert SECRET not in audit_log.read_text()
    assert SECRET.encode() not in audit_log.read_bytes()
    assert verify(audit_log).ok


# --- max runtime ------------------------------------------------------------------------------


def test_max_runtime_kills_the_sandbox(make_sandbox: Any, audit_log: Path) -> None:
    sb = make_sandbox({"resources": {"max_runtime_s": 1}})
    r = sb.run(["sleep", "10"])
    assert r.exit_code == 137
    assert r.timed_out is True
    assert any(b.rule == "resources.max_runtime_s" for b in r.blocked)
    hits = assert_blocked(audit_log, sb.id, "resources.max_runtime_s")
    assert any(h["event"] == "anomaly" for h in hits), json.dumps(hits)
    with pytest.raises(SandboxClosed) as info:
        sb.run(["true"])
    assert "max runtime" in str(info.value)
    assert sb.destroy().clean is True
