"""Writable host dirs (issue 13, item 2): protected names, setuid bits, ownership.

Pairs on every tier that applies: the harmless write in the writable dir
works; each attack on a protected name fails with EACCES, leaves the host
file as it was, and leaves a ``deny`` record with rule
``filesystem.protected``; setuid/setgid modes fail with EPERM (rule
``filesystem.setuid``).  The microVM tier shares no host dir at all: there
the refusal at compile time is what is tested.
"""

from __future__ import annotations

import errno
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
from glassroom._errors import PlanError, PolicyError
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
    # ignored by a casefold dir's lookup, so the same name as .envrc / .git there
    "envrc-ignorable": "open('.envrc\\ufe0f', 'w').write('evil')",
    "gitdir-ignorable": "open('.gi\\u034ft', 'w').write('gitdir: /elsewhere')",
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
    # namespaces: the supervisor's seccomp listener; gvisor: the sentry's debug line
    # for a call its seccomp filter refused; microvm: the guest agent's (its report)
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


# The gate keeps a node for each name the kernel looked up.  A node the task
# still holds (an open fd) whose name it then removed, with a symlink put
# where its parent dir was: the gate must never serve that node again (it
# used to resolve ``<dir>/a/config`` on the host, through ``a -> .git``).
# Twins: a live file reopened through /proc, a symlink to a dir of the repo.
_HELD = "(os.mkdir({d!r}), setattr(sys, {d!r}, os.open({d!r} + '/' + {f!r}, os.O_CREAT | os.O_RDWR)),"
_SWAP = " os.unlink({d!r} + '/' + {f!r}), os.rmdir({d!r}), {make}, "
_REOPEN = "os.read(os.open('/proc/self/fd/%d' % getattr(sys, {d!r}), {how}), 64))"


def _stale(d: str, f: str, make: str, how: str) -> str:
    return (_HELD + _SWAP + _REOPEN).format(d=d, f=f, make=make, how=how)


STALE = {
    "twin-reopen-live": "(open('live', 'w').write('x'), setattr(sys, 'fd', os.open('live', os.O_RDWR)),"
                        " os.read(os.open(f'/proc/self/fd/{sys.fd}', os.O_RDWR), 1) == b'x' or fail())",
    "twin-tempfile": "(setattr(sys, 't', tempfile.TemporaryFile(dir='.')), sys.t.write(b'x'),"
                     " sys.t.seek(0), sys.t.read() == b'x' or fail())",
    "twin-symlink-dir": "(os.makedirs('real/dir'), os.symlink('real', 'lnk'),"
                        " open('lnk/dir/f', 'w').write('ok'))",
    "stale-config": _stale("a", "config", "os.symlink('.git', 'a')", "os.O_RDWR | os.O_TRUNC"),
    "stale-read": _stale("b", "passwd", "os.symlink('/etc', 'b')", "os.O_RDONLY"),
    "stale-fstat": "(os.mkdir('c'), setattr(sys, 'c', os.open('c/shadow', os.O_CREAT | os.O_RDWR)),"
                   " os.unlink('c/shadow'), os.rmdir('c'), os.symlink('/etc', 'c'), os.fstat(sys.c))",
    # a FIFO where the file was, carried in by renaming its parent: the
    # gate's open must not block (it did: the supervisor's thread hung)
    "stale-fifo": _stale("e", "f", "(os.makedirs('g'), os.mkfifo('g/f'), os.rename('g', 'e'))",
                         "os.O_RDONLY"),
}  # fmt: skip
STALE_PRE = "import sys, tempfile\ndef fail():\n    raise OSError(errno.EIO, 'twin')\n"


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_stale_nodes_never_resolve_outside(backend: str, repo: Path, audit_log: Path) -> None:
    """Removed names held open, parent swapped for a symlink: ESTALE, host untouched."""
    before = _snapshot(repo)
    prog = RUNNER + STALE_PRE + "".join(f"run({k!r}, lambda: {v})\n" for k, v in STALE.items())
    with Sandbox(_policy(repo), backend=backend, audit_log=audit_log) as sb:
        r = sb.run(["python3", "-c", prog + "print(json.dumps(out))\n", str(repo)], timeout_s=30)
    assert r.exit_code == 0 and not r.timed_out, r
    got = json.loads(r.stdout)
    want = {k: "OK" if k.startswith("twin") else "ESTALE" for k in STALE}
    assert got == want, got
    assert (repo / "real/dir/f").read_text() == "ok"
    assert _protected_part(_snapshot(repo)) == _protected_part(before)


@pytest.mark.parametrize("backend", HOST_TIERS)
def test_symlink_on_the_way_is_never_followed(backend: str, repo: Path, audit_log: Path) -> None:
    """A dir the sandbox holds open is swapped for ``-> /etc`` behind its back (by a
    host process here; two gates over one tree did the same, and are now refused at
    load).  The gate walks each component with O_NOFOLLOW: ELOOP, denied and logged."""
    import threading
    import time

    (repo / "sub/x").mkdir()
    os.chown(repo / "sub/x", *_config.sandbox_ids())
    prog = RUNNER + (
        f"sys_fd = os.open('{repo}/sub/x', os.O_RDONLY | os.O_DIRECTORY)\n"
        "run('twin', lambda: os.close(os.open('README', os.O_RDONLY)))\n"
        "open('ready', 'w').close()\n"
        "import time\n"
        "for _ in range(300):\n"
        "    if os.path.exists('go'): break\n"
        "    time.sleep(0.05)\n"
        "run('through', lambda: os.read(os.open('passwd', os.O_RDONLY, dir_fd=sys_fd), 64))\n"
        "print(json.dumps(out))\n"
    )  # fmt: skip

    def swap() -> None:  # the host's side: bounded wait for the sandbox, then the swap
        for _ in range(600):
            if (repo / "ready").exists():
                os.rename(repo / "sub/x", repo / "sub/y")
                os.symlink("/etc", repo / "sub/x")
                (repo / "go").touch()
                return
            time.sleep(0.05)

    with Sandbox(_policy(repo), backend=backend, audit_log=audit_log) as sb:
        t = threading.Thread(target=swap, daemon=True)
        t.start()
        r = sb.run(["python3", "-c", prog, str(repo)], timeout_s=40)
        t.join(timeout=5)
        sid = sb.id
    assert r.exit_code == 0, r
    assert json.loads(r.stdout) == {"twin": "OK", "through": "ELOOP"}, r
    hits = assert_blocked(audit_log, sid, "filesystem.protected")
    assert any(h["details"]["action"] == "resolve" and h["details"]["target"] == f"{repo}/sub/x"
               for h in hits), hits  # fmt: skip


def test_overlapping_writable_dirs_are_refused(repo: Path, tmp_path: Path) -> None:
    """Two separate writable dirs load; a dir and a symlink into it do not (one
    write gate per tree, or each gate misses the other's renames)."""
    from glassroom.policy import validate_policy

    other = repo.parent / "other-dir"
    other.mkdir()
    link = repo.parent / "sublink"
    os.symlink(repo / "sub", link)
    pol = _policy(repo)
    pol["filesystem"]["write"].append(str(other))
    validate_policy(pol)  # the twin: disjoint trees
    pol["filesystem"]["write"][-1] = str(link)
    with pytest.raises(PolicyError) as err:
        validate_policy(pol)
    assert (f"filesystem.write[1]: '{link}' overlaps filesystem.write '{repo}' "
            f"(as '{repo}/sub' within '{repo}'): list one dir per tree") in str(err.value)


def _bare_gate(root: Path, denied: list[tuple[str, dict[str, Any]]]) -> fusegate.Gate:
    gate = fusegate.Gate(str(root), str(root), fusegate.Protection([], []), uid=0, gid=0,
                         on_deny=lambda rule, d: denied.append((rule, d)))  # fmt: skip
    gate.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    return gate


def test_gate_never_opens_a_fifo_nor_follows_a_symlink(tmp_path: Path) -> None:
    """Unit pair on the gate itself (no mount): a node naming a FIFO or a path through
    a symlink is refused at once; the same node naming a file or a dir works."""
    import struct
    import time

    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("x")
    os.mkfifo(tmp_path / "p")
    os.symlink("/etc", tmp_path / "lnk")
    denied: list[tuple[str, dict[str, Any]]] = []
    gate = _bare_gate(tmp_path, denied)
    try:
        gate.nodes.update({5: ("d", "f"), 6: ("p",), 7: ("lnk", "passwd")})
        rd = struct.pack("=II", os.O_RDONLY, 0)
        fh = struct.unpack_from("=Q", gate.op_open(5, rd))[0]  # twin
        assert os.pread(gate.files[fh], 1, 0) == b"x"
        t0 = time.monotonic()
        with pytest.raises(fusegate._Refused) as fifo:
            gate.op_open(6, rd)
        assert fifo.value.err == errno.ESTALE and time.monotonic() - t0 < 1
        with pytest.raises(fusegate._Refused) as through:
            gate.op_getattr(7, b"")
        assert through.value.err == errno.ELOOP
        assert denied and denied[-1][0] == "filesystem.protected"
        assert denied[-1][1]["action"] == "resolve"
    finally:
        os.close(gate.root_fd)
        gate.close()


def test_gate_listings_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dir handles held mid-listing cost supervisor memory (outside the sandbox's
    limits): past ``MAX_LISTED`` entries held, a further listing is ENOMEM; one read
    to its end is dropped, and a lone listing (twin) is never refused."""
    import struct

    (tmp_path / "big").mkdir()
    for i in range(30):
        (tmp_path / f"big/{i:03d}").touch()
    monkeypatch.setattr(fusegate, "MAX_LISTED", 50)
    gate = _bare_gate(tmp_path, [])
    try:
        gate.nodes[5] = ("big",)
        a, b = (struct.unpack_from("=Q", gate.op_opendir(5, b""))[0] for _ in range(2))

        def read(fh: int, off: int) -> bytes:
            return gate.op_readdir(5, struct.pack("=QQI", fh, off, 4096))

        assert read(a, 0)  # twin: the lone listing, 32 entries held
        with pytest.raises(fusegate._Refused) as info:
            read(b, 0)
        assert info.value.err == errno.ENOMEM
        assert read(a, 32) == b"" and gate.listed == 0  # a read to its end: dropped
        assert read(b, 0) and gate.listed == 32
        gate.op_releasedir(5, struct.pack("=Q", b))
        assert gate.listed == 0
    finally:
        os.close(gate.root_fd)
        gate.close()


def test_reaper_record_names_staging_dirs_before_start() -> None:
    """The record is written before the gates mount: it must already name every
    staging dir (a supervisor killed mid-start leaves mounts the reaper must find)."""
    from types import SimpleNamespace

    from glassroom.backends._gates import Gates

    mounts = [SimpleNamespace(kind="bind"), SimpleNamespace(kind="ro"), SimpleNamespace(kind="bind")]
    gates = Gates(SimpleNamespace(mounts=mounts), "sb-test", lambda *a: None)  # type: ignore[arg-type]
    assert gates.dirs() == [str(gates.root / "0"), str(gates.root / "1"), str(gates.root)]
    assert Gates(SimpleNamespace(mounts=mounts[1:2]), "sb-x", lambda *a: None).dirs() == []  # type: ignore[arg-type]


def test_gate_close_never_frees_an_fd_a_busy_thread_still_uses(tmp_path: Path) -> None:
    """A gate thread still in an operation at close (a huge listing, a slow disk): its
    /dev/fuse fd is replaced by /dev/null, not freed, so the reply it is about to
    write cannot land in a file the supervisor opens next; its files stay open
    for it to close.  Twin: an idle gate's fds are simply closed."""
    import threading
    import time

    null_rdev = os.stat(os.devnull).st_rdev
    for busy in (False, True):
        gate = _bare_gate(tmp_path, [])
        r, w = os.pipe()
        gate.fd, gate.files[1] = w, r
        gate._thread = threading.Thread(target=time.sleep, args=(2.5 if busy else 0,))
        gate._thread.start()
        time.sleep(0.1)
        gate.close()
        if busy:
            assert os.fstat(w).st_rdev == null_rdev and gate.files == {1: r}
            os.fstat(r)  # still open
            gate._thread.join()
            os.close(w)
            os.close(r)
        else:
            assert gate.fd == -1 and gate.files == {}
            for fd in (r, w):
                with pytest.raises(OSError):
                    os.fstat(fd)
        os.close(gate.root_fd)
