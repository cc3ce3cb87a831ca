"""The egress proxy: the sandbox's only way out (see docs/network.md).

``Egress`` is one sandbox's proxy; ``NetworkOptions`` the host-side knobs
(resolver, upstream CA, approval callback); ``HostsResolver`` a fixed hosts
map; ``PlanDecider`` the decisions of a compiled ``NetworkPlan``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

if TYPE_CHECKING:
    from ._approvals import Approval, ApprovalError
    from ._decide import Decider, Decision, PlanDecider, Request
    from ._proxy import EgressProxy, ProxyConfig
    from ._resolve import HostsResolver, ResolveError, Resolver, SystemResolver
    from ._service import Egress, NetworkOptions
    from ._tls import SandboxCA

# The proxy and its TLS (cryptography) load only when a sandbox has a network.
__getattr__, __dir__ = exports(__name__, {
    **dict.fromkeys(("Approval", "ApprovalError"), "._approvals"),
    **dict.fromkeys(("Decider", "Decision", "PlanDecider", "Request"), "._decide"),
    **dict.fromkeys(("EgressProxy", "ProxyConfig"), "._proxy"),
    **dict.fromkeys(("HostsResolver", "ResolveError", "Resolver", "SystemResolver"), "._resolve"),
    **dict.fromkeys(("Egress", "NetworkOptions"), "._service"),
    "SandboxCA": "._tls",
})  # fmt: skip

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
