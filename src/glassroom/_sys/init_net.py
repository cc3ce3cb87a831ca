"""The init's network part: the proxy bridge, and the direct-attempt watch.

Runs INSIDE the sandbox as part of the init, so it is stdlib only (C
modules and ctypes) and imported before Landlock hides the interpreter.

* ``start_forwarder``: forks a small process that listens on
  ``127.0.0.1:PORT`` in the sandbox's network namespace (which has only
  loopback) and splices every TCP connection to the egress proxy's Unix
  socket, bind-mounted read-only into the sandbox.  It is the only way out.
  It is forked after Landlock (it is confined like everything else) and
  before the watch filter (its own connects are not reported).
* ``install_listener``: installs a seccomp filter, compiled on the host and
  sent in the config, that returns SECCOMP_RET_USER_NOTIF for connect,
  sendto with an address, sendmsg/sendmmsg and raw/packet socket(); the
  listener fd is handed to the supervisor, which only *logs* each attempt
  and lets the kernel continue (enforcement stays the empty netns).
"""

from __future__ import annotations

import _socket
import os
import select

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHUNK = 1 << 18
MAX_CONNS = 400
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_IN = select.POLLIN
_OUT = select.POLLOUT
_BAD = select.POLLERR | select.POLLNVAL


def setup(cfg: dict[str, Any]) -> dict[str, Any]:
    """Called by the init after Landlock and rlimits; returns fields for ``ready``."""
    out: dict[str, Any] = {}
    fwd = cfg.get("forward")
    if fwd:
        start_forwarder(int(fwd["port"]), str(fwd["socket"]))
    bpf = cfg.get("netwatch")
    if bpf:
        out["netwatch_fd"] = install_listener(bpf)
    return out


def install_trace(bpf: bytes) -> None:
    """The file/exec audit filter (SECCOMP_RET_TRACE; see ``_sys/tracer.py``).

    Installed last, right before ``ready``: from here on every watched call
    of this process and its children needs the tracer, which the supervisor
    attaches before it sends the first request.
    """
    install_listener(bpf, flags=0)


def install_listener(bpf: bytes, flags: int = SECCOMP_FILTER_FLAG_NEW_LISTENER) -> int:
    import ctypes

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = Fprog(len(bpf) // 8, ctypes.addressof(buf))
    nr = _SYS_SECCOMP[os.uname().machine]
    fd = libc.syscall(nr, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, "seccomp(NEW_LISTENER): " + os.strerror(err))
    return int(fd)


def start_forwarder(port: int, path: str) -> int:
    pid: int = os.fork()
    if pid:
        return pid
    try:
        os.closerange(3, 1 << 16)
        os.setsid()
        _serve(port, path)
    finally:
        os._exit(0)
    return 0


class _Pair:
    __slots__ = ("eof", "pend", "socks")

    def __init__(self, a: Any, b: Any) -> None:
        self.socks: dict[int, Any] = {a.fileno(): a, b.fileno(): b}
        # bytes waiting to be written TO fd
        self.pend: dict[int, bytes] = {a.fileno(): b"", b.fileno(): b""}
        self.eof: set[int] = set()

    def peer(self, fd: int) -> int:
        for f in self.socks:
            if f != fd:
                return f
        return -1


def _serve(port: int, path: str) -> None:
    lsock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    lsock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(128)
    lsock.setblocking(False)
    lfd = lsock.fileno()
    poll = select.poll()
    poll.register(lfd, _IN)
    pairs: dict[int, _Pair] = {}

    def close(pair: _Pair) -> None:
        for fd, s in pair.socks.items():
            pairs.pop(fd, None)
            try:
                poll.unregister(fd)
            except (KeyError, ValueError):
                pass
            s.close()

    def mask(pair: _Pair, fd: int) -> None:
        peer = pair.peer(fd)
        m = 0
        if fd not in pair.eof and not pair.pend[peer]:
            m |= _IN
        if pair.pend[fd]:
            m |= _OUT
        poll.modify(fd, m)

    def shut(sock: Any) -> None:
        try:
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass

    while True:
        for fd, ev in poll.poll():
            if fd == lfd:
                while len(pairs) < 2 * MAX_CONNS:
                    try:
                        cfd, _addr = lsock._accept()  # type: ignore[attr-defined]
                    except OSError:  # EAGAIN: drained; anything else: try again later
                        break
                    c = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, cfd)
                    u = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                    try:
                        u.connect(path)
                    except OSError:
                        u.close()
                        c.close()
                        continue
                    c.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                    c.setblocking(False)
                    u.setblocking(False)
                    pair = _Pair(c, u)
                    pairs[c.fileno()] = pairs[u.fileno()] = pair
                    poll.register(c.fileno(), _IN)
                    poll.register(u.fileno(), _IN)
                continue
            got = pairs.get(fd)
            if got is None:
                continue
            pair = got
            peer = pair.peer(fd)
            sock, psock = pair.socks[fd], pair.socks[peer]
            try:
                if ev & _OUT and pair.pend[fd]:
                    n = sock.send(pair.pend[fd])
                    pair.pend[fd] = pair.pend[fd][n:]
                    if not pair.pend[fd] and peer in pair.eof:
                        shut(sock)
                if ev & (_IN | select.POLLHUP) and fd not in pair.eof and not pair.pend[peer]:
                    try:
                        data = sock.recv(CHUNK)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    if data == b"":
                        pair.eof.add(fd)
                        shut(psock)
                    elif data:
                        try:
                            n = psock.send(data)
                        except (BlockingIOError, InterruptedError):
                            n = 0
                        pair.pend[peer] = data[n:]
                elif ev & _BAD or (ev & select.POLLHUP and not ev & _IN and not pair.pend[fd]):
                    close(pair)
                    continue
            except OSError:
                close(pair)
                continue
            if len(pair.eof) == 2 and not any(pair.pend.values()):
                close(pair)
                continue
            mask(pair, fd)
            mask(pair, peer)
