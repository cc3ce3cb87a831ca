"""The host agent: one Ray actor per node, owning that node's glassroom service.

It runs the single-host server unchanged (``create_app`` on a
``SandboxService``: the same walls, audit log, deadlines, reaper and egress
proxy), with uvicorn in a thread of the actor, so a sandbox's owner threads
live in the actor process.  bubblewrap's ``--die-with-parent`` is tied to
those threads: when the node dies (its raylet, and with it this worker, is
killed) the sandboxes' processes die too, and what the kernel leaves behind
(cgroups, state records) is reaped when the node comes back, because its
data and state dirs are keyed by the node's stable *name*, not Ray's node id.

The front door reaches it over HTTP on the node's address (a stream is a
stream, end to end); everything else (ids, audit heads) goes through Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("glassroom.fleet")


def node_dirs(root: Path, name: str) -> tuple[Path, Path]:
    """``(data dir, state dir)`` of node ``name`` under ``root``.

    The state dir must be searchable by the sandbox uid (the init script is
    copied there), so ``root`` and the node's dir are 0755; the data dir
    (audit log, snapshots) is 0700, made by the service."""
    node = root / name
    for d in (root, node, node / "state"):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    return node / "serve", node / "state"


class HostAgent:
    """The node's service and its HTTP server (see the module docstring)."""

    def __init__(self, name: str, cfg: Any, root: str, host: str | None = None) -> None:
        from ..interfaces.http import SandboxService, create_app

        # The node's own setting wins (``ray start`` passes its environment on):
        # the dirs are on the node's disk, wherever the front door keeps its own.
        data, state = node_dirs(Path(os.environ.get("GLASSROOM_FLEET_DIR") or root), name)
        # Per node: the reaper only looks at this node's records, and the
        # anchor key (state_dir()/audit-anchor.key) is this node's own.
        os.environ["GLASSROOM_STATE_DIR"] = str(state)
        cfg.data_dir = data
        self.name = name
        self.started = time.time()
        self.service = SandboxService(cfg)  # runs the reaper before it answers anyone
        if host is None:  # the address Ray knows the node by: the front door reaches it there
            import ray

            host = str(ray.util.get_node_ip_address())
        self.url, self._server, self._thread = _serve(
            create_app(cfg, service=self.service), host, os.environ.get("GLASSROOM_AGENT_PORT")
        )
        # MCP (``glassroom mcp --http``'s app) on the same service: its sandboxes
        # count in the same caps; the front door pins each MCP session to a node.
        from ..interfaces.mcp import _server as mcp

        self.service.tenant(mcp.MCP_TENANT).max_sandboxes = mcp.MCP_TENANT_CAP
        self.service.tenant(mcp.MCP_HANDLE_TENANT).max_sandboxes = cfg.max_handle_sandboxes
        self.mcp_url, self._mcp_server, self._mcp_thread = _serve(
            mcp.http_app(self.service, host=host), host, os.environ.get("GLASSROOM_AGENT_MCP_PORT")
        )

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "mcp_url": self.mcp_url, "pid": os.getpid(),
                "started": self.started}  # fmt: skip

    def configure(self, cfg: Any) -> None:
        """Take the front door's tenants, keys and templates (a front door that
        restarts with a changed config, or a second one, finds agents made with
        the old one: the node must judge keys as the front door does)."""
        mine = self.service.cfg
        mine.tenants.update(cfg.tenants)  # the MCP server's own tenants stay
        mine.key_hashes = dict(cfg.key_hashes)  # a key taken out of the config is out
        mine.templates = dict(cfg.templates)
        mine.default_template = cfg.default_template

    def sandboxes(self) -> list[tuple[str, str]]:
        """``(id, tenant)`` of every sandbox the node holds."""
        return [(e.id, e.tenant) for e in self.service.live()]

    def audit_head(self) -> dict[str, Any]:
        """Verify this node's log (chain and anchor), anchor its head, say how it stands."""
        from ..audit import verify

        path = self.service.cfg.audit_log
        anchored = None
        try:
            anchored = self.service.audit.anchor()
        except Exception as exc:  # a log that no longer matches its anchor: verify says why
            log.warning("node %s: anchoring failed: %s", self.name, exc)
        res = verify(path)
        return {
            "node": self.name,
            "log": str(path),
            "ok": res.ok,
            "records": res.records,
            "problems": res.problems[:20],
            "seq": res.last_seq,
            "hash": res.last_hash,
            "anchored_seq": (anchored or {}).get("seq", res.anchored_seq),
            "anchor_status": res.anchor_status,
        }

    def hash_at(self, seq: int) -> str | None:
        """The hash of record ``seq`` of this node's log (None: not there)."""
        from ..audit import read_records

        for rec in read_records(self.service.cfg.audit_log):
            if rec.get("seq") == seq:
                h = rec.get("hash")
                return str(h) if h is not None else None
        return None

    def records(self, limit: int = 1000) -> list[dict[str, Any]]:
        from ..audit import read_records

        out = [r for r in read_records(self.service.cfg.audit_log) if "_error" not in r]
        return out[-limit:]

    def stop(self) -> None:
        """Destroy every sandbox and stop serving (a planned removal of the node)."""
        self.service.begin_shutdown()
        self._server.should_exit = self._mcp_server.should_exit = True
        self._thread.join(10)
        self._mcp_thread.join(10)
        self.service.close()


def _serve(app: Any, host: str, port: str | None) -> tuple[str, Any, threading.Thread]:
    """``app`` on uvicorn in a thread of this process, on ``host``; its URL.

    The socket is bound here (no race for a free port), with TCP_NODELAY on the
    listener so accepted connections inherit it: uvicorn sets it only on
    sockets it binds itself, and without it every answer waited 40 ms (Nagle
    against the client's delayed ACK)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, int(port or 0)))
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
        )  # fmt: skip
    )
    th = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="glassroom-agent", daemon=True
    )
    th.start()
    end = time.monotonic() + 30
    while not server.started:
        if not th.is_alive() or time.monotonic() > end:
            raise RuntimeError("the node's glassroom service did not start")
        time.sleep(0.02)
    bracket = f"[{host}]" if ":" in host else host
    return f"http://{bracket}:{sock.getsockname()[1]}", server, th


def start_agent(name: str, node_id: str, cfg: Any, root: str, host: str | None) -> Any:
    """The node's agent actor (made, or the live one of that name), pinned to it.

    Detached, so a front door that restarts finds the agents (and their
    sandboxes) still there; ``max_restarts=0``: an agent that died took its
    sandboxes with it, and a new one is made only with a new node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ._ray import NAMESPACE

    actor = ray.remote(HostAgent).options(
        name=f"glassroom-agent-{name}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=0,
        max_concurrency=8,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    )
    return actor.remote(name, cfg, root, host)
