"""Host side of file/exec tracing: the filter, the tracer process, its reports.

``tracer.py`` does the ptrace work in its own process; this module builds
the seccomp program that selects the traced syscalls (``SECCOMP_RET_TRACE``
for those, ALLOW for the rest; compiled here with libseccomp, installed by
the sandbox's init on itself), starts the tracer, and turns its reports into
audit records through the one schema (``audit/_events.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyseccomp

from .._errors import WallError
from ..audit._events import syscalls_for, to_record
from . import proc
from .seccomp import export_bpf

TRACER = Path(__file__).with_name("tracer.py")
ATTACH_TIMEOUT_S = 10.0
#: A sandbox that makes more traced calls than this is killed, with an
#: anomaly record: the log must not be a way to fill the host's disk, and a
#: task must not be able to outrun its audit and then act unseen.
MAX_EVENTS = 1_000_000
_filters: dict[str, bytes] = {}
_next_cpu = 0  # spreads traced sandboxes over the CPUs
Record = tuple[str, dict[str, Any], str, "str | None"]


def syscall_table(level: str) -> dict[int, str]:
    """Native syscall number -> name for every call traced at ``level``."""
    out: dict[int, str] = {}
    for name in syscalls_for(level):
        with contextlib.suppress(Exception):
            nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if nr >= 0:
                out[nr] = name
    return out


def filter_program(level: str) -> bytes:
    """The classic-BPF program the init installs: TRACE the watched calls."""
    cached = _filters.get(level)
    if cached is not None:
        return cached
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for nr in syscall_table(level):
        f.add_rule(pyseccomp.TRACE(0), nr)
    _filters[level] = export_bpf(f, "trace-" + level)
    return _filters[level]


class TraceWatch:
    """One tracer process for one sandbox, and the thread that logs its reports.

    ``sink`` gets lists of records (one batch per read, so the audit log
    can write a batch with one fsync).
    """

    def __init__(
        self,
        level: str,
        sink: Callable[[list[Record]], None],
        name: str,
        *,
        program: Path = TRACER,
        python: str = sys.executable,
        on_fail: Callable[[str], None] | None = None,
        run_as: tuple[int, int] | None = None,
        compiled: Path | None = None,
    ) -> None:
        """``program``/``python``: a copy of tracer.py and an interpreter that a
        non-root supervisor can read (the package may live under /root).
        ``compiled``: the compiled init, whose ``--tracer`` mode is a drop-in
        for tracer.py (``_sys/agent/tracer.c``); it is run instead.
        ``run_as``: (uid, gid) for the tracer.  As root, glassroom passes the
        sandbox's own host uid: it owns the sandbox's user namespaces, so it
        may trace them, and a tracer fed hostile memory holds nothing more
        than the sandbox already has."""
        self.level = level
        self.sink = sink
        #: Called (once) when the audit cannot go on: the budget is spent, the
        #: log cannot be written, or the tracer died.  The caller kills the
        #: sandbox: a task whose calls are no longer logged must not run on.
        self.on_fail = on_fail
        self.events = 0
        self._closing = False
        self._failed = False
        try:
            argv = [str(compiled), "--tracer"] if compiled else [python, "-I", "-S", str(program)]
            self._proc = self._spawn(argv, run_as)
        except OSError as exc:
            raise WallError(f"audit: level {level!r}: cannot start the tracer: {exc}",
                            rule="audit.level") from exc  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name=f"trace-{name}", daemon=True)
        self._buf = b""
        self._synced = 0
        self._asked = 0
        self._cond = threading.Condition()

    @staticmethod
    def _spawn(command: list[str], run_as: tuple[int, int] | None) -> subprocess.Popen[bytes]:
        argv, as_ids = proc.as_user(command, run_as)
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, env={}, **as_ids,
        )  # fmt: skip

    def attach(self, pid: int) -> None:
        """Seize ``pid``; raises WallError (rule ``audit.level``) if impossible."""
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        cfg = {"pid": pid, "syscalls": {str(k): v for k, v in syscall_table(self.level).items()}}
        try:
            proc.stdin.write(json.dumps(cfg).encode() + b"\n")
            proc.stdin.flush()
        except OSError as exc:
            raise self._fail(f"cannot talk to the tracer: {exc}") from None
        line = self._line(time.monotonic() + ATTACH_TIMEOUT_S)
        try:
            answer = json.loads(line) if line else {}
        except ValueError:
            answer = {}
        if answer.get("attached") != pid:
            why = answer.get("error") or self._stderr() or "no answer"
            raise self._fail(f"cannot trace the sandbox: {why}")
        self._thread.start()

    def pin(self, pid: int, cpus: float) -> list[int]:
        """Put the tracee tree and the tracer on the same ``ceil(cpus)`` CPUs.

        Why: every traced call stops the tracee and wakes the tracer.  On
        different CPUs that wake-up is an inter-processor interrupt, which
        on a VM is a VM exit; measured on the 2-vCPU CI VM, the file-heavy
        bench costs 1.5x unpinned and 1.1x pinned.  Children inherit the
        init's affinity.  Best effort: a failure only costs speed.
        """
        allowed = sorted(os.sched_getaffinity(0))
        want = max(1, min(len(allowed), math.ceil(cpus)))
        global _next_cpu
        start = _next_cpu % len(allowed)
        _next_cpu += want
        chosen = [allowed[(start + i) % len(allowed)] for i in range(want)]
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, chosen)
            os.sched_setaffinity(self._proc.pid, chosen)
        return chosen

    def _fail(self, why: str) -> WallError:
        self.kill()
        return WallError(f"audit: level {self.level!r}: {why}", rule="audit.level")

    def _line(self, deadline: float) -> bytes:
        import select

        out = self._proc.stdout
        assert out is not None
        fd = out.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return b""
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _stderr(self) -> str:
        with contextlib.suppress(Exception):
            self._proc.wait(timeout=1)
            err = self._proc.stderr.read() if self._proc.stderr else b""
            return err.decode(errors="replace").strip().splitlines()[-1]
        return ""

    def _loop(self) -> None:
        out = self._proc.stdout
        assert out is not None
        fd = out.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            data = self._buf + chunk
            lines = data.split(b"\n")
            self._buf = lines.pop() if chunk else b""
            batch: list[Record] = []
            synced = 0
            for raw in lines:
                if raw.startswith(b'{"synced":'):
                    with contextlib.suppress(ValueError):
                        synced = max(synced, int(raw[10:-1]))
                elif raw and (r := self._record(raw)) is not None:
                    batch.append(r)
            if batch:
                try:
                    self.sink(batch)
                except Exception as exc:  # any failure to log is fatal
                    self._give_up(f"cannot write the audit log: {exc}")
            if self.events > MAX_EVENTS:
                self._give_up(f"more than {MAX_EVENTS} traced calls: the audit budget is spent")
            if synced or not chunk:
                with self._cond:  # only now: the batch before the marker is written
                    self._synced = max(self._synced, synced) if chunk else 1 << 62
                    self._cond.notify_all()
            if not chunk:
                code: int | None = None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self._proc.wait(timeout=1)
                # Status 0: the last tracee is gone, nothing runs unseen.  Any
                # other end while the sandbox lives is a lost audit.
                if code != 0 and not self._closing:
                    self._give_up(f"the tracer exited unexpectedly (status {code})")
                return

    def _give_up(self, why: str) -> None:
        if self._failed:
            return
        self._failed = True
        with contextlib.suppress(Exception):
            self.sink([("anomaly", {"reason": why, "action": "sandbox killed"}, "deny",
                        "audit.level")])  # fmt: skip
        if self.on_fail is not None:
            # Not on this thread: it must keep draining the tracer, or the
            # tracer blocks and the killed tracees cannot be reaped.
            threading.Thread(target=self.on_fail, args=(why,), daemon=True,
                             name="audit-fail").start()  # fmt: skip

    def sync(self, timeout: float = 2.0) -> bool:
        """Return once every call observed so far is handed to the sink.

        Called when a command has ended, so that its file and exec records
        come before its ``command.ended`` in the log.  False on timeout (the
        records still come, later).
        """
        if not self._thread.is_alive() or self._proc.stdin is None:
            return False
        with self._cond:
            self._asked += 1
            ticket = self._asked
        try:
            self._proc.stdin.write(b"sync %d\n" % ticket)
            self._proc.stdin.flush()
        except (OSError, ValueError):
            return False
        with self._cond:
            return self._cond.wait_for(lambda: self._synced >= ticket, timeout=timeout)

    def _record(self, raw: bytes) -> Record | None:
        self.events += 1
        if self.events > MAX_EVENTS:
            return None  # _loop kills the sandbox after this batch
        try:
            ev = json.loads(raw)
        except ValueError:
            return ("anomaly", {"reason": "unparseable tracer report"}, "info", "audit.level")
        if not isinstance(ev, dict):
            return None
        return to_record(ev, "ptrace")

    def close(self, timeout: float = 5.0) -> None:
        """Wait for the last report (the tracees are gone), then stop.

        Called after the sandbox was killed: the tracer sees every tracee
        exit, flushes and ends, and the reader logs the rest before this
        returns.  That is what makes destroy return only after every event
        of the sandbox is in the log.
        """
        self._closing = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)
        with contextlib.suppress(OSError):  # EOF: a tracer still running exits now
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        self.kill()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        for f in (self._proc.stdout, self._proc.stderr):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()

    def kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
