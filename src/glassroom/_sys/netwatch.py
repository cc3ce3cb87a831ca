"""Seeing direct network attempts: seccomp user notification, host side.

The sandbox's network namespace has only loopback, so a connect() to any
other address, a UDP datagram (DNS included) or a raw socket already fails
in the kernel.  To *log* those attempts with their destination, the init
installs a second seccomp filter (``init_net.install_listener``) whose
program is compiled here with libseccomp: it returns SECCOMP_RET_USER_NOTIF
for

* ``connect``;
* ``sendto`` with a destination address (arg 4 != NULL);
* ``sendmsg`` and ``sendmmsg`` (the address is inside the message);
* ``socket`` of type SOCK_RAW, or of family AF_PACKET.

The supervisor takes the listener fd out of the init with ``pidfd_getfd``
and a thread reads each notification, copies the socket address from the
target's memory (``/proc/PID/mem``) FOR LOGGING ONLY, and answers
SECCOMP_USER_NOTIF_FLAG_CONTINUE: the kernel then runs the syscall as if
nothing had happened, and the netns refuses it.  No decision is ever based
on user memory (it could change under us); enforcement stays the netns.
Loopback destinations (the sandbox's own ``lo``, the proxy bridge) and
Unix sockets are not egress and are not reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pyseccomp

from .seccomp import DenyEntry, add_notify_rules, entry_matches, export_bpf, notify_entries

_NOTIF_SIZE = 80  # struct seccomp_notif
_RESP_SIZE = 24  # struct seccomp_notif_resp
IOCTL_RECV = 0xC0502100
IOCTL_SEND = 0xC0182101
IOCTL_ID_VALID = 0x40082102
FLAG_CONTINUE = 1
_SYS_PIDFD_GETFD = 438

WATCHED = ("connect", "sendto", "sendmsg", "sendmmsg", "socket")
_bpf_cache: dict[tuple[bool, str], tuple[bytes, dict[int, list[DenyEntry]]]] = {}


def filter_program(network: bool = True, profile: str = "default") -> bytes:
    """The watch filter as a classic-BPF program for the init to install.

    Besides the network calls (``network``), it carries the seccomp
    profile's ``notify`` entries (setuid/setgid modes): those the watch does
    not let through but answers with the entry's errno, and reports as ``deny``.
    """
    return _program(network, profile)[0]


def denied_calls(profile: str = "default") -> dict[int, list[DenyEntry]]:
    """The profile's ``notify`` entries by syscall number (what the watch refuses)."""
    return _program(True, profile)[1]


def _program(network: bool, profile: str) -> tuple[bytes, dict[int, list[DenyEntry]]]:
    hit = _bpf_cache.get((network, profile))
    if hit is not None:
        return hit
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    notify = pyseccomp.NOTIFY
    if network:
        f.add_rule(notify, "connect")
        f.add_rule(notify, "sendto", pyseccomp.Arg(4, pyseccomp.NE, 0))
        f.add_rule(notify, "sendmsg")
        f.add_rule(notify, "sendmmsg")
        f.add_rule(notify, "socket", pyseccomp.Arg(1, pyseccomp.MASKED_EQ, 0xF, socket.SOCK_RAW))
        f.add_rule(notify, "socket", pyseccomp.Arg(0, pyseccomp.EQ, 17))  # AF_PACKET
    by_nr = add_notify_rules(f, notify_entries(profile))
    hit = _bpf_cache[network, profile] = (export_bpf(f, "netwatch"), by_nr)
    return hit


_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A duplicate of ``target_fd`` of process ``pid`` (needs ptrace rights over it)."""
    pidfd = os.pidfd_open(pid)
    try:
        fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {target_fd}): {os.strerror(err)}")
        return int(fd)
    finally:
        os.close(pidfd)


def _syscall_names() -> dict[int, str]:
    out = {}
    for name in WATCHED:
        nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        if nr >= 0:
            out[nr] = name
    return out


def parse_sockaddr(raw: bytes) -> tuple[str, str, int] | None:
    """(family, address, port) of an AF_INET/AF_INET6 sockaddr, else None."""
    if len(raw) < 2:
        return None
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET and len(raw) >= 8:
        return "inet", str(ipaddress.IPv4Address(raw[4:8])), int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6 and len(raw) >= 24:
        return "inet6", str(ipaddress.IPv6Address(raw[8:24])), int.from_bytes(raw[2:4], "big")
    return None


class NetWatch:
    """Reads one listener fd on a thread; reports each non-loopback attempt."""

    def __init__(self, fd: int, on_attempt: Callable[[dict[str, Any]], None], name: str,
                 refuse: dict[int, list[DenyEntry]] | None = None,
                 on_refused: Callable[[str, dict[str, Any]], None] | None = None,
                 ) -> None:  # fmt: skip
        self.fd = fd
        self.on_attempt = on_attempt
        #: Calls answered with an errno, never continued (decided by the BPF
        #: program on register values; this side only reports them).
        self.refuse = refuse or {}
        self.on_refused = on_refused
        self.names = _syscall_names()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"netwatch-{name}", daemon=True)
        self.seen = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            try:
                events = poller.poll(200)
            except OSError:
                return
            for _fd, ev in events:
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) and not (
                    ev & select.POLLIN
                ):
                    return
                self._one()

    def _one(self) -> None:
        buf = bytearray(_NOTIF_SIZE)
        try:
            fcntl.ioctl(self.fd, IOCTL_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINTR):
                return
            raise
        nid, pid, _flags, nr, _arch, _ip = struct.unpack_from("=QIIiIQ", buf, 0)
        args = struct.unpack_from("=6Q", buf, 32)
        entries = self.refuse.get(nr)
        if entries:
            # The filter only notifies a call that meets an entry: it is refused
            # whatever this side finds; the match only picks the reason to log.
            entry = next((e for e in entries if entry_matches(e, args)), entries[0])
            err = errno.EPERM if entry.errno == "EPERM" else errno.ENOSYS
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, IOCTL_SEND, bytearray(struct.pack("=QqiI", nid, 0, -err, 0)),
                            True)  # fmt: skip
            if self.on_refused is not None:
                name = next((s for s in entry.syscalls
                             if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, s) == nr), str(nr))
                with contextlib.suppress(Exception):
                    self.on_refused(str(entry.rule), {"syscall": name, "pid": pid,
                                                      "args": [hex(a) for a in args[:4]],
                                                      "reason": entry.reason})  # fmt: skip
            return
        try:
            info = self._describe(pid, self.names.get(nr, str(nr)), args)
            if info is not None and not self._valid(nid):
                info = None
        except Exception:
            info = None
        resp = struct.pack("=QqiI", nid, 0, 0, FLAG_CONTINUE)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, IOCTL_SEND, bytearray(resp), True)
        if info is not None:
            self.seen += 1
            with contextlib.suppress(Exception):
                self.on_attempt(info)

    def _valid(self, nid: int) -> bool:
        try:
            fcntl.ioctl(self.fd, IOCTL_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
        except OSError:
            return False
        return True

    def _describe(self, pid: int, name: str, args: tuple[int, ...]) -> dict[str, Any] | None:
        if name == "socket":
            kind = "packet" if args[0] == 17 else "raw"
            return {"syscall": "socket", "what": f"{kind} socket", "family": int(args[0]),
                    "pid": pid, "destination": f"{kind} socket"}  # fmt: skip
        sockfd = int(args[0] & 0xFFFFFFFF)
        with _Mem(pid) as mem:
            if name == "connect":
                raw = mem.read(args[1], min(int(args[2] & 0xFFFFFFFF), 128))
            elif name == "sendto":
                raw = mem.read(args[4], min(int(args[5] & 0xFFFFFFFF), 128))
            else:  # sendmsg / sendmmsg: struct msghdr starts with msg_name, msg_namelen
                hdr = mem.read(args[1], 12)
                ptr, nlen = struct.unpack("=QI", hdr)
                if not ptr:
                    return None
                raw = mem.read(ptr, min(nlen, 128))
        dest = parse_sockaddr(raw)
        if dest is None:
            return None
        family, address, port = dest
        addr = ipaddress.ip_address(address)
        if addr.is_loopback or (
            isinstance(addr, ipaddress.IPv6Address)
            and addr.ipv4_mapped is not None
            and addr.ipv4_mapped.is_loopback
        ):
            return None
        proto = _socket_type(pid, sockfd)
        return {"syscall": name, "family": family, "address": address, "port": port,
                "protocol": proto, "pid": pid,
                "destination": f"[{address}]:{port}" if family == "inet6"
                else f"{address}:{port}"}  # fmt: skip


def _socket_type(pid: int, fd: int) -> str:
    try:
        dup = pidfd_getfd(pid, fd)
    except OSError:
        return "unknown"
    try:
        s = socket.socket(fileno=dup)
        try:
            kind = s.type
        finally:
            s.detach()
        return {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp",
                socket.SOCK_RAW: "raw"}.get(kind, str(int(kind)))  # fmt: skip
    except OSError:
        return "unknown"
    finally:
        os.close(dup)


class _Mem:
    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def __enter__(self) -> _Mem:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def read(self, addr: int, size: int) -> bytes:
        if size <= 0:
            return b""
        return os.pread(self.fd, size, addr)


def init_host_pid(bwrap_child_pid: int) -> int | None:
    """The host pid of the init: the child of bwrap's pid 1 in the sandbox."""
    try:
        with open(f"/proc/{bwrap_child_pid}/task/{bwrap_child_pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def attach(bwrap_child_pid: int, fd_in_init: int, on_attempt: Callable[[dict[str, Any]], None],
           name: str, on_refused: Callable[[str, dict[str, Any]], None] | None = None,
           profile: str = "default") -> NetWatch:  # fmt: skip
    """Take the init's listener fd and start watching; raises OSError if impossible."""
    pid = init_host_pid(bwrap_child_pid)
    if pid is None:
        raise OSError(errno.ESRCH, "cannot find the sandbox's init")
    fd = pidfd_getfd(pid, fd_in_init)
    # The fd number is the (untrusted) init's word: what it names must be a
    # seccomp listener, or the real one would stay with the init.
    try:
        what = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        what = "?"
    if what != "anon_inode:seccomp notify":
        os.close(fd)
        raise OSError(errno.EBADF, f"fd {fd_in_init} of the init is not a seccomp listener "
                                   f"({what[:60]})")  # fmt: skip
    watch = NetWatch(fd, on_attempt, name, denied_calls(profile), on_refused)
    watch.start()
    return watch
