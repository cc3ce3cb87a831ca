"""A guest agent that lies: the host stays correct and logs the anomaly.

No VM is needed: the supervisor's ``MicrovmInstance`` is attached to one end
of a socketpair, and a fake guest on the other end answers each request
with a lie (oversized frames, malformed JSON, out-of-range fields, more
data than asked for, directory entries naming paths outside the workspace).
"""

from __future__ import annotations

import json
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from glassroom import SandboxError, WallError
from glassroom.audit import AuditLog, verify
from glassroom.backends.base import ExecRequest
from glassroom.backends.microvm import MicrovmInstance, _instance
from glassroom.backends.microvm._channel import ProtocolViolation, check
from glassroom.guest import protocol
from glassroom.policy import compile as compile_policy
from glassroom.policy import validate_policy

Reply = Callable[[dict[str, Any], socket.socket], None]
Event = tuple[str, dict[str, Any], str, "str | None"]


def frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return protocol.encode(header, payload)


class FakeGuest:
    """Reads the host's frames; ``reply(header, sock)`` writes whatever lie it likes."""

    def __init__(self, sock: socket.socket, reply: Reply) -> None:
        self.sock = sock
        self.reply = reply
        self.seen: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = protocol.Decoder()
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            for header, _payload in dec.feed(data):
                self.seen.append(header)
                try:
                    self.reply(header, self.sock)
                except OSError:
                    return


@pytest.fixture
def attach() -> Iterator[Callable[[Reply], tuple[MicrovmInstance, list[Event]]]]:
    made: list[MicrovmInstance] = []

    def make(
        reply: Reply, policy: dict[str, Any] | None = None
    ) -> tuple[MicrovmInstance, list[Event]]:
        plan = compile_policy(validate_policy(policy or {"risk": "high"}), "microvm")
        events: list[Event] = []
        inst = MicrovmInstance(plan, "sb-liar", lambda e, d, dec, r: events.append((e, d, dec, r)))
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        FakeGuest(guest, reply)
        inst.attach(host)
        made.append(inst)
        return inst, events

    yield make
    for inst in made:
        receipt = inst.destroy()
        assert receipt.clean, receipt.as_dict()


def anomalies(events: list[Event]) -> list[str]:
    return [str(d.get("detail")) for e, d, dec, rule in events
            if e == "anomaly" and dec == "deny" and rule == "guest.protocol"]  # fmt: skip


def req(argv: list[str], max_output: int = 1024) -> ExecRequest:
    return ExecRequest(argv=tuple(argv), env={}, cwd="/workspace", max_output_bytes=max_output)


# -- the frame layer -------------------------------------------------------------------


def test_decoder_refuses_oversized_lengths_before_reading() -> None:
    dec = protocol.Decoder()
    with pytest.raises(protocol.FrameError, match="exceed"):
        dec.feed(struct.pack(">II", protocol.MAX_HEADER + 1, 0))
    with pytest.raises(protocol.FrameError, match="exceed"):
        protocol.Decoder().feed(struct.pack(">II", 2, 1 << 31))


def test_decoder_refuses_deep_nesting() -> None:
    """A header nested past the recursion limit is a malformed frame, not a crash."""
    deep = b'{"op":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with pytest.raises(protocol.FrameError, match="malformed"):
        protocol.Decoder().feed(struct.pack(">II", len(deep), 0) + deep)


@pytest.mark.parametrize("header", [
    {"op": "exec", "id": 1},                                  # a host op, not a guest op
    {"op": "exit", "id": 1, "code": 999},                     # out of range
    {"op": "exit", "id": 1, "signal": 0},
    {"op": "exit", "id": 1, "code": True},                    # bool is not int
    {"op": "exit", "id": 1, "workspace": [1, -5]},
    {"op": "started", "id": 1, "pid": "12"},
    {"op": "out", "id": 1, "stream": "stdin"},
    {"op": "done", "id": 1, "code": 0, "extra": 1},           # unknown field
    {"op": "error", "id": 1, "errno": 2, "error": "x" * 5000},
    {"op": "netdirect", "syscall": "connect", "address": "not-an-ip", "port": 1},
    {"op": "netdirect", "syscall": "connect", "address": "9.9.9.9", "port": 70000},
    {"op": "done", "code": 0},                                # reply without an id
])  # fmt: skip
def test_schema_rejects(header: dict[str, Any]) -> None:
    with pytest.raises(ProtocolViolation):
        check(header, b"")


def test_payload_on_a_payloadless_op_is_rejected() -> None:
    with pytest.raises(ProtocolViolation):
        check({"op": "done", "id": 1, "code": 0}, b"x")


# -- a lying guest behind a real host instance ---------------------------------------------


def test_oversized_frame_ends_the_sandbox_and_is_logged(attach: Any) -> None:
    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] == "exec":
            s.sendall(struct.pack(">II", 16, 64 << 20))  # claims a 64 MiB payload

    inst, events = attach(reply)
    res = inst.exec(req(["true"]))
    assert res.signal == 9 and res.exit_code == 137  # the VM is gone: reported as killed
    assert any("exceed" in a for a in anomalies(events)), events
    assert not inst.alive()
    with pytest.raises(SandboxError):
        inst.read_file("/workspace/x", 10)


def test_malformed_json_ends_the_sandbox_and_is_logged(attach: Any) -> None:
    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] == "exec":
            bad = b"{not json"
            s.sendall(struct.pack(">II", len(bad), 0) + bad)

    inst, events = attach(reply)
    res = inst.exec(req(["true"]))
    assert res.signal == 9
    assert any("malformed header" in a for a in anomalies(events)), events


def test_lies_inside_valid_frames_are_dropped_and_logged(attach: Any) -> None:
    """Bad fields, replies to unknown requests, output past the cap: the host stays correct."""

    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] != "exec":
            return
        rid = h["id"]
        s.sendall(frame({"op": "started", "id": rid, "pid": 7}))
        s.sendall(frame({"op": "exit", "id": rid + 100, "code": 0}))  # unknown request
        s.sendall(frame({"op": "exit", "id": rid, "code": 4096}))  # out of range
        for _ in range(64):  # 4 MiB of output
            s.sendall(frame({"op": "out", "id": rid, "stream": "stdout"}, b"y" * 65536))
        s.sendall(frame({"op": "exit", "id": rid, "code": 3, "signal": None}))

    inst, events = attach(reply)
    res = inst.exec(req(["true"], max_output=1000))
    assert res.exit_code in (3, 137)  # its real exit, or killed because output was capped
    assert res.truncated and len(res.stdout) == 1000
    found = anomalies(events)
    assert any("unknown request id" in a for a in found), found
    assert any("out of range" in a for a in found), found


def test_frames_after_exit_are_dropped_and_logged(attach: Any) -> None:
    """A second exit, output and a ``started`` after the exit: logged, dropped; the
    result already given stays right and the channel stays up."""
    rids: list[int] = []
    late = threading.Event()

    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] != "exec":
            return
        rid = h["id"]
        rids.append(rid)
        s.sendall(frame({"op": "started", "id": rid, "pid": 7}))
        s.sendall(frame({"op": "out", "id": rid, "stream": "stdout"}, b"hi\n"))
        s.sendall(frame({"op": "exit", "id": rid, "code": 0, "signal": None}))
        if len(rids) == 1:
            late.wait(5)  # until the host has the result
            s.sendall(frame({"op": "exit", "id": rid, "code": 3, "signal": None}))
            s.sendall(frame({"op": "out", "id": rid, "stream": "stdout"}, b"late"))
            s.sendall(frame({"op": "started", "id": rid, "pid": 8}))

    inst, events = attach(reply)
    res = inst.exec(req(["true"]))
    late.set()
    assert (res.exit_code, res.stdout) == (0, b"hi\n")
    end = time.monotonic() + 5
    while len([a for a in anomalies(events) if "unknown request id" in a]) < 3:
        assert time.monotonic() < end, anomalies(events)
        time.sleep(0.01)
    assert (res.exit_code, res.stdout) == (0, b"hi\n")
    assert inst.dead_reason is None
    assert inst.exec(req(["true"])).stdout == b"hi\n"


def test_read_with_more_data_than_asked_is_refused(attach: Any) -> None:
    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] == "file":
            s.sendall(frame({"op": "data", "id": h["id"]}, b"A" * 5000))
            s.sendall(frame({"op": "done", "id": h["id"], "code": 0}))

    inst, events = attach(reply)
    with pytest.raises(SandboxError, match="malformed reply"):
        inst.read_file("/workspace/f", 100)
    assert any("more data than asked" in a for a in anomalies(events)), events


@pytest.mark.parametrize("entry", [
    {"name": "../../etc/passwd", "type": "file", "size": 1},
    {"name": "/etc/shadow", "type": "file", "size": 1},
    {"name": "..", "type": "dir", "size": 0},
    {"name": "ok", "type": "blockdev", "size": 0},
    {"name": "ok", "type": "file", "size": -1},
])  # fmt: skip
def test_listing_that_names_files_outside_the_workspace(attach: Any, entry: dict[str, Any]) -> None:
    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] == "file":
            body = json.dumps([{"name": "fine.txt", "type": "file", "size": 3}, entry]).encode()
            s.sendall(frame({"op": "data", "id": h["id"]}, body))
            s.sendall(frame({"op": "done", "id": h["id"], "code": 0}))

    inst, events = attach(reply)
    with pytest.raises(SandboxError, match="malformed reply"):
        inst.list_dir("/workspace")
    assert any("malformed directory listing" in a for a in anomalies(events)), events


def test_truthful_guest_works(attach: Any) -> None:
    """The control: the same host code with an honest fake guest."""

    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] == "exec":
            s.sendall(frame({"op": "started", "id": h["id"], "pid": 7}))
            s.sendall(frame({"op": "out", "id": h["id"], "stream": "stdout"}, b"hi\n"))
            s.sendall(frame({"op": "exit", "id": h["id"], "code": 0, "signal": None,
                             "oom_kill": 0, "pids_max_hits": 0, "workspace": [0, 10]}))  # fmt: skip
        elif h["op"] == "file":
            body = json.dumps([{"name": "a.py", "type": "file", "size": 3}]).encode()
            s.sendall(frame({"op": "data", "id": h["id"]}, body))
            s.sendall(frame({"op": "done", "id": h["id"], "code": 0}))

    inst, events = attach(reply)
    res = inst.exec(req(["echo", "hi"]))
    assert (res.exit_code, res.stdout) == (0, b"hi\n")
    assert [e.name for e in inst.list_dir("/workspace")] == ["a.py"]
    assert anomalies(events) == []


# -- the file audit: the guest's trace reports ------------------------------------------

FILES = {"risk": "high", "audit": {"level": "files"}}
GOOD = {"syscall": "openat", "path": "/workspace/a", "flags": "O_RDONLY", "result": "ok", "pid": 7}


def traced(events: list[Event]) -> list[Event]:
    return [ev for ev in events if ev[1].get("source") == "guest agent (untrusted)"]


def exec_replying(*frames: Callable[[int], bytes]) -> Reply:
    """A guest that answers each exec with ``started``, the given frames, ``exit``."""

    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] != "exec":
            return
        rid = h["id"]
        s.sendall(frame({"op": "started", "id": rid, "pid": 7}))
        for f in frames:
            s.sendall(f(rid))
        s.sendall(frame({"op": "exit", "id": rid, "code": 0}))

    return reply


def trace(events: Any, **extra: Any) -> Callable[[int], bytes]:
    return lambda rid: frame({"op": "trace", "id": rid, "events": events, **extra})


def test_honest_trace_reports_are_logged_as_untrusted(attach: Any) -> None:
    inst, events = attach(exec_replying(trace([GOOD, {**GOOD, "syscall": "unlinkat",
                                                      "flags": None, "result": "EACCES"}])),
                          FILES)  # fmt: skip
    assert inst.exec(req(["true"])).exit_code == 0
    got = traced(events)
    assert [(e, dec, rule) for e, _d, dec, rule in got] == [
        ("file.open", "allow", None), ("file.unlink", "deny", "filesystem.write"),
    ]  # fmt: skip
    assert all(d["untrusted"] is True for _e, d, _dec, _r in got)
    assert anomalies(events) == []


def test_lies_in_trace_frames_are_dropped_and_logged(attach: Any) -> None:
    """Non-list events, non-dict events, wrong types, unwatched calls, unknown keys,
    huge strings, an id that is not running: logged as anomalies, never a crash."""
    bad_events = [
        3, "openat", None, [GOOD], {"syscall": 5}, {"path": "/x", "result": "ok"},
        {**GOOD, "pid": "7"}, {**GOOD, "pid": True}, {**GOOD, "path": ["/x"]},
        {**GOOD, "argv": {"a": 1}}, {**GOOD, "result": "ok; and more"},
        {**GOOD, "syscall": "ptrace"}, {**GOOD, "syscall": "newfstatat"},  # not watched at "files"
    ]  # fmt: skip
    liar = {**GOOD, "env": {"SECRET": "x"}, "evil": "y" * 10, "path": "/w/" + "p" * 60_000,
            "path2": "\ud800lone surrogate"}  # fmt: skip
    inst, events = attach(exec_replying(
        trace({"not": "a list"}),                               # schema: wrong type
        trace(bad_events),
        trace([liar]),
        lambda rid: frame({"op": "trace", "id": rid + 50, "events": [GOOD]}),  # not running
        trace([GOOD], error="x" * 100),                          # the guest says it lost some
        lambda rid: frame({"op": "trace", "events": [GOOD]}),   # no id
    ), FILES)  # fmt: skip
    assert inst.exec(req(["true"])).exit_code == 0
    assert inst.dead_reason is None  # the channel is still up
    found = anomalies(events)
    assert any("'events' has the wrong type" in a for a in found), found
    assert any(f"{len(bad_events)} malformed report(s)" in a for a in found), found
    assert any("which is not running" in a for a in found), found
    assert any("trace: missing id" in a for a in found), found
    assert any(e == "anomaly" and rule == "audit.level" and "tracer" in d["reason"]
               for e, d, _dec, rule in events)  # fmt: skip
    got = traced(events)
    assert len(got) == 2  # the liar (cleaned) and the GOOD of the "error" frame
    d = got[0][1]
    assert set(d) <= {"syscall", "path", "path2", "flags", "mode", "pid", "ppid", "parent",
                      "argv", "result", "source", "untrusted"}  # fmt: skip
    assert len(d["path"]) <= 1024 + 32  # bounded (cut by the host before the schema)
    d["path2"].encode()  # encodable: the lone surrogate was replaced
    # The log takes every record as it is (a real AuditLog: types, sizes, chain).
    with tempfile.TemporaryDirectory() as tmp:
        log = AuditLog(f"{tmp}/a.jsonl")
        log.append_many("sb-liar", [(e, d, dec, r) for e, d, dec, r in events])
        log.close()
        assert verify(f"{tmp}/a.jsonl").ok


def test_a_million_reports_are_bounded(attach: Any) -> None:
    """10^6 reports (1000 frames of 1000): the per-sandbox cap holds, one anomaly
    says so, the rest are counted and dropped; a frame over the per-frame cap is
    cut; the host's memory stays bounded."""
    small = {"syscall": "openat", "result": "ok"}
    one = frame({"op": "trace", "id": 1, "events": [small] * 1000})
    cap = 5000
    over = [small] * (_instance.MAX_TRACE_PER_FRAME + 500)

    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] != "exec":
            return
        rid = h["id"]
        assert rid == 1  # the pre-encoded frames name it
        s.sendall(frame({"op": "started", "id": rid, "pid": 7}))
        s.sendall(frame({"op": "trace", "id": rid, "events": over}))
        for _ in range(1000):
            s.sendall(one)
        s.sendall(frame({"op": "exit", "id": rid, "code": 0}))

    inst, events = attach(reply, FILES)
    inst.max_trace_events = cap
    tracemalloc.start()
    try:
        assert inst.exec(req(["true"])).exit_code == 0
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(traced(events)) == cap
    assert inst.trace_events == cap
    assert inst.trace_dropped == 1_000_000 + len(over) - cap - 500
    capped = [d for e, d, dec, rule in events if e == "anomaly" and rule == "audit.level"
              and dec == "deny" and "more than" in d["reason"]]  # fmt: skip
    assert len(capped) == 1 and capped[0]["action"] == "sandbox killed"  # fail closed
    assert any("at most" in a for a in anomalies(events))
    # The cap's records (kept by this test's sink) and a frame or two: not 10^6 reports.
    assert peak < 16 << 20, f"peak {peak >> 20} MiB"


def test_reports_batch_into_a_many_sink(attach: Any) -> None:
    """A sink with ``many`` gets each frame's records in one call (one fsync)."""
    inst, events = attach(exec_replying(trace([GOOD] * 10), trace([GOOD] * 3)), FILES)
    batches: list[list[Event]] = []
    sink = inst.on_event

    def one(e: str, d: dict[str, Any], dec: str, r: str | None) -> None:
        sink(e, d, dec, r)

    one.many = batches.append  # type: ignore[attr-defined]
    inst.on_event = one
    assert inst.exec(req(["true"])).exit_code == 0
    assert [len(b) for b in batches] == [10, 3]
    assert traced(events) == []  # nothing went one by one


def test_reports_when_the_audit_is_off_are_an_anomaly(attach: Any) -> None:
    inst, events = attach(exec_replying(trace([GOOD])))
    assert inst.exec(req(["true"])).exit_code == 0
    assert traced(events) == []
    assert any("file audit is off" in a for a in anomalies(events))


def test_a_guest_that_cannot_trace_refuses_the_command(attach: Any) -> None:
    """``wall: audit.level`` in an error: a WallError naming the rule, and a record."""

    def reply(h: dict[str, Any], s: socket.socket) -> None:
        if h["op"] in ("exec", "file"):
            s.sendall(frame({"op": "error", "id": h["id"], "errno": 1,
                             "error": "cannot trace the request", "wall": "audit.level"}))  # fmt: skip

    inst, events = attach(reply, FILES)
    with pytest.raises(WallError) as exc:
        inst.exec(req(["true"]))
    assert exc.value.rule == "audit.level"
    assert any(e == "blocked" and dec == "deny" and rule == "audit.level"
               for e, _d, dec, rule in events)  # fmt: skip
    with pytest.raises(WallError) as exc:
        inst.read_file("/workspace/f", 10)
    assert exc.value.rule == "audit.level"
    with pytest.raises(ProtocolViolation):  # only that wall may be named
        check({"op": "error", "id": 1, "errno": 1, "error": "x", "wall": "landlock"}, b"")
