"""The supervisor's end of the control channel to the in-sandbox init.

Everything the init says is untrusted (sandboxed code may have taken it
over), so messages are size-bounded and checked against a small schema
before anything acts on them.  Replies are routed by request id to the
thread that waits for them.
"""

from __future__ import annotations

import json
import marshal
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from .._errors import SandboxClosed

MAX_REPLY = 64 * 1024
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


class ProtocolViolation(Exception):
    """The init sent something outside the protocol: a sign of compromise."""


def parse_reply(
    raw: bytes,
    *,
    ops: set[str] | frozenset[str] = frozenset(_OPS),
    fields: dict[str, tuple[type, ...]] = _FIELD_TYPES,
    max_len: int = MAX_REPLY,
) -> dict[str, Any]:
    """Validate one JSON reply of the (untrusted) init against a small schema.

    Backends with a richer protocol pass their own ``ops``/``fields``; the
    checks (size, JSON, known op, typed fields, bounded strings) are shared.
    """
    if len(raw) > max_len:
        raise ProtocolViolation(f"reply of {len(raw)} bytes exceeds {max_len}")
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise ProtocolViolation(f"malformed reply: {exc}") from None
    if not isinstance(msg, dict) or msg.get("op") not in ops:
        raise ProtocolViolation("reply is not an object with a known op")
    for key, value in msg.items():
        if key == "op":
            continue
        types = fields.get(key)
        if types is None or not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolViolation(f"reply field {key!r} has an unexpected value")
        if isinstance(value, str) and len(value) > 4096:
            raise ProtocolViolation(f"reply field {key!r} is too long")
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
        data = marshal.dumps(msg)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except OSError as exc:
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
