"""A bounded fuzz of every host-side parser of what the in-sandbox init/agent says.

Property: arbitrary bytes (split at arbitrary points) make the parsers raise only
their documented exception (``ProtocolViolation``, ``protocol.FrameError``) or
route/log an anomaly, never anything else (no IndexError, KeyError, TypeError,
RecursionError, MemoryError, UnicodeError); and the memory they hold stays bounded.
Hypothesis runs a fixed number of examples (no deadline) plus a seeded random loop.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import tracemalloc
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glassroom.backends import _channel, gvisor
from glassroom.backends._channel import Channel, ProtocolViolation, parse_reply
from glassroom.backends.gvisor import GvisorInstance
from glassroom.backends.microvm._channel import GuestChannel, check
from glassroom.backends.microvm._channel import ProtocolViolation as GuestViolation
from glassroom.guest import protocol
from glassroom.policy import compile as compile_policy
from glassroom.policy import validate_policy

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

FIELDS = ["op", "id", "pid", "code", "signal", "errno", "error", "wall", "landlock_abi",
          "netwatch_fd", "used", "total", "stream", "events", "workspace", "version", "x"]  # fmt: skip
OPS = ["ready", "started", "exit", "error", "fatal", "statfs", "out", "data", "done",
       "trace", "netdirect", "configured", "refused", "pwn", ""]  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True), st.text(max_size=50), st.sampled_from(OPS),
)  # fmt: skip
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)  # fmt: skip
headers = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6).map(
    lambda d: d if "op" in d else {"op": "exit", **d}
) | st.fixed_dictionaries({"op": st.sampled_from(OPS), "id": st.integers(-2, 5)},
                          optional={"pid": scalars, "code": scalars, "signal": scalars,
                                    "errno": scalars, "error": scalars})  # fmt: skip


def to_json(h: Any) -> bytes:
    return json.dumps(h, allow_nan=True).encode()


replies = st.one_of(st.binary(max_size=300), headers.map(to_json),
                    st.sampled_from([b"[" * 30_000, b"{" * 5, b'"\\ud800"', b"\xff",
                                     b'{"op":"exit","id":1,"code":' + b"9" * 5000 + b"}"]))  # fmt: skip


# -- namespaces / gVisor: parse_reply ----------------------------------------------------


def parse_both(raw: bytes) -> None:
    for parse in (parse_reply, gvisor.parse_reply):
        try:
            msg = parse(raw)
        except ProtocolViolation:
            continue
        assert isinstance(msg, dict) and isinstance(msg["op"], str)
        for key in _channel._REQUIRED.get(msg["op"], ()):
            assert key in msg


def test_parse_reply_op_of_any_type() -> None:
    """Found by this fuzz: ``{"op": []}`` raised TypeError (unhashable) from ``in ops``."""
    for op in ([], {}, [1], 1, None, 1.5, True):
        for parse in (parse_reply, gvisor.parse_reply):
            try:
                parse(json.dumps({"op": op, "id": 1}).encode())
            except ProtocolViolation:
                continue
            raise AssertionError(f"op {op!r} accepted")


@FUZZ
@given(replies)
def test_parse_reply_raises_only_protocol_violation(raw: bytes) -> None:
    parse_both(raw)


# -- namespaces: the Channel's receive path, datagram by datagram -------------------------


def channel_feed(datagrams: list[bytes]) -> list[str]:
    host, init = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    host.settimeout(5)
    said: list[str] = []
    ch = Channel(host, said.append)
    _rid, q = ch.new_request()
    try:
        for d in datagrams:
            init.send(d or b" ")  # an empty datagram would read as EOF
            try:
                msg = ch.recv_one()
            except ProtocolViolation as exc:
                said.append(str(exc))
                continue
            assert msg is not None
            ch.dispatch(msg)
        init.close()
        assert ch.recv_one() is None
    finally:
        ch.close("done")
        init.close()
    while not q.empty():
        assert isinstance(q.get_nowait(), dict)
    return said


@FUZZ
@given(st.lists(replies, max_size=6))
def test_channel_receive_path(datagrams: list[bytes]) -> None:
    channel_feed(datagrams)


def test_channel_refuses_an_oversized_datagram() -> None:
    said = channel_feed([b" " * (_channel.MAX_REPLY + 1000)])
    assert any("exceeds" in s for s in said)


# -- gVisor: the frame reader over a byte stream split anywhere ---------------------------


class StreamProc:
    """What ``GvisorInstance._pump`` reads: each chunk one SEQPACKET datagram, so the
    reader sees the stream split exactly where the fuzzer split it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def write() -> None:  # on a thread: the stream may be larger than the buffer
            try:
                for c in chunks:
                    if c:
                        w.send(c)
            except OSError:  # the reader stopped (a violation): the rest is not read
                pass
            finally:
                w.close()  # EOF after the last chunk

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()
        self.stdout = self._r.makefile("rb", buffering=0)
        self.stdin = None
        self.stderr = None
        self.pid = 1 << 30

    def poll(self) -> int | None:
        return None

    def kill(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def close(self) -> None:
        self.stdout.close()
        self._r.close()
        self._writer.join(timeout=5)
        assert not self._writer.is_alive()


_PLAN = None


def pump(chunks: list[bytes]) -> tuple[str, list[str], int]:
    global _PLAN
    _PLAN = _PLAN or compile_policy(validate_policy({}), "gvisor")
    said: list[str] = []
    inst = GvisorInstance(_PLAN, "sb-fuzz",
                          lambda e, d, dec, r: said.append(str(d.get("detail"))))  # fmt: skip
    got = [0]
    for _ in range(3):  # requests 1..3 wait; 4 exists and is forgotten
        inst._new_req(lambda kind, data: got.__setitem__(0, got[0] + len(data)))
    inst._new_req()
    inst._forget(4)
    p = StreamProc(chunks)
    try:
        reason = inst._pump(p, bytearray())  # type: ignore[arg-type]
    finally:
        p.close()
    assert reason in ("sandbox exited", "protocol violation")
    for r in inst._reqs.values():
        while not r.q.empty():
            assert isinstance(r.q.get_nowait(), dict)
    return reason, said, got[0]


def frame(kind: int, rid: int, payload: bytes, n: int | None = None) -> bytes:
    n = len(payload) if n is None else n
    return bytes((kind,)) + (rid % (1 << 32)).to_bytes(4, "big") + n.to_bytes(4, "big") + payload


frames = st.one_of(
    st.tuples(st.sampled_from([ord("J"), ord("O"), ord("E")]), st.integers(0, 6), replies)
    .map(lambda t: frame(*t)),
    st.tuples(st.integers(0, 255), st.integers(0, (1 << 32) - 1), st.binary(max_size=40),
              st.integers(0, (1 << 32) - 1)).map(lambda t: frame(*t)),
    st.binary(max_size=30),
)  # fmt: skip


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return [c for c in out if c]


@FUZZ
@given(st.lists(frames, max_size=6), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_gvisor_reader_on_any_stream(parts: list[bytes], cuts: list[int]) -> None:
    pump(split(b"".join(parts), cuts))


def test_gvisor_reader_keeps_honest_frames_across_any_split() -> None:
    """The same honest stream, cut at every point: routed the same way each time."""
    data = (frame(ord("J"), 0, json.dumps({"op": "started", "id": 1, "pid": 7}).encode())
            + frame(ord("O"), 1, b"hello") + frame(ord("E"), 2, b"!")
            + frame(ord("J"), 0, json.dumps({"op": "exit", "id": 1, "code": 0}).encode()))  # fmt: skip
    for cut in range(len(data) + 1):
        assert pump([data[:cut], data[cut:]]) == ("sandbox exited", [], 6)


# -- microVM: the frame decoder, the schema, the guest channel ------------------------------


def guest_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload


guest_frames = st.one_of(
    st.tuples(replies, st.binary(max_size=64)).map(lambda t: guest_frame(*t)),
    st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
    .map(lambda t: struct.pack(">II", *t)),
    st.binary(max_size=30),
)  # fmt: skip


def guest_feed(chunks: list[bytes]) -> None:
    dec = protocol.Decoder()
    said: list[str] = []
    host, guest = socket.socketpair()
    ch = GuestChannel(host, said.append)
    got: list[dict[str, Any]] = []
    ch.register(lambda h, p: got.append(h))
    ch.on_untagged(lambda h, p: got.append(h))
    try:
        for c in chunks:
            try:
                for header, payload in dec.feed(c):
                    assert isinstance(header, dict) and isinstance(payload, bytes)
                    try:
                        check(header, payload)
                    except GuestViolation:
                        pass
            except protocol.FrameError:
                break
        for c in chunks:
            try:
                ch.feed(c)
            except GuestViolation:
                break
    finally:
        ch.close("done")
        host.close()
        guest.close()


@FUZZ
@given(st.lists(guest_frames, max_size=6), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_microvm_decoder_and_check_on_any_stream(parts: list[bytes], cuts: list[int]) -> None:
    guest_feed(split(b"".join(parts), cuts))


@FUZZ
@given(headers, st.binary(max_size=protocol.CHUNK + 10))
def test_microvm_check_raises_only_protocol_violation(header: dict[str, Any],
                                                      payload: bytes) -> None:  # fmt: skip
    try:
        check(header, payload)
    except GuestViolation:
        pass


# -- a seeded random loop: mutated honest traffic into every parser ------------------------


def test_seeded_random_bytes_into_every_parser() -> None:
    rng = random.Random(20261207)
    honest = [json.dumps(h).encode() for h in (
        {"op": "started", "id": 1, "pid": 7}, {"op": "exit", "id": 1, "code": 0, "signal": None},
        {"op": "error", "id": 2, "errno": 2, "error": "no"}, {"op": "ready", "landlock_abi": 3},
        {"op": "statfs", "id": 3, "used": 1, "total": 2},
    )]  # fmt: skip

    def mutate(b: bytes) -> bytes:
        b = bytearray(b)
        for _ in range(rng.randint(0, 4)):
            op = rng.random()
            i = rng.randrange(len(b) + 1)
            if op < 0.4 and b:
                b[min(i, len(b) - 1)] = rng.randrange(256)
            elif op < 0.7:
                b[i:i] = rng.randbytes(rng.randint(1, 8))
            else:
                del b[i : i + rng.randint(1, 8)]
        return bytes(b)

    for _ in range(300):
        msgs = [mutate(rng.choice(honest)) if rng.random() < 0.8
                else rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 5))]  # fmt: skip
        for m in msgs:
            parse_both(m)
        channel_feed(msgs)
        stream = b"".join(frame(rng.choice(b"JOE"), rng.randint(0, 5), m) for m in msgs)
        cuts = [rng.randrange(len(stream) + 1) for _ in range(rng.randint(0, 6))]
        pump(split(mutate(stream) if rng.random() < 0.3 else stream, cuts))
        gstream = b"".join(guest_frame(m) for m in msgs)
        guest_feed(split(mutate(gstream) if rng.random() < 0.3 else gstream, cuts))


# -- memory: the readers hold at most one bounded frame ---------------------------------------


def test_memory_stays_bounded_on_floods() -> None:
    """8 MiB of noise into each reader, and lengths announcing 4 GiB: the peak stays
    within a frame's bound, never the stream's or the announced size."""
    rng = random.Random(7)
    noise = [rng.randbytes(1 << 16) for _ in range(128)]  # made before tracing: 8 MiB
    honest_out = [frame(ord("O"), 1, b"y" * gvisor.MAX_DATA) for _ in range(128)]
    announce = [struct.pack(">II", protocol.MAX_HEADER, protocol.MAX_PAYLOAD)]
    tracemalloc.start()
    try:
        dec = protocol.Decoder()
        try:
            dec.feed(struct.pack(">II", 1 << 31, 1 << 31))
        except protocol.FrameError:
            pass
        dec = protocol.Decoder()
        for a in announce:  # a maximal frame, trickled: held until complete, no more
            dec.feed(a)
        for _ in range(protocol.MAX_HEADER // 4096):
            dec.feed(b" " * 4096)
        pump([frame(ord("O"), 1, b"", (1 << 32) - 1)])
        pump([frame(ord("J"), 0, b"", gvisor.MAX_JSON), *([b" " * 4096] * 15)])
        reason, _said, got = pump(honest_out[:64])  # 4 MiB of real output, passed on
        assert reason == "sandbox exited" and got == 64 * gvisor.MAX_DATA
        for chunk in noise[:16]:
            parse_both(chunk)
        channel_feed(noise[:16])
        guest_feed(noise[:32])
        pump(noise[:32])
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"
