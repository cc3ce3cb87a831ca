"""The ``glassroom`` CLI driven as a subprocess, exactly as a user runs it.

The session fixture in conftest.py has already pointed GLASSROOM_STATE_DIR and
GLASSROOM_CGROUP_PARENT at test-only places; the child inherits them.  Each
test gets its own GLASSROOM_AUDIT_LOG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import records, venv_tool
from glassroom.audit import verify

CLI = [sys.executable, "-m", "glassroom.interfaces.cli"]
RUN_KEYS = {
    "sandbox_id", "backend", "exit_code", "stdout", "stderr", "duration_ms", "truncated", "blocked",
}  # fmt: skip

NARROW_TOOLS = """\
risk = "low"
[tools]
allow = ["sh", "echo"]
"""


def cli(*args: str, log: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GLASSROOM_AUDIT_LOG=str(log))
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def refused_line(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert glassroom's refusal contract (125 + one 'glassroom: ' line); return the line."""
    assert proc.returncode == 125, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("glassroom: "), lines[0]
    return lines[0]


def policy_file(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- run -----------------------------------------------------------------------------


def test_run_exit_status_is_the_commands(audit_log: Path) -> None:
    p = cli("run", "--", "sh", "-c", "exit 3", log=audit_log)
    assert p.returncode == 3, p.stderr
    assert p.stderr == ""


def test_run_plain_output_passes_through(audit_log: Path) -> None:
    p = cli("run", "--", "sh", "-c", "echo out; echo err >&2", log=audit_log)
    assert p.returncode == 0
    assert p.stdout == "out\n"
    assert p.stderr == "err\n"


def test_run_ends_without_teardown_and_loses_nothing(audit_log: Path) -> None:
    """``run`` ends with os._exit after the atexit handlers and a flush of stdio
    (cli._end_now): every byte of a large output, the command's status, and an
    audit log that verifies, sandbox destroyed, are all still there."""
    script = "i=0; while [ $i -lt 30000 ]; do echo line-$i; i=$((i+1)); done; echo end >&2; exit 7"
    p = cli("run", "--", "sh", "-c", script, log=audit_log)
    assert p.returncode == 7, p.stderr
    assert p.stdout.splitlines() == [f"line-{i}" for i in range(30000)]
    assert p.stderr == "end\n"
    ok = cli("audit", "verify", str(audit_log), log=audit_log)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    events = [r["event"] for r in records(audit_log)]
    assert events[0] == "sandbox.created" and events[-1] == "sandbox.destroyed", events


def test_run_json(audit_log: Path) -> None:
    p = cli("run", "--json", "--", "echo", "hi", log=audit_log)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == RUN_KEYS
    assert out["exit_code"] == 0
    assert out["stdout"] == "hi\n"
    assert out["stderr"] == ""
    assert out["truncated"] is False
    assert out["blocked"] == []
    assert out["backend"] == "namespaces"
    assert out["sandbox_id"].startswith("sb-")
    assert isinstance(out["duration_ms"], (int, float))
    # The run was audited under that sandbox id, and the log verifies.
    events = [r["event"] for r in records(audit_log, out["sandbox_id"])]
    assert events[0] == "sandbox.created" and events[-1] == "sandbox.destroyed"
    assert verify(audit_log).ok


def test_run_json_shows_blocked_exec(tmp_path: Path, audit_log: Path) -> None:
    pol = policy_file(tmp_path, NARROW_TOOLS)
    p = cli("run", "--policy", str(pol), "--json", "--", "cat", "/dev/null", log=audit_log)
    assert p.returncode == 126, p.stderr
    out = json.loads(p.stdout)
    assert set(out) == RUN_KEYS
    assert out["exit_code"] == 126
    assert out["blocked"] == [{"action": "exec", "target": "cat", "rule": "tools.allow"}]


def test_run_timeout_json(audit_log: Path) -> None:
    p = cli("run", "--timeout", "0.5", "--json", "--", "sleep", "5", log=audit_log)
    assert p.returncode == 137, p.stderr
    out = json.loads(p.stdout)
    assert out["exit_code"] == 137
    assert {"action": "timeout", "target": "0.5s", "rule": "run.timeout_s"} in out["blocked"]


# --- refusals: 125 and one line ---------------------------------------------------------


@pytest.mark.parametrize("args", [["run"], ["run", "--"]], ids=["bare", "dashdash"])
def test_run_without_command(audit_log: Path, args: list[str]) -> None:
    line = refused_line(cli(*args, log=audit_log))
    assert "no command" in line


def test_unknown_backend(audit_log: Path) -> None:
    line = refused_line(cli("run", "--backend", "nope", "--", "true", log=audit_log))
    assert "nope" in line


def test_missing_policy_file(tmp_path: Path, audit_log: Path) -> None:
    missing = tmp_path / "does-not-exist.toml"
    line = refused_line(cli("run", "--policy", str(missing), "--", "true", log=audit_log))
    assert str(missing) in line


# (policy text, the 1-based line the error must name, what the message must contain)
BAD_POLICIES = {
    "malformed-toml": ('risk = "low"\n[filesystem]\nread = [/usr]\n[tools]\n', 3, "TOML"),
    "unknown-field": ('risk = "low"\n\n[filesystem]\nraed = ["/usr"]\n', 4, "filesystem.raed"),
    "wrong-type": ('risk = "low"\n[resources]\ncpus = 1.0\npids = "many"\n', 4, "resources.pids"),
    "dangerous-path": ('[filesystem]\nread = ["/usr"]\nwrite = ["/"]\n', 3, "filesystem.write"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_bad_policy_is_refused_with_file_and_line(
    tmp_path: Path, audit_log: Path, case: str
) -> None:
    text, line_no, needle = BAD_POLICIES[case]
    pol = policy_file(tmp_path, text)
    for args in (
        ["run", "--policy", str(pol), "--", "true"],
        ["policy", "check", str(pol)],
    ):
        line = refused_line(cli(*args, log=audit_log))
        assert f"{pol}:{line_no}: " in line, (args, line)
        assert needle in line, (args, line)
    # Nothing ran.
    assert not [r for r in records(audit_log) if r["event"] == "command.started"]


NETWORK_POLICY = 'risk = "low"\n[network]\nallow = ["*.com"]\n'


def test_network_tld_wildcard_is_refused(tmp_path: Path, audit_log: Path) -> None:
    pol = policy_file(tmp_path, NETWORK_POLICY)
    for args in (["run", "--policy", str(pol), "--", "true"], ["policy", "check", str(pol)]):
        line = refused_line(cli(*args, log=audit_log))
        assert "network.allow[0]" in line and "top-level domain" in line, line
    assert not [r for r in records(audit_log) if r["event"] == "command.started"]


def test_network_refusal_names_file_and_line(tmp_path: Path, audit_log: Path) -> None:
    """README: ``policy check`` gives "one-line errors with FILE:LINE"."""
    pol = policy_file(tmp_path, NETWORK_POLICY)
    line = refused_line(cli("policy", "check", str(pol), log=audit_log))
    assert f"{pol}:3: network.allow[0]" in line, line


def test_approvals_cli_without_pending(tmp_path: Path, audit_log: Path) -> None:
    listed = cli("approvals", "list", log=audit_log)
    assert listed.returncode == 0 and "no pending approvals" in listed.stdout
    line = refused_line(cli("approvals", "allow", "ap-0000000000", log=audit_log))
    assert "no pending approval ap-0000000000" in line, line


def test_high_risk_refused_on_weaker_backend(tmp_path: Path, audit_log: Path) -> None:
    pol = policy_file(tmp_path, 'risk = "high"\n')
    line = refused_line(
        cli("run", "--policy", str(pol), "--backend", "namespaces", "--", "true", log=audit_log)
    )
    assert "high" in line and "namespaces" in line and "weaker" in line, line
    assert not [r for r in records(audit_log) if r["event"] == "command.started"]


# --- policy check -------------------------------------------------------------------------


def test_policy_check_ok(tmp_path: Path, audit_log: Path) -> None:
    pol = policy_file(tmp_path, NARROW_TOOLS)
    p = cli("policy", "check", str(pol), log=audit_log)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{pol}: ok"), p.stdout
    assert "namespaces" in p.stdout
    assert p.stderr == ""


# --- doctor ---------------------------------------------------------------------------------


def test_doctor(audit_log: Path) -> None:
    p = cli("doctor", log=audit_log)
    assert p.returncode == 0, p.stderr
    for word in ("user namespaces", "landlock", "seccomp", "cgroups", "bwrap", "kvm"):
        assert word in p.stdout, word


def test_doctor_json(audit_log: Path) -> None:
    p = cli("doctor", "--json", log=audit_log)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    for key in ("user_namespaces", "landlock", "seccomp", "cgroups", "bwrap", "kvm", "runsc",
                "qemu"):  # fmt: skip
        assert key in rep, key
    assert rep["kvm"]["kind"] in {"real", "pvm", "none"}
    # This host runs the namespaces tier, so its walls are all reported present.
    assert rep["user_namespaces"]["ok"] is True
    assert rep["landlock"]["ok"] is True and rep["landlock"]["abi"] >= 1
    assert rep["seccomp"]["ok"] is True
    assert rep["bwrap"]


# --- audit ---------------------------------------------------------------------------------


def _blocked_run(tmp_path: Path, log: Path) -> str:
    pol = policy_file(tmp_path, NARROW_TOOLS, "narrow.toml")
    p = cli("run", "--policy", str(pol), "--json", "--", "cat", "/dev/null", log=log)
    assert p.returncode == 126, p.stderr
    sid: str = json.loads(p.stdout)["sandbox_id"]
    return sid


def test_audit_show_blocked_json(tmp_path: Path, audit_log: Path) -> None:
    other = json.loads(cli("run", "--json", "--", "true", log=audit_log).stdout)["sandbox_id"]
    sid = _blocked_run(tmp_path, audit_log)
    p = cli("audit", "show", "--sandbox", sid, "--blocked", "--json", log=audit_log)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert recs
    assert all(r["sandbox"] == sid for r in recs)
    assert all(r["decision"] == "deny" for r in recs)
    assert other not in p.stdout
    blocked = [r for r in recs if r["event"] == "blocked"]
    assert len(blocked) == 1
    assert blocked[0]["rule"] == "tools.allow"
    assert blocked[0]["details"] == {"action": "exec", "target": "cat"}


def test_audit_verify_good_and_tampered(tmp_path: Path, audit_log: Path) -> None:
    _blocked_run(tmp_path, audit_log)
    assert cli("run", "--", "true", log=audit_log).returncode == 0
    p = cli("audit", "verify", log=audit_log)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "ok" in p.stdout

    # Change one record's content in a copy (kept canonical JSON, old hash kept).
    lines = audit_log.read_text().splitlines()
    idx = next(i for i, ln in enumerate(lines) if json.loads(ln)["event"] == "command.ended")
    rec: dict[str, Any] = json.loads(lines[idx])
    rec["details"]["exit_code"] = 0 if rec["details"]["exit_code"] else 1
    lines[idx] = json.dumps(rec, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join(lines) + "\n")

    p = cli("audit", "verify", str(tampered), log=audit_log)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert re.search(rf"seq={rec['seq']}\b", p.stdout), p.stdout
    # The original is untouched and still verifies.
    assert cli("audit", "verify", str(audit_log), log=audit_log).returncode == 0

    p = cli("audit", "verify", "--json", str(tampered), log=audit_log)
    assert p.returncode == 1
    out = json.loads(p.stdout)
    assert out["ok"] is False
    assert any(re.search(rf"seq={rec['seq']}\b", x) for x in out["problems"])


# --- drill ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["namespaces", "gvisor", "microvm"])
def test_drill_json_all_pass(backend: str, audit_log: Path) -> None:
    """`glassroom drill --backend X`, the command a user runs, passes on every tier
    (tests/security/test_drill_*.py check each attempt's record on its own)."""
    p = cli("drill", "--json", "--backend", backend, log=audit_log, timeout=900)
    results = json.loads(p.stdout)
    failed = [r for r in results if not r["passed"]]
    assert not failed, json.dumps(failed, indent=1)
    assert len(results) >= 30, [r["name"] for r in results]
    assert p.returncode == 0, p.stderr


def test_cli_entry_point_installed() -> None:
    """The console script exists and is the same program (used by the README)."""
    exe = venv_tool("glassroom")
    assert exe, "the glassroom console script is not installed in this environment"
    p = subprocess.run([exe, "run"], capture_output=True, text=True, timeout=60, check=False)
    refused_line(p)


# Without the serve extra, what to install is named (the module of a missing
# extra is hidden from the import system: the same ModuleNotFoundError a
# plain `pip install glassroom` gives).
_NO_EXTRA = (
    "import sys\n"
    "for m in ('fastapi', 'uvicorn', 'mcp', 'httpx'): sys.modules[m] = None\n"
    "from glassroom.interfaces.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize("verb", ["serve", "mcp"])
def test_service_without_serve_extra_names_the_extra(verb: str, audit_log: Path) -> None:
    env = {**os.environ, "GLASSROOM_API_KEY": "e2b_" + "0" * 40}
    p = subprocess.run([sys.executable, "-c", _NO_EXTRA, verb], capture_output=True, text=True,
                       timeout=60, check=False, env=env)  # fmt: skip
    line = refused_line(p)
    assert f"glassroom {verb} needs the 'serve' extra" in line, line
    assert "pip install 'glassroom[serve]'" in line and "internal error" not in line


def test_remote_sdk_without_serve_extra_names_the_extra() -> None:
    code = ("import sys\nsys.modules['httpx'] = None\nimport glassroom\n"
            "try:\n    glassroom.Sandbox(url='http://127.0.0.1:9', api_key='k')\n"
            "except glassroom.GlassroomError as e:\n    print(type(e).__name__, e)\n")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       check=False)  # fmt: skip
    assert p.stdout.startswith("BackendUnavailable Sandbox(url=...) needs the 'serve' extra"), p


def test_state_dir_behind_a_shut_dir_is_named(audit_log: Path) -> None:
    """A state dir under a 0700 dir (what any mktemp -d makes): as root the
    sandbox uid cannot reach it, and both `run` and `doctor` name the dir in
    the way; glassroom running as its own user is not affected."""
    shut = Path(tempfile.mkdtemp(prefix="glassroom-test-"))
    try:
        _check_shut_state_dir(shut, audit_log)
    finally:
        shutil.rmtree(shut, ignore_errors=True)


def _check_shut_state_dir(shut: Path, audit_log: Path) -> None:
    env = {**os.environ, "GLASSROOM_STATE_DIR": str(shut / "state"),
           "GLASSROOM_AUDIT_LOG": str(audit_log)}  # fmt: skip
    run = subprocess.run([*CLI, "run", "--", "true"], capture_output=True, text=True,
                         timeout=60, check=False, env=env)  # fmt: skip
    doc = subprocess.run([*CLI, "doctor", "--json"], capture_output=True, text=True,
                         timeout=120, check=False, env=env)  # fmt: skip
    reach = json.loads(doc.stdout)["state_dir_reachable"]
    if os.geteuid() != 0:
        assert run.returncode == 0, run.stderr
        assert reach["ok"], reach
        return
    line = refused_line(run)
    assert f"state dir {shut / 'state'} is not reachable by the sandbox" in line, line
    assert f"{shut} (mode 0700, owner 0:0) cannot be searched by uid 65534" in line, line
    assert not reach["ok"] and str(shut) in reach["detail"], reach
    assert json.loads(doc.stdout)["backends"]["namespaces"].startswith("unavailable: state dir")


def test_bwrap_failure_shows_bwrap_cause(audit_log: Path) -> None:
    """A read path bwrap cannot open as the sandbox uid: the error is bwrap's
    own words, not the symptom that follows (a cgroup or pidfd error).  As
    root the sandbox uid is another uid (0700 shuts it out); otherwise it is
    ours, and only mode 0000 does."""
    base = Path(tempfile.mkdtemp(prefix="glassroom-test-shut-", dir="/var/tmp"))
    try:
        (base / "sub").mkdir()
        os.chmod(base, 0o700 if os.geteuid() == 0 else 0)
        pol = base.parent / f"{base.name}.toml"
        pol.write_text(f'[filesystem]\nread = ["/usr", "{base}/sub"]\n')
        p = subprocess.run([*CLI, "run", "--policy", str(pol), "--", "true"], capture_output=True,
                           text=True, timeout=60, check=False,
                           env={**os.environ, "GLASSROOM_AUDIT_LOG": str(audit_log)})  # fmt: skip
        line = refused_line(p)
        assert line == (f"glassroom: namespaces: bwrap failed: bwrap: Can't find source path "
                        f"{base}/sub: Permission denied"), line  # fmt: skip
    finally:
        os.chmod(base, 0o700)
        shutil.rmtree(base, ignore_errors=True)
        (base.parent / f"{base.name}.toml").unlink(missing_ok=True)
