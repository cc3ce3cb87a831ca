"""The supervisor's end of the control channel to the in-sandbox init.

Everything the init says is untrusted (sandboxed code may have taken it
over), so messages are size-bounded and checked against a small schema
before anything acts on them.  Replies are routed by request id to the
thread that waits for them.
"""

from __future__ import annotations

import errno
import json
import marshal
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .._errors import SandboxClosed, SandboxError

MAX_REPLY = 64 * 1024
#: The largest request the init reads (``MAX_MSG`` of ``_sys/sandbox_init.py``
#: and ``_sys/agent/agent.h``): a longer one would reach it cut, and it stops.
MAX_REQUEST = 1 << 20
#: What a unix datagram carries at most: the socket's SO_SNDBUF less this.
_DGRAM_OVERHEAD = 32
#: After a command's timeout the init is asked to SIGKILL it; an init that
#: gives no exit in this long is not answering (stopped by a command, which
#: shares its uid, or lying): the backends then kill the sandbox, so that
#: ``run(timeout_s=)`` returns near its timeout and not at max runtime.
UNANSWERED_KILL_S = 5.0
_OPS = {"ready", "started", "exit", "error", "fatal"}
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (int,),
    "pid": (int,),
    "code": (int, type(None)),
    "signal": (int, type(None)),
    "errno": (int,),
    "error": (str,),
    "wall": (str,),
    "landlock_abi": (int,),
    "netwatch_fd": (int,),
}
#: Fields each op must carry (the host reads them without a default).
_REQUIRED: dict[str, frozenset[str]] = {
    "ready": frozenset({"landlock_abi"}),
    "started": frozenset({"id", "pid"}),
    "exit": frozenset({"id"}),
    "error": frozenset({"id", "errno", "error"}),
    "statfs": frozenset({"id", "used", "total"}),
}
#: The range of each integer field, wherever it appears: an exit code, a
#: signal, an errno or a pid outside these is a lie, not a figure to pass on.
_RANGES: dict[str, tuple[int, int]] = {
    "id": (0, (1 << 62) - 1),
    "pid": (1, (1 << 31) - 1),
    "code": (0, 255),
    "signal": (1, 64),
    "errno": (0, 4095),
    "landlock_abi": (0, 1 << 16),
    "netwatch_fd": (0, (1 << 31) - 1),
    "used": (0, (1 << 63) - 1),
    "total": (0, (1 << 63) - 1),
}
MAX_STR = 4096


class _Killable(Protocol):
    on_event: Any
    dead_reason: str | None

    def kill(self) -> None: ...


def end_unanswered(inst: _Killable, timeout_s: float | None) -> None:
    """The init did not end a timed-out command within ``UNANSWERED_KILL_S``:
    it is stopped (a command shares its uid and can SIGSTOP it) or lying.
    Nothing in the sandbox can be driven any more, so the sandbox ends, with
    a record; the same on every tier that has an init."""
    inst.on_event(
        "anomaly",
        {"reason": "the init did not end a timed-out command; sandbox killed",
         "timeout_s": timeout_s, "waited_s": UNANSWERED_KILL_S},
        "deny", "init.unresponsive",
    )  # fmt: skip
    if inst.dead_reason is None:
        inst.dead_reason = "the init stopped answering"
    inst.kill()


class RequestTooLarge(SandboxError):
    """A request does not fit in one message to the init: nothing was sent, and
    the sandbox runs on."""

    def __init__(self, op: str, size: int, limit: int) -> None:
        what = " (argv, env and cwd together)" if op == "exec" else ""
        super().__init__(
            f"{op} request of {size} bytes exceeds the {limit}-byte limit of one "
            f"message to the sandbox's init{what}",
            rule="init.max_message",
        )
        self.size = size
        self.limit = limit


class ProtocolViolation(Exception):
    """The init sent something outside the protocol: a sign of compromise."""


def parse_reply(
    raw: bytes,
    *,
    ops: set[str] | frozenset[str] = frozenset(_OPS),
    fields: dict[str, tuple[type, ...]] = _FIELD_TYPES,
    max_len: int = MAX_REPLY,
    required: dict[str, frozenset[str]] = _REQUIRED,
    ranges: dict[str, tuple[int, int]] = _RANGES,
) -> dict[str, Any]:
    """Validate one JSON reply of the (untrusted) init against a small schema.

    Backends with a richer protocol pass their own ``ops``/``fields``; the
    checks (size, JSON, known op, typed fields in range, required fields,
    bounded and encodable strings) are shared.  Raises only ProtocolViolation.
    """
    if len(raw) > max_len:
        raise ProtocolViolation(f"reply of {len(raw)} bytes exceeds {max_len}")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        raise ProtocolViolation(f"malformed reply: {str(exc)[:200]}") from None
    # ``op`` may be any JSON value: a list is not even hashable (``in ops``).
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str) or msg["op"] not in ops:
        raise ProtocolViolation("reply is not an object with a known op")
    for key, value in msg.items():
        if key == "op":
            continue
        types = fields.get(key)
        if types is None or not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolViolation(f"reply field {key[:40]!r} has an unexpected value")
        if isinstance(value, int):
            lo, hi = ranges.get(key, (-(1 << 62), 1 << 62))
            if not lo <= value <= hi:
                raise ProtocolViolation(f"reply field {key!r} is out of range")
        if isinstance(value, str):
            if len(value) > MAX_STR:
                raise ProtocolViolation(f"reply field {key!r} is too long")
            try:
                value.encode()
            except UnicodeEncodeError:  # a lone surrogate: it would fail later, in the caller
                raise ProtocolViolation(f"reply field {key!r} is not valid text") from None
    missing = required.get(msg["op"], frozenset()) - msg.keys()
    if missing:
        raise ProtocolViolation(f"{msg['op']} reply lacks {', '.join(sorted(missing))}")
    return msg


class Channel:
    """Request/reply over a SOCK_SEQPACKET socket, replies demultiplexed by id."""

    def __init__(self, sock: socket.socket, on_violation: Callable[[str], None]) -> None:
        self.sock = sock
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()
        self._waiters: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._closed = False
        self._on_violation = on_violation
        #: The largest request that reaches the init whole: MAX_REQUEST, or less
        #: when one datagram of this socket cannot carry that much.
        try:
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            sndbuf = MAX_REQUEST + _DGRAM_OVERHEAD
        self.max_request = min(MAX_REQUEST, sndbuf - _DGRAM_OVERHEAD)

    def new_request(self) -> tuple[int, queue.Queue[dict[str, Any]]]:
        with self._lock:
            if self._closed:
                raise SandboxClosed("the sandbox is no longer running")
            rid = next(self._ids)
            q: queue.Queue[dict[str, Any]] = queue.Queue()
            self._waiters[rid] = q
            return rid, q

    def forget(self, rid: int) -> None:
        with self._lock:
            self._waiters.pop(rid, None)

    def send(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Raises RequestTooLarge (nothing sent) or SandboxClosed."""
        data = marshal.dumps(msg)
        if len(data) > self.max_request:
            raise RequestTooLarge(str(msg.get("op")), len(data), self.max_request)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:  # the socket's buffer shrank under us
                raise RequestTooLarge(str(msg.get("op")), len(data), self.max_request) from None
            raise SandboxClosed(f"the sandbox is no longer running ({exc.strerror})") from None

    def recv_one(self) -> dict[str, Any] | None:
        """Read one reply (blocking); None on EOF."""
        raw = self.sock.recv(MAX_REPLY + 1)
        if not raw:
            return None
        return parse_reply(raw)

    def dispatch(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        with self._lock:
            q = self._waiters.get(rid) if isinstance(rid, int) else None
        if q is None:
            self._on_violation(f"reply for unknown request id {rid!r}")
            return
        q.put(msg)

    def close(self, reason: str) -> None:
        """Wake every waiter: the sandbox is gone."""
        with self._lock:
            self._closed = True
            waiters = list(self._waiters.values())
            self._waiters.clear()
        for q in waiters:
            q.put({"op": "closed", "reason": reason})
        try:
            self.sock.close()
        except OSError:
            pass


def release_quietly(fd: int) -> None:
    """Drop what ``fd`` refers to, but keep its number until its owner closes it.

    ``fd`` becomes /dev/null (dup2), so the pipe end is gone (EOF / EPIPE for
    the other side) while the number stays reserved.  Closing early and then
    again in a ``finally`` would close whatever another thread (the egress
    proxy, the audit log) opened under that number in between.
    """
    if fd < 0:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.dup2(null, fd, inheritable=False)
    except OSError:
        pass
    finally:
        os.close(null)


def close_quietly(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
