"""Attacks on the guest agents (the compiled ``_sys/agent/guest.c`` and
``guest/agent.py``, pid 1 of the VM) from inside its sandbox, and requests
that used to wedge them.

Every request the agent handles runs in its one main loop, so anything that
makes that loop block stops the whole sandbox answering: later commands,
file ops, and the ``signal`` a timeout sends.  Each test pairs the harmless
request, which works, with its hostile twin, which must leave the agent
serving (within seconds, not at the command's or the VM's end) and give the
task nothing.  Few VMs: several pairs share one sandbox.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import records
from glassroom import Sandbox, SandboxError
from glassroom._config import state_dir
from glassroom._sys import agent_build
from glassroom.backends.microvm import qemu

POLICY: dict[str, Any] = {"risk": "maximum"}


@pytest.fixture(autouse=True)
def _built(init: str) -> None:
    """Each test on both guest agents (conftest's ``init``): the Python one had
    the same blocking reads and got the same fixes."""
    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    if agent_build.find(state_dir()) is None:
        pytest.skip("the compiled agent is not built (no C compiler); CI builds it")


def _timed_echo(sb: Sandbox, word: str) -> float:
    t = time.monotonic()
    r = sb.run(["echo", word], timeout_s=60)
    assert (r.exit_code, r.stdout) == (0, f"{word}\n"), r
    return time.monotonic() - t


#: A descendant that leaves the process group (so the exit's killpg misses it)
#: and writes its inherited stdout as fast as it can, for 40 s.
ESCAPED_WRITER = r"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        b = b"y" * 65536
        t = time.time()
        while time.time() - t < 40:
            try:
                os.write(1, b)
            except OSError:
                break
        os._exit(0)
    os._exit(0)
time.sleep(0.5)
"""


def test_stdin_a_command_never_reads_and_an_escaped_writer_do_not_stop_the_agent(init: str) -> None:
    with Sandbox(POLICY) as sb:
        assert sb.walls["init"] == init
        # harmless: stdin larger than a pipe reaches a command that reads it, all of it
        data = bytes(range(256)) * 1200  # 300 KiB
        r = sb.run(["sh", "-c", "sleep 1; wc -c"], stdin=data, timeout_s=60)
        assert (r.exit_code, r.stdout.strip()) == (0, str(len(data))), r
        digest = "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"
        r = sb.run(["python3", "-c", digest], stdin=data, timeout_s=60)
        assert r.stdout == hashlib.sha256(data).hexdigest() + "\n", r
        # hostile: a command that never reads its stdin, given more than a pipe holds.
        # The agent used to block in write(2) until the command ended: a later
        # request waited the whole 30 s, and so would the timeout's SIGKILL.
        p = sb.spawn(["sleep", "30"])
        p.write_stdin(b"x" * 300_000)
        assert _timed_echo(sb, "served") < 10
        p.signal(9)
        res = p.wait(20)
        assert res is not None and res.signal == 9, res
        # the same with eof after the data: the close waits for the queue, nothing hangs
        p = sb.spawn(["sh", "-c", "sleep 2; wc -c"])
        p.write_stdin(b"z" * 200_000)
        p.close_stdin()
        assert _timed_echo(sb, "served2") < 10
        res = p.wait(60)
        assert res is not None and res.exit_code == 0 and res.stdout.strip() == b"200000", res
        # hostile: an escaped descendant floods the command's stdout after it exits.
        # The agent's drain of the pipe used to go on as long as the writer (40 s).
        t = time.monotonic()
        p = sb.spawn(["python3", "-c", ESCAPED_WRITER])
        res = p.wait(60)
        assert res is not None, "no exit frame"
        assert time.monotonic() - t < 15, time.monotonic() - t
        assert _timed_echo(sb, "after-flood") < 10


#: From inside: SIGSTOP every uid-1000 process that is not this one, while
#: file ops run (a stopped file child used to block the agent's loop for ever
#: on kernels without Landlock's signal scope; ABI 6 refuses the signal).
STOPPER = r"""
import os, signal, time
me, sent, refused = os.getpid(), 0, 0
t = time.time()
while time.time() - t < 12:
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in (me, 1):
            continue
        try:
            os.kill(int(d), signal.SIGSTOP)
            sent += 1
        except PermissionError:
            refused += 1
        except ProcessLookupError:
            pass
print(sent, refused, flush=True)
"""


def test_file_ops_survive_a_setuid_mode_and_a_stopper(init: str, audit_log: Path) -> None:
    with Sandbox(POLICY, audit_log=audit_log) as sb:
        # harmless: a mode without setuid bits
        sb.files.write("/workspace/ok.sh", b"#!/bin/sh\necho ok\n", mode=0o755)
        assert sb.files.read("/workspace/ok.sh") == b"#!/bin/sh\necho ok\n"
        assert sb.run(["stat", "-c", "%a", "/workspace/ok.sh"]).stdout == "755\n"
        # hostile: a setuid mode.  The file child's open(O_CREAT, 04755) is a call
        # the agent's own listener must answer, while the agent waited on that
        # child: it deadlocked until the VM's max runtime.  Now refused (EPERM).
        t = time.monotonic()
        with pytest.raises(SandboxError):
            sb.files.write("/workspace/s", b"x", mode=0o4755)
        assert time.monotonic() - t < 20
        st = sb.run(["sh", "-c", "stat -c %a /workspace/s 2>/dev/null || echo absent"])
        assert st.stdout == "absent\n", st
        assert _timed_echo(sb, "after-suid") < 10
        sid = sb.id
        # hostile: a task that SIGSTOPs everything of its uid while file ops run.
        # Landlock ABI 6 (signal scope) refuses every such signal, so the ops all
        # work; on an older kernel a stopped file child is killed (the op fails
        # with an error), never left to block the agent.
        abi = sb.run(["python3", "-c", "import ctypes; print(ctypes.CDLL(None).syscall(444, 0, 0, 1))"])
        sb.files.write("/workspace/big", b"q" * (4 << 20))
        p = sb.spawn(["python3", "-c", STOPPER])
        time.sleep(1)
        t = time.monotonic()
        failed = 0
        for _ in range(4):
            try:
                assert len(sb.files.read("/workspace/big", max_bytes=8 << 20)) == 4 << 20
                sb.files.write("/workspace/w", b"w" * 100_000)
            except SandboxError:
                failed += 1
        assert time.monotonic() - t < 50
        res = p.wait(60)
        assert res is not None and res.exit_code == 0, res
        sent, refused = (int(x) for x in res.stdout.split())
        if int(abi.stdout) >= 6:
            assert (sent, failed) == (0, 0) and refused > 0, (sent, refused, failed)
        assert _timed_echo(sb, "after-stopper") < 10
    blocked = [r for r in records(audit_log, sid) if r["event"] == "blocked"]
    assert any(r["rule"] == "filesystem.setuid" for r in blocked), blocked


#: Direct network attempts with crafted sockaddr pointers: the agent reads them
#: from /proc/PID/mem for its report.  None may crash or stall it; the valid one
#: is reported.  Then: signals to pid 1, an orphan/zombie flood, fds.
NETWATCH = r"""
import ctypes, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
good = struct.pack("<H", 2) + struct.pack(">H", 9) + bytes([192, 0, 2, 1]) + bytes(8)
gbuf = ctypes.create_string_buffer(good, 16)
bad_ptrs = [0, 1, 0xdeadbeef000, (1 << 47) - 8, 0xffffffffffff0000]
for ptr in bad_ptrs:
    for ln in (0, 1, 2, 16, 128, 0xffffffff, -1):
        libc.syscall(42, s.fileno(), ctypes.c_void_p(ptr), ctypes.c_long(ln))
        libc.syscall(44, d.fileno(), gbuf, 1, 0, ctypes.c_void_p(ptr), ctypes.c_long(ln))
        # sendmsg: a msghdr that is itself unmapped, and one whose name is
        libc.syscall(46, d.fileno(), ctypes.c_void_p(ptr), 0)
        hdr = ctypes.create_string_buffer(struct.pack("=QI4xQQQQi4x", ptr, ln & 0xffffffff,
                                                      0, 0, 0, 0, 0), 56)
        libc.syscall(46, d.fileno(), hdr, 0)
        libc.syscall(307, d.fileno(), hdr, 1, 0)
# a bad fd number with a good address
libc.syscall(42, 987654, gbuf, 16)
libc.syscall(42, -5, gbuf, 16)
# a sockaddr that ends at the edge of a mapping
import mmap
m = mmap.mmap(-1, 4096)
edge = ctypes.addressof(ctypes.c_char.from_buffer(m)) + 4096 - 4
ctypes.memmove(edge, good[:4], 4)
libc.syscall(42, s.fileno(), ctypes.c_void_p(edge), 16)
# the one a report is for
try:
    s.connect(("192.0.2.1", 9))
except OSError as e:
    print("connect", e.errno)
# pid 1 is root: no signal reaches it
for sig in (9, 19, 15, 17, 1):
    try:
        os.kill(1, sig)
        print("signalled pid 1 with", sig)
    except PermissionError:
        pass
print("done")
"""

ORPHANS = r"""
import os, time
made = 0
while made < 300:
    try:
        pid = os.fork()
    except BlockingIOError:  # pids.max: the guest cgroup's limit holds
        time.sleep(0.02)
        continue
    if pid == 0:
        try:
            if os.fork() == 0:
                os._exit(0)  # an orphan for pid 1, a zombie until it reaps it
        except BlockingIOError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    made += 1
print("forked", made)
"""


def test_netwatch_pointers_signals_orphans_and_fds(init: str, audit_log: Path) -> None:
    with Sandbox(POLICY, audit_log=audit_log) as sb:
        sid = sb.id
        r = sb.run(["python3", "-c", NETWATCH], timeout_s=120)
        assert r.exit_code == 0 and "done" in r.stdout, r
        assert "signalled pid 1" not in r.stdout, r
        assert "connect" in r.stdout, r  # ENETUNREACH: the guest has no route
        assert _timed_echo(sb, "after-netwatch") < 10
        # orphans are reparented to pid 1 and reaped: no zombie is left behind
        r = sb.run(["python3", "-c", ORPHANS], timeout_s=120)
        assert (r.exit_code, r.stdout) == (0, "forked 300\n"), r
        time.sleep(1)
        z = sb.run(["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null | awk '$3==\"Z\"' | wc -l"])
        assert z.stdout.strip() == "0", z
        # a command holds only its own 0/1/2: nothing of the agent's (the port,
        # other commands' pipes, the watch listener)
        other = sb.spawn(["sleep", "20"])
        fds = sb.run(["sh", "-c", "ls /proc/self/fd; readlink /proc/self/fd/* 2>/dev/null"])
        names = fds.stdout.split()
        assert [n for n in names if n.isdigit()] == ["0", "1", "2", "3"], fds
        assert not any("virtio" in n or "vport" in n or "anon_inode" in n for n in names), fds
        # pid 1's memory, fds and environment are not the task's
        peek = ("import os\nfor p in ('mem', 'environ', 'fd/0', 'fd/3'):\n"
                "    try:\n        open('/proc/1/' + p, 'rb').read(1); print(p)\n"
                "    except OSError:\n        pass\n"
                "for p in ('fd', 'root', 'cwd', 'map_files'):\n"
                "    try:\n        os.listdir('/proc/1/' + p); print(p)\n"
                "    except OSError:\n        pass\n")  # fmt: skip
        got = sb.run(["python3", "-c", peek])
        assert (got.exit_code, got.stdout) == (0, ""), got
        other.signal(9)
        res = other.wait(30)
        assert res is not None and res.signal == 9, res
    direct = [r for r in records(audit_log, sid) if r["event"] == "network.direct"]
    good = [r["details"] for r in direct if r["details"].get("address") == "192.0.2.1"
            and r["details"].get("port") == 9 and r["details"].get("syscall") == "connect"]  # fmt: skip
    # the real socket is named; a call on an fd that is no socket is "unknown"
    assert {g["protocol"] for g in good} == {"tcp", "unknown"}, good
