"""The gVisor tier's compiled init (``glassroom-init --stream``) is a drop-in for init_stream.py.

The same static binary as the namespaces tier's init (``_sys/agent``), run
as the container's pid 1 in stream mode (``_sys/agent/stream.c``): frames on
its stdin/stdout, pipes it makes itself, seccomp and rlimits it applies, no
Landlock (gVisor has none).  Here: which init ran is never silent (the
``sandbox.created`` record says), each harmless request works and its
malicious twin is refused with the very text the Python init gives, a
missing build fails closed when the compiled init is required, the host's
/usr is not in the container at all under the compiled init (the Python one
needs it), and the binary, executable inside, does nothing when sandboxed
code runs it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import created_details
from glassroom import PlanError, Sandbox, SandboxError, WallError
from glassroom._config import state_dir
from glassroom._sys import agent_build

pytestmark = pytest.mark.usefixtures("_gvisor")


@pytest.fixture
def _gvisor() -> None:
    if shutil.which("runsc") is None and not os.path.exists("/usr/bin/runsc"):
        pytest.skip("runsc is not installed")
    if os.geteuid() != 0:
        pytest.skip("the gvisor tier runs as root")
    if agent_build.find(state_dir()) is None:
        pytest.skip("the compiled init is not built (no C compiler); CI builds it")




def test_the_record_names_the_init_that_ran(init: str, audit_log: Path) -> None:
    with Sandbox({}, audit_log=audit_log, backend="gvisor") as sb:
        r = sb.run(["sh", "-c", "echo hi; echo err >&2; exit 3"])
        walls = sb.walls
        sid = sb.id
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "err\n")
    assert walls["init"] == init
    assert created_details(audit_log, sid)["walls"]["init"] == init


def test_compiled_required_but_not_built_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    top = Path(tempfile.mkdtemp(prefix="glassroom-nobuild-", dir="/tmp"))
    os.chmod(top, 0o755)
    empty = top / "state"
    empty.mkdir(mode=0o755)
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(empty))
    monkeypatch.setenv("GLASSROOM_INIT_DIR", str(empty / "no-init"))
    monkeypatch.setenv("GLASSROOM_INIT", "compiled")
    try:
        with pytest.raises(WallError) as info:
            Sandbox({}, backend="gvisor")
        assert info.value.rule == "init"
        assert "GLASSROOM_INIT=compiled" in str(info.value)
        assert "glassroom init build" in str(info.value)
        # the harmless twin: auto falls back to the Python init, and says so
        monkeypatch.setenv("GLASSROOM_INIT", "auto")
        with Sandbox({}, backend="gvisor") as sb:
            assert sb.walls["init"] == "python"
            assert sb.run(["echo", "ok"]).stdout == "ok\n"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _outcome(sb: Sandbox, op: str, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", getattr(sb.files, op)(*args)
    except SandboxError as exc:
        return "error", (getattr(exc, "errno", None), str(exc))


STATUS = (
    "while read k v; do case $k in SigIgn:|SigBlk:|Umask:|NoNewPrivs:|Seccomp:) "
    "echo $k $v;; esac; done < /proc/self/status; ls /proc/self/fd; cat /proc/self/limits"
)
#: Shell commands and file requests whose every outcome must be the same on both inits.
SHELL = [
    ["sh", "-c", "echo harmless > /workspace/a; cat /workspace/a"],
    ["sh", "-c", "cat /proc/1/mem"],  # the init is not dumpable
    ["sh", "-c", "echo x > /proc/1/comm"],
    ["nosuch-command"],
    ["/workspace/nosuch"],
    # noexec: a file the task made does not run, as on the Python init
    [
        "sh",
        "-c",
        "printf '#!/bin/sh\\necho ran\\n' > /workspace/x; chmod +x /workspace/x; /workspace/x",
    ],
    ["sh", "-c", "head -c 300000 /dev/zero | wc -c"],  # a pipe inside, output through frames
    ["sh", "-c", "sleep 0.2 & echo bg"],  # an orphan: pid 1 reaps it
    # what a command inherits: ignored signals (SIGPIPE, SIGXFSZ as CPython leaves
    # them), its session, limits, fds, umask, no_new_privs, seccomp
    ["sh", "-c", STATUS],
    ["sh", "-c", "cat /proc/self/stat | cut -d' ' -f5-6 | tr ' ' '\\n' | sort -u | wc -l"],
]


CAP = 400_000


def _run_all(audit_log: Path) -> tuple[list[Any], list[Any], list[Any], str]:
    runs, files = [], []
    pol = {"resources": {"max_output_bytes": CAP}}
    with Sandbox(pol, audit_log=audit_log, backend="gvisor") as sb:
        for argv in SHELL:
            r = sb.run(argv)
            runs.append([r.exit_code, r.stdout, r.stderr])
        r = sb.run(["cat"], stdin=b"x" * 200_000)
        big = [r.exit_code, len(r.stdout)]
        r = sb.run(["sh", "-c", "head -c 5000000 /dev/zero"])
        capped = [r.exit_code, len(r.stdout), r.truncated]
        sb.run(["python3", "-c",
                "import os; os.mkfifo('/workspace/p'); os.mkdir('/workspace/d');"
                "open(b'/workspace/d/\\xff\\xfe-\\xc3\\xa9', 'w').write('x')"])  # fmt: skip
        files += [
            _outcome(sb, "read", "/workspace/a"),
            _outcome(sb, "read", "/workspace/p"),  # a FIFO: refused, never blocks
            _outcome(sb, "read", "/workspace/d"),
            _outcome(sb, "read", "/workspace/missing 'q'"),
            _outcome(sb, "write", "/workspace/p", b"x"),
            _outcome(sb, "write", "/usr/evil", b"x"),
            _outcome(sb, "write", "/workspace/big", b"y" * 300_000),
            _outcome(sb, "read", "/workspace/big"),
            _outcome(sb, "list", "/workspace/d"),  # a non-UTF-8 name: surrogateescape
            _outcome(sb, "list", "/workspace/missing"),
            _outcome(sb, "make_dir", "/workspace/m/n/o"),
            _outcome(sb, "make_dir", "/usr/evil/dir"),
            _outcome(sb, "remove", "/workspace/d"),
            _outcome(sb, "remove", "/usr/bin"),
            _outcome(sb, "list", "/workspace/m/n"),
        ]
        walls = sb.walls
    return runs, [big, capped], files, walls["init"]


def test_every_outcome_is_the_same_on_both_inits(
    audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLASSROOM_INIT", "python")
    py_runs, py_io, py_files, which = _run_all(audit_log)
    assert which == "python"
    monkeypatch.setenv("GLASSROOM_INIT", "compiled")
    c_runs, c_io, c_files, which = _run_all(audit_log)
    assert which == "compiled"
    for argv, a, b in zip(SHELL, py_runs, c_runs, strict=True):
        assert a == b, argv
    assert py_io == c_io
    assert py_files == c_files
    # the harmless twins worked, the malicious ones were refused with the path named
    assert c_runs[0][:2] == [0, "harmless\n"]
    assert c_runs[1][0] != 0 and "Permission denied" in c_runs[1][2]
    assert c_runs[5][0] == 126 and "Permission denied" in c_runs[5][2]
    assert c_runs[6][:2] == [0, "300000\n"]
    assert c_io == [[0, 200_000], [c_io[1][0], CAP, True]]
    assert c_files[0] == ("ok", b"harmless\n")
    assert c_files[1][0] == "error" and "not a regular file (a FIFO); refused" in c_files[1][1][1]
    assert c_files[7] == ("ok", b"y" * 300_000)
    names = {e.name for e in c_files[8][1]}
    assert names == {os.fsdecode(b"\xff\xfe-\xc3\xa9")}


def test_the_hosts_usr_is_not_in_the_container(init: str) -> None:
    """The Python init needs the sandbox's python3; the static one nothing: with
    /usr not in filesystem.read, the compiled init starts and /usr is not there,
    and the Python init is refused at compile time (it would have no python3)."""
    pol = {"filesystem": {"read": ["/etc"]}, "tools": {"allow": []}}
    if init == "python":
        with pytest.raises(PlanError) as info:
            Sandbox(pol, backend="gvisor")
        assert info.value.rule == "filesystem.read"
        assert "add /usr to filesystem.read" in str(info.value)
        return
    with Sandbox(pol, backend="gvisor") as sb:
        assert sb.walls["init"] == "compiled"
        assert sb.files.list("/workspace") == []
        with pytest.raises(SandboxError) as err:
            sb.files.read("/usr/bin/python3")
        assert "no such file in the sandbox (ENOENT)" in str(err.value)
        with pytest.raises(SandboxError) as err:
            sb.files.list("/.glassroom-host")
        assert "no such file in the sandbox (ENOENT)" in str(err.value)


def test_sandboxed_code_cannot_use_the_init_binary(init: str) -> None:
    """Readable and executable inside (gVisor applies noexec to pid 1 too), but
    it runs only as the container's pid 1: run again, it refuses at once."""
    with Sandbox({}, backend="gvisor") as sb:
        ok = sb.run(["sh", "-c", "echo harmless"])
        r = sb.run(["sh", "-c", "/.glassroom-init --stream < /dev/null; echo rc=$?"])
    assert ok.stdout == "harmless\n"
    if init == "compiled":
        assert r.stdout == "rc=126\n"
        assert r.stderr == "glassroom-init --stream: only the container's pid 1 runs this\n"
    else:  # not there at all
        assert r.stdout == "rc=127\n" and "not found" in r.stderr


def test_a_restore_runs_the_init_that_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint names its init; the restore binds that very one, whatever
    GLASSROOM_INIT says now; a checkpoint naming a binary that is not a build of
    this state dir is refused before anything starts."""
    from glassroom._errors import SnapshotError
    from glassroom.backends import gvisor
    from glassroom.backends.base import Checkpoint, ExecRequest
    from glassroom.policy import compile, default_policy

    plan = compile(default_policy(), "gvisor")
    backend = gvisor.GvisorBackend()

    def sink(*_a: Any) -> None:
        pass

    def sh(inst: gvisor.GvisorInstance, script: str) -> bytes:
        res = inst.exec(ExecRequest(argv=("sh", "-c", script), env=dict(plan.env),
                                    cwd="/workspace", timeout_s=30))  # fmt: skip
        assert res.exit_code == 0, res
        return res.stdout

    monkeypatch.setenv("GLASSROOM_INIT", "compiled")
    made: list[gvisor.GvisorInstance] = []
    try:
        a = backend.start(plan, "sb-ckpt-init", sink)
        made.append(a)
        sh(a, "echo kept > /workspace/f")
        dest = tmp_path / "ck"
        dest.mkdir(mode=0o700)
        ck = a.checkpoint(dest, leave_running=False)
        assert ck.details["init"] == "compiled"
        assert ck.details["init_binary"].startswith("glassroom-init-")
        a.destroy()
        # malicious: the checkpoint's init names something else
        bad = Checkpoint.from_dict(ck.as_dict())
        bad.details["init_binary"] = "../../../usr/bin/python3"
        with pytest.raises(SnapshotError) as info:
            made.append(backend.restore(plan, "sb-ckpt-init", sink, dest, bad))
        assert info.value.rule == "snapshot.state"
        assert "the checkpoint runs the compiled init '../../../usr/bin/python3'" in str(info.value)
        # harmless: restored under another choice, it runs the saved (compiled) init
        monkeypatch.setenv("GLASSROOM_INIT", "python")
        b = backend.restore(plan, "sb-ckpt-init", sink, dest, Checkpoint.from_dict(ck.as_dict()))
        made.append(b)
        assert b.walls["init"] == "compiled"
        assert sh(b, "cat /workspace/f") == b"kept\n"
    finally:
        for inst in made:
            inst.destroy()
