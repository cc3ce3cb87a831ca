"""The in-sandbox init: applies the last walls, then runs commands on request.

It runs INSIDE the sandbox as ``/usr/bin/python3 -I -S /.glassroom/sandbox_init.py``
after bubblewrap has built the namespaces and mounts and loaded seccomp.
Landlock must come after the mounts (a Landlock-restricted process may not
change its mount topology), so it cannot be applied before bwrap; this
process applies it to itself before anything untrusted runs, and every
command inherits it.

Import cost matters (it is paid on every sandbox start), so only C modules
and ``landlock`` (ctypes) are imported: no ``socket``, ``signal``, ``json``.

Protocol, over the SOCK_SEQPACKET socket on fd 3 (one message = one datagram):

* supervisor -> init: ``marshal`` dicts (the supervisor is trusted), fds
  attached with SCM_RIGHTS.
* init -> supervisor: JSON objects.  The supervisor treats them as untrusted
  (sandboxed code could have taken this process over): bounded, validated.

Ops: ``config`` (first), ``exec`` (fds: stdin, stdout, stderr; with
``pty``, see ``_pty_body``), ``file`` (fd: a pipe end), ``signal``,
``resize`` (a pty's size).  Replies: ``ready``, ``started``, ``exit``,
``error``, ``fatal``.
"""

from __future__ import annotations

import _json
import _socket
import fcntl  # built in: no file to read
import marshal
import os
import resource
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import landlock  # type: ignore[import-not-found]

TYPE_CHECKING = False
if TYPE_CHECKING:  # importing typing costs start-up time: annotations only
    from collections.abc import Callable
    from typing import Any

CTL_FD = int(sys.argv[-1]) if len(sys.argv) > 1 else 3  # the supervisor passes the number
SIGKILL = 9
MAX_MSG = 1 << 20
_json_str = _json.encode_basestring_ascii
#: File types (``st_mode & S_IFMT``): no ``stat`` import (start-up time).
S_IFMT, S_IFREG, S_IFDIR, S_IFLNK = 0o170000, 0o100000, 0o040000, 0o120000
ENXIO, EISDIR = 6, 21
EIO, EPIPE = 5, 32
#: ioctls of a pty (asm-generic numbers, the same on x86-64 and arm64).
TIOCSWINSZ, TIOCGSID = 0x5414, 0x5429
SIGHUP = 1
_SPECIAL = {0o010000: "a FIFO", 0o140000: "a socket", 0o020000: "a character device",
            0o060000: "a block device"}  # fmt: skip


def _enc(value: object) -> str:
    """Tiny JSON encoder: avoids importing ``json`` (it pulls in ``re``).

    Everything is imported before Landlock is applied: after that the
    interpreter's own files may be invisible to this process.
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json_str(value)
    if isinstance(value, dict):
        return "{" + ",".join(_json_str(str(k)) + ":" + _enc(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_enc(v) for v in value) + "]"
    return _json_str(str(value))


class Init:
    def __init__(self) -> None:
        self.ctl = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, CTL_FD)
        self.children: dict[int, tuple[int, int]] = {}  # pidfd -> (request id, pid)
        self.ptys: dict[int, int] = {}  # request id -> its pty's master (resize, signals)
        self.poll = select.poll()
        self.poll.register(self.ctl.fileno(), select.POLLIN)

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.ctl.send(_enc(msg).encode())
        except OSError:
            self.shutdown()

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        data, anc, _flags, _addr = self.ctl.recvmsg(MAX_MSG, _socket.CMSG_SPACE(4 * 8))
        if not data:
            self.shutdown()
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += [
                    int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4)
                ]
        return marshal.loads(data), fds

    def shutdown(self) -> None:
        """The supervisor went away: nothing may outlive it."""
        for _pidfd, (_rid, pid) in list(self.children.items()):
            try:
                os.killpg(pid, SIGKILL)
            except OSError:
                pass
        os._exit(0)

    def configure(self, cfg: dict[str, Any]) -> None:
        import ctypes

        net: Any = None
        if cfg.get("forward") or cfg.get("netwatch") or cfg.get("trace"):
            import init_net  # type: ignore[import-not-found]  # before Landlock

            net = init_net

        libc = ctypes.CDLL(None, use_errno=True)
        # Not dumpable: code running as the same uid cannot open /proc/<init>/mem.
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
        try:
            abi = landlock.restrict(
                read=cfg["read"],
                write=cfg["write"],
                execute=cfg["execute"],
                devices=cfg["devices"],
                listable=cfg["listable"],
            )
        except OSError as exc:
            self.send({"op": "fatal", "wall": "landlock", "error": str(exc)})
            os._exit(125)
        for name, value in cfg["rlimits"].items():
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (OSError, ValueError) as exc:
                self.send({"op": "fatal", "wall": "rlimits", "error": f"{name}: {exc}"})
                os._exit(125)
        ready = {"op": "ready", "landlock_abi": abi, "pid": os.getpid()}
        if net is not None and (cfg.get("forward") or cfg.get("netwatch")):
            # the proxy bridge and the direct-attempt watch (init_net.py)
            try:
                ready.update(net.setup(cfg))
            except OSError as exc:
                self.send({"op": "fatal", "wall": "network", "error": str(exc)})
                os._exit(125)
        if cfg.get("trace"):  # the file/exec audit: last, so nothing above is traced
            try:
                net.install_trace(cfg["trace"])
            except OSError as exc:
                self.send({"op": "fatal", "wall": "audit.level", "error": str(exc)})
                os._exit(125)
        self.send(ready)

    def spawn(self, rid: int, fds: list[int], body: Callable[[int, list[int]], None]) -> bool:
        """Fork a child that runs ``body``; report its start and, later, its exit.
        False if it failed before its op started (reported as ``error``)."""
        errr, errw = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(errr)
                os.setsid()
                self.ctl.close()
                body(errw, fds)
            except OSError as exc:
                # Before the op started, errw carries the error; once the op has
                # closed errw (and started streaming) the errno is the exit code.
                try:
                    os.write(errw, str(exc.errno or 0).encode() + b" " + str(exc).encode())
                except OSError:
                    pass
                os._exit((exc.errno or 1) & 0xFF)
            finally:
                os._exit(127)
        os.close(errw)
        for fd in fds:
            os.close(fd)
        err = os.read(errr, 4096)
        os.close(errr)
        if err:
            os.waitpid(pid, 0)
            code, _, text = err.decode(errors="replace").partition(" ")
            self.send({"op": "error", "id": rid, "errno": int(code or 0), "error": text})
            return False
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (rid, pid)
        self.poll.register(pidfd, select.POLLIN)
        self.send({"op": "started", "id": rid, "pid": pid})
        return True

    def spawn_pty(self, rid: int, fds: list[int], msg: dict[str, Any]) -> None:
        """``exec`` on a new pseudo-terminal, made here, inside every wall.

        The pty comes from the sandbox's own devpts (bwrap's ``--dev``), opened
        by this process under its Landlock (``/dev`` is a device path).  The
        child (``_pty_body``) relays the host's pipes to and from the master;
        this init keeps a copy of the master for ``resize`` and ``signal``."""
        for fd in fds[2:]:
            os.close(fd)  # stderr: a terminal has one output stream
        try:
            master, slave = os.openpty()
            rows, cols = (int(v) for v in msg["pty"])
            fcntl.ioctl(master, TIOCSWINSZ, winsize(rows, cols))
        except (OSError, ValueError) as exc:
            for fd in fds[:2]:
                os.close(fd)
            self.send({"op": "error", "id": rid, "errno": getattr(exc, "errno", 0) or 22,
                       "error": f"pty: {exc}"})  # fmt: skip
            return
        if self.spawn(rid, [*fds[:2], os.dup(master), slave], _pty_body(msg)):
            self.ptys[rid] = master
        else:
            os.close(master)

    def pty_session(self, rid: int) -> int:
        """The session (and process group) on request ``rid``'s pty, or 0."""
        master = self.ptys.get(rid)
        if master is None:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(master, TIOCGSID, bytes(4)), sys.byteorder)
        except OSError:
            return 0

    def reap(self, pidfd: int) -> None:
        rid, pid = self.children.pop(pidfd)
        self.poll.unregister(pidfd)
        os.close(pidfd)
        master = self.ptys.pop(rid, None)
        if master is not None:
            os.close(master)  # the last master: what is left on the tty gets SIGHUP
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            self.send({"op": "exit", "id": rid, "code": None, "signal": os.WTERMSIG(status)})
        else:
            self.send(
                {"op": "exit", "id": rid, "code": os.waitstatus_to_exitcode(status), "signal": None}
            )

    def loop(self) -> None:
        while True:
            for fd, _ev in self.poll.poll():
                if fd == self.ctl.fileno():
                    msg, fds = self.recv()
                    self.handle(msg, fds)
                elif fd in self.children:
                    self.reap(fd)
            # Orphans re-parented to bwrap's pid 1 are reaped by it, not here.

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        rid = int(msg.get("id", 0))
        if op == "config":
            self.configure(msg)
        elif op == "exec":
            if msg.get("pty"):
                self.spawn_pty(rid, fds, msg)
            else:
                self.spawn(rid, fds, _exec_body(msg))
        elif op == "file":
            self.spawn(rid, fds, _file_body(msg))
        elif op == "signal":
            for _pidfd, (crid, pid) in self.children.items():
                if crid == msg.get("target"):
                    # a pty's command is in a session of its own: signal that too
                    for group in (pid, self.pty_session(crid)):
                        try:
                            if group > 0:
                                os.killpg(group, int(msg["sig"]))
                        except OSError:
                            pass
        elif op == "resize":
            master = self.ptys.get(msg.get("target", -1))
            err = 0
            if master is not None:
                try:
                    fcntl.ioctl(master, TIOCSWINSZ, winsize(int(msg["rows"]), int(msg["cols"])))
                except (OSError, ValueError) as exc:
                    err = getattr(exc, "errno", 0) or 22
            # the answer (errno 0: done) lets the host order the resize before later input
            self.send({"op": "error", "id": rid, "errno": err, "error": "resize"})
        elif op == "netwatch-taken":  # the supervisor holds the listener now
            try:
                os.close(int(msg["fd"]))
            except OSError:
                pass
        else:
            self.send({"op": "error", "id": rid, "errno": 22, "error": f"unknown op {op!r}"})


def _exec_body(msg: dict[str, Any]) -> Callable[[int, list[int]], None]:
    def body(errw: int, fds: list[int]) -> None:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.closerange(3, errw)
        os.closerange(errw + 1, 1 << 16)
        env = msg["env"]
        os.chdir(msg["cwd"])
        argv = msg["argv"]
        exe = argv[0]
        if "/" not in exe:
            exe = _which(exe, env.get("PATH", ""))
        os.execve(exe, argv, env)

    return body


def winsize(rows: int, cols: int) -> bytes:
    """``struct winsize`` (rows, cols, two unused pixel sizes) without ``struct``."""
    return rows.to_bytes(2, sys.byteorder) + cols.to_bytes(2, sys.byteorder) + bytes(4)


def _pty_body(msg: dict[str, Any]) -> Callable[[int, list[int]], None]:
    """The child of a pty ``exec``: it forks the command onto the pty, then relays.

    fds: the host's stdin pipe, its stdout pipe, the master and the slave.
    The command (the grandchild) gets the slave as its controlling terminal
    (``login_tty``: a new session, ``TIOCSCTTY``, the slave on 0/1/2), then
    runs exactly as ``_exec_body`` runs a command: this is a fork of the init,
    so Landlock, seccomp and rlimits are the same.  A failed ``execve`` is
    reported on ``errw`` as for any command.  This process copies stdin into
    the master and the master's output into stdout until the command exits,
    then exits with the command's status (or dies of its signal)."""
    run = _exec_body(msg)

    def body(errw: int, fds: list[int]) -> None:
        in_r, out_w, master, slave = fds
        _close_except({in_r, out_w, master, slave, errw})  # the init's other fds
        pid = os.fork()
        if pid == 0:
            for fd in (in_r, out_w, master):
                os.close(fd)
            os.login_tty(slave)
            run(errw, [0, 1, 2])
        os.close(slave)
        os.close(errw)
        status = _relay_pty(pid, in_r, out_w, master)
        if os.WIFSIGNALED(status):
            import _signal  # type: ignore[import-not-found]  # built in

            sig = os.WTERMSIG(status)
            _signal.signal(sig, _signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            os._exit(128 + sig)
        os._exit(os.waitstatus_to_exitcode(status))

    return body


def _relay_pty(pid: int, in_r: int, out_w: int, master: int) -> int:
    """Copy ``in_r`` -> master and master -> ``out_w`` until ``pid`` exits; its status.

    Input waits in a bounded buffer while the terminal does not take it (the
    master is non-blocking), so a command that does not read never blocks
    its own output.  If the host stops reading (the output cap closed
    ``out_w``: EPIPE) the terminal is hung up (SIGHUP), as a writer to a
    closed pipe gets EPIPE."""
    pidfd = os.pidfd_open(pid)
    os.set_blocking(master, False)
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    poll.register(master, select.POLLIN)
    poll.register(in_r, select.POLLIN)
    pending = b""
    reading_in = out_open = master_open = True
    in_eof = False
    while True:
        for fd, ev in poll.poll():
            if fd == pidfd:
                _, status = os.waitpid(pid, 0)
                if master_open and out_open:
                    _drain(master, out_w)
                return status
            if fd == master:
                if ev & select.POLLOUT and pending:
                    try:
                        pending = pending[os.write(master, pending[:4096]) :]
                    except BlockingIOError:
                        pass
                    except OSError:
                        pending = b""
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        chunk = os.read(master, 1 << 16)
                    except BlockingIOError:
                        chunk = None
                    except OSError:  # EIO: no process has the slave open any more
                        chunk = b""
                    if chunk == b"":
                        poll.unregister(master)
                        master_open = False
                    elif chunk and out_open:
                        try:
                            _write_all(out_w, chunk)
                        except OSError:  # EPIPE: the host stopped reading
                            out_open = False
                            try:
                                os.killpg(pid, SIGHUP)
                            except OSError:
                                pass
            elif fd == in_r:
                data = os.read(in_r, 1 << 16)
                if not data:
                    poll.unregister(in_r)
                    reading_in, in_eof = False, True
                pending += data
                if len(pending) > 1 << 16 and reading_in:
                    poll.unregister(in_r)  # full: read on once the terminal took some
                    reading_in = False
        if master_open:
            poll.modify(master, select.POLLIN | (select.POLLOUT if pending else 0))
        if not reading_in and not in_eof and len(pending) <= 1 << 15:
            poll.register(in_r, select.POLLIN)
            reading_in = True


def _close_except(keep: set[int]) -> None:
    """Close every fd from 3 up but those in ``keep``."""
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)


def _drain(master: int, out_w: int) -> None:
    """What the command wrote before it exited (bounded: a background job of
    the command that keeps writing does not hold its end)."""
    for _ in range(64):
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EAGAIN (nothing now) or EIO (the slave is closed)
            return
        if not chunk:
            return
        try:
            _write_all(out_w, chunk)
        except OSError:
            return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _which(name: str, path: str) -> str:
    denied = None
    for d in path.split(":"):
        cand = d + "/" + name
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if st.st_mode & 0o170000 == 0o100000:
            if os.access(cand, os.X_OK):
                return cand
            denied = cand
    if denied:
        return denied
    raise FileNotFoundError(2, f"{name}: command not found")


def _file_body(msg: dict[str, Any]) -> Callable[[int, list[int]], None]:
    """File operations run in a child so they see exactly the sandbox's view."""

    def body(errw: int, fds: list[int]) -> None:
        kind, path = msg["kind"], msg["path"]
        pipe = fds[0] if fds else -1
        if kind == "read":
            fd = open_regular(path, os.O_RDONLY)
            limit = int(msg["max"])
            os.close(errw)
            while limit > 0:
                chunk = os.read(fd, min(limit, 1 << 16))
                if not chunk:
                    break
                limit -= len(chunk)
                os.write(pipe, chunk)
            os._exit(0)
        elif kind == "write":
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            fd = open_regular(path, flags, int(msg.get("mode", 0o644)))
            os.close(errw)
            while True:
                chunk = os.read(pipe, 1 << 16)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.close(fd)
            os._exit(0)
        elif kind == "list":
            entries = []
            with os.scandir(path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed or renamed while listed: not there any more
                    entries.append(
                        {"name": e.name, "type": entry_type(st.st_mode), "size": st.st_size}
                    )
            os.close(errw)
            os.write(pipe, _enc(entries).encode())
            os._exit(0)
        elif kind == "mkdir":
            os.makedirs(path, exist_ok=True)
            os.close(errw)
            os._exit(0)
        elif kind == "remove":
            _remove(path)
            os.close(errw)
            os._exit(0)
        raise OSError(22, f"unknown file op {kind!r}")

    return body


def open_regular(path: str, flags: int, mode: int = 0o644) -> int:
    """Open ``path`` for a file op only if it is a regular file, without ever blocking.

    The sandbox may have put a FIFO, a socket or a device at any path: a
    plain blocking ``open`` of a FIFO waits for a peer forever, and the init
    waits for this child's first word, so every later request would hang
    with it.  So: ``O_NONBLOCK`` for the open (a FIFO opens at once for
    reading, or fails ENXIO for writing with no reader; a socket fails
    ENXIO), then the type of what was opened, from the fd itself (nothing
    can swap it in between), and only a regular file goes on, back in
    blocking mode.  Anything else is ENXIO (a directory: EISDIR), before
    any byte moves.  ``O_CREAT`` still creates a new regular file; the
    ``O_TRUNC`` of an existing FIFO or device is a no-op in the kernel.

    The path is resolved as it always was: by the kernel, in the sandbox's
    own mount namespace and under its walls (a symlink is followed there,
    and what it leads to is checked the same way).  The microVM agent
    (``guest/agent.py``) does the same.
    """
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == ENXIO:  # a FIFO with no reader, a socket: same refusal as below
            raise OSError(ENXIO, "not a regular file; refused") from None
        raise
    try:
        kind = os.fstat(fd).st_mode & S_IFMT
        if kind == S_IFDIR:
            raise OSError(EISDIR, "is a directory")
        if kind != S_IFREG:
            what = _SPECIAL.get(kind, "a special file")
            raise OSError(ENXIO, f"not a regular file ({what}); refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def entry_type(mode: int) -> str:
    """A listing's ``type``: a FIFO, socket or device is ``other``, never ``file``."""
    kind = mode & S_IFMT
    if kind == S_IFDIR:
        return "dir"
    if kind == S_IFLNK:
        return "symlink"
    return "file" if kind == S_IFREG else "other"


def _remove(path: str) -> None:
    """rmtree without importing shutil (not importable once Landlock is on)."""
    try:
        os.unlink(path)
        return
    except IsADirectoryError:
        pass
    except PermissionError:
        if not os.path.isdir(path) or os.path.islink(path):
            raise
    with os.scandir(path) as it:
        for e in list(it):
            if e.is_dir(follow_symlinks=False):
                _remove(e.path)
            else:
                os.unlink(e.path)
    os.rmdir(path)


def main() -> None:
    init = Init()
    msg, _fds = init.recv()
    if msg.get("op") != "config":
        init.send({"op": "fatal", "wall": "init", "error": "first message must be config"})
        os._exit(125)
    init.configure(msg)
    init.loop()


if __name__ == "__main__":
    main()
