"""The fleet's audit: each node's own chain, verified where it lives, heads kept centrally.

Each node keeps its hash-chained, signed log exactly as a single host does
(the agent's service writes it on the node's disk).  Verifying it means
reading it, so each agent verifies its own log (``HostAgent.audit_head``)
and sends back the outcome and its head ``(seq, hash)``.

The front door then *anchors* the heads: one ``fleet.anchored`` record in
its own log (itself chained and signed with the front door's key), listing
every node's head.  Later, a node's log must still have that hash at that
seq: a node whose log was rewritten, even with a re-signed anchor (whoever
holds that node's key can do that), no longer matches what the front door
wrote down.  :func:`verify_fleet` checks both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..audit import AuditLog, read_records, verify

ANCHORED = "fleet.anchored"


def _agents() -> dict[str, Any]:
    """Every live node's agent, by node name (from Ray's node table)."""
    import ray

    from . import _ray

    out: dict[str, Any] = {}
    for n in ray.nodes():
        name = _ray.node_name(n.get("Resources") or {})
        if name and n.get("Alive"):
            try:
                out[name] = ray.get_actor(f"glassroom-agent-{name}", namespace=_ray.NAMESPACE)
            except ValueError:
                out[name] = None  # a node without its agent (the front door makes them)
    return out


def heads(agents: dict[str, Any], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    import ray

    refs = {name: a.audit_head.remote() for name, a in agents.items() if a is not None}
    out = []
    for name in sorted(agents):
        if name not in refs:
            out.append({"node": name, "ok": False, "problems": ["no agent on the node"]})
            continue
        try:
            out.append(ray.get(refs[name], timeout=timeout_s))
        except Exception as exc:
            out.append({"node": name, "ok": False, "problems": [f"no answer: {exc}"]})
    return out


def last_anchored(log: str | Path) -> dict[str, dict[str, Any]]:
    """Per node, the head the last ``fleet.anchored`` record of ``log`` wrote down."""
    found: dict[str, dict[str, Any]] = {}
    if not Path(log).exists():
        return found
    for rec in read_records(log):
        if rec.get("event") == ANCHORED:
            for h in (rec.get("details") or {}).get("heads", []):
                found[str(h.get("node"))] = h
    return found


def check_anchored(agents: dict[str, Any], anchored: dict[str, dict[str, Any]]) -> list[str]:
    """Problems: a node whose log no longer has the hash the front door anchored."""
    import ray

    problems = []
    for name, head in sorted(anchored.items()):
        agent = agents.get(name)
        if agent is None or head.get("seq") is None:
            continue
        got = ray.get(agent.hash_at.remote(int(head["seq"])), timeout=60)
        if got != head.get("hash"):
            problems.append(
                f"node {name}: record seq {head['seq']} is {got or 'missing'}, but the front "
                f"door anchored {head.get('hash')}: the node's log was rewritten"
            )
    return problems


def anchor_into(log: AuditLog, found: list[dict[str, Any]]) -> None:
    """One ``fleet.anchored`` record of ``found``'s heads, then sign the front log's head."""
    kept = [
        {"node": h["node"], "seq": h.get("seq"), "hash": h.get("hash"), "ok": h.get("ok")}
        for h in found
    ]
    bad = [h["node"] for h in found if not h.get("ok")]
    log.append(
        "fleet",
        ANCHORED,
        {"heads": kept},
        decision="deny" if bad else "info",
        rule="fleet.audit" if bad else None,
    )
    log.anchor()


def anchor_heads(fleet: Any) -> dict[str, Any]:
    """On demand (and periodically): verify every node, check the heads anchored
    before, anchor the new ones in the front door's log."""
    agents = {n.name: n.agent for n in fleet.live_nodes()}
    return _report(agents, fleet.audit, fleet.cfg.audit_log)


def _report(agents: dict[str, Any], log: AuditLog | None, path: Path | None) -> dict[str, Any]:
    found = heads(agents)
    problems = check_anchored(agents, last_anchored(path)) if path else []
    central = None
    if log is not None and path is not None:
        anchor_into(log, found)
        res = verify(path)
        central = {"log": str(path), "ok": res.ok, "records": res.records,
                   "problems": res.problems[:20]}  # fmt: skip
    ok = all(h.get("ok") for h in found) and not problems and (central or {}).get("ok", True)
    return {"ok": bool(ok), "nodes": found, "problems": problems, "central": central}


def verify_fleet(address: str, anchor_log: str | Path | None = None) -> dict[str, Any]:
    """``glassroom audit verify --fleet``: every node's log, and (given the front
    door's log) the heads it anchored, which are then anchored anew."""
    from . import _ray

    _ray.connect(address)
    agents = _agents()
    log = AuditLog(anchor_log) if anchor_log else None
    try:
        return _report(agents, log, Path(anchor_log) if anchor_log else None)
    finally:
        if log is not None:
            log.close()


def show_fleet(address: str, limit: int = 200) -> list[dict[str, Any]]:
    """``glassroom audit show --fleet``: the last records of every node, by time."""
    import ray

    from . import _ray

    _ray.connect(address)
    agents = {k: v for k, v in _agents().items() if v is not None}
    refs = {name: a.records.remote(limit) for name, a in agents.items()}
    out = []
    for name, ref in refs.items():
        for rec in ray.get(ref, timeout=60):
            out.append({**rec, "node": name})
    out.sort(key=lambda r: str(r.get("ts", "")))
    return out[-limit:]
