"""Landlock, applied for real in a child interpreter (never to the test process).

Each security check is a pair: the allowed twin works, the denied one fails
with the exact errno.  The child imports ``landlock`` from its file (as the
sandbox init does) and imports everything it needs BEFORE restricting itself.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import glassroom._sys.landlock as landlock

LANDLOCK_DIR = str(Path(landlock.__file__).parent)
ABI = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason="Landlock not available")
LOADER = os.path.realpath("/lib64/ld-linux-x86-64.so.2")

PRELUDE = textwrap.dedent(
    f"""
    import errno, json, os, signal, sys, time
    sys.path.insert(0, {LANDLOCK_DIR!r})
    import landlock
    out = {{}}
    def attempt(name, fn):
        try:
            fn()
            out[name] = 0
        except OSError as exc:
            out[name] = exc.errno
    """
)


RESTRICT = "out['abi'] = landlock.restrict(**json.loads(os.environ['LL_ARGS']))\n"


def run_restricted(body: str, *, restrict: bool = True, **kwargs: object) -> dict[str, int]:
    code = PRELUDE + (RESTRICT if restrict else "") + textwrap.dedent(body)
    code += "\nprint(json.dumps(out))"
    env = {"LL_ARGS": json.dumps(kwargs), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    result: dict[str, int] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def test_abi_version_is_an_int() -> None:
    assert isinstance(ABI, int) and ABI >= 0


@needs_landlock
def test_read_allowed_and_denied(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "f").write_text("ok")
    secret = tmp_path / "secret"
    secret.write_text("no")
    out = run_restricted(
        f"""
        attempt("read_allowed", lambda: open({str(allowed / "f")!r}).read())
        attempt("list_allowed", lambda: os.listdir({str(allowed)!r}))
        attempt("read_denied", lambda: open({str(secret)!r}).read())
        attempt("read_etc", lambda: open("/etc/hostname").read())
        attempt("write_in_read_dir", lambda: open({str(allowed / "g")!r}, "w"))
        """,
        read=[str(allowed)],
        write=[],
        execute=[],
    )
    assert out["abi"] == ABI
    assert out["read_allowed"] == 0
    assert out["list_allowed"] == 0
    assert out["read_denied"] == 13  # EACCES
    assert out["read_etc"] == 13
    assert out["write_in_read_dir"] == 13


@needs_landlock
def test_write_allowed_and_denied(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "existing").write_text("keep")
    out = run_restricted(
        f"""
        def write_and_remove():
            with open({str(work / "new")!r}, "w") as f:
                f.write("x")
            os.mkdir({str(work / "d")!r})
            os.rename({str(work / "new")!r}, {str(work / "d" / "moved")!r})
            os.truncate({str(work / "d" / "moved")!r}, 0)
            os.unlink({str(work / "d" / "moved")!r})
            os.rmdir({str(work / "d")!r})
        attempt("write_allowed", write_and_remove)
        attempt("create_denied", lambda: open({str(ro / "new")!r}, "w"))
        attempt("modify_denied", lambda: open({str(ro / "existing")!r}, "a"))
        attempt("unlink_denied", lambda: os.unlink({str(ro / "existing")!r}))
        attempt("mknod_fifo_allowed", lambda: os.mkfifo({str(work / "fifo")!r}))
        """,
        read=[str(ro)],
        write=[str(work)],
        execute=[],
    )
    assert out["write_allowed"] == 0
    assert out["mknod_fifo_allowed"] == 0
    assert out["create_denied"] == 13
    assert out["modify_denied"] == 13
    assert out["unlink_denied"] == 13
    assert (ro / "existing").read_text() == "keep"


@needs_landlock
def test_execute_allowed_and_denied() -> None:
    # ld.so is opened with FMODE_EXEC by the kernel, so it needs EXECUTE too.
    out = run_restricted(
        """
        def run(path):
            pid = os.posix_spawn(path, [path], {})
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        attempt("true", lambda: run("/usr/bin/true"))
        attempt("ls", lambda: run("/usr/bin/ls"))
        """,
        read=["/usr", "/lib", "/lib64", "/etc"],
        write=[],
        execute=["/usr/bin/true", LOADER],
    )
    assert out["true"] == 0
    assert out["ls"] == 13


@needs_landlock
def test_device_dir_rules_on_files_and_dirs() -> None:
    out = run_restricted(
        """
        def use_null():
            with open("/dev/null", "r+b", buffering=0) as f:
                f.write(b"x")
        attempt("dev_null", use_null)
        attempt("mknod_char", lambda: os.mknod("/dev/shm/glassroom-x", 0o600 | 0o020000, 0))
        """,
        read=[],
        write=[],
        execute=[],
        devices=["/dev"],
    )
    assert out["dev_null"] == 0
    assert out["mknod_char"] in (1, 13)  # EACCES from Landlock (EPERM if no CAP_MKNOD)


@pytest.mark.skipif(ABI < 6, reason="signal scoping needs Landlock ABI 6")
def test_signal_scope_blocks_outside_allows_own_child() -> None:
    outside = subprocess.Popen(["sleep", "30"])
    try:
        out = run_restricted(
            f"""
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            attempt("kill_own_child", lambda: os.kill(child, signal.SIGKILL))
            os.waitpid(child, 0)
            attempt("kill_outside", lambda: os.kill({outside.pid}, signal.SIGKILL))
            """,
            read=[],
            write=[],
            execute=[],
        )
        assert out["kill_own_child"] == 0
        assert out["kill_outside"] == 1  # EPERM
        assert outside.poll() is None
        out = run_restricted(
            f"attempt('unscoped', lambda: os.kill({outside.pid}, 0))\n",
            read=[],
            write=[],
            execute=[],
            scope=False,
        )
        assert out["unscoped"] == 0
    finally:
        outside.kill()
        outside.wait()


@needs_landlock
def test_missing_path_names_path_and_list(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    out = run_restricted(
        f"""
        try:
            landlock.restrict(read=[], write=[{missing!r}], execute=[])
            out["raised"] = 0
        except OSError as exc:
            out["raised"] = exc.errno
            out["names"] = int({missing!r} in str(exc) and "write" in str(exc)
                               and "landlock" in str(exc))
        """,
        restrict=False,
    )
    assert out == {"raised": 2, "names": 1}


def test_import_is_stdlib_only() -> None:
    res = subprocess.run(
        [
            "/usr/bin/python3",
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {LANDLOCK_DIR!r}); before = set(sys.modules);"
            "import landlock; print(sorted(set(sys.modules) - before))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    new = set(ast.literal_eval(res.stdout))
    forbidden = {"glassroom", "pydantic", "json", "re", "socket", "typing", "__future__"}
    assert "landlock" in new
    assert not new & forbidden, new & forbidden
