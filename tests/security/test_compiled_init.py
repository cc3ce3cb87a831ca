"""The namespaces tier's compiled init (``_sys/agent``) is a drop-in for the Python one.

It speaks the same protocol under the same walls, so the rest of the suite
runs on it (``GLASSROOM_INIT=auto`` picks it once built; tests/conftest.py
builds it for the session).  Here: which init ran is never silent (the
``sandbox.created`` record says), each harmless request works and its
malicious twin is refused with the very text the Python init gives, a
missing build fails closed when the compiled init is required, and the
Python init still works when chosen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import created_details
from glassroom import Sandbox, SandboxError, WallError
from glassroom._config import state_dir
from glassroom._sys import agent_build


@pytest.fixture(autouse=True)
def _built() -> None:
    """conftest builds it for the session; under CI a missing build fails there."""
    if agent_build.find(state_dir()) is None:
        pytest.skip("the compiled init is not built (no C compiler); CI builds it")




def test_the_record_names_the_init_that_ran(init: str, audit_log: Path) -> None:
    with Sandbox({}, audit_log=audit_log, backend="namespaces") as sb:
        r = sb.run(["sh", "-c", "echo hi; echo err >&2; exit 3"])
        walls = sb.walls
        sid = sb.id
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "err\n")
    assert walls["init"] == init
    assert created_details(audit_log, sid)["walls"]["init"] == init
    assert walls["landlock"]["abi"] >= 1


def test_compiled_required_but_not_built_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    top = Path(tempfile.mkdtemp(prefix="glassroom-nobuild-", dir="/tmp"))
    os.chmod(top, 0o755)
    empty = top / "state"
    empty.mkdir(mode=0o755)
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(empty))
    monkeypatch.setenv("GLASSROOM_INIT_DIR", str(empty / "no-init"))
    monkeypatch.setenv("GLASSROOM_INIT", "compiled")
    with pytest.raises(WallError) as info:
        Sandbox({}, backend="namespaces")
    assert info.value.rule == "init"
    assert "GLASSROOM_INIT=compiled" in str(info.value)
    assert "glassroom init build" in str(info.value)
    # the harmless twin: auto falls back to the Python init, and says so
    monkeypatch.setenv("GLASSROOM_INIT", "auto")
    try:
        with Sandbox({}, backend="namespaces") as sb:
            assert sb.walls["init"] == "python"
            assert sb.run(["echo", "ok"]).stdout == "ok\n"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_an_unknown_choice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLASSROOM_INIT", "fastest")
    with pytest.raises(WallError) as info:
        Sandbox({}, backend="namespaces")
    assert info.value.rule == "init" and "'fastest'" in str(info.value)


def _outcome(sb: Sandbox, op: str, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", getattr(sb.files, op)(*args)
    except SandboxError as exc:
        return "error", (getattr(exc, "errno", None), str(exc))


#: Shell commands and file requests whose every outcome must be the same on both inits.
SHELL = [
    ["sh", "-c", "echo harmless > /workspace/a; cat /workspace/a"],
    ["sh", "-c", "cat /.glassroom/landlock.py"],  # the init's own files: no Landlock rule
    ["sh", "-c", "cat /.glassroom-init"],
    ["sh", "-c", "cat /proc/1/mem"],  # the init is not dumpable
    ["nosuch-command"],
    ["/workspace/nosuch"],
    # what a command inherits: ignored signals (SIGPIPE, SIGXFSZ as CPython leaves
    # them), its session, limits, fds, umask
    ["sh", "-c", "while read k v; do case $k in SigIgn:|SigBlk:|Umask:) echo $k $v;; esac; "
                 "done < /proc/self/status; ls /proc/self/fd; cat /proc/self/limits"],
]


def _run_all(audit_log: Path) -> tuple[list[Any], list[Any], str]:
    runs, files = [], []
    with Sandbox({}, audit_log=audit_log, backend="namespaces") as sb:
        for argv in SHELL:
            r = sb.run(argv)
            runs.append([r.exit_code, r.stdout, r.stderr.replace("/.glassroom-init", "X")])
        sb.run(["python3", "-c",
                "import os; os.mkfifo('/workspace/p'); os.mkdir('/workspace/d');"
                "open(b'/workspace/d/\\xff\\xfe-\\xc3\\xa9', 'w').write('x')"])  # fmt: skip
        files += [
            _outcome(sb, "read", "/workspace/a"),
            _outcome(sb, "read", "/workspace/p"),  # a FIFO: refused, never blocks
            _outcome(sb, "read", "/workspace/d"),
            _outcome(sb, "read", "/workspace/missing 'q'"),
            _outcome(sb, "read", "/.glassroom/sandbox_init.py"),
            _outcome(sb, "write", "/workspace/p", b"x"),
            _outcome(sb, "write", "/usr/evil", b"x"),
            _outcome(sb, "list", "/workspace/d"),  # a non-UTF-8 name: surrogateescape
            _outcome(sb, "list", "/workspace/missing"),
            _outcome(sb, "make_dir", "/workspace/m/n/o"),
            _outcome(sb, "make_dir", "/usr/evil/dir"),
            _outcome(sb, "remove", "/workspace/d"),
            _outcome(sb, "remove", "/usr/bin"),
            _outcome(sb, "list", "/workspace/m/n"),
        ]
        walls = sb.walls
    return runs, files, walls["init"]


def test_every_outcome_is_the_same_on_both_inits(
    audit_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLASSROOM_INIT", "python")
    py_runs, py_files, which = _run_all(audit_log)
    assert which == "python"
    monkeypatch.setenv("GLASSROOM_INIT", "compiled")
    c_runs, c_files, which = _run_all(audit_log)
    assert which == "compiled"
    for argv, a, b in zip(SHELL, py_runs, c_runs, strict=True):
        if "/.glassroom-init" in " ".join(argv):
            # the binary is not there with the Python init: only the refusal counts
            assert a[0] == b[0] != 0 and "Permission denied" in b[2]
            continue
        assert a == b, argv
    assert py_files == c_files
    # the harmless twins worked, the malicious ones were refused with the path named
    assert c_runs[0][:2] == [0, "harmless\n"]
    assert c_runs[1] == [1, "", "cat: /.glassroom/landlock.py: Permission denied\n"]
    assert c_files[0] == ("ok", b"harmless\n")
    assert c_files[1][0] == "error" and "not a regular file (a FIFO); refused" in c_files[1][1][1]
    names = {e.name for e in c_files[7][1]}
    assert names == {os.fsdecode(b"\xff\xfe-\xc3\xa9")}



def test_a_build_in_the_build_dir_is_found_and_other_names_are_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The build dir (``GLASSROOM_INIT_DIR``; /var/lib/glassroom/init as root)
    outlives a reboot; a state dir's copy is looked at first.  Only a name of
    the current sources' digest runs, and ``locate`` takes no path."""
    state, builds = tmp_path / "state", tmp_path / "init"
    state.mkdir()
    monkeypatch.setenv("GLASSROOM_INIT_DIR", str(builds))
    assert agent_build.find(state) is None
    built = agent_build.find(state_dir())
    assert built is not None
    builds.mkdir()
    shutil.copy2(built, builds / built.name)
    assert agent_build.find(state) == builds / built.name
    (builds / "glassroom-init-0000000000000000").write_bytes(built.read_bytes())
    for name in ("../init/" + built.name, "x" + built.name, built.name + "/", ".."):
        assert agent_build.locate(name, state) is None
    assert agent_build.locate(built.name, state) == builds / built.name


def test_a_user_finds_roots_build_only_as_root_left_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who has not built it runs root's build (the microVM image root made
    holds it); never one that anybody but root could have written."""
    from glassroom import _config

    top = Path(tempfile.mkdtemp(prefix="glassroom-sysinit-", dir="/tmp"))
    os.chmod(top, 0o755)
    system = top / "init"
    system.mkdir(mode=0o755)
    built = agent_build.find(state_dir())
    assert built is not None
    shutil.copyfile(built, system / built.name)
    os.chmod(system / built.name, 0o755)
    monkeypatch.setattr(agent_build, "SYSTEM_DIR", system)
    monkeypatch.setattr(_config, "is_root", lambda: False)
    monkeypatch.setenv("GLASSROOM_INIT_DIR", str(top / "mine"))  # the user's own: empty
    empty = top / "state"
    empty.mkdir()
    try:
        if os.geteuid() == 0:
            assert agent_build.find(empty) == system / built.name
        os.chmod(system, 0o775)  # writable by a group: not root's alone
        assert agent_build.find(empty) is None
        os.chmod(system, 0o755)
        os.chmod(system / built.name, 0o757)
        assert agent_build.find(empty) is None
    finally:
        shutil.rmtree(top, ignore_errors=True)
