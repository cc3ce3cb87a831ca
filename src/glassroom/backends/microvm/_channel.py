"""The host end of the microVM control channel: every frame is untrusted.

The guest kernel and the agent are inside the sandbox, so anything they
say may be a lie.  Frames are length-bounded before they are read
(``guest.protocol``), then each header is checked against a schema (op,
field names, types, ranges).  A frame that cannot be parsed ends the
channel (the stream cannot be trusted to resynchronize) and the VM is
killed; a well-formed frame that makes no sense (an unknown request id,
output after exit) is logged as an anomaly and dropped.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from ..._errors import SandboxClosed
from ...guest import protocol

Handler = Callable[[dict[str, Any], bytes], None]
#: ``(frame, request is running)``: a ``trace`` frame, routed apart.
TraceHandler = Callable[[dict[str, Any], bool], None]

_INT = (int,)
_OPT_INT = (int, type(None))
#: op -> {field: allowed types}; "op" and "id" are checked apart.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {"version": _INT},
    "configured": {"landlock_abi": _INT, "kernel": (str,), "audit": (str,)},
    "started": {"pid": _INT},
    "out": {"stream": (str,)},
    "exit": {
        "code": _OPT_INT,
        "signal": _OPT_INT,
        "oom_kill": _INT,
        "pids_max_hits": _INT,
        "workspace": (list,),
    },  # fmt: skip
    # ``wall``: the request was refused because a wall could not be built
    # for it (only "audit.level": no tracer could follow it).
    "error": {"errno": _INT, "error": (str,), "wall": (str,)},
    "fatal": {"wall": (str,), "error": (str,)},
    "data": {},
    "done": {"code": _INT},
    # A direct network attempt the guest saw (its claim; logged, never acted on).
    "netdirect": {
        "syscall": (str,),
        "family": (str,),
        "address": (str,),
        "port": _INT,
        "protocol": (str,),
        "pid": _INT,
        "destination": (str,),
        "what": (str,),
    },
    # A call the agent answered with an errno (a profile's notify entry: setuid/
    # setgid modes); the instance checks ``nr`` against what it asked for.
    "refused": {"nr": _INT, "pid": _INT},
    # What the guest's tracer saw a request do (the file audit): the guest's
    # claim, validated event by event by the instance (see ``_instance``).
    "trace": {"events": (list,), "error": (str,)},
    # A checkpoint: the agent holds still (``quiesced``) until ``resume``.
    "quiesced": {},
    "resumed": {"version": _INT, "reseeded": _INT},  # 1: the RNG was reseeded
}
#: Walls a guest may name in an ``error`` frame.
WALLS = frozenset({"audit.level"})
#: Ops that are not replies to a request.
UNTAGGED = {"ready", "configured", "fatal", "netdirect", "refused", "quiesced", "resumed"}
#: Ops that carry a payload; every other op must come with an empty one.
WITH_PAYLOAD = {"out", "data"}
MAX_STR = 4096


class ProtocolViolation(Exception):
    """The guest said something outside the protocol."""


def check(header: dict[str, Any], payload: bytes) -> dict[str, Any]:
    op = header.get("op")
    if not isinstance(op, str) or op not in SCHEMA:
        raise ProtocolViolation(f"unknown op {str(op)[:40]!r}")
    fields = SCHEMA[op]
    for key, value in header.items():
        if key == "op":
            continue
        if key == "id":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
                raise ProtocolViolation(f"{op}: bad id")
            continue
        types = fields.get(key)
        if types is None:
            raise ProtocolViolation(f"{op}: unexpected field {key[:40]!r}")
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolViolation(f"{op}: field {key!r} has the wrong type")
        if isinstance(value, int) and not -1 <= value < 1 << 62:
            raise ProtocolViolation(f"{op}: field {key!r} out of range")
        if isinstance(value, str) and len(value) > MAX_STR:
            raise ProtocolViolation(f"{op}: field {key!r} too long")
    if op not in UNTAGGED and "id" not in header:
        raise ProtocolViolation(f"{op}: missing id")
    if op == "netdirect":
        _check_netdirect(header)
    if op == "error" and "wall" in header and header["wall"] not in WALLS:
        raise ProtocolViolation("error: unknown wall")
    if op == "out" and header.get("stream") not in ("stdout", "stderr", "pty"):
        raise ProtocolViolation("out: unknown stream")
    if op == "exit":
        ws = header.get("workspace")
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ws or ())
        if ws is not None and not (len(ws) == 2 and ok):
            raise ProtocolViolation("exit: bad workspace figures")
        sig, code = header.get("signal"), header.get("code")
        if sig is not None and not 1 <= sig <= 64:
            raise ProtocolViolation("exit: signal out of range")
        if code is not None and not 0 <= code <= 255:
            raise ProtocolViolation("exit: code out of range")
    if payload and op not in WITH_PAYLOAD:
        raise ProtocolViolation(f"{op}: unexpected payload")
    if len(payload) > protocol.CHUNK:
        raise ProtocolViolation(f"{op}: payload of {len(payload)} bytes exceeds {protocol.CHUNK}")
    return header


def _check_netdirect(h: dict[str, Any]) -> None:
    import ipaddress

    if h.get("syscall") not in ("connect", "sendto", "sendmsg", "sendmmsg", "socket"):
        raise ProtocolViolation("netdirect: unknown syscall")
    if h["syscall"] != "socket":
        try:
            ipaddress.ip_address(str(h.get("address")))
        except ValueError:
            raise ProtocolViolation("netdirect: address is not an IP address") from None
        if not isinstance(h.get("port"), int) or not 0 <= h["port"] <= 65535:
            raise ProtocolViolation("netdirect: port out of range")
    for key in ("family", "protocol", "destination", "what"):
        if len(str(h.get(key, ""))) > 64:
            raise ProtocolViolation(f"netdirect: {key} too long")


class GuestChannel:
    """Framed request/reply over the virtio-serial socket; frames routed by id."""

    def __init__(self, sock: socket.socket, on_anomaly: Callable[[str], None], *,
                 first_id: int = 1, orphans: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.sock = sock
        self.decoder = protocol.Decoder()
        self._ids = iter(range(first_id, 1 << 62))
        self._next = first_id
        #: Requests of the VM's life before a restore (processes still running in
        #: it): their frames are checked like any, then dropped without an anomaly.
        self.orphans = set(orphans)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._handlers: dict[int, Handler] = {}
        self._untagged: Handler | None = None
        self._trace: TraceHandler | None = None
        self.closed: str | None = None
        self.on_anomaly = on_anomaly

    def register(self, handler: Handler) -> int:
        with self._lock:
            if self.closed is not None:
                raise SandboxClosed(f"the sandbox is no longer running ({self.closed})")
            rid = next(self._ids)
            self._next = rid + 1
            self._handlers[rid] = handler
            return rid

    def state(self) -> tuple[int, list[int]]:
        """(the next request id, the ids still open): what a restored channel must
        know so that its ids never meet the guest's earlier requests."""
        with self._lock:
            return self._next, sorted(set(self._handlers) | self.orphans)

    def hold(self, header: dict[str, Any]) -> None:
        """Send ``header`` and keep every other sender waiting until :meth:`release`:
        after a ``quiesce`` nothing may follow it into the saved stream."""
        data = protocol.encode(header)
        self._send_lock.acquire()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._send_lock.release()
            raise SandboxClosed(f"the sandbox is no longer running ({exc.strerror})") from None

    def release(self, header: dict[str, Any] | None = None) -> None:
        """End :meth:`hold`, sending ``header`` (``resume``) first when given."""
        try:
            if header is not None:
                self.sock.sendall(protocol.encode(header))
        except OSError as exc:
            raise SandboxClosed(f"the sandbox is no longer running ({exc.strerror})") from None
        finally:
            self._send_lock.release()

    def on_untagged(self, handler: Handler) -> None:
        self._untagged = handler

    def on_trace(self, handler: TraceHandler) -> None:
        """``trace`` frames go to ``handler``, not to their request's handler, so
        a request's own code never sees them; the handler learns whether the
        id names a request that is still running."""
        self._trace = handler

    def forget(self, rid: int) -> None:
        with self._lock:
            self._handlers.pop(rid, None)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = protocol.encode(header, payload)
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as exc:
            raise SandboxClosed(f"the sandbox is no longer running ({exc.strerror})") from None

    def feed(self, data: bytes) -> None:
        """Parse and route; raises ProtocolViolation when the stream is unusable."""
        try:
            frames = self.decoder.feed(data)
        except protocol.FrameError as exc:
            raise ProtocolViolation(str(exc)) from None
        for header, payload in frames:
            try:
                msg = check(header, payload)
            except ProtocolViolation as exc:
                self.on_anomaly(str(exc))
                continue
            rid = msg.get("id")
            if rid is None:
                if self._untagged is not None:
                    self._untagged(msg, payload)
                else:
                    self.on_anomaly(f"unsolicited {msg['op']!r} frame")
                continue
            with self._lock:
                handler = self._handlers.get(rid)
                orphan = handler is None and rid in self.orphans
                if orphan and msg["op"] in ("exit", "error", "done"):
                    self.orphans.discard(rid)
            if msg["op"] == "trace":  # an orphan's too: the file audit goes on
                if self._trace is None:
                    self.on_anomaly("unsolicited 'trace' frame")
                else:
                    self._trace(msg, handler is not None or orphan)
                continue
            if orphan:  # output and exit of a request no one here waits for
                continue
            if handler is None:
                self.on_anomaly(f"{msg['op']!r} frame for unknown request id {rid}")
                continue
            handler(msg, payload)

    def close(self, reason: str) -> None:
        with self._lock:
            if self.closed is not None:
                return
            self.closed = reason
            handlers = list(self._handlers.values())
            self._handlers.clear()
        for h in handlers:
            h({"op": "closed", "reason": reason}, b"")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
