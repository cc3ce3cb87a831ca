"""runsc strace records -> audit events, and the init's reply schema (no runsc needed).

Every line below is a verbatim record of runsc 20221219 (``--strace
--debug-log-format=json``, read from the trace FIFO of a glassroom gvisor
sandbox at ``[audit] level = "files"`` or ``"syscalls"``).  The sentry writes
them, but sandboxed code shapes their content (paths, argv, env, task
names), so these pin down the parsing: argv is taken, the environment never
is, and odd paths or task names cannot forge a call or shift what is parsed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from glassroom.backends import gvisor
from glassroom.backends._channel import ProtocolViolation
from glassroom.backends.gvisor import Tracer, parse_reply
from glassroom.plan import LaunchPlan, Limits, NetworkPlan

Event = tuple[str, dict[str, Any], str, "str | None"]

# fmt: off
SECCOMP_DENIED = '{"msg":"[   1:   1] Syscall 90: denied by seccomp","level":"debug","time":"2026-12-03T13:35:35.409003362Z"}'
OPEN_CREATE = '{"msg":"[   2:   2] python3 X openat(AT_FDCWD /workspace, 0x7f67cb65ef90 /workspace/a.txt, O_WRONLY|O_CLOEXEC|O_CREAT|O_TRUNC, 0o666) = 3 (0x3) (12.433µs)","level":"info","time":"2026-11-27T04:45:02.049013812Z"}'
OPEN_READ = '{"msg":"[   2:   2] python3 X openat(AT_FDCWD /workspace, 0x7f67cb65f950 /workspace/a.txt, O_RDONLY|O_CLOEXEC, 0o0) = 3 (0x3) (7.834µs)","level":"info","time":"2026-11-27T04:45:02.050382383Z"}'
OPEN_ENOENT = '{"msg":"[   2:   2] python3 X openat(AT_FDCWD /workspace, 0x7f67cb6671a0 /nonexist/x, O_RDONLY|O_CLOEXEC, 0o0) = 0 (0x0) errno=2 (no such file or directory) (112.333µs)","level":"info","time":"2026-11-27T04:45:02.055569564Z"}'
OPEN_EACCES = '{"msg":"[   2:   2] python3 X openat(AT_FDCWD /workspace, 0x7f67cb6671a0 /usr/x, O_WRONLY|O_CLOEXEC|O_CREAT|O_TRUNC, 0o666) = 0 (0x0) errno=13 (permission denied) (204.836µs)","level":"info","time":"2026-11-27T04:45:02.056095624Z"}'
OPEN_RELATIVE = '{"msg":"[   2:   2] python3 X openat(0x3 /workspace, 0x7f67cb667b60 rel.txt, O_WRONLY|O_CLOEXEC|O_CREAT|O_EXCL, 0o640) = 4 (0x4) (20.904µs)","level":"info","time":"2026-11-27T04:45:02.054114232Z"}'
OPEN_BAD_FD = '{"msg":"[   2:   2] python3 X openat(0x63 (bad FD), 0x7f9d953c5be0 rel, O_RDONLY|0x0, 0o0) = 0 (0x0) errno=9 (bad file number) (927ns)","level":"info","time":"2026-11-27T04:45:03.590305715Z"}'
OPEN_SYNC = '{"msg":"[   2:   2] python3 X open(0x7f9d953be890 /workspace/o.txt, O_WRONLY|O_CREAT|O_SYNC|0x1000, 0o600) = 6 (0x6) (3.725µs)","level":"info","time":"2026-11-27T04:45:03.590368341Z"}'
CREAT = '{"msg":"[   2:   2] python3 X creat(0x7f9d953be750 /workspace/cr.txt, 0o600) = 4 (0x4) (8.488µs)","level":"info","time":"2026-11-27T04:45:03.590165607Z"}'
OPEN_NEWLINE = '{"msg":"[   2:   2] python3 X openat(AT_FDCWD /workspace, 0x7f9d9559c4b0 /workspace/bad\\nI1127 04:37:01.339455   11618 strace.go:608] [   9:   9] x X unlink(0x1 /forged) = 0 (0x0) (1us)\\nX, O_RDONLY|O_CLOEXEC, 0o0) = 0 (0x0) errno=2 (no such file or directory) (1.371µs)","level":"info","time":"2026-11-27T04:45:03.590414959Z"}'
MKDIR_EROFS = '{"msg":"[   2:   2] python3 X mkdir(0x7f98ddfb2a80 /sys/zz, 0o777) = 0 (0x0) errno=30 (read-only file system) (4.918µs)","level":"info","time":"2026-11-27T04:45:19.720915852Z"}'
UNLINK_EACCES = '{"msg":"[   2:   2] python3 X unlink(0x7f67cb6671a0 /usr/bin/ls) = 0 (0x0) errno=13 (permission denied) (220.917µs)","level":"info","time":"2026-11-27T04:45:02.056642805Z"}'
UNLINKAT = '{"msg":"[   2:   2] python3 X unlinkat(0x3 /workspace, 0x7f67cb667b60 rel.txt, 0x0) = 0 (0x0) (35.784µs)","level":"info","time":"2026-11-27T04:45:02.054515205Z"}'
UNLINKAT_DIR = '{"msg":"[   2:   2] python3 X unlinkat(0x3 /workspace, 0x7f9d953c4260 dd, 0x200) = 0 (0x0) (6.181µs)","level":"info","time":"2026-11-27T04:45:03.589890738Z"}'
RENAME = '{"msg":"[   2:   2] python3 X rename(0x7f67cb871710 /workspace/a.txt, 0x7f67cb65f010 /workspace/b.txt) = 0 (0x0) (41.663µs)","level":"info","time":"2026-11-27T04:45:02.05169608Z"}'
RENAMEAT = '{"msg":"[   2:   2] python3 X renameat(0x3 /workspace, 0x7f67cb667b60 c.txt, 0x3, 0x7f67cb6671a0 f.txt) = 0 (0x0) (5.055µs)","level":"info","time":"2026-11-27T04:45:02.054673476Z"}'
RENAMEAT2 = '{"msg":"[   2:   2] python3 X renameat2(AT_FDCWD /workspace, 0x7f67cb65e910 /workspace/f.txt, 0xffffffffffffff9c, 0x7f67cb65e990 /workspace/g.txt, 0x1) = 0 (0x0) (8.064µs)","level":"info","time":"2026-11-27T04:45:02.055093788Z"}'
FCHMODAT = '{"msg":"[   2:   2] python3 X fchmodat(0x3 /workspace, 0x7f9d953c4260 c.txt, 0o600) = 0 (0x0) (4.335µs)","level":"info","time":"2026-11-27T04:45:03.589609671Z"}'
LINKAT = '{"msg":"[   2:   2] python3 X linkat(0x3 /workspace, 0x7f9d953c4260 c.txt, 0x3, 0x7f9d9543d640 d.txt, 0x400) = 0 (0x0) (4.438µs)","level":"info","time":"2026-11-27T04:45:03.589684832Z"}'
SYMLINKAT = '{"msg":"[   2:   2] python3 X symlinkat(0x7f9d953c4260 c.txt, 0x3 /workspace, 0x7f9d9543d640 e.txt) = 0 (0x0) (6.413µs)","level":"info","time":"2026-11-27T04:45:03.589804649Z"}'
MKDIRAT = '{"msg":"[   2:   2] python3 X mkdirat(0x3 /workspace, 0x7f9d953c4260 dd, 0x1e8) = 0 (0x0) (2.365µs)","level":"info","time":"2026-11-27T04:45:03.589846264Z"}'
FCHOWNAT = '{"msg":"[   2:   2] python3 X fchownat(0x3 /workspace, 0x7f9d953c4260 c.txt, 0x3e8, 0x3e8, 0x100) = 0 (0x0) (1.44µs)","level":"info","time":"2026-11-27T04:45:03.590052495Z"}'
CHOWN_EPERM = '{"msg":"[   2:   2] python3 X chown(0x7f67cb585910 /workspace/d.txt, 0x0, 0x0) = 0 (0x0) errno=1 (operation not permitted) (4.434µs)","level":"info","time":"2026-11-27T04:45:02.116837159Z"}'
STAT = '{"msg":"[   2:   2] python3 X newfstatat(AT_FDCWD /workspace, 0x7f2c7e67eab0 /workspace/l, 0x7f7d2c94b6f0 {dev=16, ino=1, mode=S_IFDIR|0o755, nlink=2, uid=1000, gid=1000, rdev=0, size=60, blksize=4096, blocks=0, atime=2026-11-27 04:46:10.06516373 +0000 UTC, mtime=2026-11-27 04:46:10.264680156 +0000 UTC, ctime=2026-11-27 04:46:10.264680156 +0000 UTC}, 0x0) = 0 (0x0) (2.477µs)","level":"info","time":"2026-11-27T04:46:10.264719934Z"}'
ACCESS = '{"msg":"[   2:   2] python3 X access(0x7f2c7e67eae0 /workspace/nope, 0o4) = 0 (0x0) errno=2 (no such file or directory) (2.236µs)","level":"info","time":"2026-11-27T04:46:10.264830409Z"}'
READLINK = '{"msg":"[   2:   2] python3 X readlink(0x7f2c7e67eae0 /workspace/l, 0x7f7d2c94a6f0 \\"/workspace\\", 0x1000) = 10 (0xa) (2.93µs)","level":"info","time":"2026-11-27T04:46:10.264934114Z"}'
CHDIR = '{"msg":"[   2:   2] python3 X chdir(0x7f2c7e67eae0 /tmp) = 0 (0x0) (2.107µs)","level":"info","time":"2026-11-27T04:46:10.264970329Z"}'
VFORK = '{"msg":"[   2:   2] python3 X vfork() = 3 (0x3) (147.143µs)","level":"info","time":"2026-11-27T04:45:02.057473664Z"}'
EXEC_ENOENT = '{"msg":"[   3:   3] python3 X execve(0x7f67cb5a05b0 /usr/local/bin/ls, 0x7f67cb5a06f0 [\\"ls\\", \\"/workspace\\"], 0x7ffc8fd858a8 [\\"PATH=/usr/local/bin:/usr/bin:/bin\\", \\"HOME=/workspace\\", \\"TMPDIR=/tmp\\", \\"LANG=C.UTF-8\\", \\"USER=agent\\", \\"LOGNAME=agent\\", \\"SHELL=/bin/sh\\", \\"LD_PRELOAD=/.glassroom/gvisor-compat.so\\"]) = 0 (0x0) errno=2 (no such file or directory) (1.746345ms)","level":"info","time":"2026-11-27T04:45:02.064173644Z"}'
EXEC_OK = '{"msg":"[   3:   3] python3 X execve(0x7f67cb82c5d0 /usr/bin/ls, 0x7f67cb5a06f0 [\\"ls\\", \\"/workspace\\"], 0x7ffc8fd858a8 [\\"PATH=/usr/local/bin:/usr/bin:/bin\\", \\"HOME=/workspace\\", \\"TMPDIR=/tmp\\", \\"LANG=C.UTF-8\\", \\"USER=agent\\", \\"LOGNAME=agent\\", \\"SHELL=/bin/sh\\", \\"LD_PRELOAD=/.glassroom/gvisor-compat.so\\"]) = 0 (0x0) (1.141827ms)","level":"info","time":"2026-11-27T04:45:02.065401227Z"}'
EXEC_DENIED = '{"msg":"[   4:   4] python3 X execve(0x7f67cb82c5d0 /usr/bin/od, 0x7f67cb7c3a50 [\\"/usr/bin/od\\", \\"/dev/null\\"], 0x7ffc8fd858a8 [\\"PATH=/usr/local/bin:/usr/bin:/bin\\", \\"HOME=/workspace\\", \\"TMPDIR=/tmp\\", \\"LANG=C.UTF-8\\", \\"USER=agent\\", \\"LOGNAME=agent\\", \\"SHELL=/bin/sh\\", \\"LD_PRELOAD=/.glassroom/gvisor-compat.so\\"]) = 0 (0x0) errno=13 (permission denied) (252.354µs)","level":"info","time":"2026-11-27T04:45:02.115968339Z"}'
EXECVEAT = '{"msg":"[   3:   3] q X rename( X execveat(0x3 /usr/bin, 0x7f96ff7ba540 true, 0x7f96ff5b4330 [\\"true\\", \\"a b\\"], 0x7f96ff730910 [\\"TOKEN=s3cr3t\\"], 0x0) = 0 (0x0) (1.133969ms)","level":"info","time":"2026-11-27T04:45:36.793458785Z"}'
SOCKET = '{"msg":"[   2:   2] python3 X socket(AF_INET, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = 3 (0x3) (25.69µs)","level":"info","time":"2026-11-27T04:45:19.717686033Z"}'
SENDTO = '{"msg":"[   2:   2] python3 X sendto(0x3 socket:[1], 0xa5f170, 0x1, 0x0, 0x7f08461b6550 {Family: AF_INET, Addr: 9.9.9.9, Port: 53}, 0x10) = 0 (0x0) errno=113 (no route to host) (60.412µs)","level":"info","time":"2026-11-27T04:45:19.71795486Z"}'
LOOPBACK = '{"msg":"[   2:   2] python3 X connect(0x4 socket:[2], 0x7f08461b65b0 {Family: AF_INET, Addr: 127.0.0.1, Port: 1}, 0x10) = 0 (0x0) errno=111 (connection refused) (292.521µs)","level":"info","time":"2026-11-27T04:45:19.718955631Z"}'
FORK_EAGAIN = '{"msg":"[   2:   2] python3 X clone(CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|0x11, 0x0, 0x0, 0x7f98de02aa10, 0x0) = 0 (0x0) errno=11 (try again) (915.392µs)","level":"info","time":"2026-11-27T04:45:19.722346943Z"}'
COMM_SPOOF = '{"msg":"[   2:   2] a X unlink(b c X openat(AT_FDCWD /workspace, 0x7f96ff7bb680 /workspace/zz, O_WRONLY|O_CLOEXEC|O_CREAT|O_TRUNC, 0o666) = 3 (0x3) (1.503497ms)","level":"info","time":"2026-11-27T04:45:36.77663775Z"}'
COMM_SPOOF_ENTRY = '{"msg":"[   2:   2] a X unlink(b c E rename(0x7f96ff7bb680 /workspace/zz, 0x7f96ff58ab50 /workspace/y) = 0 (0x0) (1us)","level":"info","time":"2026-11-27T04:45:36.777055956Z"}'
COMM_SPOOF_EXIT = '{"msg":"[   2:   2] a X unlink(b c X rename(0x7f96ff7bb680 /workspace/zz, 0x7f96ff58ab50 /workspace/y) = 0 (0x0) (1us) = 0 (0x0) (12.201µs)","level":"info","time":"2026-11-27T04:45:36.777082977Z"}'
CHDIR_TMP = '{"msg":"[   2:   2] python3 X chdir(0x7f250ad375f0 /tmp) = 0 (0x0) (4.091µs)","level":"info","time":"2026-11-27T04:49:12.310173644Z"}'
RENAME_RELATIVE = '{"msg":"[   2:   2] python3 X rename(0x7f250ad375f0 r.txt, 0x7f250ad37620 s.txt) = 0 (0x0) (7.594µs)","level":"info","time":"2026-11-27T04:49:12.31087285Z"}'
FCHDIR = '{"msg":"[   2:   2] python3 X fchdir(0x3 /workspace) = 0 (0x0) (715ns)","level":"info","time":"2026-11-27T04:49:12.311017493Z"}'
MKDIR_RELATIVE = '{"msg":"[   2:   2] python3 X mkdir(0x7f250ad37620 sub, 0o777) = 0 (0x0) (4.164µs)","level":"info","time":"2026-11-27T04:49:12.311150617Z"}'
CHDIR_SUB = '{"msg":"[   2:   2] python3 X chdir(0x7f250ad37620 sub) = 0 (0x0) (984ns)","level":"info","time":"2026-11-27T04:49:12.311218292Z"}'
RMDIR_RELATIVE = '{"msg":"[   2:   2] python3 X rmdir(0x7f250ad37620 ../sub) = 0 (0x0) (1.681µs)","level":"info","time":"2026-11-27T04:49:12.311281847Z"}'
# fmt: on


def _plan(level: str = "actions") -> LaunchPlan:
    return LaunchPlan(
        backend="gvisor", risk="medium", mounts=(), fs_rules=(), tools=(),
        limits=Limits(1.0, 1 << 20, 8, 1 << 20, 10.0, 1 << 20),
        network=NetworkPlan(), env=(), audit_level=level,
    )  # fmt: skip


class _Sink:
    """An event sink like the supervisor's; with ``batched`` it has ``many``."""

    def __init__(self, batched: bool) -> None:
        self.events: list[Event] = []
        self.batches: list[list[Event]] = []
        if batched:
            self.many = self._many

    def __call__(
        self, event: str, details: dict[str, Any], decision: str, rule: str | None
    ) -> None:
        self.events.append((event, details, decision, rule))

    def _many(self, batch: list[Event]) -> None:
        self.batches.append(list(batch))
        self.events.extend(batch)


def _tracer(level: str = "actions", *, batched: bool = False, arm: bool = True) -> Any:
    sink = _Sink(batched)
    r, w = os.pipe2(os.O_NONBLOCK)
    tracer = Tracer(r, sink, "sb-test", _plan(level))
    if arm:
        tracer.arm()

    def feed(*lines: str) -> list[Event]:
        os.write(w, ("\n".join(lines) + "\n").encode())
        tracer.drain()
        return sink.events

    return feed, tracer, sink, w


@pytest.fixture
def traced() -> Any:
    feed, tracer, _sink, w = _tracer()
    yield feed, tracer
    tracer.stop()
    os.close(w)


@pytest.fixture
def files() -> Any:
    feed, tracer, sink, w = _tracer("files", batched=True)
    yield feed, tracer, sink
    tracer.stop()
    os.close(w)


def _only(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


# --- exec -----------------------------------------------------------------------------------


def test_exec_events_take_argv_never_env(traced: Any) -> None:
    feed, _ = traced
    events = feed(VFORK, EXEC_DENIED, EXEC_ENOENT, EXEC_OK, EXECVEAT)
    text = repr(events)
    assert "LD_PRELOAD" not in text and "s3cr3t" not in text and "HOME=" not in text
    denied, missing, ok, at = events
    assert denied == ("exec", {
        "syscall": "execve", "path": "/usr/bin/od", "parent": "python3", "pid": 4,
        "argv": ["/usr/bin/od", "/dev/null"], "result": "EACCES", "source": "runsc strace",
    }, "deny", "tools.allow")  # fmt: skip
    assert missing[0] == "exec" and missing[1]["path"] == "/usr/local/bin/ls"
    assert missing[1]["result"] == "ENOENT" and missing[2:] == ("info", None)
    # pid 3 is the child of pid 2's vfork: its parent is known by pid.
    assert ok == ("exec", {
        "syscall": "execve", "path": "/usr/bin/ls", "parent": "python3", "pid": 3, "ppid": 2,
        "argv": ["ls", "/workspace"], "result": "ok", "source": "runsc strace",
    }, "allow", None)  # fmt: skip
    # execveat: the dirfd is skipped, its path makes the program's path absolute.
    assert at[1]["path"] == "/usr/bin/true" and at[1]["argv"] == ["true", "a b"]
    assert at[1]["syscall"] == "execveat" and at[2] == "allow"


def test_go_quoted_argv_is_decoded() -> None:
    args = '0x1 /bin/true, 0x2 ["tr\\x01ue", "é\\t\\"q\\\\", "\\xff"], 0x3 ["TOKEN=x"]'
    assert gvisor.exec_raw("execve", args)["argv"] == ["tr\x01ue", 'é\t"q\\', "\ufffd"]


# --- files, level actions (unchanged subset) ------------------------------------------------


def test_actions_level_logs_only_writing_and_refused_opens(traced: Any) -> None:
    feed, _ = traced
    events = feed(OPEN_EACCES, OPEN_READ, OPEN_ENOENT, OPEN_CREATE, UNLINKAT, RENAME)
    assert [(e, d["path"], d["result"], dec, rule) for e, d, dec, rule in events] == [
        ("file.open", "/usr/x", "EACCES", "deny", "filesystem.write"),
        ("file.open", "/workspace/a.txt", "ok", "allow", None),
    ]


# --- files, level files ---------------------------------------------------------------------


def test_files_level_logs_every_open_with_its_result(files: Any) -> None:
    feed, _, _ = files
    events = feed(OPEN_CREATE, OPEN_READ, OPEN_ENOENT, OPEN_EACCES)
    src = {"pid": 2, "source": "runsc strace", "syscall": "openat"}
    assert events == [
        ("file.open", {"path": "/workspace/a.txt", "flags": "O_WRONLY|O_CREAT|O_TRUNC",
                       "mode": "0o666", "result": "ok", **src}, "allow", None),
        ("file.open", {"path": "/workspace/a.txt", "flags": "O_RDONLY", "result": "ok", **src},
         "allow", None),
        ("file.open", {"path": "/nonexist/x", "flags": "O_RDONLY", "result": "ENOENT", **src},
         "info", None),
        ("file.open", {"path": "/usr/x", "flags": "O_WRONLY|O_CREAT|O_TRUNC", "mode": "0o666",
                       "result": "EACCES", **src}, "deny", "filesystem.write"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "event", "expected", "decision", "rule"),
    [
        (OPEN_RELATIVE, "file.open", {"path": "/workspace/rel.txt", "mode": "0o640",
                                      "flags": "O_WRONLY|O_CREAT|O_EXCL"}, "allow", None),
        (OPEN_BAD_FD, "file.open", {"path": "<fd 99>/rel", "result": "EBADF"}, "info", None),
        (OPEN_SYNC, "file.open", {"syscall": "open", "path": "/workspace/o.txt",
                                  "flags": "O_WRONLY|O_CREAT", "mode": "0o600"}, "allow", None),
        (CREAT, "file.open", {"syscall": "creat", "path": "/workspace/cr.txt",
                              "flags": "O_WRONLY|O_CREAT|O_TRUNC", "mode": "0o600"}, "allow", None),
        (UNLINKAT, "file.unlink", {"syscall": "unlinkat", "path": "/workspace/rel.txt"},
         "allow", None),
        (UNLINKAT_DIR, "file.unlink", {"path": "/workspace/dd", "flags": "AT_REMOVEDIR"},
         "allow", None),
        (UNLINK_EACCES, "file.unlink", {"path": "/usr/bin/ls", "result": "EACCES"},
         "deny", "filesystem.write"),
        (RENAME, "file.rename", {"path": "/workspace/a.txt", "path2": "/workspace/b.txt"},
         "allow", None),
        (RENAMEAT, "file.rename", {"syscall": "renameat", "path": "/workspace/c.txt",
                                   "path2": "/workspace/f.txt"}, "allow", None),
        (RENAMEAT2, "file.rename", {"syscall": "renameat2", "path": "/workspace/f.txt",
                                    "path2": "/workspace/g.txt"}, "allow", None),
        (FCHMODAT, "file.chmod", {"path": "/workspace/c.txt", "mode": "0o600"}, "allow", None),
        (LINKAT, "file.link", {"path": "/workspace/c.txt", "path2": "/workspace/d.txt"},
         "allow", None),
        # symlinkat(target, dirfd, linkpath): the link is the path, the target stays as written.
        (SYMLINKAT, "file.symlink", {"path": "/workspace/e.txt", "path2": "c.txt"},
         "allow", None),
        (MKDIRAT, "file.mkdir", {"path": "/workspace/dd", "mode": "0o750"}, "allow", None),
        (MKDIR_EROFS, "file.mkdir", {"path": "/sys/zz", "mode": "0o777", "result": "EROFS"},
         "deny", "filesystem.write"),
        (FCHOWNAT, "file.chown", {"path": "/workspace/c.txt"}, "allow", None),
        (CHOWN_EPERM, "file.chown", {"path": "/workspace/d.txt", "result": "EPERM"},
         "deny", "filesystem.write"),
    ],
)  # fmt: skip
def test_files_level_file_calls(
    files: Any, line: str, event: str, expected: dict[str, Any], decision: str, rule: str | None
) -> None:
    feed, _, _ = files
    got_event, details, got_decision, got_rule = _only(feed(line))
    assert (got_event, got_decision, got_rule) == (event, decision, rule)
    assert details | expected == details, details
    assert details["pid"] == 2 and details["source"] == "runsc strace"
    assert details["result"] == expected.get("result", "ok")


def test_relative_paths_follow_the_cwd(files: Any) -> None:
    """rename/mkdir/rmdir take no dirfd: their relative paths are made absolute with
    the cwd as last seen (chdir, fchdir, any ``AT_FDCWD <cwd>``), as on namespaces."""
    feed, _, _ = files
    events = feed(CHDIR_TMP, RENAME_RELATIVE, FCHDIR, MKDIR_RELATIVE, CHDIR_SUB, RMDIR_RELATIVE)
    assert [(e, d["path"], d.get("path2")) for e, d, _dec, _r in events] == [
        ("file.rename", "/tmp/r.txt", "/tmp/s.txt"),
        ("file.mkdir", "/workspace/sub", None),
        ("file.rmdir", "/workspace/sub/../sub", None),
    ]


def test_an_unknown_cwd_leaves_the_path_relative(files: Any) -> None:
    feed, _, _ = files
    assert _only(feed(RENAME_RELATIVE))[1]["path"] == "r.txt"
    assert feed(OPEN_CREATE, RENAME_RELATIVE)[-1][1]["path2"] == "/workspace/s.txt"


def test_metadata_calls_only_at_level_syscalls() -> None:
    lines = (STAT, ACCESS, READLINK, CHDIR)
    feed, tracer, _sink, w = _tracer("files")
    assert feed(*lines) == []
    tracer.stop()
    os.close(w)
    feed, tracer, _sink, w = _tracer("syscalls")
    events = feed(*lines)
    tracer.stop()
    os.close(w)
    assert [(e, d["syscall"], d["path"], d["result"], dec) for e, d, dec, _r in events] == [
        ("file.stat", "newfstatat", "/workspace/l", "ok", "allow"),
        ("file.access", "access", "/workspace/nope", "ENOENT", "info"),
        ("file.readlink", "readlink", "/workspace/l", "ok", "allow"),
        ("file.chdir", "chdir", "/tmp", "ok", "allow"),
    ]
    assert "mode" not in events[1][1]  # access takes an access mode, not a file mode


def test_the_init_starting_up_is_not_logged() -> None:
    """Before the init reports ready (``arm``), file and exec calls are glassroom's own."""
    feed, tracer, _sink, w = _tracer("files", arm=False)
    assert feed(OPEN_READ, EXEC_OK) == []
    tracer.arm()
    assert [e[0] for e in feed(OPEN_READ, EXEC_OK)] == ["file.open", "exec"]
    tracer.stop()
    os.close(w)


# --- what sandboxed code controls cannot forge records ---------------------------------------


def test_a_newline_in_a_path_cannot_forge_a_line(files: Any) -> None:
    feed, _, _ = files
    event, details, decision, _rule = _only(feed(OPEN_NEWLINE))
    assert event == "file.open" and decision == "info" and details["result"] == "ENOENT"
    assert details["path"].startswith("/workspace/bad\n") and "/forged" in details["path"]
    # The same text as a plain (non-JSON) line, as the old text log format had it: ignored.
    forged = "I1127 04:37:01.339455   11618 strace.go:608] [   9:   9] x X unlink(0x1 /forged) = 0 (0x0) (1us)"
    assert feed(forged) == [(event, details, decision, _rule)]


def test_a_task_name_cannot_forge_the_call(files: Any) -> None:
    """prctl(PR_SET_NAME, "a X unlink(b c"): the name holds a fake marker and call."""
    feed, _, _ = files
    events = feed(COMM_SPOOF, COMM_SPOOF_ENTRY, COMM_SPOOF_EXIT)
    assert [(e, d["syscall"], d["path"], d.get("path2")) for e, d, _dec, _r in events] == [
        ("file.open", "openat", "/workspace/zz", None),
        ("file.rename", "rename", "/workspace/zz", "/workspace/y) = 0 (0x0) (1us"),
    ]


# --- order, batches, cap -----------------------------------------------------------------


def test_events_keep_line_order_one_batch_per_chunk(files: Any) -> None:
    feed, _, sink = files
    events = feed(OPEN_CREATE, OPEN_READ, RENAME, UNLINK_EACCES, VFORK, EXEC_OK)
    assert [e[0] for e in events] == ["file.open", "file.open", "file.rename", "file.unlink",
                                      "exec"]  # fmt: skip
    assert sink.batches == [events]


def test_without_many_each_event_is_handed_over_in_order() -> None:
    feed, tracer, sink, w = _tracer("files", batched=False)
    events = feed(OPEN_CREATE, RENAME, OPEN_READ)
    tracer.stop()
    os.close(w)
    assert [e[1]["path"] for e in events] == ["/workspace/a.txt"] * 3
    assert [e[0] for e in events] == ["file.open", "file.rename", "file.open"]
    assert not hasattr(sink, "many")


def test_the_event_cap_ends_in_one_anomaly_and_a_kill(
    files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: past the budget the sandbox is killed, not left running unseen."""
    monkeypatch.setattr(gvisor, "MAX_EVENTS", 3)
    feed, tracer, _ = files
    killed: list[bool] = []
    tracer.on_overflow = lambda: killed.append(True)
    events = feed(*[OPEN_READ] * 6)
    assert [e[0] for e in events] == ["file.open", "file.open", "anomaly"]
    assert events[-1][2:] == ("deny", "audit.level")
    assert killed == [True]


# --- network and forks (every level) ---------------------------------------------------------


def test_network_attempts_and_loopback(traced: Any) -> None:
    feed, _ = traced
    event, details, decision, rule = _only(feed(SOCKET, SENDTO, LOOPBACK))
    assert event == "network.direct" and decision == "deny" and rule == "network.allow"
    assert details["address"] == "9.9.9.9" and details["port"] == 53
    assert details["protocol"] == "udp" and details["syscall"] == "sendto"
    assert details["result"] == "EHOSTUNREACH" and details["source"] == "runsc strace"


def test_failed_forks_count_as_pids_hits(traced: Any) -> None:
    feed, tracer = traced
    feed(FORK_EAGAIN, FORK_EAGAIN, "garbage line without structure", "{ X not json", "")
    assert tracer.fork_eagain() == 2


# --- the init's replies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"op": "shell"}',
        b'{"op": "exit", "id": "1"}',
        b'{"op": "exit", "id": 1, "extra": 2}',
        b'{"op": "error", "id": 1, "errno": 2, "error": "' + b"x" * 5000 + b'"}',
        b"x" * (70 * 1024),
    ],
)
def test_reply_schema_rejects(raw: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_reply(raw)


def test_reply_schema_accepts() -> None:
    assert parse_reply(b'{"op": "statfs", "id": 3, "used": 1, "total": 2}')["total"] == 2


# --- refused by the sentry's seccomp filter ------------------------------------------------


def test_a_setuid_mode_refused_by_seccomp_is_a_deny_record(traced: Any) -> None:
    """runsc --debug's line for a call the sandbox's filter refused (verbatim: chmod,
    nr 90, of a 04755 mode) is the ``filesystem.setuid`` deny record on this tier."""
    feed, _ = traced
    assert _only(feed(SECCOMP_DENIED)) == ("blocked", {
        "action": "chmod", "syscall": "chmod", "pid": 1, "source": "runsc seccomp",
        "reason": "setuid (S_ISUID) by chmod/fchmod or in a new file's mode",
    }, "deny", "filesystem.setuid")  # fmt: skip


def test_seccomp_lines_that_are_not_the_sentrys_are_ignored(traced: Any) -> None:
    """The same text at level info (a strace record is info, and its paths are the
    task's), a syscall the profile names no rule for, and trailing text: nothing."""
    feed, _ = traced
    forged = SECCOMP_DENIED.replace('"level":"debug"', '"level":"info"')
    other = SECCOMP_DENIED.replace("Syscall 90:", "Syscall 165:")  # mount: no rule
    tail = SECCOMP_DENIED.replace("denied by seccomp", "denied by seccomp X y")
    assert feed(forged, other, tail) == []
