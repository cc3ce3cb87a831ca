"""The compiled tracer (``glassroom-init --tracer``) against ``_sys/tracer.py``.

The same tracee runs twice from the same directory, once under each tracer,
and the two record streams must be the same, key for key and in order (pids
renumbered by first appearance): opens that work and fail, relative paths
joined to their dir, a bad pointer, names that are not UTF-8, a buffer
rewritten between the seccomp stop and the call, and a fork and exec with an
argv.  Then the protocol: a bad config, a pid that cannot be seized, ``sync``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from glassroom._config import state_dir
from glassroom._sys import agent_build, tracewatch
from glassroom._sys import tracer as py_tracer

LEVEL = "syscalls"

#: The tracee: imports first, then waits on the gate until it is seized, then
#: installs the trace filter and does its work (every call from here is traced).
TRACEE = r"""
import ctypes, os, sys, subprocess, threading
from glassroom._sys import init_net
gate = int(sys.argv[1]); bpf = bytes.fromhex(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # PR_SET_PTRACER_ANY (Yama)
os.read(gate, 1)
init_net.install_trace(bpf)
os.mkdir("d", 0o750)
fd = os.open("d/a.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640); os.close(fd)
for p in ("d/a.txt", os.path.abspath("d/a.txt"), "missing", "d/../d/./a.txt"):
    try: os.close(os.open(p, os.O_RDONLY))
    except OSError: pass
dfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY)
os.close(os.open("b.txt", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600, dir_fd=dfd))
os.rename("d/b.txt", "d/c.txt"); os.symlink("c.txt", "d/link"); os.link("d/c.txt", "d/hard")
os.stat("d/link"); os.lstat("d/link"); os.access("d/c.txt", os.W_OK); os.readlink("d/link")
os.chmod("d/c.txt", 0o4755); os.truncate("d/c.txt", 3); os.utime("d/c.txt")
fd = os.open("d/c.txt", os.O_RDWR); os.fchmod(fd, 0o600); os.ftruncate(fd, 1); os.close(fd)
for name in (b"d/\xff\xfe-not-utf8", "d/caf\u00e9-\U0001f600".encode(), b"d/back\\xff", b"d/q\"t\x01"):
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644))
try: os.close(os.open("d/tmp", os.O_TMPFILE | os.O_WRONLY, 0o600))
except OSError: pass
libc.syscall(257, -100, ctypes.c_void_p(1), 0)  # openat(AT_FDCWD, a bad pointer)
libc.syscall(257, -100, ctypes.c_void_p(0), 0)  # and NULL
libc.syscall(93, -100, 0, 0)  # fchown(AT_FDCWD): an fd argument, EBADF, never "the cwd"
libc.syscall(91, -100, 0o600)  # fchmod(AT_FDCWD)
buf = ctypes.create_string_buffer(b"d/c.txt")
libc.syscall(87, buf)  # unlink, a buffer nobody rewrites
os.unlink("d/hard"); os.unlink("d/link"); os.rmdir("d") if False else None
try: os.rmdir("d")
except OSError: pass
os.mkdir("d/" + "x" * 200)
os.chdir("d"); os.open("a.txt", os.O_RDONLY); os.chdir("..")
r = subprocess.run(["/bin/sh", "-c", "exec /bin/true one 'two words' $0", "caf\u00e9"], close_fds=True)
subprocess.run([b"/bin/true", b"\xff\xfe"], close_fds=True)
subprocess.run([b"/bin/true", b"\xfe" * 1100, b"y" * 1100], close_fds=True)  # past MAX_ARG
try: subprocess.run(["/no/such/tool", "x"])
except OSError: pass
"""


def _tracers() -> dict[str, list[str]]:
    binary = agent_build.find(state_dir())
    if binary is None:
        pytest.skip("the compiled init is not built (no C compiler); CI builds it")
    return {
        "python": [sys.executable, "-I", "-S", str(Path(py_tracer.__file__))],
        "compiled": [str(binary), "--tracer"],
    }


def _trace(argv: list[str], work: Path) -> list[dict[str, Any]]:
    """Run the tracee in a fresh ``work`` under the tracer ``argv``; its records."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bpf = tracewatch.filter_program(LEVEL)
    gate_r, gate_w = os.pipe()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    tracee = subprocess.Popen([sys.executable, "-c", TRACEE, str(gate_r), bpf.hex()],
                              cwd=work, pass_fds=(gate_r,), env=env)  # fmt: skip
    os.close(gate_r)
    tr = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)  # fmt: skip
    assert tr.stdin is not None and tr.stdout is not None
    try:
        cfg = {"pid": tracee.pid,
               "syscalls": {str(k): v for k, v in tracewatch.syscall_table(LEVEL).items()}}
        tr.stdin.write(json.dumps(cfg).encode() + b"\n")
        tr.stdin.flush()
        assert json.loads(tr.stdout.readline()) == {"attached": tracee.pid}
        os.write(gate_w, b"g")
        assert tracee.wait(timeout=120) == 0
        out, _ = tr.communicate(timeout=60)  # it ends when no tracee is left
        assert tr.returncode == 0
    finally:
        os.close(gate_w)
        for p in (tracee, tr):
            if p.poll() is None:
                p.kill()
                p.wait()
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    # pids differ from run to run: number them by first appearance
    seen: dict[int, int] = {}
    for r in records:
        for key in ("pid", "ppid"):
            if key in r:
                r[key] = seen.setdefault(r[key], len(seen))
    # one process's records keep their order; processes interleave freely
    return sorted(records, key=lambda r: r["pid"])


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("tracer") / "work"
    return {name: _trace(argv, work) for name, argv in _tracers().items()}


def test_the_compiled_tracer_writes_what_the_python_tracer_writes(
    both: dict[str, list[dict[str, Any]]],
) -> None:
    py, c = both["python"], both["compiled"]
    assert len(py) > 40
    for i, (a, b) in enumerate(zip(py, c, strict=False)):
        assert list(a.items()) == list(b.items()), f"record {i}"
    assert len(py) == len(c)


def test_what_the_records_show(both: dict[str, list[dict[str, Any]]]) -> None:
    """The harmless and the hostile calls are there, with their results (on the compiled one)."""
    recs = both["compiled"]
    paths = {r.get("path") for r in recs}
    assert any(p and p.endswith("/d/\\xff\\xfe-not-utf8") for p in paths)
    assert any(p and p.endswith("/d/caf\u00e9-\U0001f600") for p in paths)
    bad = [r for r in recs if r.get("path_unreadable")]
    assert len(bad) == 2 and {r["result"] for r in bad} == {"EFAULT"}
    missing = [r for r in recs if (r.get("path") or "").endswith("/missing")]
    assert missing and missing[0]["result"] == "ENOENT"
    setuid = [r for r in recs if r["syscall"] == "chmod" and r.get("mode") == "0o4755"]
    assert setuid and setuid[0]["result"] == "ok"
    execs = [r for r in recs if r["syscall"] == "execve" and r["result"] == "ok"]
    assert any(r.get("argv") == ["/bin/true", "one", "two words", "caf\u00e9"] for r in execs)
    assert any(r.get("argv") == ["/bin/true", "\\xff\\xfe"] for r in execs)
    assert all("ppid" in r and "parent" in r for r in execs)
    assert [r["result"] for r in recs if r.get("path") == "/no/such/tool"] == ["ENOENT"]
    fd_calls = [r for r in recs if r["syscall"] in ("fchown", "fchmod") and r["result"] == "EBADF"]
    assert [r["path"] for r in fd_calls] == ["<fd/4294967196>"] * 2, fd_calls
    long = [r for r in execs if len(r.get("argv", [])) == 3 and r["argv"][2] == "y" * 1024]
    assert long and long[0]["argv"][1] == "\\xfe" * 256 and "argv_arg" not in long[0], long


def _tracer_says(argv: list[str], first: bytes) -> tuple[int, list[Any]]:
    p = subprocess.run(argv, input=first, capture_output=True, timeout=30)
    return p.returncode, [json.loads(line) for line in p.stdout.splitlines()]


@pytest.mark.parametrize("which", ["python", "compiled"])
def test_a_bad_config_is_refused(which: str) -> None:
    argv = _tracers()[which]
    for first in (b"not json\n", b'{"pid": 1}\n', b'{"syscalls": {}}\n', b"\n"):
        code, said = _tracer_says(argv, first)
        assert code == 2 and len(said) == 1 and said[0]["error"].startswith("bad config"), first


@pytest.mark.parametrize("which", ["python", "compiled"])
def test_a_pid_that_cannot_be_seized(which: str) -> None:
    argv = _tracers()[which]
    code, said = _tracer_says(argv, b'{"pid": 999999999, "syscalls": {"257": "openat"}}\n')
    assert code == 1 and said == [{"error": "[Errno 3] ptrace(SEIZE, 999999999): No such process"}]


@pytest.mark.parametrize("which", ["python", "compiled"])
def test_sync_answers_after_what_was_seen_and_eof_ends_it(which: str) -> None:
    argv = _tracers()[which]
    sleeper = subprocess.Popen(["sleep", "30"])
    tr = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert tr.stdin is not None and tr.stdout is not None
    try:
        tr.stdin.write(json.dumps({"pid": sleeper.pid, "syscalls": {"257": "openat"}}).encode()
                       + b"\n")  # fmt: skip
        tr.stdin.flush()
        assert json.loads(tr.stdout.readline()) == {"attached": sleeper.pid}
        tr.stdin.write(b"sync 7\nsync x\nsync 8\n")
        tr.stdin.flush()
        raw = b""
        end = time.monotonic() + 10
        while raw.count(b"\n") < 2 and time.monotonic() < end:
            if select.select([tr.stdout], [], [], 1)[0]:
                raw += os.read(tr.stdout.fileno(), 4096)
        assert [json.loads(line) for line in raw.splitlines()] == [{"synced": 7}, {"synced": 8}]
        tr.stdin.close()  # the host is gone: the tracer ends, EXITKILL ends the tracee
        assert tr.wait(timeout=10) == 3
        assert sleeper.wait(timeout=10) == -9
    finally:
        for p in (sleeper, tr):
            if p.poll() is None:
                p.kill()
                p.wait()
