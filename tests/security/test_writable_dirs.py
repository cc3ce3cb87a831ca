"""Writable host dirs (issue 13, item 2): protected names, setuid bits, ownership.

Pairs on every tier that applies: the harmless write in the writable dir
works; each attack on a protected name fails with EACCES, leaves the host
file as it was, and leaves a ``deny`` record with rule
``filesystem.protected``; setuid/setgid modes fail with EPERM (rule
``filesystem.setuid``).  The microVM tier shares no host dir at all: there
the refusal at compile time is what is tested.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_blocked, records
from glassroom import Sandbox, WallError, _config
from glassroom._errors import PlanError
from glassroom._sys import fusegate
from glassroom.policy._protected import PROTECTED

HOST_TIERS = ["namespaces", "gvisor"]  # the tiers that bind host dirs at all
TOOLS = ["sh", "python3", "cat", "ls", "mkdir", "mv", "rm", "ln", "chmod", "cp", "echo", "true"]

pytestmark = pytest.mark.skipif(
    fusegate.available() is not None, reason=f"write gate: {fusegate.available()}"
)

# Each attack: a Python expression run under ``run(name, lambda: ...)`` in the repo dir.
ATTACKS: dict[str, str] = {
    "hook-create": "open('.git/hooks/post-checkout', 'w').write('#!/bin/sh\\nevil\\n')",
    "hook-modify": "open('.git/hooks/pre-commit', 'a').write('evil\\n')",
    "config-fsmonitor": "open('.git/config', 'a').write('[core]\\n\\tfsmonitor = evil\\n')",
    "config-truncate": "os.open('.git/config', os.O_WRONLY | os.O_TRUNC)",
    "envrc-new": "open('.envrc', 'w').write('evil\\n')",
    "bashrc-new": "open('.bashrc', 'w').write('evil\\n')",
    "vscode-mkdir": "os.mkdir('.vscode')",
    "vscode-case": "os.mkdir('.VSCode')",
    "workflows-mkdir": "os.mkdir('.github/workflows')",
    "claude-dir": "os.makedirs('.claude/commands')",
    "nested-config": "open('sub/.git/config', 'a').write('[core]\\n\\tfsmonitor = evil\\n')",
    "nested-hook": "open('sub/.git/hooks/pre-commit', 'w').write('evil')",
    "deep-new-envrc": "(os.makedirs('new/deeper', exist_ok=True),"
                      " open('new/deeper/.envrc', 'w').write('evil'))",
    "new-gitdir": "(os.makedirs('fresh', exist_ok=True), os.mkdir('fresh/.git'))",
    "dotdot": "open('sub/../.envrc', 'w').write('evil')",
    "rename-onto": "(open('plain', 'w').write('evil'), os.rename('plain', '.git/hooks/pre-push'))",
    "rename-away": "os.rename('.git/hooks', 'hooks.old')",
    "rename-gitdir": "os.rename('.git', 'git.old')",
    "rename-completes": "(os.makedirs('t/workflows', exist_ok=True), os.rename('t', 'sub/.github'))",
    "unlink": "os.unlink('.git/config')",
    "rmdir-tree": "os.rmdir('.git/hooks')",
    "hardlink-from": "os.link('.git/config', 'cfg-alias')",
    "hardlink-onto": "(open('h', 'w').write('evil'), os.link('h', '.envrc'))",
    "symlink-at": "os.symlink('/tmp/evil', '.envrc')",
    "symlink-through": "(os.symlink('.git/config', 'via'), open('via', 'a').write('evil'))",
    "symlink-prefix": "(os.makedirs('ci/workflows', exist_ok=True), os.symlink('ci', 'sub/.github'))",
    "symlink-renamed": "(os.symlink('ci', 'lnk'), os.rename('lnk', 'new/.github'))",
}  # fmt: skip

RUNNER = r"""
import errno, json, os, sys
os.chdir(sys.argv[1])
out = {}
def run(name, f):
    try:
        f(); out[name] = "OK"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
"""


def _runner(attacks: dict[str, str]) -> str:
    body = "".join(f"run({k!r}, lambda: {v})\n" for k, v in attacks.items())
    return RUNNER + body + "print(json.dumps(out))\n"


@pytest.fixture
def repo() -> Iterator[Path]:
    """A host repository the sandbox may write: top-level .git and a nested one."""
    root = Path(tempfile.mkdtemp(prefix="gr-wdir-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    r = root / "repo"
    for d in ("repo/.git/hooks", "repo/.github", "repo/sub/.git/hooks"):
        (root / d).mkdir(parents=True)
    (r / ".git/config").write_text("[core]\n\tbare = false\n")
    (r / ".git/hooks/pre-commit").write_text("#!/bin/sh\nexit 0\n")
    (r / "sub/.git/config").write_text("[core]\n")
    (r / "README").write_text("hello\n")
    uid, gid = _config.sandbox_ids()
    for dirpath, dirs, files in os.walk(r):
        os.chown(dirpath, uid, gid)
        for n in dirs + files:
            os.chown(os.path.join(dirpath, n), uid, gid)
    try:
        yield r
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _snapshot(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath, n)
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777,
                                             hashlib.sha256(data).hexdigest())  # fmt: skip
    return out


def _protected_part(snap: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in snap.items() if k.startswith((".git", "sub/.git", ".github"))}


def _policy(repo: Path, **fs: Any) -> dict[str, Any]:
    return {"filesystem": {"read": ["/usr"], "write": [str(repo)], **fs}, "tools": {"allow": TOOLS}}


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_harmless_write_works_and_belongs_to_the_sandbox_uid(
    backend: str, repo: Path, audit_log: Path
) -> None:
    """Harmless twin: ordinary files, dirs, renames and deletes in the writable dir."""
    with Sandbox(_policy(repo), backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["sh", "-c", f"cd {repo} && echo ok > notes.txt && mkdir -p src/pkg && "
                    "echo x > src/pkg/a.py && mv src/pkg src/lib && rm src/lib/a.py && "
                    "cat README && cat .git/config >/dev/null && ls .git/hooks && echo done"])
        sid = sb.id
    assert r.exit_code == 0, r
    assert "hello" in r.stdout and "pre-commit" in r.stdout and "done" in r.stdout
    assert (repo / "notes.txt").read_text() == "ok\n"
    assert (repo / "src/lib").is_dir()
    # never a host account: the sandbox's own uid, on gVisor too (not uid 1000)
    uid, gid = _config.sandbox_ids()
    st = (repo / "notes.txt").stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert not [x for x in records(audit_log, sid) if x.get("decision") == "deny"
                and str(x.get("rule", "")).startswith("filesystem.")]  # fmt: skip


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_protected_names_are_refused(backend: str, repo: Path, audit_log: Path) -> None:
    """Malicious: every write of a protected name fails EACCES, host unchanged, denied in the log."""
    before = _protected_part(_snapshot(repo))
    with Sandbox(_policy(repo), backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", _runner(ATTACKS), str(repo)])
        sid = sb.id
    assert r.exit_code == 0, r
    got = json.loads(r.stdout)
    assert got == dict.fromkeys(ATTACKS, "EACCES"), got
    after = _snapshot(repo)
    assert _protected_part(after) == before
    for name in (".envrc", ".bashrc", ".vscode", ".VSCode", ".claude", "new/deeper/.envrc",
                 "fresh/.git", "cfg-alias", "hooks.old", "git.old", "sub/.github"):  # fmt: skip
        assert name not in after, name
    hits = assert_blocked(audit_log, sid, "filesystem.protected")
    targets = {h["details"]["target"] for h in hits}
    for rel in (".git/hooks/post-checkout", ".git/config", ".envrc", "sub/.git/config",
                "new/deeper/.envrc", "fresh/.git", ".github/workflows", ".VSCode"):  # fmt: skip
        assert f"{repo}/{rel}" in targets, (rel, sorted(targets))
    assert all(h["details"]["protected"] and h["details"]["reason"] for h in hits)


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_unprotect_lifts_named_paths_only(backend: str, repo: Path, audit_log: Path) -> None:
    """``filesystem.unprotect``: the named path becomes writable, is logged; the rest is not."""
    pol = _policy(repo, unprotect=[f"{repo}/.git/hooks"])
    with Sandbox(pol, backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", _runner({
            "hook": "open('.git/hooks/post-commit', 'w').write('ok')",
            "config": "open('.git/config', 'a').write('x')",
        }), str(repo)])  # fmt: skip
        sid = sb.id
    assert json.loads(r.stdout) == {"hook": "OK", "config": "EACCES"}, r
    assert (repo / ".git/hooks/post-commit").read_text() == "ok"
    lifted = [x for x in records(audit_log, sid) if x["event"] == "policy.unprotect"]
    assert lifted and lifted[0]["details"]["path"] == f"{repo}/.git/hooks"
    assert lifted[0]["rule"] == "filesystem.unprotect"
    assert_blocked(audit_log, sid, "filesystem.protected")


SETUID = {
    "chmod-4755": "os.chmod('f', 0o4755)",
    "chmod-2755": "os.chmod('f', 0o2755)",
    "fchmod-6755": "os.fchmod(os.open('f', os.O_RDONLY), 0o6755)",
    "fchmodat": "os.chmod('f', 0o4711, dir_fd=os.open('.', os.O_RDONLY))",
    "open-creat-4755": "os.open('n1', os.O_CREAT | os.O_WRONLY, 0o4755)",
    "creat-2755": "libc.creat(b'n2', 0o2755) >= 0 or fail()",
    "mknod-4644": "os.mknod('n3', 0o4644 | stat.S_IFREG)",
}
SETUID_PRE = ("import ctypes, stat\nlibc = ctypes.CDLL(None, use_errno=True)\n"
              "def fail():\n    raise OSError(ctypes.get_errno(), 'libc')\n"
              "open('f', 'w').write('#!/bin/sh\\n')\n")  # fmt: skip


def _setuid_program(where: str) -> str:
    body = "".join(f"run({k!r}, lambda: {v})\n" for k, v in SETUID.items())
    twin = "run('twin-chmod-755', lambda: os.chmod('f', 0o755))\n"
    return RUNNER + SETUID_PRE + twin + body + "print(json.dumps(out))\n"


def _check_setuid(backend: str, log: Path, sid: str, got: dict[str, str]) -> None:
    assert got == {"twin-chmod-755": "OK", **dict.fromkeys(SETUID, "EPERM")}, got
    if backend == "gvisor":
        # Refused by the seccomp filter inside the sentry (EPERM, checked
        # above) before runsc's strace sees the call: this runsc gives no
        # record (docs/threat-model.md says so).  What holds is checked.
        return
    # namespaces: the supervisor's seccomp listener; microvm: the guest agent's (its report)
    hits = assert_blocked(log, sid, "filesystem.setuid")
    assert {h["details"]["syscall"] for h in hits} >= {"fchmodat", "fchmod", "openat"}


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_setuid_in_writable_dir_refused(backend: str, repo: Path, audit_log: Path) -> None:
    """chmod/fchmod/fchmodat/open/creat/mknod with S_ISUID/S_ISGID: EPERM; the host file stays plain.

    Copying a setuid file keeping its mode (``cp -p``, what ``install -m`` and
    tar do too: create, then chmod) leaves a plain copy.
    """
    src = repo.parent / "suid-src"
    src.write_text("#!/bin/sh\n")
    os.chmod(src, 0o4755)
    pol = _policy(repo)
    pol["filesystem"]["read"].append(str(src))
    with Sandbox(pol, backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", _setuid_program(str(repo)), str(repo)])
        cp = sb.run(["cp", "-p", str(src), f"{repo}/copied"])
        sid = sb.id
    assert r.exit_code == 0, r
    # cp drops the bits itself when it cannot keep the owner, or its chmod is refused
    assert (repo / "copied").exists(), cp
    assert os.stat(repo / "copied").st_mode & 0o7777 == 0o755, cp
    for dirpath, dirs, files in os.walk(repo):
        for n in dirs + files:
            assert not os.lstat(os.path.join(dirpath, n)).st_mode & 0o6000, n
    assert os.stat(repo / "f").st_mode & 0o777 == 0o755
    _check_setuid(backend, audit_log, sid, json.loads(r.stdout))


def test_setuid_in_workspace_refused(backend: str, audit_log: Path) -> None:
    """The same calls in /workspace (every tier, the microVM guest included): EPERM."""
    with Sandbox({"tools": {"allow": TOOLS}}, backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", _setuid_program("/workspace"), "/workspace"])
        sid = sb.id
    assert r.exit_code == 0, r
    _check_setuid(backend, audit_log, sid, json.loads(r.stdout))


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_setxattr_capability_refused_in_writable_dir(
    backend: str, repo: Path, audit_log: Path
) -> None:
    """File capabilities (security.capability) on a host file: refused, never on the host."""
    cap = "bytes.fromhex('0100000200200000000000000000000000000000')"  # cap_net_raw, v2
    with Sandbox(_policy(repo), backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", _runner({
            "twin": "open('c', 'w').write('x')",
            "cap": f"os.setxattr('c', 'security.capability', {cap})",
        }), str(repo)])  # fmt: skip
        sid = sb.id
    got = json.loads(r.stdout)
    # The kernels refuse before the gate is asked (which would refuse security.* too,
    # EPERM and logged): namespaces: no CAP_SETFCAP (EPERM); gVisor's sentry keeps
    # no security.* xattrs on host files (ENOTSUP).
    want = {"namespaces": "EPERM", "gvisor": "ENOTSUP"}[backend]
    assert got == {"twin": "OK", "cap": want}, got
    assert sid
    assert not os.listxattr(repo / "c")


def test_microvm_refuses_writable_host_dirs(repo: Path) -> None:
    """microVM: no host dir is ever shared, so the refusal at compile time must hold."""
    with pytest.raises(PlanError) as info:
        Sandbox(_policy(repo), backend="microvm")
    assert info.value.rule == "filesystem.write[0]"


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_no_gate_left_on_host(backend: str, repo: Path, audit_log: Path) -> None:
    """While it runs the gate is mounted only in the sandbox; afterwards nothing is left."""
    with Sandbox(_policy(repo), backend=backend, audit_log=audit_log) as sb:
        sid = sb.id
        gates = Path(_config.state_dir()) / "gates" / sid
        with open("/proc/self/mounts") as f:
            assert str(gates) not in f.read()
        r = sb.run(["sh", "-c", f"echo x > {repo}/still-served && cat {repo}/still-served"])
        assert r.exit_code == 0 and r.stdout == "x\n", r
    assert not gates.exists()
    with open("/proc/self/mounts") as f:
        assert str(gates) not in f.read()


def test_no_gate_means_no_start(repo: Path, audit_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail closed: where the gate cannot be built (non-root, no /dev/fuse) nothing starts."""
    monkeypatch.setattr(fusegate, "available", lambda: "needs glassroom to run as root")
    with pytest.raises(WallError) as info:
        Sandbox(_policy(repo), backend="namespaces", audit_log=audit_log)
    assert info.value.rule == "filesystem.protected"
    assert not (repo / ".envrc").exists()


def test_protected_list_is_data_with_reasons() -> None:
    names = [p for p, _tree, _why in PROTECTED]
    assert len(names) == len(set(names))
    for path, tree, why in PROTECTED:
        assert path and not path.startswith("/") and ".." not in path.split("/"), path
        assert isinstance(tree, bool) and len(why) > 10, path
    for must in (".git/hooks", ".git/config", ".bashrc", ".envrc", ".vscode",
                 ".github/workflows", ".codex", ".claude", ".cursor"):  # fmt: skip
        assert must in names


CRASHING_SUPERVISOR = r"""
import sys, time
from glassroom import Sandbox
sb = Sandbox({"filesystem": {"read": ["/usr"], "write": [sys.argv[1]]},
              "tools": {"allow": ["sh", "true"]}}, audit_log=sys.argv[2])
print(sb.id, flush=True)
time.sleep(1000)
"""


def test_reaper_unmounts_gates_and_never_deletes_through_them(repo: Path, audit_log: Path) -> None:
    """A supervisor killed mid-task: the reaper removes its gate dirs with rmdir only,
    and the user's files (seen through the gate while it ran) are all still there."""
    import signal
    import subprocess
    import sys

    from glassroom.lifecycle import reaper

    before = _snapshot(repo)
    child = subprocess.Popen([sys.executable, "-c", CRASHING_SUPERVISOR, str(repo), str(audit_log)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")  # fmt: skip
    try:
        assert child.stdout is not None
        sid = child.stdout.readline().decode().strip()
        assert sid.startswith("sb-"), child.stderr.read() if child.stderr else sid
        gates = Path(_config.state_dir()) / "gates" / sid
        assert gates.is_dir()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    reaper.reap()
    assert not gates.exists()
    assert _snapshot(repo) == before


@pytest.mark.parametrize("header", [
    {"op": "refused", "nr": "90", "pid": 1},           # wrong type
    {"op": "refused", "nr": 90, "pid": 1, "why": "x"},  # unknown field
    {"op": "refused", "nr": 1 << 63, "pid": 1},         # out of range
])  # fmt: skip
def test_guest_refusal_reports_are_checked(header: dict[str, Any]) -> None:
    """microVM: the guest agent's report of a refused setuid call is untrusted input."""
    from glassroom.backends.microvm._channel import ProtocolViolation, check

    with pytest.raises(ProtocolViolation):
        check(header, b"")
    assert check({"op": "refused", "nr": 90, "pid": 7}, b"")["nr"] == 90
