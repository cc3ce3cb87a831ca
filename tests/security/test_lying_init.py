"""An in-sandbox init that lies: the host stays correct, ends the sandbox where the
protocol says so, and logs the anomaly (namespaces and gVisor; the microVM agent's
twin is tests/microvm/test_lying_guest.py).

No bwrap or runsc is needed: the supervisor's own instance is built directly and
attached to one end of a socketpair, with its real reader thread; a fake init on
the other end answers each request with a lie (malformed JSON, oversized
datagrams and frames, unknown ops, wrong types, out-of-range figures, replies
for requests never sent, frames after the exit, more output than asked for, a
``started`` pid that is not its child, a ``netwatch_fd`` that is no listener).
Every wait is bounded (joins with timeouts, short deadlines).
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import signal
import socket
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glassroom import SandboxClosed, WallError
from glassroom.backends import gvisor, namespaces
from glassroom.backends._channel import Channel
from glassroom.backends.base import ExecRequest
from glassroom.backends.gvisor import GvisorInstance
from glassroom.backends.namespaces import NamespacesInstance
from glassroom.policy import compile as compile_policy
from glassroom.policy import validate_policy

Event = tuple[str, dict[str, Any], str, "str | None"]
BOUND_S = 5.0  # no step of any test may wait longer than this


def anomalies(events: list[Event]) -> list[str]:
    return [str(d.get("detail")) for e, d, dec, rule in events
            if e == "anomaly" and dec == "deny" and rule == "init.protocol"]  # fmt: skip


def wait_for(cond: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + BOUND_S
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


def req(argv: list[str] | None = None, max_output: int = 1024, **kw: Any) -> ExecRequest:
    return ExecRequest(argv=tuple(argv or ["true"]), env={}, cwd="/workspace",
                       max_output_bytes=max_output, **kw)  # fmt: skip


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


#: Replies no host may accept: each is sent in place of the honest one.
#: ``{rid}`` is the request's id.
def lies(rid: int) -> list[tuple[str, bytes]]:
    return [
        ("malformed json", b"{not json"),
        ("not an object", b"[1, 2, 3]"),
        ("deep nesting", b"[" * 50_000 + b"]" * 50_000),
        ("unknown op", js({"op": "pwn", "id": rid})),
        ("op as a list", js({"op": ["exit"], "id": rid})),
        ("unknown field", js({"op": "started", "id": rid, "pid": 7, "uid": 0})),
        ("pid as a string", js({"op": "started", "id": rid, "pid": "7"})),
        ("bool as int", js({"op": "exit", "id": rid, "code": True})),
        ("id as float", js({"op": "started", "id": float(rid), "pid": 7})),
        ("huge string", js({"op": "error", "id": rid, "errno": 2, "error": "x" * 5000})),
        ("huge int", b'{"op": "started", "id": %d, "pid": %s}' % (rid, b"9" * 5000)),
        ("signal out of range", js({"op": "exit", "id": rid, "code": None, "signal": 99999})),
        ("code out of range", js({"op": "exit", "id": rid, "code": -5, "signal": None})),
        ("errno out of range", js({"op": "error", "id": rid, "errno": 1 << 40, "error": "x"})),
        ("error without errno", js({"op": "error", "id": rid, "error": "x"})),
        ("error without text", js({"op": "error", "id": rid, "errno": 5})),
        ("started without pid", js({"op": "started", "id": rid})),
        ("lone surrogate", b'{"op": "error", "id": %d, "errno": 5, "error": "\\ud800"}' % rid),
        ("not utf-8", b'{"op": "error", "id": 1, "errno": 5, "error": "\xff\xfe"}'),
    ]  # fmt: skip


LIE_NAMES = [name for name, _ in lies(1)]


# == namespaces: a fake init on a SOCK_SEQPACKET socketpair ==============================

NsReply = Callable[[dict[str, Any], list[int], socket.socket], None]


class FakeInit:
    """Reads the host's marshal messages (and their fds); ``reply`` lies as it likes.

    ``reply`` owns the fds it is given: the ones it leaves open are closed after it."""

    def __init__(self, sock: socket.socket, reply: NsReply) -> None:
        self.sock = sock
        self.reply = reply
        self.seen: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 20, 16)
            except OSError:
                return
            if not data:
                return
            msg = marshal.loads(data)
            self.seen.append(msg)
            try:
                self.reply(msg, fds, self.sock)
            except OSError:
                pass
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def honest_exec(msg: dict[str, Any], fds: list[int], s: socket.socket,
                out: bytes = b"hi\n") -> None:  # fmt: skip
    rid = msg["id"]
    s.send(js({"op": "started", "id": rid, "pid": 7}))
    os.write(fds[1], out)
    for fd in fds:
        os.close(fd)
    fds.clear()
    s.send(js({"op": "exit", "id": rid, "code": 0, "signal": None}))


NsAttach = Callable[..., tuple[NamespacesInstance, list[Event], FakeInit]]


@pytest.fixture
def ns() -> Iterator[NsAttach]:
    made: list[tuple[NamespacesInstance, FakeInit]] = []

    def make(reply: NsReply, *, reader: bool = True, runtime: float | None = None
             ) -> tuple[NamespacesInstance, list[Event], FakeInit]:  # fmt: skip
        plan = compile_policy(validate_policy({}), "namespaces")
        events: list[Event] = []
        inst = NamespacesInstance(plan, "sb-liar-ns",
                                  lambda e, d, dec, r: events.append((e, d, dec, r)))  # fmt: skip
        host, init = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inst.channel = Channel(host, inst._violation)
        fake = FakeInit(init, reply)
        if runtime is not None:  # before the reader starts: it waits until then
            inst.deadline = time.monotonic() + runtime
        if reader:
            inst._reader = threading.Thread(target=inst._read_loop, daemon=True)
            inst._reader.start()
        made.append((inst, fake))
        return inst, events, fake

    yield make
    for inst, fake in made:
        # kill() ends a real init, and so its end of the channel: the fake's goes here.
        with contextlib.suppress(OSError):
            fake.sock.shutdown(socket.SHUT_RDWR)
        t0 = time.monotonic()
        receipt = inst.destroy()
        assert time.monotonic() - t0 < BOUND_S
        assert receipt.clean, receipt.as_dict()
        assert inst._reader is None or not inst._reader.is_alive()


def ns_ended(inst: NamespacesInstance) -> None:
    """The reader stopped, the channel is closed: no request can reach the init."""
    assert inst._reader is not None
    inst._reader.join(timeout=BOUND_S)
    assert not inst._reader.is_alive()
    assert inst.dead_reason == "protocol violation"
    with pytest.raises(SandboxClosed):
        inst.exec(req())


def test_ns_truthful_init_works(ns: NsAttach) -> None:
    """The control: the same host code with an honest fake init."""

    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] == "exec":
            honest_exec(msg, fds, s)
        elif msg["op"] == "file" and msg["kind"] == "read":
            s.send(js({"op": "started", "id": msg["id"], "pid": 8}))
            os.write(fds[0], b"data")
            os.close(fds.pop())
            s.send(js({"op": "exit", "id": msg["id"], "code": 0, "signal": None}))

    inst, events, _fake = ns(reply)
    res = inst.exec(req(["echo", "hi"]))
    assert (res.exit_code, res.signal, res.stdout) == (0, None, b"hi\n")
    assert inst.read_file("/workspace/f", 100) == b"data"
    assert inst.exec(req()).exit_code == 0
    assert anomalies(events) == []
    assert inst.dead_reason is None and inst._reader is not None and inst._reader.is_alive()


@pytest.mark.parametrize("lie", LIE_NAMES)
def test_ns_lie_ends_the_sandbox_and_is_logged(ns: NsAttach, lie: str) -> None:
    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] == "exec":
            s.send(dict(lies(msg["id"]))[lie])

    inst, events, _fake = ns(reply)
    with pytest.raises(SandboxClosed):
        inst.exec(req())
    assert anomalies(events), events
    ns_ended(inst)


def test_ns_lie_after_started_reports_a_kill(ns: NsAttach) -> None:
    """A lie once the command runs: the sandbox is ended, the command reported killed."""

    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] == "exec":
            s.send(js({"op": "started", "id": msg["id"], "pid": 7}))
            s.send(b"{not json")

    inst, events, _fake = ns(reply)
    res = inst.exec(req())
    assert (res.exit_code, res.signal) == (137, 9)
    assert any("malformed reply" in a for a in anomalies(events)), events
    ns_ended(inst)


def test_ns_oversized_datagram_is_refused(ns: NsAttach) -> None:
    big = js({"op": "error", "id": 1, "errno": 2, "error": "x" * 4000}) + b" " * (70 << 10)

    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] == "exec":
            s.send(big)

    inst, events, _fake = ns(reply)
    with pytest.raises(SandboxClosed):
        inst.exec(req())
    assert any("exceeds" in a for a in anomalies(events)), events
    ns_ended(inst)


def test_ns_replies_for_unknown_and_ended_requests_are_logged(ns: NsAttach) -> None:
    """Replies for ids never sent, a second exit, frames after the exit: logged and
    dropped (the sandbox goes on), and the results the host gave stay right."""
    rids: list[int] = []

    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] == "exec":
            rids.append(msg["id"])
            s.send(js({"op": "exit", "id": msg["id"] + 100, "code": 0, "signal": None}))
            honest_exec(msg, fds, s)

    inst, events, fake = ns(reply)
    res = inst.exec(req())
    assert (res.exit_code, res.stdout) == (0, b"hi\n")
    wait_for(lambda: any("unknown request id 101" in a for a in anomalies(events)), "anomaly")
    rid = rids[0]
    fake.sock.send(js({"op": "exit", "id": rid, "code": 3, "signal": None}))  # a second exit
    fake.sock.send(js({"op": "started", "id": rid, "pid": 9}))  # a frame after the exit
    fake.sock.send(js({"op": "error", "id": 1 << 40, "errno": 1, "error": "x"}))
    wait_for(lambda: len(anomalies(events)) >= 4, "the anomalies")
    found = anomalies(events)
    assert found.count(f"reply for unknown request id {rid}") == 2, found
    assert inst.dead_reason is None  # still running, still correct
    assert inst.exec(req()).stdout == b"hi\n"


def test_ns_output_after_exit_and_beyond_the_cap_is_bounded(ns: NsAttach) -> None:
    """4 MiB asked 1000; output still coming after the exit: both bounded."""

    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] != "exec":
            return
        rid = msg["id"]
        s.send(js({"op": "started", "id": rid, "pid": 7}))
        if msg["argv"] == ["flood"]:
            try:
                for _ in range(64):
                    os.write(fds[1], b"y" * 65536)
            except BrokenPipeError:
                pass
            s.send(js({"op": "exit", "id": rid, "code": 0, "signal": None}))
        else:  # "late": the exit first, then output on and on (a grandchild's)
            s.send(js({"op": "exit", "id": rid, "code": 0, "signal": None}))
            out = os.dup(fds[1])

            def trickle() -> None:
                try:
                    for _ in range(300):
                        os.write(out, b"z")
                        time.sleep(0.01)
                except OSError:
                    pass
                finally:
                    os.close(out)

            threading.Thread(target=trickle, daemon=True).start()

    inst, _events, _fake = ns(reply)
    res = inst.exec(req(["flood"], max_output=1000))
    assert res.truncated and len(res.stdout) == 1000 and "output" in res.limits_hit
    t0 = time.monotonic()
    res = inst.exec(req(["late"], max_output=1000))
    assert time.monotonic() - t0 < 2.0  # the exit ends it, after a short grace
    assert res.exit_code == 0 and len(res.stdout) < 1000
    assert inst.dead_reason is None


def test_ns_started_pid_is_never_signalled_on_the_host(ns: NsAttach,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``started`` naming pid 1 (the host's init): a timeout's kill goes to the
    request over the channel, never to that pid on the host."""
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def spy(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        if pid != 1:
            real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", spy)

    def reply(msg: dict[str, Any], fds: list[int], s: socket.socket) -> None:
        if msg["op"] == "exec":
            s.send(js({"op": "started", "id": msg["id"], "pid": 1}))
            for fd in fds:
                os.close(fd)
            fds.clear()
        elif msg["op"] == "signal":
            s.send(js({"op": "exit", "id": msg["target"], "code": None, "signal": msg["sig"]}))

    inst, _events, fake = ns(reply)
    res = inst.exec(req(timeout_s=0.2))
    assert res.timed_out and res.signal == 9
    assert [m["target"] for m in fake.seen if m["op"] == "signal"] == [1]  # the request id
    assert all(pid != 1 for pid, _sig in sent), sent


def test_ns_silent_init_is_ended_at_the_deadline(ns: NsAttach) -> None:
    """An init that never answers: the sandbox's max runtime ends the wait."""
    inst, events, _fake = ns(lambda m, f, s: None, runtime=0.3)
    t0 = time.monotonic()
    with pytest.raises(SandboxClosed) as exc:
        inst.exec(req())
    assert time.monotonic() - t0 < BOUND_S
    assert exc.value.rule == "resources.max_runtime_s"
    assert any(rule == "resources.max_runtime_s" for _e, _d, _dec, rule in events)


@pytest.mark.parametrize(("first", "match"), [
    (b"{not json", "init: malformed reply"),
    (js({"op": "ready"}), "lacks landlock_abi"),                   # the host reads it
    (js({"op": "ready", "landlock_abi": True}), "unexpected value"),
    (js({"op": "ready", "landlock_abi": 3, "netwatch_fd": -1}), "out of range"),
    (js({"op": "started", "id": 1, "pid": 5}), "unexpected first reply"),
    (js({"op": "fatal", "wall": "landlock", "error": "no"}), "landlock: no"),
    (b" " * (70 << 10), "exceeds"),
])  # fmt: skip
def test_ns_bad_first_reply_fails_the_start(ns: NsAttach, first: bytes, match: str) -> None:
    inst, _events, fake = ns(lambda m, f, s: None, reader=False)
    fake.sock.send(first)
    assert inst.channel is not None
    with pytest.raises(WallError, match=match):
        inst._await_ready(inst.channel.sock)


def test_ns_silent_first_reply_times_out(ns: NsAttach, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(namespaces, "START_TIMEOUT_S", 0.2)
    inst, _events, _fake = ns(lambda m, f, s: None, reader=False)
    assert inst.channel is not None
    with pytest.raises(WallError, match="no answer"):
        inst._await_ready(inst.channel.sock)


def test_ns_honest_ready_is_taken(ns: NsAttach) -> None:
    inst, _events, fake = ns(lambda m, f, s: None, reader=False)
    fake.sock.send(js({"op": "ready", "landlock_abi": 3, "pid": 2}))
    assert inst.channel is not None
    assert inst._await_ready(inst.channel.sock)["landlock_abi"] == 3


@pytest.fixture
def fake_sandbox_pid() -> Iterator[int]:
    """A real process with a child (bwrap's pid 1 and the init, as netwatch looks for them)."""
    p = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        path = f"/proc/{p.pid}/task/{p.pid}/children"
        wait_for(lambda: bool(Path(path).read_text().split()), "the child")
        yield p.pid
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=BOUND_S)


@pytest.mark.parametrize("fd", [0, 1, 999])  # /dev/null, /dev/null, not open
def test_ns_fake_netwatch_fd_is_refused(ns: NsAttach, fake_sandbox_pid: int, fd: int) -> None:
    """The init names an fd that is no seccomp listener: the start fails (a WallError),
    the host keeps nothing of it, and the init is told it was taken (or not)."""
    inst, _events, fake = ns(lambda m, f, s: None, reader=False)
    inst.child_pid = fake_sandbox_pid
    with pytest.raises(WallError) as exc:
        inst._attach_netwatch({"op": "ready", "landlock_abi": 3, "netwatch_fd": fd})
    assert exc.value.rule == "network"
    assert inst._netwatch is None
    wait_for(lambda: any(m["op"] == "netwatch-taken" for m in fake.seen), "netwatch-taken")


# == gVisor: a fake init behind a fake runsc, framed over a stream ========================

GvSend = Callable[[int, int, bytes], None]
GvReply = Callable[[dict[str, Any], GvSend], None]
KJ, KO, KE = ord("J"), ord("O"), ord("E")


class FakeRunsc:
    """What the reader needs of runsc's Popen: its stdio is one end of a socketpair."""

    def __init__(self, host: socket.socket, init: socket.socket) -> None:
        self.stdin = host.makefile("wb")
        self.stdout = host.makefile("rb", buffering=0)
        self.stderr = None
        self.pid = 1 << 30  # never a pid: the receipt's leftovers find nothing
        self._init = init
        self.killed = False

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def kill(self) -> None:
        self.killed = True
        try:
            self._init.shutdown(socket.SHUT_RDWR)  # the reader sees EOF, the fake init too
        except OSError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        return -9


class FakeStreamInit:
    """Reads the host's frames (M: marshal); ``reply(msg, send)`` answers with frames."""

    def __init__(self, sock: socket.socket, reply: GvReply) -> None:
        self.sock = sock
        self.reply = reply
        self.seen: list[tuple[int, int, Any]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def send(self, kind: int, rid: int, payload: bytes) -> None:
        with self.lock:
            self.sock.sendall(bytes((kind,)) + rid.to_bytes(4, "big")
                              + len(payload).to_bytes(4, "big") + payload)  # fmt: skip

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[5:9], "big"):
                kind, rid = buf[0], int.from_bytes(buf[1:5], "big")
                n = int.from_bytes(buf[5:9], "big")
                payload, buf = buf[9 : 9 + n], buf[9 + n :]
                msg = marshal.loads(payload) if kind == ord("M") else None
                self.seen.append((kind, rid, msg))
                if msg is not None:
                    try:
                        self.reply(msg, self.send)
                    except OSError:
                        return


def gv_honest(msg: dict[str, Any], send: GvSend) -> None:
    rid = msg.get("id", 0)
    if msg["op"] == "exec":
        send(KJ, 0, js({"op": "started", "id": rid, "pid": 7}))
        send(KO, rid, b"hi\n")
        send(KJ, 0, js({"op": "exit", "id": rid, "code": 0, "signal": None}))
    elif msg["op"] == "file":
        send(KJ, 0, js({"op": "started", "id": rid, "pid": 8}))
        send(KO, rid, b"data")
        send(KJ, 0, js({"op": "exit", "id": rid, "code": 0, "signal": None}))
    elif msg["op"] == "statfs":
        send(KJ, 0, js({"op": "statfs", "id": rid, "used": 10, "total": 100}))


GvAttach = Callable[..., tuple[GvisorInstance, list[Event], FakeStreamInit]]


@pytest.fixture
def gv() -> Iterator[GvAttach]:
    made: list[GvisorInstance] = []

    def make(reply: GvReply, runtime: float | None = None
             ) -> tuple[GvisorInstance, list[Event], FakeStreamInit]:  # fmt: skip
        plan = compile_policy(validate_policy({}), "gvisor")
        events: list[Event] = []
        inst = GvisorInstance(plan, "sb-liar-gv",
                              lambda e, d, dec, r: events.append((e, d, dec, r)))  # fmt: skip
        host, init = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inst.proc = FakeRunsc(host, init)  # type: ignore[assignment]
        fake = FakeStreamInit(init, reply)
        if runtime is not None:  # before the reader starts: it waits until then
            inst.deadline = time.monotonic() + runtime
        inst._reader = threading.Thread(target=inst._read_loop, daemon=True)
        inst._reader.start()
        made.append(inst)
        return inst, events, fake

    yield make
    for inst in made:
        t0 = time.monotonic()
        receipt = inst.destroy()
        assert time.monotonic() - t0 < BOUND_S
        assert receipt.clean, receipt.as_dict()
        assert inst._reader is not None and not inst._reader.is_alive()


def gv_ended(inst: GvisorInstance) -> None:
    assert inst._reader is not None
    inst._reader.join(timeout=BOUND_S)
    assert not inst._reader.is_alive()
    assert inst.dead_reason == "protocol violation"
    assert inst.proc is not None and inst.proc.killed  # type: ignore[attr-defined]
    with pytest.raises(SandboxClosed):
        inst.exec(req())


def test_gv_truthful_init_works(gv: GvAttach) -> None:
    inst, events, _fake = gv(gv_honest)
    res = inst.exec(req(["echo", "hi"]))
    assert (res.exit_code, res.signal, res.stdout) == (0, None, b"hi\n")
    assert inst.read_file("/workspace/f", 100) == b"data"
    assert inst.workspace_usage() == (10, 100)
    assert anomalies(events) == []
    assert inst.dead_reason is None


@pytest.mark.parametrize("lie", LIE_NAMES)
def test_gv_lie_ends_the_sandbox_and_is_logged(gv: GvAttach, lie: str) -> None:
    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "exec":
            send(KJ, 0, dict(lies(msg["id"]))[lie])

    inst, events, _fake = gv(reply)
    with pytest.raises(SandboxClosed):
        inst.exec(req())
    assert anomalies(events), events
    gv_ended(inst)


def test_gv_statfs_without_figures_is_a_violation(gv: GvAttach) -> None:
    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "statfs":
            send(KJ, 0, js({"op": "statfs", "id": msg["id"]}))

    inst, events, _fake = gv(reply)
    assert inst.workspace_usage() is None
    assert any("lacks" in a for a in anomalies(events)), events
    gv_ended(inst)


@pytest.mark.parametrize(("head", "what"), [
    (bytes((KJ,)) + (0).to_bytes(4, "big") + (gvisor.MAX_JSON + 1).to_bytes(4, "big"), "json"),
    (bytes((KO,)) + (1).to_bytes(4, "big") + (0xFFFFFFFF).to_bytes(4, "big"), "4 GiB output"),
    (b"X" + bytes(8), "unknown kind"),
])  # fmt: skip
def test_gv_oversized_length_is_refused_before_the_payload(gv: GvAttach, head: bytes,
                                                           what: str) -> None:  # fmt: skip
    """Only the 9-byte head is sent, and the stream stays open: the host must refuse
    it at once, never wait for (or allocate) the payload it announces."""

    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "exec":
            fake.sock.sendall(head)

    tracemalloc.start()
    try:
        inst, events, fake = gv(reply)
        t0 = time.monotonic()
        with pytest.raises(SandboxClosed):
            inst.exec(req())
        assert time.monotonic() - t0 < 2.0
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"
    assert any("bad frame" in a for a in anomalies(events)), events
    gv_ended(inst)


def test_gv_oversized_frame_is_refused(gv: GvAttach) -> None:
    big = js({"op": "error", "id": 1, "errno": 2, "error": "x"}) + b" " * (gvisor.MAX_JSON + 1)

    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "exec":
            send(KJ, 0, big)

    inst, events, _fake = gv(reply)
    with pytest.raises(SandboxClosed):
        inst.exec(req())
    assert any("bad frame" in a for a in anomalies(events)), events
    gv_ended(inst)


@pytest.mark.parametrize("frame", [
    (KJ, js({"op": "exit", "id": 999, "code": 0, "signal": None})),  # an id never sent
    (KO, b"output for an id never sent"),
    (KE, b"output for id 0"),
])  # fmt: skip
def test_gv_frames_for_requests_never_sent_end_the_sandbox(gv: GvAttach,
                                                           frame: tuple[int, bytes]) -> None:  # fmt: skip
    kind, payload = frame

    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "exec":
            send(KJ, 0, js({"op": "started", "id": msg["id"], "pid": 7}))
            send(kind, {KO: 999, KE: 0}.get(kind, 0), payload)

    inst, events, _fake = gv(reply)
    res = inst.exec(req())
    assert (res.exit_code, res.signal) == (137, 9)
    assert any("unknown request id" in a for a in anomalies(events)), events
    gv_ended(inst)


def test_gv_frames_after_exit_are_logged_and_dropped(gv: GvAttach) -> None:
    """A second exit, output and a ``started`` after the exit: logged, dropped, the
    result given stays right and the sandbox goes on."""
    inst, events, fake = gv(gv_honest)
    res = inst.exec(req())
    assert (res.exit_code, res.stdout) == (0, b"hi\n")
    rid = inst._next_id - 1
    fake.send(KJ, 0, js({"op": "exit", "id": rid, "code": 3, "signal": None}))
    fake.send(KO, rid, b"late output")
    fake.send(KJ, 0, js({"op": "started", "id": rid, "pid": 9}))
    wait_for(lambda: len(anomalies(events)) >= 3, "the anomalies")
    found = anomalies(events)
    assert any(f"'exit' reply for request {rid} after its end" in a for a in found), found
    assert any(f"output for request {rid} after its end" in a for a in found), found
    assert res.exit_code == 0 and res.stdout == b"hi\n"
    assert inst.dead_reason is None
    assert inst.exec(req()).stdout == b"hi\n"


def test_gv_output_beyond_the_cap_is_cut(gv: GvAttach) -> None:
    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "exec":
            rid = msg["id"]
            send(KJ, 0, js({"op": "started", "id": rid, "pid": 7}))
            for _ in range(64):  # 4 MiB
                send(KO, rid, b"y" * gvisor.MAX_DATA)
            send(KJ, 0, js({"op": "exit", "id": rid, "code": 0, "signal": None}))

    inst, _events, fake = gv(reply)
    res = inst.exec(req(max_output=1000))
    assert res.truncated and len(res.stdout) == 1000 and "output" in res.limits_hit
    wait_for(lambda: any(m is not None and m["op"] == "close_output" for _k, _r, m in fake.seen),
             "close_output")  # fmt: skip
    assert inst.dead_reason is None


def test_gv_started_pid_is_only_ever_named_to_the_init(gv: GvAttach,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    sent: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(pid))

    def reply(msg: dict[str, Any], send: GvSend) -> None:
        if msg["op"] == "exec":
            send(KJ, 0, js({"op": "started", "id": msg["id"], "pid": 1}))
        elif msg["op"] == "signal":
            send(KJ, 0, js({"op": "exit", "id": msg["target"], "code": None, "signal": msg["sig"]}))

    inst, _events, fake = gv(reply)
    res = inst.exec(req(timeout_s=0.2))
    assert res.timed_out and res.signal == 9
    assert [m["target"] for _k, _r, m in fake.seen if m and m["op"] == "signal"] == [1]
    assert sent == []


def test_gv_silent_init_is_ended_at_the_deadline(gv: GvAttach) -> None:
    inst, events, _fake = gv(lambda m, s: None, runtime=0.3)
    t0 = time.monotonic()
    with pytest.raises(SandboxClosed) as exc:  # the exec never started: the sandbox is gone
        inst.exec(req())
    assert time.monotonic() - t0 < BOUND_S
    assert exc.value.rule == "resources.max_runtime_s"
    assert any(rule == "resources.max_runtime_s" for _e, _d, _dec, rule in events)
