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
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from glassroom import SandboxError
from glassroom.backends.base import ExecRequest
from glassroom.backends.microvm import MicrovmInstance
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

    def make(reply: Reply) -> tuple[MicrovmInstance, list[Event]]:
        plan = compile_policy(validate_policy({"risk": "high"}), "microvm")
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
