"""The in-sandbox init's stream transport, for tiers where fds cannot be passed.

The ``namespaces`` tier hands the init pipe ends with SCM_RIGHTS over a
socketpair.  Under gVisor (``runsc run``) the only channel between the
supervisor and the container's first process is that process's stdin and
stdout, and no host fd can cross the user-space kernel.  So this module
runs the same init (same exec/file bodies, imported from ``sandbox_init``)
but speaks framed messages over fd 0 (supervisor -> init) and fd 1
(init -> supervisor), and multiplexes each command's output into frames.

Frame: ``kind`` (1 byte) | request id (4 bytes, big endian) | length (4
bytes, big endian) | payload.

* supervisor -> init (trusted): ``M`` a ``marshal`` dict (an op, as in
  ``sandbox_init``), ``I`` stdin bytes for a request, ``C`` close its stdin.
  An ``exec`` with ``pty`` runs on a pseudo-terminal made here (the
  container's own devpts): ``I`` is typed into it, ``O`` is what it shows,
  and the ``resize`` op sets its size.
* init -> supervisor (untrusted, bounded and validated by the host): ``J``
  a JSON reply, ``O`` / ``E`` stdout / stderr bytes of a request.

The init is pid 1 of the container here, so it also reaps orphans.  There
is no ``pidfd_open`` in gVisor: child exits arrive as SIGCHLD through a
wake-up pipe.  Landlock does not exist in gVisor either (ENOSYS); the
walls it builds on the namespaces tier come from the OCI mounts instead
(see ``backends/_gvisor_spec.py``).  What this init applies itself: the
seccomp programs the supervisor sends, rlimits, and non-dumpable.

Only C modules are imported (start-up time is paid on every sandbox).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import fcntl
import marshal
import os
import resource
import select

import sandbox_init as base  # type: ignore[import-not-found]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_DATA = 1 << 16
_K_JSON, _K_OUT, _K_ERR = ord("J"), ord("O"), ord("E")
_K_MSG, _K_IN, _K_CLOSE = ord("M"), ord("I"), ord("C")
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR


class _Req:
    __slots__ = ("eof", "max", "outs", "pending", "pid", "rid", "sent", "stdin")

    def __init__(self, rid: int, pid: int, max_out: int) -> None:
        self.rid = rid
        self.pid = pid
        self.outs: dict[int, int] = {}  # fd -> frame kind
        self.stdin = -1
        self.pending = bytearray()
        self.eof = False
        self.sent = 0
        self.max = max_out


class StreamInit:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.preload = ""
        self.frames: list[tuple[int, int, bytes]] = []
        self.poll = select.poll()
        self.poll.register(0, select.POLLIN)
        self.reqs: dict[int, _Req] = {}
        self.by_pid: dict[int, _Req] = {}
        self.by_fd: dict[int, _Req] = {}
        self.ttys: dict[int, int] = {}  # request id -> its pty's master (resize)
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w)
        _signal.signal(_signal.SIGCHLD, _noop)
        self.poll.register(self.wake_r, select.POLLIN)

    # -- output to the supervisor ---------------------------------------

    def frame(self, kind: int, rid: int, payload: bytes) -> None:
        data = memoryview(bytes((kind,)) + rid.to_bytes(4, "big")
                          + len(payload).to_bytes(4, "big") + payload)  # fmt: skip
        try:
            while data:
                data = data[os.write(1, data) :]
        except OSError:
            self.shutdown()

    def send(self, msg: dict[str, Any]) -> None:
        self.frame(_K_JSON, 0, base._enc(msg).encode())

    def shutdown(self) -> None:
        """The supervisor went away: nothing may outlive it (pid 1 exits)."""
        os._exit(0)

    # -- input from the supervisor ----------------------------------------

    def read_frames(self) -> None:
        """Read what fd 0 has; complete frames go to ``self.frames``."""
        chunk = os.read(0, 1 << 17)
        if not chunk:
            self.shutdown()
        self.buf += chunk
        while len(self.buf) >= 9:
            n = int.from_bytes(self.buf[5:9], "big")
            if len(self.buf) < 9 + n:
                break
            self.frames.append((self.buf[0], int.from_bytes(self.buf[1:5], "big"),
                                bytes(self.buf[9 : 9 + n])))  # fmt: skip
            del self.buf[: 9 + n]

    def first_message(self) -> dict[str, Any]:
        while True:
            while not self.frames:
                self.read_frames()
            kind, _rid, payload = self.frames.pop(0)
            if kind == _K_MSG:
                msg: dict[str, Any] = marshal.loads(payload)
                return msg

    # -- walls ------------------------------------------------------------

    def configure(self, cfg: dict[str, Any]) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/1/mem for same-uid code
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS (the OCI spec sets it too)

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        for prog in cfg.get("seccomp", ()):
            buf = ctypes.create_string_buffer(prog, len(prog))
            fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
            if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
                err = ctypes.get_errno()
                self.send({"op": "fatal", "wall": "seccomp", "error": os.strerror(err)})
                os._exit(125)
        self.preload = str(cfg.get("preload") or "")
        for name, value in cfg["rlimits"].items():
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (OSError, ValueError) as exc:
                self.send({"op": "fatal", "wall": "rlimits", "error": f"{name}: {exc}"})
                os._exit(125)
        fwd = cfg.get("forward")
        if fwd:  # the proxy bridge (init_net.py), as on namespaces
            self.forwarder(int(fwd["port"]), str(fwd["socket"]))
        self.send({"op": "ready", "landlock_abi": 0, "pid": os.getpid()})

    def forwarder(self, port: int, path: str) -> None:
        """Start ``init_net``'s loopback->proxy bridge, without the control channel.

        A short-lived child points fds 0/1 at /dev/null first, so the bridge
        (which pid 1 adopts and reaps) never holds the supervisor's pipes.
        """
        import init_net  # type: ignore[import-not-found]

        pid = os.fork()
        if pid == 0:
            try:
                _signal.set_wakeup_fd(-1)
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
                null = os.open("/dev/null", os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                init_net.start_forwarder(port, path)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    # -- requests -----------------------------------------------------------

    def spawn(self, rid: int, msg: dict[str, Any]) -> None:
        """Fork the op's child with fresh pipes; the init relays them as frames."""
        op = msg["op"]
        parent_fds: list[tuple[int, int]] = []  # (fd, kind) kept here
        child_fds: list[int] = []
        if op == "exec" and msg.get("pty"):
            try:
                master, slave = os.openpty()
                rows, cols = (int(v) for v in msg["pty"])
                fcntl.ioctl(master, base.TIOCSWINSZ, base.winsize(rows, cols))
            except (OSError, ValueError) as exc:
                self.send({"op": "error", "id": rid, "errno": getattr(exc, "errno", 0) or 22,
                           "error": f"pty: {exc}"})  # fmt: skip
                return
            # A fork, not posix_spawn: the child needs the slave as its controlling tty.
            child_fds = [slave]
            parent_fds = [(os.dup(master), _K_IN), (master, _K_OUT)]
            self.ttys[rid] = os.dup(master)
            if self.preload:
                env = msg["env"]
                env["LD_PRELOAD"] = " ".join(filter(None, (self.preload, env.get("LD_PRELOAD"))))
            body = _pty_exec_body(msg)
        elif op == "exec":
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            child_fds = [in_r, out_w, err_w]
            parent_fds = [(in_w, _K_IN), (out_r, _K_OUT), (err_r, _K_ERR)]
            if self.preload:  # the compat shim (see backends/_gvisor_spec.py)
                env = msg["env"]
                env["LD_PRELOAD"] = " ".join(filter(None, (self.preload, env.get("LD_PRELOAD"))))
            try:
                pid = self.spawn_exec(msg, child_fds)
            except OSError as exc:
                for fd, _k in parent_fds:
                    os.close(fd)
                self.send({"op": "error", "id": rid, "errno": exc.errno or 0, "error": str(exc)})
                return
            finally:
                for fd in child_fds:
                    os.close(fd)
            self.register(rid, pid, parent_fds, msg)
            return
        else:
            kind = msg.get("kind")
            if kind in ("read", "list"):
                r, w = os.pipe2(os.O_CLOEXEC)
                child_fds, parent_fds = [w], [(r, _K_OUT)]
            elif kind == "write":
                r, w = os.pipe2(os.O_CLOEXEC)
                child_fds, parent_fds = [r], [(w, _K_IN)]
            body = base._file_body(msg)
        errr, errw = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                _signal.set_wakeup_fd(-1)
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
                os.close(errr)
                for fd, _k in parent_fds:
                    os.close(fd)
                if op != "exec":  # the control channel must not reach the op's child
                    null = os.open("/dev/null", os.O_RDWR)
                    os.dup2(null, 0)
                    os.dup2(null, 1)
                os.setsid()
                body(errw, child_fds)
            except OSError as exc:
                try:
                    os.write(errw, str(exc.errno or 0).encode() + b" " + str(exc).encode())
                except OSError:
                    pass
                os._exit((exc.errno or 1) & 0xFF)
            finally:
                os._exit(127)
        os.close(errw)
        for fd in child_fds:
            os.close(fd)
        err = os.read(errr, 4096)
        os.close(errr)
        if err:
            os.waitpid(pid, 0)
            for fd, _k in parent_fds:
                os.close(fd)
            self.drop_tty(rid)
            code, _, text = err.decode(errors="replace").partition(" ")
            self.send({"op": "error", "id": rid, "errno": int(code or 0), "error": text})
            return
        self.register(rid, pid, parent_fds, msg)

    def drop_tty(self, rid: int) -> None:
        tty = self.ttys.pop(rid, None)
        if tty is not None:
            os.close(tty)

    def spawn_exec(self, msg: dict[str, Any], child_fds: list[int]) -> int:
        """posix_spawn (vfork + exec): far cheaper than fork()ing this Python under gVisor.

        Same effect as ``sandbox_init._exec_body``: the three pipe ends on
        0/1/2 (every other fd of the init is close-on-exec), a new session,
        the request's cwd (taken by the init itself: posix_spawn has no chdir
        here, and the init only uses absolute paths) and env.  A denied or
        missing executable raises OSError with its errno.
        """
        env = msg["env"]
        argv = msg["argv"]
        exe = argv[0] if "/" in argv[0] else base._which(argv[0], env.get("PATH", ""))
        os.chdir(msg["cwd"])
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(child_fds)]
        return os.posix_spawn(exe, argv, env, file_actions=actions, setsid=True,
                              setsigdef=(_signal.SIGCHLD,))  # fmt: skip

    def register(self, rid: int, pid: int, parent_fds: list[tuple[int, int]],
                 msg: dict[str, Any]) -> None:  # fmt: skip
        """Track a started child: relay its outputs, feed its stdin, report it."""
        req = _Req(rid, pid, int(msg.get("max_output", 1 << 20)))
        for fd, k in parent_fds:
            os.set_blocking(fd, False)
            if k == _K_IN:
                req.stdin = fd
            else:
                req.outs[fd] = k
                self.by_fd[fd] = req
                self.poll.register(fd, select.POLLIN)
        self.reqs[rid] = req
        self.by_pid[pid] = req
        self.send({"op": "started", "id": rid, "pid": pid})

    def relay(self, fd: int) -> bool:
        """Forward one chunk of ``fd``; False when nothing is left now (EOF or EAGAIN)."""
        req = self.by_fd.get(fd)
        if req is None:
            return False
        try:
            chunk = os.read(fd, MAX_DATA)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.close_out(req, fd)
            return False
        req.sent += len(chunk)
        self.frame(req.outs[fd], req.rid, chunk)
        if req.sent > req.max:  # past the cap: the writer gets EPIPE, as on namespaces
            for f in list(req.outs):
                self.close_out(req, f)
            return False
        return True

    def close_out(self, req: _Req, fd: int) -> None:
        if req.outs.pop(fd, None) is not None:
            self.by_fd.pop(fd, None)
            self.poll.unregister(fd)
            os.close(fd)

    def close_stdin(self, req: _Req) -> None:
        if req.stdin >= 0:
            try:
                self.poll.unregister(req.stdin)
            except KeyError:
                pass
            self.by_fd.pop(req.stdin, None)
            os.close(req.stdin)
            req.stdin = -1
        req.pending.clear()

    def feed(self, req: _Req) -> None:
        """Write pending stdin without blocking; the rest waits for POLLOUT."""
        try:
            while req.pending:
                n = os.write(req.stdin, req.pending[:MAX_DATA])
                del req.pending[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.close_stdin(req)
            return
        registered = req.stdin in self.by_fd
        if req.pending and not registered:
            self.by_fd[req.stdin] = req
            self.poll.register(req.stdin, select.POLLOUT)
        elif not req.pending:
            if registered:
                self.by_fd.pop(req.stdin, None)
                self.poll.unregister(req.stdin)
            if req.eof:
                self.close_stdin(req)

    def reap(self) -> None:
        """Reap every exited child (pid 1 adopts orphans); report ours."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            req = self.by_pid.pop(pid, None)
            if req is None:
                continue
            for fd in list(req.outs):  # what it wrote before exiting, then close:
                while self.relay(fd):  # a background grandchild writing on gets EPIPE
                    pass
                self.close_out(req, fd)
            self.close_stdin(req)
            self.drop_tty(req.rid)
            self.reqs.pop(req.rid, None)
            if os.WIFSIGNALED(status):
                self.send({"op": "exit", "id": req.rid, "code": None,
                           "signal": os.WTERMSIG(status)})  # fmt: skip
            else:
                self.send({"op": "exit", "id": req.rid,
                           "code": os.waitstatus_to_exitcode(status), "signal": None})  # fmt: skip

    def handle(self, kind: int, rid: int, payload: bytes) -> None:
        if kind in (_K_IN, _K_CLOSE):
            req = self.reqs.get(rid)
            if req is None or req.stdin < 0:
                return
            if kind == _K_IN:
                req.pending += payload
            else:
                req.eof = True
            self.feed(req)
            return
        if kind != _K_MSG:
            return
        msg = marshal.loads(payload)
        op = msg.get("op")
        mid = int(msg.get("id", 0))
        if op in ("exec", "file"):
            self.spawn(mid, msg)
        elif op == "signal":
            target = self.reqs.get(msg.get("target", -1))
            if target is not None:
                try:
                    os.killpg(target.pid, int(msg["sig"]))
                except OSError:
                    pass
        elif op == "resize":
            tty = self.ttys.get(msg.get("target", -1))
            if tty is not None:
                try:
                    size = base.winsize(int(msg["rows"]), int(msg["cols"]))
                    fcntl.ioctl(tty, base.TIOCSWINSZ, size)
                except (OSError, ValueError):
                    pass
        elif op == "close_output":
            target = self.reqs.get(msg.get("target", -1))
            if target is not None:
                for fd in list(target.outs):
                    self.close_out(target, fd)
        elif op == "statfs":
            try:
                st = os.statvfs(msg["path"])
                total = st.f_blocks * st.f_frsize
                self.send({"op": "statfs", "id": mid, "total": total,
                           "used": total - st.f_bavail * st.f_frsize})  # fmt: skip
            except OSError as exc:
                self.send({"op": "error", "id": mid, "errno": exc.errno or 0, "error": str(exc)})
        else:
            self.send({"op": "error", "id": mid, "errno": 22, "error": f"unknown op {op!r}"})

    def loop(self) -> None:
        while True:
            for fd, ev in self.poll.poll(1000):
                if fd == 0:
                    self.read_frames()
                    while self.frames:
                        self.handle(*self.frames.pop(0))
                elif fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 512)
                    except OSError:
                        pass
                elif fd in self.by_fd:
                    req = self.by_fd[fd]
                    if fd == req.stdin:
                        self.feed(req)
                    elif ev & _POLLIN:
                        self.relay(fd)
            self.reap()


def _pty_exec_body(msg: dict[str, Any]) -> Any:
    """The command on the slave: its controlling tty (``login_tty``: ``TIOCSCTTY``,
    the slave on 0/1/2), then the same exec as ``sandbox_init._exec_body``."""
    run = base._exec_body(msg)

    def body(errw: int, fds: list[int]) -> None:
        os.login_tty(fds[0])  # its setsid fails (the fork made a session already)
        run(errw, [0, 1, 2])

    return body


def _noop(_sig: int, _frame: object) -> None:
    """SIGCHLD only has to interrupt poll(); the wake-up pipe does the rest."""


def main() -> None:
    init = StreamInit()
    msg = init.first_message()
    if msg.get("op") != "config":
        init.send({"op": "fatal", "wall": "init", "error": "first message must be config"})
        os._exit(125)
    init.configure(msg)
    init.loop()
