"""Attacks on the compiled in-sandbox init (``_sys/agent``), from inside the sandbox.

Each test is a pair: the harmless action works, its malicious twin is
refused with the exact error.  Every test runs on both inits (``compiled``
and ``python``) so a wall the C init weakens shows up as a one-sided failure.

Tests whose docstring starts with FINDING were found by an attack review
and failed before their fix: the gVisor init's channel reopened through
/proc/1/fd (now a socketpair), a stopped init holding ``run(timeout_s=)``
until max runtime (now the sandbox is killed: ``init.unresponsive``), and a
self-referencing marshal value that crashed the C init's repr (now bounded).
The other tests are walls that held.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom import Sandbox, SandboxError
from glassroom._config import state_dir
from glassroom._sys import agent_build


@pytest.fixture(autouse=True)
def _built() -> None:
    if agent_build.find(state_dir()) is None:
        pytest.skip("the compiled init is not built (no C compiler); CI builds it")


@pytest.fixture
def _gvisor() -> None:
    if shutil.which("runsc") is None and not os.path.exists("/usr/bin/runsc"):
        pytest.skip("runsc is not installed")
    if os.geteuid() != 0:
        pytest.skip("the gvisor tier runs as root")


def _sh(sb: Sandbox, script: str, timeout_s: float = 20) -> Any:
    return sb.run(["sh", "-c", script], timeout_s=timeout_s)


def _err(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except SandboxError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


# ---------------------------------------------------------------- namespaces tier


def test_commands_get_only_fds_0_1_2(init: str) -> None:
    """No control socket, netwatch listener, pidfd or pty master leaks into a command."""
    with Sandbox({}, backend="namespaces") as sb:
        assert sb.walls["init"] == init
        plain = _sh(sb, "ls /proc/self/fd")
        # the twin: a pty command (the relay holds the master) and a second live command
        bg = sb.spawn("sleep 5", pty=(24, 80))
        try:
            again = _sh(sb, "ls /proc/self/fd")
        finally:
            bg.signal(9)
            bg.wait(10)
    # ls's own directory fd (3) is the only extra entry
    assert plain.stdout.split() == ["0", "1", "2", "3"]
    assert again.stdout.split() == ["0", "1", "2", "3"]


def test_the_init_is_not_dumpable(init: str) -> None:
    """A same-uid command can read its own /proc entries but none of the init's."""
    with Sandbox({}, backend="namespaces") as sb:
        own = _sh(sb, "head -c 4 /proc/self/environ >/dev/null && echo own-ok")
        evil = _sh(
            sb,
            "p=$PPID; for f in environ mem maps; do head -c 1 /proc/$p/$f >/dev/null 2>&1"
            " && echo $f-READ; done; ls /proc/$p/fd >/dev/null 2>&1 && echo fd-LISTED;"
            " readlink /proc/$p/exe >/dev/null 2>&1 && echo exe-READ; echo done",
        )
    assert own.stdout == "own-ok\n"
    assert evil.stdout == "done\n"


def test_ptrace_of_the_init_is_refused(init: str) -> None:
    code = (
        "import ctypes,os,sys;l=ctypes.CDLL(None,use_errno=True);"
        "t=int(sys.argv[1]);r=l.ptrace(16,t,0,0);print(r,ctypes.get_errno())"
    )
    with Sandbox({}, backend="namespaces") as sb:
        ok = sb.run(["python3", "-c", "print('alive')"], timeout_s=20)
        evil = sb.run(["sh", "-c", f'python3 -c "{code}" $PPID'], timeout_s=20)
    assert ok.stdout == "alive\n"
    assert evil.stdout == "-1 1\n"  # PTRACE_ATTACH: EPERM


def test_the_init_binary_is_neither_readable_nor_runnable(init: str) -> None:
    with Sandbox({}, backend="namespaces") as sb:
        ok = _sh(sb, "head -c 1 /usr/bin/sh >/dev/null && echo read-ok")
        evil = _sh(
            sb,
            "head -c 1 /proc/$PPID/exe >/dev/null 2>&1 && echo exe-READ;"
            " /proc/$PPID/exe --stream </dev/null >/dev/null 2>&1; echo x=$?;"
            " head -c 1 /.glassroom-init >/dev/null 2>&1 && echo bin-READ; echo done",
        )
        write = _err(sb.files.write, "/.glassroom-init", b"x")
    assert ok.stdout == "read-ok\n"
    assert evil.stdout == "x=126\ndone\n"
    assert write == (
        "SandboxPathError: write /.glassroom-init: read-only in the sandbox (EROFS)"
    )


def test_file_ops_refuse_special_files_and_init_proc(init: str) -> None:
    prep = (
        "cd /workspace && printf hi > f && ln -s /proc/$PPID/environ penv &&"
        " ln -s /dev/zero dz && python3 -c \"import socket;"
        "socket.socket(socket.AF_UNIX).bind('/workspace/sock')\""
    )
    with Sandbox({}, backend="namespaces") as sb:
        assert _sh(sb, prep).exit_code == 0
        ok = sb.files.read("/workspace/f")
        penv = _err(sb.files.read, "/workspace/penv")
        sock = _err(sb.files.read, "/workspace/sock")
        dz = _err(sb.files.read, "/workspace/dz")
        mem = _err(sb.files.read, "/proc/self/mem")
    assert ok == b"hi"
    assert penv == (
        "SandboxPathError: read /workspace/penv: outside the sandbox's view or not "
        "allowed by the policy (EACCES)"
    )
    assert sock == "SandboxError: read /workspace/sock: [Errno 6] not a regular file; refused (ENXIO)"
    assert dz == (
        "SandboxError: read /workspace/dz: [Errno 6] not a regular file (a character "
        "device); refused (ENXIO)"
    )
    assert mem == (
        "SandboxPathError: read /proc/self/mem: outside the sandbox's view or not "
        "allowed by the policy (EACCES)"
    )


def test_odd_names_round_trip_in_listings(init: str) -> None:
    with Sandbox({}, backend="namespaces") as sb:
        _sh(sb, "cd /workspace && printf x > \"$(printf 'a\\377b')\" &&"
                " printf y > \"$(printf 'n\\nl\"q')\"")
        names = sorted(e.name for e in sb.files.list("/workspace"))
        assert sb.files.read("/workspace/a\udcffb") == b"x"
        assert sb.files.read('/workspace/n\nl"q') == b"y"
    assert names == ["a\udcffb", 'n\nl"q']


def test_nul_bytes_in_argv_and_env_do_not_run(init: str) -> None:
    with Sandbox({}, backend="namespaces") as sb:
        ok = sb.run(["echo", "a\udcffb"])
        argv = sb.run(["echo", "a\x00b"])
        env = sb.run(["echo", "a"], env={"X": "a\x00b"})
        key = sb.run(["echo", "a"], env={"X=Y": "a"})
    assert (ok.exit_code, ok.stdout_bytes) == (0, b"a\xffb\n")
    assert (argv.exit_code, argv.stdout) == (127, "")
    assert (env.exit_code, env.stdout) == (127, "")
    assert (key.exit_code, key.stdout) == (127, "")


def test_pty_sizes_are_bounded(init: str) -> None:
    with Sandbox({}, backend="namespaces") as sb:
        p = sb.spawn("sleep 3", pty=(24, 80))
        try:
            p.resize(30, 100)  # harmless
            big = _err(p.resize, 70000, 5)
            neg = _err(p.resize, -1, 5)
        finally:
            p.signal(9)
            p.wait(10)
        start = _err(lambda: sb.spawn("true", pty=(2**40, 1)))
    want = "SandboxError: pty: rows must be a whole number from 1 to 65535"
    assert big == neg == start == want


def _bounded(fn: Any, limit_s: float) -> tuple[bool, Any]:
    box: list[Any] = []
    th = threading.Thread(target=lambda: box.append(_err(fn)), daemon=True)
    th.start()
    th.join(limit_s)
    return (not th.is_alive(), box[0] if box else None)


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
def test_a_stopped_init_does_not_hang_the_host_past_the_timeout(
    init: str, backend: str, tmp_path: Path
) -> None:
    """FINDING (medium, both inits).  ``kill -STOP $PPID`` from a command stops
    the init (same uid, same Landlock domain: SCOPE_SIGNAL does not apply).  The
    host's run loop (backends/namespaces.py, the timeout branch of the run
    loop) only *asks* the init to SIGKILL the command and then waits for an
    ``exit`` that never comes: sb.run(timeout_s=3) hangs until the sandbox's
    max_runtime_s.  Fix: in run(), when no exit arrives within a grace period
    after the timeout, kill the sandbox (self.kill()) and report timed_out; and
    in run.c exec_body / sandbox_init._exec_body, restrict the command into a
    nested Landlock domain with LANDLOCK_SCOPE_SIGNAL (ABI >= 6) so it cannot
    signal the init, the pty relay or the forwarder at all.  The gVisor tier
    (backends/gvisor.py, the same wait) hangs the same way on ``kill -STOP 1``;
    there the init is pid 1 and the fix is the host-side kill on a missed exit
    (a nested Landlock domain is not available under gVisor)."""
    if backend == "gvisor" and (shutil.which("runsc") is None or os.geteuid() != 0):
        pytest.skip("the gvisor tier needs runsc and root")
    log = tmp_path / "audit.jsonl"
    sb = Sandbox({}, backend=backend, audit_log=log)
    try:
        ok = _sh(sb, "echo hi", timeout_s=3)
        assert ok.stdout == "hi\n"
        done, _ = _bounded(lambda: _sh(sb, "kill -STOP $PPID; sleep 30", timeout_s=3), 20)
    finally:
        threading.Thread(target=sb.destroy, daemon=True).start()
    assert done, "sb.run(timeout_s=3) still blocked 20 s after the init was stopped"
    said = [r for r in records(log, sb.id) if r.get("rule") == "init.unresponsive"]
    assert [(r["event"], r["decision"]) for r in said] == [("anomaly", "deny")]


def test_a_killed_init_ends_the_sandbox_not_the_host(init: str) -> None:
    with Sandbox({}, backend="namespaces") as sb:
        assert _sh(sb, "echo x").stdout == "x\n"
        try:  # the init may die before or after it reports the start
            r = _sh(sb, "kill -KILL $PPID; sleep 5", timeout_s=10)
            first = f"{r.exit_code} {r.signal}"
        except SandboxError as exc:
            first = f"{type(exc).__name__}: {exc}"
        after = _err(lambda: _sh(sb, "echo x"))
    assert first == "137 9" or first.endswith("(sandbox exited)")
    assert after.startswith("SandboxClosed: sandbox ") and after.endswith("(sandbox exited)")


# ---------------------------------------------------------------- gVisor tier

FORGE = r"""
import json, os, struct, sys, time
try:
    fd = os.open("/proc/1/fd/1", os.O_WRONLY)
except OSError as exc:
    print("refused", exc.errno, file=sys.stderr)
else:
    p = b"FORGED\n"
    os.write(fd, b"O" + struct.pack(">II", 1, len(p)) + p)
    j = json.dumps({"op": "exit", "id": 1, "code": 0, "signal": None}).encode()
    os.write(fd, b"J" + struct.pack(">II", 1, len(j)) + j)
    time.sleep(2)
sys.exit(7)
"""

OPEN_INIT_FDS = r"""
import os
for n in (0, 1):
    for mode in (os.O_RDONLY, os.O_WRONLY):
        try:
            os.close(os.open("/proc/1/fd/%d" % n, mode))
            print(n, mode, "OPEN")
        except OSError as exc:
            print(n, mode, exc.errno)
"""


@pytest.mark.usefixtures("_gvisor")
def test_gvisor_commands_cannot_open_the_inits_control_stream(init: str) -> None:
    """FINDING (high, both inits).  Under gVisor, PR_SET_DUMPABLE(0) does not
    stop a same-uid command from opening /proc/1/fd/0 and /proc/1/fd/1: the
    init's stdin/stdout, which are the whole host<->init channel.  The command
    can read the host's frames (other requests' stdin, file-write payloads,
    env) and write frames of its own.  Fix: in backends/_gvisor_spec.py run the
    init as a uid other than the commands' (e.g. 0 with every capability but
    CAP_SETUID/CAP_SETGID dropped) and in stream.c / init_stream.py switch each
    child to the agent uid (setresgid/setresuid) before exec, so the /proc/1
    access check fails; or give the init non-reopenable stdio (a socketpair
    instead of pipes) in backends/gvisor.py.  Fixed the second way."""
    with Sandbox({}, backend="gvisor") as sb:
        assert sb.walls["init"] == init
        own = sb.run(["python3", "-c", "import os;os.close(os.open('/proc/self/fd/1',1));print('ok')"],
                     timeout_s=20)
        evil = sb.run(["python3", "-c", OPEN_INIT_FDS], timeout_s=20)
    assert own.stdout == "ok\n"
    # ENXIO on each: the channel is a socketpair (backends/gvisor.py, _launch),
    # and a socket cannot be opened through /proc
    assert evil.stdout == "0 0 6\n0 1 6\n1 0 6\n1 1 6\n"


@pytest.mark.usefixtures("_gvisor")
def test_gvisor_a_command_cannot_forge_its_own_exit(init: str) -> None:
    """FINDING (high, both inits): the consequence of the one above.  The
    command writes an ``O`` frame and a ``J`` exit frame for its own request id
    (1: the first request) into /proc/1/fd/1; the host reports exit 0 with the
    forged output after ~0.3 s while the real command still runs (it exits 7
    later, unobserved: no timeout or output cap applies to it any more).  Fix:
    as above."""
    with Sandbox({}, backend="gvisor") as sb:
        r = sb.run(["python3", "-c", FORGE], timeout_s=20)
    assert "FORGED" not in r.stdout
    assert r.exit_code == 7
    assert r.stderr == "refused 6\n"


@pytest.mark.usefixtures("_gvisor")
def test_gvisor_commands_get_only_fds_0_1_2_and_cannot_read_init_mem(init: str) -> None:
    with Sandbox({}, backend="gvisor") as sb:
        fds = _sh(sb, "ls /proc/self/fd")
        mem = _sh(sb, "head -c 1 /proc/self/status >/dev/null && echo own-ok;"
                      " head -c 1 /proc/1/mem >/dev/null 2>&1 || echo mem-denied")
    assert fds.stdout.split() == ["0", "1", "2", "3"]
    assert mem.stdout == "own-ok\nmem-denied\n"


@pytest.mark.usefixtures("_gvisor")
def test_gvisor_fake_frames_in_output_are_just_bytes(init: str) -> None:
    """Frame-looking bytes on a command's own stdout are data, not frames."""
    with Sandbox({}, backend="gvisor") as sb:
        r = _sh(sb, "printf 'J\\000\\000\\000\\001\\000\\000\\000\\002{}'; exit 3")
    assert (r.exit_code, r.stdout_bytes) == (3, b"J\x00\x00\x00\x01\x00\x00\x00\x02{}")


FLOOD = r"""
import socket, time
c = []
for i in range(450):
    try:
        c.append(socket.create_connection(("127.0.0.1", 3128), timeout=1))
    except OSError:
        break
held = len(c)
for k in c:
    k.close()
time.sleep(0.5)
k = socket.create_connection(("127.0.0.1", 3128), timeout=5)
k.settimeout(5)
k.sendall(b"GET http://10.0.0.1/ HTTP/1.0\r\nHost: 10.0.0.1\r\n\r\n")
print(held >= 400, k.recv(24))
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("1.1.1.1", 80))
    print("direct OK")
except OSError as exc:
    print("direct", exc.errno)
"""


def test_the_forwarder_survives_a_connection_flood(init: str) -> None:
    """MAX_CONNS (400) held open: the forwarder stops accepting, then recovers;
    a direct connection has no route."""
    with Sandbox('[network]\nallow=["example.com"]\n', backend="namespaces") as sb:
        ok = sb.run(["python3", "-c", "print(1)"], timeout_s=10)
        r = sb.run(["python3", "-c", FLOOD], timeout_s=60)
    assert ok.stdout == "1\n"
    assert r.stdout == "True b'HTTP/1.1 403 Forbidden\\r\\n'\ndirect 101\n"


# ---------------------------------------------------------------- the binary itself


def _talk(second: bytes) -> tuple[bytes, int]:
    """Run the built init on a socketpair (as bwrap would), configure it with an
    empty Landlock ruleset, send one more message; its reply and exit status."""
    import socket
    import subprocess

    binary = agent_build.find(state_dir())
    assert binary is not None
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([str(binary), str(b.fileno())], pass_fds=[b.fileno()],
                            stdin=subprocess.DEVNULL)
    b.close()
    try:
        import marshal

        a.settimeout(5)
        a.send(marshal.dumps({"op": "config", "read": [], "write": [], "execute": [],
                              "devices": [], "listable": [], "rlimits": {}}))
        assert a.recv(4096).startswith(b'{"op":"ready"')
        a.send(second)
        try:
            reply = a.recv(4096)
        except OSError:
            reply = b""
    finally:
        a.close()
        status = proc.wait(10)
    return reply, status


def test_a_self_referencing_marshal_value_does_not_crash_the_init() -> None:
    """FINDING (low, compiled only).  marshal.c registers a FLAG_REF container
    before its items are read, so ``r`` can point a list at itself (Python's
    marshal does the same: ``{'op': [[...]]}``).  handle() then calls
    py_repr_value() for "unknown op ...", which recurses without end: SIGSEGV
    (status -11).  The Python init answers ``unknown op [[...]]``.  The
    namespaces tier's channel is the host's, but the same reader and repr
    serve stream.c, whose stdin a command can open on gVisor (see above).
    Fix: json.c py_repr_value: a depth bound / visited set printing ``[...]``
    (and ``{...}``) as CPython's reprlib guard does."""
    ok, ok_status = _talk(marshal_dumps({"op": ["x"]}))
    assert (ok, ok_status) == (b'{"op":"error","id":0,"errno":22,"error":"unknown op [\'x\']"}', 0)
    selfref = b"{Z\x02op" + bytes([ord("[") | 0x80]) + b"\x01\x00\x00\x00r\x00\x00\x00\x000"
    reply, status = _talk(selfref)
    assert status == 0, f"the init died with status {status}"
    assert reply == b'{"op":"error","id":0,"errno":22,"error":"unknown op [[...]]"}'


def marshal_dumps(v: Any) -> bytes:
    import marshal

    return marshal.dumps(v)


@pytest.mark.parametrize("backend", ["namespaces", "gvisor"])
def test_output_is_capped_and_orphans_do_not_hold_a_run(init: str, backend: str) -> None:
    if backend == "gvisor" and (shutil.which("runsc") is None or os.geteuid() != 0):
        pytest.skip("the gvisor tier needs runsc and root")
    with Sandbox({}, backend=backend) as sb:
        small = _sh(sb, "head -c 1000 /dev/zero")
        flood = _sh(sb, "head -c 50000000 /dev/zero; echo x")
        orphan = _sh(sb, "(sleep 20 &); (sleep 20 >/dev/null 2>&1 &); echo bye", timeout_s=10)
    assert (small.exit_code, len(small.stdout_bytes), small.truncated) == (0, 1000, False)
    assert (len(flood.stdout_bytes), flood.truncated, flood.timed_out) == (1 << 20, True, False)
    assert (orphan.exit_code, orphan.stdout, orphan.timed_out) == (0, "bye\n", False)
    assert orphan.duration_ms < 5000
