"""Background processes for the ``namespaces`` backend: ``Instance.spawn()``.

``exec()`` runs a command to completion; ``spawn()`` starts the same kind of
command (same init request, same walls) and returns at once with a handle
that streams output as it arrives, takes stdin, signals and waits.  One
reader thread per process drains stdout/stderr into a bounded event list;
any number of consumers read it from an index (``events_since``), so a
second client can attach to a running process and replay what it missed.

The output cap (``max_output_bytes``) holds for the process's whole life:
past it the pipes are closed (the writer gets ``EPIPE``) and ``truncated``
is set, exactly as for ``exec()``.

With ``req.pty`` the init makes a pseudo-terminal inside the sandbox
(``sandbox_init._pty_body``); the same stdin/stdout pipes then carry what
is typed into it and what it shows (``"pty"`` events; nothing on stderr),
and :meth:`NamespacesProcess.resize` sets its size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import select
import signal as _signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import SandboxClosed
from ._channel import close_quietly
from .base import ExecRequest, ExecResult, pty_size, resize_message

if TYPE_CHECKING:
    from .namespaces import NamespacesInstance

#: How long ``resize`` waits for the init to say it has set the size.
RESIZE_TIMEOUT_S = 5.0
#: (stream, data): stream is "stdout" or "stderr".
Event = tuple[str, bytes]


class NamespacesProcess:
    """A command running in a namespaces sandbox (see :class:`base.Process`)."""

    def __init__(self, inst: NamespacesInstance, req: ExecRequest) -> None:
        self._inst = inst
        self.req = req
        self.pid = 0
        self.started = time.monotonic()
        self.events: list[Event] = []
        self.result: ExecResult | None = None
        self._cond = threading.Condition()
        self._rid = 0
        self._q: queue.Queue[dict[str, Any]] | None = None
        self._in_w = -1
        self._stdin_lock = threading.Lock()
        self._on_exit: list[Callable[[ExecResult], None]] = []
        self._killed_by: int | None = None

    # -- start ---------------------------------------------------------------

    def _start(self) -> None:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        msg: dict[str, Any] = {
            "op": "exec",
            "argv": list(self.req.argv),
            "env": dict(self.req.env),
            "cwd": self.req.cwd,
        }
        if self.req.pty is not None:
            msg["pty"] = list(pty_size(*self.req.pty))
        try:
            self._rid, self._q = self._inst._request(msg, [in_r, out_w, err_w])
        except SandboxClosed:
            close_quietly(in_r, in_w, out_r, out_w, err_r, err_w)
            raise self._inst._closed_error() from None
        close_quietly(in_r, out_w, err_w)
        first = self._q.get()
        if first["op"] in ("closed", "error"):
            assert self._inst.channel is not None
            self._inst.channel.forget(self._rid)
            close_quietly(in_w, out_r, err_r)
            if first["op"] == "closed":
                raise self._inst._closed_error()
            err = int(first["errno"])
            self._finish(
                ExecResult(
                    exit_code=126 if err == errno.EACCES else 127,
                    signal=None,
                    stdout=b"",
                    stderr=f"{self.req.argv[0]}: {first['error']}\n".encode(),
                    duration_ms=(time.monotonic() - self.started) * 1000,
                    truncated=False,
                    exec_errno=err,
                    exec_error=str(first["error"]),
                )
            )
            self.events.append(("stderr", self.result.stderr if self.result else b""))
            return
        self.pid = int(first.get("pid", 0))
        self._in_w = in_w
        if self.req.stdin is not None:
            self.write_stdin(self.req.stdin)
            self.close_stdin()
        threading.Thread(
            target=self._pump,
            args=(out_r, err_r),
            daemon=True,
            name=f"glassroom-proc-{self._inst.sandbox_id}-{self._rid}",
        ).start()

    # -- the reader thread -----------------------------------------------------

    def _pump(self, out_r: int, err_r: int) -> None:
        assert self._q is not None
        names = {out_r: "stdout" if self.req.pty is None else "pty", err_r: "stderr"}
        bufs = {out_r: bytearray(), err_r: bytearray()}
        open_fds = {out_r, err_r}
        budget = self.req.max_output_bytes
        truncated = timed_out = False
        deadline = self.started + self.req.timeout_s if self.req.timeout_s else None
        exit_msg: dict[str, Any] | None = None
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        try:
            while True:
                if exit_msg is None:
                    with contextlib.suppress(queue.Empty):
                        got = self._q.get_nowait()
                        exit_msg = _as_exit(got)
                if exit_msg is not None and not open_fds:
                    break
                if deadline and time.monotonic() > deadline and not timed_out:
                    timed_out = True
                    self.signal(int(_signal.SIGKILL))
                if not open_fds:
                    with contextlib.suppress(queue.Empty):
                        exit_msg = _as_exit(self._q.get(timeout=0.5))
                    continue
                for fd, ev in poller.poll(50 if exit_msg is None else 100):
                    chunk = os.read(fd, 65536) if ev & (select.POLLIN | select.POLLHUP) else b""
                    if not chunk:
                        poller.unregister(fd)
                        open_fds.discard(fd)
                        continue
                    if len(chunk) > budget:
                        chunk, truncated = chunk[:budget], True
                    budget -= len(chunk)
                    bufs[fd] += chunk
                    if chunk:
                        with self._cond:
                            self.events.append((names[fd], chunk))
                            self._cond.notify_all()
                    if truncated:
                        for f in list(open_fds):
                            poller.unregister(f)
                            close_quietly(f)
                        open_fds.clear()
                        break
                if exit_msg is not None and open_fds and not poller.poll(0):
                    # Exited, and the pipes are quiet: a grandchild may hold
                    # them open; give it a moment, then stop reading.
                    time.sleep(0.05)
                    if not poller.poll(0):
                        break
        finally:
            close_quietly(*open_fds)
            with self._stdin_lock:
                close_quietly(self._in_w)
                self._in_w = -1
            if self._inst.channel is not None:
                self._inst.channel.forget(self._rid)
        exit_msg = exit_msg or {"signal": int(_signal.SIGKILL), "closed": True}
        sig = exit_msg.get("signal")
        code = exit_msg.get("code")
        limits = ["output"] if truncated else []
        by_deadline = bool(exit_msg.get("closed") and self._inst.killed_by_deadline)
        if by_deadline:
            limits.append("max_runtime")
        self._finish(
            ExecResult(
                exit_code=128 + sig if sig else int(code or 0),
                signal=sig,
                stdout=bytes(bufs[out_r]),
                stderr=bytes(bufs[err_r]),
                duration_ms=(time.monotonic() - self.started) * 1000,
                truncated=truncated,
                timed_out=timed_out or by_deadline,
                limits_hit=limits,
            )
        )

    def _finish(self, res: ExecResult) -> None:
        trace = getattr(self._inst, "_trace", None)
        if trace is not None:  # its file/exec records come before its end
            trace.sync()
        with self._cond:
            self.result = res
            callbacks = list(self._on_exit)
            self._cond.notify_all()
        for cb in callbacks:
            cb(res)

    # -- the handle's API --------------------------------------------------------

    def on_exit(self, callback: Callable[[ExecResult], None]) -> None:
        with self._cond:
            done = self.result
            if done is None:
                self._on_exit.append(callback)
        if done is not None:
            callback(done)

    def events_since(self, index: int, timeout: float) -> tuple[list[Event], int, bool]:
        with self._cond:
            if len(self.events) <= index and self.result is None:
                self._cond.wait(timeout)
            new = self.events[index:]
            return (
                new,
                index + len(new),
                self.result is not None and not self.events[index + len(new) :],
            )

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.result is None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self.result

    def signal(self, sig: int) -> None:
        if self.result is not None or not self._rid:
            return
        self._killed_by = sig
        with contextlib.suppress(SandboxClosed):
            assert self._inst.channel is not None
            self._inst.channel.send({"op": "signal", "target": self._rid, "sig": int(sig)})

    def write_stdin(self, data: bytes) -> None:
        with self._stdin_lock:
            if self._in_w < 0:
                raise BrokenPipeError(errno.EPIPE, "stdin is closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self._in_w, view[: 1 << 16]) :]

    def close_stdin(self) -> None:
        with self._stdin_lock:
            close_quietly(self._in_w)
            self._in_w = -1

    def resize(self, rows: int, cols: int) -> None:
        msg = resize_message(
            self.req.pty is not None, self.pid, self.result is None, self._rid, rows, cols
        )
        if msg is None:
            return
        try:
            rid, q = self._inst._request(msg, [])
        except SandboxClosed:
            return
        try:  # done before it returns: input typed next sees the new size
            q.get(timeout=RESIZE_TIMEOUT_S)
        except queue.Empty:
            pass
        finally:
            if self._inst.channel is not None:
                self._inst.channel.forget(rid)


def spawn(inst: NamespacesInstance, req: ExecRequest) -> NamespacesProcess:
    proc = NamespacesProcess(inst, req)
    proc._start()
    return proc


def _as_exit(msg: dict[str, Any]) -> dict[str, Any]:
    if msg["op"] == "closed":
        return {"op": "exit", "code": None, "signal": int(_signal.SIGKILL), "closed": True}
    return msg
