"""An optional warm pool: sandboxes built ahead of time for one policy.

Every sandbox a pool hands out is new, built for no task before.  The
pool only moves the cost of building it off the task's critical path.  It
is still destroyed after its one task, like any other.  A pool never
reuses a sandbox.

Sandboxes are built on the pool's own long-lived thread.  bwrap's
``--die-with-parent`` fires when the *thread* that started it exits, so that
thread stays alive until the pool is closed and every sandbox it made is
destroyed.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from .._errors import GlassroomError, SandboxError
from ..policy import Policy
from .supervisor import Supervised


class Pool:
    """Keep ``size`` ready sandboxes for ``policy``; ``take()`` one per task."""

    def __init__(
        self,
        policy: Policy,
        *,
        size: int = 2,
        backend: str | None = None,
        audit_log: str | Path | None = None,
    ) -> None:
        if size < 1:
            raise SandboxError("pool size must be at least 1")
        self.policy, self.size, self.backend, self.audit_log = policy, size, backend, audit_log
        self._ready: queue.Queue[Supervised] = queue.Queue()
        self._wake = threading.Condition()
        self._want = size
        self._closed = False
        self._outstanding = 0
        #: A sandbox is being built on the pool thread (close() waits for it).
        self._building = False
        self.last_error: GlassroomError | None = None
        self._thread = threading.Thread(target=self._run, name="glassroom-pool", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and self._want <= 0:
                    self._wake.wait()
                if self._closed:
                    # Keep this thread (the sandboxes' parent) alive while any
                    # sandbox it started is still in use.
                    while self._outstanding > 0:
                        self._wake.wait()
                    return
                self._want -= 1
                self._building = True
            try:
                self._build_one()
            except Exception as exc:  # the thread must outlive the sandboxes it started
                self._fail(SandboxError(f"the pool could not build a sandbox: "
                                        f"{type(exc).__name__}: {exc}"))  # fmt: skip
            finally:  # whatever happened, close() must not wait on this build
                with self._wake:
                    self._building = False
                    self._wake.notify_all()

    def _fail(self, exc: GlassroomError) -> None:
        """Stop filling; take() reports ``exc``."""
        self.last_error = exc
        with self._wake:
            self._closed = True

    def _build_one(self) -> None:
        try:
            sup = Supervised(self.policy, backend=self.backend, audit_log=self.audit_log)
        except GlassroomError as exc:  # a wall failed: stop filling, report on take()
            self._fail(exc)
            return
        with self._wake:
            late = self._closed
        if late:  # closed while this one was being built: it is never handed out
            sup.destroy()
            return
        with self._wake:
            self._outstanding += 1
            sup.on_destroy = self._released
            self._ready.put(sup)

    def _released(self) -> None:
        # Replacements are built once a task is done, not while it runs:
        # building one costs CPU that the running task would otherwise get.
        with self._wake:
            self._outstanding -= 1
            self._want += 1
            self._wake.notify_all()

    def take(self, timeout: float = 30.0) -> Supervised:
        """A never-used sandbox; the pool starts building its replacement."""
        with self._wake:
            if self._closed and self._ready.empty():
                raise self.last_error or SandboxError("the pool is closed")
            if self._ready.empty():  # drained: build one now rather than wait for a release
                self._want += 1
                self._wake.notify_all()
        try:
            sup = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise self.last_error or SandboxError(
                f"no sandbox became ready in {timeout:g}s"
            ) from None
        sup.audit.append(sup.id, "sandbox.claimed", {"pool_size": self.size}, decision="info")
        return sup

    def close(self) -> None:
        """Destroy the idle sandboxes; handed-out ones stay until destroyed.

        A sandbox still being built is waited for and destroyed too: without
        that, one finished just after close() went into the queue unseen and
        was never destroyed (a real leak the pool test caught, about 1 run in
        8)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            while self._building:
                self._wake.wait()
        while True:
            try:
                self._ready.get_nowait().destroy()
            except queue.Empty:
                break

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
