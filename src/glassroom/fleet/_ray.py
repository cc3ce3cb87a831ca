"""What glassroom asks of Ray, in one place: names of resources, and a safe connect.

A node of the fleet says what it is through Ray *custom resources*, given when
the node starts (``ray start --resources``; ``python -m glassroom.fleet
NAME`` prints them).  Ray's scheduler then does the placing, and a node without a
resource is never chosen for a sandbox that asks for it:

* ``glassroom_node_<name>: 1`` -- the node's stable name.  Ray's node ids
  change when a node restarts; the name does not, so a node that comes back
  finds its data dir (audit log, reaper records) again.
* ``glassroom_tier_<tier>: TIER_SLOTS`` -- the tier works there (namespaces,
  gvisor, microvm).  Each sandbox holds one slot of its tier.
* ``glassroom_template_<name>: 1`` -- the template (say, one that needs a
  tool or an image only some hosts have) is present there.  A template that
  some node declares is placed only on nodes that declare it; a template no
  node declares is taken to be everywhere.
* ``glassroom_cpu: N`` -- how many sandbox CPUs the node offers.  Not Ray's
  own ``CPU``: Ray's workers (and the host agent) use that, and a host runs
  more sandboxes than it has cores.

Memory is Ray's own ``memory`` resource, in bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

NODE_PREFIX = "glassroom_node_"
TIER_PREFIX = "glassroom_tier_"
TEMPLATE_PREFIX = "glassroom_template_"
CPU = "glassroom_cpu"
#: A tier's slots per node: a bound on sandboxes per tier that no host reaches.
TIER_SLOTS = 10_000
#: The Ray namespace of the host agents (named actors).
NAMESPACE = "glassroom"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

#: Set before Ray is imported: no usage reports, and (on one machine) a
#: loopback bootstrap address stays loopback.  Ray otherwise rewrites
#: ``127.0.0.1`` to the host's outward address when it connects.
SAFE_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"node name {name!r}: letters, digits, '_', '.', '-' (at most 63), not starting with "
            "a punctuation mark"
        )
    return name


def node_resources(
    name: str, tiers: Iterable[str], cpus: float, templates: Iterable[str] = ()
) -> dict[str, float]:
    """The custom resources a node of the fleet starts with."""
    out: dict[str, float] = {NODE_PREFIX + check_name(name): 1.0, CPU: float(cpus)}
    for tier in tiers:
        out[TIER_PREFIX + tier] = float(TIER_SLOTS)
    for t in templates:
        out[TEMPLATE_PREFIX + t] = 1.0
    return out


def node_name(resources: Mapping[str, Any]) -> str | None:
    """The fleet name a node's resources give it, or None: not a glassroom node."""
    for key in resources:
        if key.startswith(NODE_PREFIX):
            return key[len(NODE_PREFIX) :]
    return None


def node_tiers(resources: Mapping[str, Any]) -> list[str]:
    return sorted(k[len(TIER_PREFIX) :] for k in resources if k.startswith(TIER_PREFIX))


def probe_tiers() -> list[str]:
    """The tiers that work on this host, as ``glassroom doctor`` finds them."""
    from ..interfaces.doctor import report

    return sorted(t for t, status in report()["backends"].items() if status.startswith("ready"))


def safe_env(*, loopback: bool = False) -> None:
    """Put :data:`SAFE_ENV` in this process's environment (children inherit it)."""
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    if loopback:
        # Ray's flag for "no real cluster": localhost is then not rewritten to
        # the host's outward address (Linux reads it too).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def connect(address: str) -> None:
    """Join the cluster at ``address`` as a driver (idempotent)."""
    host = address.rsplit(":", 1)[0]
    safe_env(loopback=host in ("127.0.0.1", "localhost", "::1"))
    import ray

    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"address": address, "namespace": NAMESPACE, "log_to_driver": False}
    if host in ("127.0.0.1", "localhost"):
        kw["_node_ip_address"] = "127.0.0.1"
    ray.init(**kw)
