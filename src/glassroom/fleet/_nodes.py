"""The front door's view of the fleet: its nodes, and which node holds which sandbox.

Ray is the source of truth for nodes (``ray.nodes()``: alive or not, with
their glassroom resources); each node's agent is the source of truth for its
sandboxes.  The table here is a cache of both, kept fresh by a watcher
thread, and rebuilt from the agents whenever it may be stale (an id nobody
knows, a tenant at its cap), so a front door that restarts loses nothing.

A node that dies (Ray says so, or its agent is gone) makes its sandboxes
*lost*: each gets a ``sandbox.lost`` record in the front door's own audit
log, naming the node, and every later call for it is answered with a clear
error instead of a timeout.  A node that comes back under the same name
gets a new agent, whose service runs the reaper on the same dirs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..interfaces.http import ServeConfig
from . import _ray
from ._agent import start_agent
from ._placement import Placer

log = logging.getLogger("glassroom.fleet")
#: How many lost ids are remembered (each answers "lost" rather than 404).
MAX_LOST = 100_000


@dataclass
class Node:
    name: str
    node_id: str
    agent: Any
    url: str
    tiers: list[str]
    mcp_url: str = ""
    alive: bool = True


@dataclass
class Placed:
    node: str
    tenant: str
    pg: Any = None
    created: float = field(default_factory=time.time)


class Fleet:
    """Nodes, agents and the sandbox table (see the module docstring)."""

    def __init__(
        self,
        cfg: ServeConfig,
        *,
        root: str | Path,
        host: str | None = None,
        watch_s: float = 0.5,
        place_wait_s: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.root = str(root)
        self.host = host
        self.placer = Placer(place_wait_s)
        Path(self.root).mkdir(parents=True, exist_ok=True)
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.audit = AuditLog(cfg.audit_log)
        self.nodes: dict[str, Node] = {}
        self.sandboxes: dict[str, Placed] = {}
        self.lost: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (tenant, node)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._remember_lost()
        self.refresh()
        self.resync()
        self._watcher = threading.Thread(
            target=self._watch, args=(watch_s,), name="glassroom-fleet-watch", daemon=True
        )
        self._watcher.start()

    def _remember_lost(self) -> None:
        """A front door that restarts still answers "lost" for what its log says was."""
        from ..audit import read_records

        if not self.cfg.audit_log.exists():
            return
        for rec in read_records(self.cfg.audit_log):
            if rec.get("event") == "sandbox.lost":
                d = rec.get("details") or {}
                self.lost[str(rec.get("sandbox"))] = (str(d.get("tenant")), str(d.get("node")))
        while len(self.lost) > MAX_LOST:
            self.lost.popitem(last=False)

    # -- nodes -----------------------------------------------------------------

    def refresh(self) -> None:
        """Follow Ray's node table: new nodes get an agent, dead ones are lost."""
        import ray

        seen: dict[str, dict[str, Any]] = {}
        for n in ray.nodes():
            name = _ray.node_name(n.get("Resources") or {})
            if name is None:
                continue
            if n.get("Alive"):
                seen[name] = n
            elif name not in seen:
                seen.setdefault(name, n)
        for name, n in seen.items():
            known = self.nodes.get(name)
            if not n.get("Alive"):
                if known is not None and known.alive and known.node_id == n["NodeID"]:
                    self.node_lost(name, "Ray reports the node dead")
                continue
            if known is not None and known.alive and known.node_id == n["NodeID"]:
                continue
            if known is not None and known.alive:  # same name, new node: the old one is gone
                self.node_lost(name, "the node restarted")
            self._join(name, n)

    def _join(self, name: str, n: dict[str, Any]) -> None:
        import ray

        agent = start_agent(name, n["NodeID"], self.cfg, self.root, self.host)
        try:
            info = ray.get(agent.info.remote(), timeout=60)
            ray.get(agent.configure.remote(self.cfg), timeout=30)
        except Exception as exc:
            log.error("node %s: its agent did not start: %s", name, exc)
            return
        with self._lock:
            self.nodes[name] = Node(
                name,
                n["NodeID"],
                agent,
                info["url"],
                _ray.node_tiers(n["Resources"]),
                mcp_url=str(info.get("mcp_url", "")),
            )
        log.info("node %s joined at %s", name, info["url"])

    def node_lost(self, name: str, why: str) -> None:
        """Mark node ``name`` and every sandbox on it lost (once), with a record each."""
        with self._lock:
            node = self.nodes.get(name)
            if node is None or not node.alive:
                return
            node.alive = False
            gone = [(sid, p) for sid, p in self.sandboxes.items() if p.node == name]
            for sid, p in gone:
                del self.sandboxes[sid]
                self.lost[sid] = (p.tenant, name)
            while len(self.lost) > MAX_LOST:
                self.lost.popitem(last=False)
        log.error("node %s lost (%s): %d sandbox(es) lost", name, why, len(gone))
        for sid, p in gone:
            self.placer.release(p.pg)
            self.audit.append(
                sid,
                "sandbox.lost",
                {"node": name, "tenant": p.tenant, "why": why},
                decision="deny",
                rule="fleet.node_lost",
            )

    def live_nodes(self) -> list[Node]:
        with self._lock:
            return [n for n in self.nodes.values() if n.alive]

    def node_by_id(self, node_id: str) -> Node | None:
        with self._lock:
            for n in self.nodes.values():
                if n.node_id == node_id and n.alive:
                    return n
        return None

    def check_agent(self, name: str) -> bool:
        """Is node ``name``'s agent still there?  Marks the node lost when not."""
        import ray

        node = self.nodes.get(name)
        if node is None or not node.alive:
            return False
        try:
            ray.get(node.agent.info.remote(), timeout=5)
            return True
        except Exception as exc:
            self.node_lost(name, f"its agent is gone: {type(exc).__name__}")
            return False

    # -- sandboxes -------------------------------------------------------------

    def resync(self, tenant: str | None = None) -> None:
        """Rebuild the table from the agents: drop what they no longer hold, add
        what they hold that the table lacks (a restarted front door, a fork)."""
        import ray

        nodes = self.live_nodes()
        refs = [(n, n.agent.sandboxes.remote()) for n in nodes]
        for node, ref in refs:
            try:
                held = ray.get(ref, timeout=10)
            except Exception:
                self.check_agent(node.name)
                continue
            ids = {sid: t for sid, t in held}
            with self._lock:
                for sid, p in list(self.sandboxes.items()):
                    stale = p.node == node.name and sid not in ids and time.time() - p.created > 2
                    if stale and (tenant is None or p.tenant == tenant):
                        del self.sandboxes[sid]
                        self.placer.release(p.pg)
                for sid, t in ids.items():
                    self.sandboxes.setdefault(sid, Placed(node.name, t))

    def count(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for p in self.sandboxes.values() if p.tenant == tenant)

    def load(self, node: str) -> int:
        with self._lock:
            return sum(1 for p in self.sandboxes.values() if p.node == node)

    def where(self, sandbox_id: str) -> Node | None:
        with self._lock:
            p = self.sandboxes.get(sandbox_id)
            return self.nodes.get(p.node) if p else None

    def add(self, sandbox_id: str, node: str, tenant: str, pg: Any = None) -> None:
        with self._lock:
            self.sandboxes[sandbox_id] = Placed(node, tenant, pg)

    def drop(self, sandbox_id: str) -> None:
        with self._lock:
            p = self.sandboxes.pop(sandbox_id, None)
        if p is not None:
            self.placer.release(p.pg)

    # -- the watcher -----------------------------------------------------------

    def _watch(self, every: float) -> None:
        last_sync = time.monotonic()
        while not self._stop.wait(every):
            try:
                self.refresh()
                if time.monotonic() - last_sync > 10:
                    self.resync()
                    last_sync = time.monotonic()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("fleet watcher")

    def close(self, *, stop_agents: bool = False) -> None:
        self._stop.set()
        self._watcher.join(5)
        if stop_agents:
            import ray

            for n in self.live_nodes():
                try:
                    ray.get(n.agent.stop.remote(), timeout=30)
                    ray.kill(n.agent)
                except Exception:
                    pass
        with self._lock:
            pgs = [p.pg for p in self.sandboxes.values()]
        for pg in pgs:
            self.placer.release(pg)
        self.audit.close()
