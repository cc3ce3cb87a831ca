"""runsc strace lines -> audit events, and the init's reply schema (no runsc needed).

The lines are written by the sentry, but sandboxed code shapes their
content (paths, argv, env), so these pin down the parsing: argv is taken,
the environment never is, and odd paths cannot shift what is parsed.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from glassroom.backends._channel import ProtocolViolation
from glassroom.backends.gvisor import Tracer, parse_reply
from glassroom.plan import LaunchPlan, Limits, NetworkPlan

HEAD = "I1127 03:01:48.015415   28344 strace.go:605] "
EXEC_DENIED = (
    HEAD + '[   3:   3] sh X execve(0x564e43d80910 /usr/bin/perl, 0x564e43d80950 ["/usr/bin/perl", '
    '"-v"], 0x564e43d80968 ["HOME=/", "TOKEN=s3cr3t", "PATH=/usr/bin:/bin"]) = 0 (0x0) '
    "errno=13 (permission denied) (268.64µs)"
)
EXEC_OK = (
    HEAD + '[   4:   4] sh X execve(0x5 /usr/bin/ls, 0x6 ["ls", "/x"], 0x7 ["TOKEN=s3cr3t"]) '
    "= 0 (0x0) (490.303µs)"
)
EXEC_ODD_PATH = (
    HEAD + '[   5:   5] sh X execve(0x5 /w/a, 0x1 ["fake"], 0x6 ["ls"], 0x7 ["TOKEN=s3cr3t"]) '
    "= 0 (0x0) errno=2 (no such file or directory) (1µs)"
)
OPEN_DENIED = (
    HEAD + "[   1:   1] python3 X openat(AT_FDCWD /workspace, 0x7fa2281ed580 /usr/x, "
    "O_WRONLY|O_CLOEXEC|O_CREAT|O_TRUNC, 0o666) = 0 (0x0) errno=13 (permission denied) (109µs)"
)
OPEN_READ = (
    HEAD + "[   1:   1] python3 X openat(AT_FDCWD /workspace, 0x7f /etc/ld.so.cache, "
    "O_RDONLY|O_CLOEXEC, 0o0) = 3 (0x3) (3µs)"
)
SOCKET = (
    HEAD + "[   1:   1] python3 X socket(AF_INET, SOCK_DGRAM|SOCK_CLOEXEC, 0x0) = 3 (0x3) (5µs)"
)
SENDTO = (
    HEAD + '[   1:   1] python3 X sendto(0x3 socket:[2], 0x7f "\\x124", 0x1d, 0x0, 0x7ffc '
    "{Family: AF_INET, Addr: 9.9.9.9, Port: 53}, 0x10) = 0 (0x0) errno=113 (no route to host) (6µs)"
)
LOOPBACK = (
    HEAD + "[   1:   1] python3 X connect(0x4 socket:[3], 0x7ffc {Family: AF_INET, Addr: "
    "127.0.0.1, Port: 3128}, 0x10) = 0 (0x0) (6µs)"
)
FORK_EAGAIN = (
    HEAD + "[   1:   1] python3 X clone(0x1200011, 0x0, 0x0, 0x7f, 0x0) = 0 (0x0) "
    "errno=11 (resource temporarily unavailable) (4µs)"
)


def _plan() -> LaunchPlan:
    return LaunchPlan(
        backend="gvisor", risk="medium", mounts=(), fs_rules=(), tools=(),
        limits=Limits(1.0, 1 << 20, 8, 1 << 20, 10.0, 1 << 20),
        network=NetworkPlan(), env=(),
    )  # fmt: skip


@pytest.fixture
def traced() -> Any:
    events: list[tuple[str, dict[str, Any], str, str | None]] = []
    r, w = os.pipe2(os.O_NONBLOCK)
    tracer = Tracer(r, lambda *e: events.append(e), "sb-test", _plan())

    def feed(*lines: str) -> list[tuple[str, dict[str, Any], str, str | None]]:
        os.write(w, ("\n".join(lines) + "\n").encode())
        tracer.drain()
        return events

    yield feed, tracer
    tracer.stop()
    os.close(w)


def test_exec_events_take_argv_never_env(traced: Any) -> None:
    feed, _ = traced
    events = feed(EXEC_DENIED, EXEC_OK, EXEC_ODD_PATH)
    assert "s3cr3t" not in repr(events)
    (e1, d1, dec1, rule1), (e2, d2, dec2, rule2), (_e3, d3, dec3, _r3) = events
    assert (e1, d1["path"], d1["argv"], dec1, rule1) == (
        "exec", "/usr/bin/perl", ["/usr/bin/perl", "-v"], "deny", "tools.allow",
    )  # fmt: skip
    assert d1["result"] == "EACCES" and d1["parent"] == "sh"
    assert (e2, d2["argv"], dec2, rule2) == ("exec", ["ls", "/x"], "allow", None)
    assert d3["result"] == "ENOENT" and dec3 == "info"


def test_open_events_only_denials_and_writes(traced: Any) -> None:
    feed, _ = traced
    events = feed(OPEN_DENIED, OPEN_READ)
    assert len(events) == 1
    event, details, decision, rule = events[0]
    assert (event, details["path"], decision, rule) == (
        "file.open", "/usr/x", "deny", "filesystem.write",
    )  # fmt: skip


def test_network_attempts_and_loopback(traced: Any) -> None:
    feed, _ = traced
    events = feed(SOCKET, SENDTO, LOOPBACK)
    assert len(events) == 1
    event, details, decision, rule = events[0]
    assert event == "network.direct" and decision == "deny" and rule == "network.allow"
    assert details["address"] == "9.9.9.9" and details["port"] == 53
    assert details["protocol"] == "udp" and details["syscall"] == "sendto"
    assert details["result"] == "EHOSTUNREACH"


def test_failed_forks_count_as_pids_hits(traced: Any) -> None:
    feed, tracer = traced
    feed(FORK_EAGAIN, FORK_EAGAIN, "garbage line without structure", "")
    assert tracer.fork_eagain() == 2


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
