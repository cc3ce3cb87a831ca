"""The egress proxy: the sandbox's only way out (see docs/network.md).

``Egress`` is one sandbox's proxy; ``NetworkOptions`` the host-side knobs
(resolver, upstream CA, approval callback); ``HostsResolver`` a fixed hosts
map; ``PlanDecider`` the decisions of a compiled ``NetworkPlan``.
"""

from __future__ import annotations

from ._approvals import Approval, ApprovalError
from ._decide import Decider, Decision, PlanDecider, Request
from ._proxy import EgressProxy, ProxyConfig
from ._resolve import HostsResolver, ResolveError, Resolver, SystemResolver
from ._service import Egress, NetworkOptions
from ._tls import SandboxCA

__all__ = [
    "Approval",
    "ApprovalError",
    "Decider",
    "Decision",
    "Egress",
    "EgressProxy",
    "HostsResolver",
    "NetworkOptions",
    "PlanDecider",
    "ProxyConfig",
    "Request",
    "ResolveError",
    "Resolver",
    "SandboxCA",
    "SystemResolver",
]
