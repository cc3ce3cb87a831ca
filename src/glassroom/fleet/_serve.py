"""``glassroom serve --ray ADDRESS``: the front door, on uvicorn, against a running cluster.

The front door needs no state of its own beyond its audit log (``sandbox.lost``
and ``fleet.anchored`` records, in ``data_dir``): the nodes and their agents are
in Ray, the sandboxes in the agents.  It anchors the nodes' heads every
``ANCHOR_EVERY_S`` seconds, and on ``POST /v1/fleet/audit``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..interfaces.http import ServeConfig

log = logging.getLogger("glassroom.fleet")
ANCHOR_EVERY_S = 60.0


def node_root(cfg: ServeConfig) -> Path:
    """Where the nodes keep their dirs (on each node's own disk): ``<data_dir>/nodes``."""
    return cfg.data_dir / "nodes"


def anchor_loop(fleet: object, stop: threading.Event, every: float = ANCHOR_EVERY_S) -> None:
    from ._audit import anchor_heads

    while not stop.wait(every):
        try:
            report = anchor_heads(fleet)
            if not report["ok"]:
                log.error("fleet audit: %s", report)
        except Exception:
            log.exception("fleet audit")


def run(cfg: ServeConfig, address: str, *, root: str | Path | None = None) -> None:
    """Serve the front door until SIGTERM/SIGINT.  The agents (and the
    sandboxes) stay: they belong to the nodes, and a new front door finds them."""
    import uvicorn

    from . import _ray
    from ._front import FrontDoor
    from ._nodes import Fleet

    _ray.connect(address)
    fleet = Fleet(cfg, root=root or node_root(cfg))
    stop = threading.Event()
    threading.Thread(
        target=anchor_loop, args=(fleet, stop), name="glassroom-fleet-anchor", daemon=True
    ).start()
    try:
        uvicorn.run(
            FrontDoor(fleet),
            host=cfg.host,
            port=cfg.port,
            log_level="info",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(cfg.shutdown_timeout_s / 2)),
        )
    finally:
        stop.set()
        fleet.close()
