"""Placing a sandbox: what its policy asks for, and Ray's scheduler to find a node.

A sandbox gets one placement group (one STRICT_PACK bundle of its tier's
slot, its CPUs and its memory), held for its life and removed when it is
destroyed or lost.  Ray picks a node that has all of it, so a node without
the tier (no runsc, no KVM) is never chosen for it, and nothing here can
fall back to a weaker tier: the tier is part of what is asked, not a
preference.  When no live node has the tier at all, the create is refused at
once, naming the rule; when nodes have it but are full, after a bounded wait.

Measured on the 2-CPU development VM (``bench/fleet.py``): about 2 ms per
group (create, ready, remove), against about 50 ms for the sandbox itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..interfaces.http import ApiError, ServeConfig
from ..policy import Policy, parse_policy, validate_policy
from ..policy._compile import RISK_BACKEND, TIERS
from . import _ray

MIB = 1 << 20
#: A pinned bundle's share of the node's name resource (Ray counts to 1e-4).
PIN = 0.0001
#: How long a pinned bundle may wait before Ray may choose any node.
PIN_WAIT_S = 1.0


@dataclass(frozen=True)
class Requirement:
    """What a sandbox needs of a node."""

    tier: str
    cpus: float
    memory_mib: int
    why: str  # where the tier came from, for the refusal: "risk 'medium'", "backend 'gvisor'"
    #: a template only some nodes have (they declare it), or None
    template: str | None = None

    def bundle(self) -> dict[str, float]:
        out = {
            _ray.TIER_PREFIX + self.tier: 1.0,
            _ray.CPU: round(self.cpus, 4),
            "memory": float(self.memory_mib * MIB),
        }
        if self.template is not None:
            out[_ray.TEMPLATE_PREFIX + self.template] = PIN
        return out


def requirement(policy: Policy, backend: str | None, template: str | None = None) -> Requirement:
    """The tier (from the risk; an explicit backend may only be stronger), CPUs,
    memory, and ``template`` when some node declares it (see :func:`declared`)."""
    tier = RISK_BACKEND[policy.risk]
    why = f"risk {policy.risk!r} needs tier {tier!r}"
    if isinstance(backend, str) and backend in TIERS and TIERS[backend] >= TIERS[tier]:
        tier, why = backend, f"backend {backend!r} was asked for"
    res = policy.resources
    return Requirement(tier, float(res.cpus), int(res.memory_mib), why, template)


def template_of(cfg: ServeConfig, body: Mapping[str, Any], *, e2b: bool) -> str | None:
    """The template a create names (None: a policy of its own)."""
    if e2b:
        name = body.get("templateID")
    elif body.get("policy") is not None:
        return None
    else:
        name = body.get("template") or cfg.default_template
    return name if isinstance(name, str) else None


def declared(template: str | None) -> str | None:
    """``template`` if some live node declares it (it is then placed only there)."""
    if template is None:
        return None
    want = _ray.TEMPLATE_PREFIX + template
    return template if any(want in n["Resources"] for n in Placer._alive()) else None


def policy_of(cfg: ServeConfig, body: Mapping[str, Any], *, e2b: bool) -> Policy | None:
    """The policy a create body asks for, or None when the body does not say it
    in a way checked here (bad input, a snapshot): the node then answers as a
    single host would, and placement uses the default template."""
    try:
        if e2b:
            name = body.get("templateID")
            return cfg.templates.get(name) if isinstance(name, str) else None
        pol = body.get("policy")
        if isinstance(pol, str):
            return parse_policy(pol, source="request.policy")
        if isinstance(pol, dict):
            return validate_policy(dict(pol))
        name = body.get("template") or cfg.default_template
        return cfg.templates.get(name) if isinstance(name, str) else None
    except Exception:
        return None


class Placer:
    """Placement groups for sandboxes (see the module docstring)."""

    def __init__(self, wait_s: float = 10.0) -> None:
        self.wait_s = wait_s

    @staticmethod
    def _alive() -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive") and _ray.node_name(n["Resources"])]

    def check_feasible(self, req: Requirement) -> None:
        """Refuse at once (no waiting) what no live node could ever hold."""
        nodes = self._alive()
        have = {str(_ray.node_name(n["Resources"])): _ray.node_tiers(n["Resources"]) for n in nodes}
        if not any(req.tier in tiers for tiers in have.values()):
            shown = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in sorted(have.items()))
            raise ApiError(
                503,
                "unavailable",
                f"no node of the fleet has tier {req.tier!r} ({req.why}); nodes and their "
                f"tiers: {shown or 'no live node'}. A sandbox never runs on a weaker tier",
                rule="fleet.tier",
            )
        if req.template is not None and not any(
            _ray.TEMPLATE_PREFIX + req.template in n["Resources"]
            and req.tier in _ray.node_tiers(n["Resources"])
            for n in nodes
        ):
            raise ApiError(
                503,
                "unavailable",
                f"no live node has both template {req.template!r} and tier {req.tier!r} "
                f"({req.why}). A sandbox never runs on a weaker tier",
                rule="fleet.template",
            )
        need = req.bundle()
        if not any(all(n["Resources"].get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
            raise ApiError(
                503,
                "unavailable",
                f"no node of the fleet is large enough: {req.cpus:g} CPUs and "
                f"{req.memory_mib} MiB on tier {req.tier!r}",
                rule="fleet.resources",
            )

    def candidates(self, req: Requirement) -> list[str]:
        """Names of the live nodes whose totals could hold ``req`` (refusing, with
        the rule, when none could)."""
        self.check_feasible(req)
        need = req.bundle()
        return [
            str(_ray.node_name(n["Resources"]))
            for n in self._alive()
            if all(n["Resources"].get(k, 0.0) >= v for k, v in need.items())
        ]

    def place(self, req: Requirement, prefer: list[str] | None = None) -> tuple[Any, str]:
        """A ready placement group for ``req`` and the Ray node id it landed on.

        ``prefer``: node names, best first (the front door's least loaded).  The
        bundle is first pinned to the first of them (its ``glassroom_node_``
        resource), so sandboxes spread instead of packing on one node; if that
        node has no room now, Ray chooses among all."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundles = []
        if prefer:
            pinned = dict(req.bundle())
            pinned[_ray.NODE_PREFIX + prefer[0]] = PIN
            bundles.append((pinned, PIN_WAIT_S))
        bundles.append((req.bundle(), self.wait_s))
        for bundle, wait in bundles:
            pg = placement_group([bundle], strategy="STRICT_PACK")
            try:
                ray.get(pg.ready(), timeout=wait)
            except Exception:
                remove_placement_group(pg)
                continue
            return pg, self._node_of(pg)
        raise ApiError(
            429,
            "limit",
            f"no node of the fleet had room within {self.wait_s:g} s for {req.cpus:g} "
            f"CPUs, {req.memory_mib} MiB on tier {req.tier!r}",
            rule="fleet.capacity",
        )

    @staticmethod
    def _node_of(pg: Any) -> str:
        from ray.util.placement_group import placement_group_table, remove_placement_group

        end = time.monotonic() + 5
        while True:
            node = placement_group_table(pg).get("bundles_to_node_id", {}).get(0)
            if node or time.monotonic() > end:
                break
            time.sleep(0.01)
        if not node:
            remove_placement_group(pg)
            raise ApiError(503, "unavailable", "placement did not name a node", rule="fleet")
        return str(node)

    @staticmethod
    def release(pg: Any) -> None:
        if pg is None:
            return
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(pg)
        except Exception:  # already gone (its node died, or the cluster stopped)
            pass
