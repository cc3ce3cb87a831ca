"""Running ``glassroom serve``: uvicorn, with a stop that is bounded.

uvicorn's own graceful stop waits for every open connection to close, and a
stream (an E2B Connect process stream, ``/v1/.../commands/stream``, a code
interpreter ``/execute``) stays open as long as the command in the sandbox
runs: a SIGTERM used to leave the server streaming until the clients left.
Here, the moment the signal arrives:

1. the service refuses new sandboxes and destroys every live one, one thread
   each (:meth:`SandboxService.begin_shutdown`); a destroyed sandbox's
   processes are gone, so each stream sends its end event and closes;
2. uvicorn closes the listening socket and idle connections and waits at most
   ``grace`` seconds for the streams, then cancels what is left;
3. the lifespan's shutdown joins the destroying threads until the bound;
4. a watchdog ends the process at the bound whatever is still running
   (``--die-with-parent`` takes the sandboxes' processes down with it, and the
   reaper removes the rest at the next start), so "stops within
   ``shutdown_timeout_s``" holds even when a teardown hangs in the kernel.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from types import FrameType

import uvicorn

from ._app import create_app
from ._config import ServeConfig
from ._service import SandboxService

#: uvicorn's own logger: it has the handlers the server's log lines go to.
log = logging.getLogger("uvicorn.error")

#: Exit status when the watchdog had to end the process at the bound.
WATCHDOG_EXIT = 70


def _exit_soon() -> None:
    time.sleep(0.5)
    os._exit(WATCHDOG_EXIT)


def grace_for(bound: float) -> float:
    """How long uvicorn waits for streams: half the bound, the rest is for teardown."""
    return max(0.5, bound / 2)


class BoundedServer(uvicorn.Server):
    """uvicorn's server, with the service's stop started at the signal and a watchdog."""

    def __init__(self, config: uvicorn.Config, service: SandboxService, bound: float) -> None:
        super().__init__(config)
        self.service = service
        self.bound = bound
        self.signalled_at: float | None = None
        self._watchdog: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only note the time (a plain store, no lock);
        # the watchdog thread and the loop do the rest.
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # Armed before serving, not when the loop gets to shutdown(): a loop that
        # is stuck (a blocked log write, a sync call) must not postpone the bound.
        self._start_watchdog()
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.signalled_at is None:  # stopping without a signal: the bound starts now
            self.signalled_at = time.monotonic()
        began = self.signalled_at
        log.info("stopping: destroying every sandbox (bound %.1f s)", self.bound)
        self.service.begin_shutdown()
        await super().shutdown(sockets)
        log.info("stopped in %.2f s", time.monotonic() - began)

    def _start_watchdog(self) -> None:
        def watch() -> None:
            # Poll in short steps: the process normally exits long before the bound.
            while (began := self.signalled_at) is None or time.monotonic() < began + self.bound:
                time.sleep(0.05)
            # The log line can block: a full stderr pipe nobody reads, or a handler
            # lock held by the very thread that hangs.  The exit must not wait for it.
            threading.Thread(target=_exit_soon, name="glassroom-stop-exit", daemon=True).start()
            log.error(
                "stopping took longer than %.1f s: exiting now; the reaper removes "
                "what is left at the next start",
                self.bound,
            )
            logging.shutdown()
            os._exit(WATCHDOG_EXIT)

        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=watch, name="glassroom-stop-watchdog", daemon=True
            )
            self._watchdog.start()


def run(cfg: ServeConfig) -> None:
    """Serve ``cfg`` until SIGTERM/SIGINT; stop within ``cfg.shutdown_timeout_s``."""
    svc = SandboxService(cfg)
    bound = cfg.shutdown_timeout_s
    config = uvicorn.Config(
        create_app(cfg, service=svc, own_service=True),
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(grace_for(bound))),
    )
    try:
        BoundedServer(config, svc, bound).run()
    finally:
        # A second Ctrl-C makes uvicorn skip the lifespan's shutdown: close here too
        # (idempotent, bounded), so the sandboxes still go before the process does.
        svc.close()
