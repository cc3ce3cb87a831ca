"""Decisions: the policy side of the egress proxy, kept out of the mechanism.

The proxy asks a :class:`Decider` two questions and never reads a policy:

* ``decide(request)``: may this host/port (and, where visible, method and
  path) be reached?  Answer ``allow``, ``deny`` or ``ask``, with the rule.
* ``check_address(request, ip, trusted)``: the proxy resolved the host to
  ``ip``; may it connect there?  This is where loopback, private,
  link-local, metadata and the host's own addresses are refused unless an
  ``allow`` entry names the address explicitly, and where ``deny`` CIDRs
  apply to resolved addresses too.

:class:`PlanDecider` answers both from a compiled :class:`NetworkPlan`.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..plan import HostRule, HttpRule, NetworkPlan
from ..policy._network import Entry, path_matches

Action = Literal["allow", "deny", "ask"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Rule names the mechanism itself uses (not entries of a policy).
RULE_DEFAULT = "network.allow"  # not listed: default deny
RULE_INTERNAL = "network.internal"
RULE_IP_LITERAL = "network.ip-literal"
RULE_SNI = "network.sni"
RULE_HOST_HEADER = "network.host-header"
RULE_DIRECT = "network.direct"


@dataclass(frozen=True)
class Request:
    """What the proxy knows about a request when it asks."""

    host: str  # lower case, no brackets, no trailing dot
    port: int
    scheme: Literal["http", "https"]
    method: str | None = None  # None: a CONNECT tunnel, not inspected
    path: str | None = None

    @property
    def is_ip(self) -> bool:
        return as_ip(self.host) is not None


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str
    reason: str = ""
    inspect_tls: bool = False
    extra_rules: tuple[str, ...] = field(default=())


class Decider(Protocol):
    def decide(self, req: Request) -> Decision: ...
    def check_address(self, req: Request, ip: str, trusted: bool) -> Decision: ...


def as_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _entry(rule: HostRule) -> Entry:
    return Entry(rule.kind, rule.value, rule.port)


def _matches(rule: HostRule, host: str, port: int) -> bool:
    e = _entry(rule)
    ip = as_ip(host)
    if ip is not None:
        return e.matches_address(ip, port)
    return e.matches_name(host, port)


_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def internal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public destination, or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return internal_reason(ip.ipv4_mapped)
    if ip in _METADATA:
        return "the cloud metadata endpoint"
    for test, what in (
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_private, "a private range"),
        (ip.is_multicast, "multicast"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_reserved, "a reserved range"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "shared address space"),
    ):
        if test:
            return what
    if ip in host_addresses():
        return "one of this host's own addresses"
    return None


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


@functools.lru_cache(maxsize=1)
def host_addresses() -> frozenset[IPAddress]:
    """Every address configured on this host (IPv4 LOCAL routes, IPv6 interfaces)."""
    out: set[IPAddress] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            last = None
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] in ("|--", "+--"):
                    last = words[1].split("/")[0]
                elif "/32 host LOCAL" in line and last:
                    out.add(ipaddress.ip_address(last))
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                h = line.split()[0]
                out.add(ipaddress.ip_address(":".join(h[i : i + 4] for i in range(0, 32, 4))))
    except (OSError, ValueError):
        pass
    return frozenset(out)


class PlanDecider:
    """The decisions a compiled :class:`NetworkPlan` makes."""

    def __init__(self, plan: NetworkPlan) -> None:
        self.plan = plan

    def _first(self, rules: tuple[HostRule, ...], req: Request) -> HostRule | None:
        return next((r for r in rules if _matches(r, req.host, req.port)), None)

    def _http_rules(self, req: Request) -> list[HttpRule]:
        return [r for r in self.plan.rules if _matches(r.host, req.host, req.port)]

    def decide(self, req: Request) -> Decision:
        hit = self._first(self.plan.deny, req)
        if hit is not None:
            return Decision("deny", hit.rule, "listed in network.deny")
        ip = as_ip(req.host)
        if ip is not None:
            allowed = self._first(self.plan.allow, req)
            if allowed is None or allowed.kind not in ("ip", "cidr"):
                why = internal_reason(ip)
                if why:
                    return Decision("deny", RULE_INTERNAL, f"{req.host} is {why}")
                return Decision(
                    "deny", RULE_IP_LITERAL, "IP-literal destinations need an explicit allow entry"
                )
            return Decision("allow", allowed.rule)
        allowed = self._first(self.plan.allow, req)
        asked = None if allowed else self._first(self.plan.ask, req)
        base = allowed or asked
        if base is None:
            return Decision("deny", RULE_DEFAULT, "not listed in network.allow")
        action: Action = "allow" if allowed else "ask"
        rules = self._http_rules(req)
        if not rules:
            return Decision(action, base.rule)
        inspect = any(r.inspect_tls for r in rules)
        if req.method is None:
            # A tunnel: method and path are not visible.
            restricted = any(r.methods or r.paths for r in rules)
            if req.scheme == "https" and restricted and not inspect:
                return Decision(
                    "deny", rules[0].rule,
                    "method/path rules cannot be enforced on HTTPS without inspect_tls",
                )  # fmt: skip
            return Decision(action, base.rule, inspect_tls=inspect,
                            extra_rules=tuple(r.rule for r in rules))  # fmt: skip
        for r in rules:
            if (not r.methods or req.method in r.methods) and (
                not r.paths or any(path_matches(p, req.path or "/") for p in r.paths)
            ):
                return Decision(action, base.rule, inspect_tls=inspect, extra_rules=(r.rule,))
        return Decision(
            "deny", rules[0].rule, f"{req.method} {req.path} is not allowed by the HTTP rules"
        )

    def check_address(self, req: Request, ip: str, trusted: bool) -> Decision:
        addr = ipaddress.ip_address(ip)
        probe = Request(str(addr), req.port, req.scheme)
        hit = self._first(self.plan.deny, probe)
        if hit is not None:
            return Decision("deny", hit.rule, f"{req.host} resolved to {ip}, which is denied")
        why = internal_reason(addr)
        if why and not trusted:
            named = self._first(self.plan.allow, probe)
            if named is None or named.kind not in ("ip", "cidr"):
                return Decision(
                    "deny", RULE_INTERNAL,
                    f"{req.host} resolved to {ip}, {why}; allow it by address to reach it",
                )  # fmt: skip
        return Decision("allow", "")
