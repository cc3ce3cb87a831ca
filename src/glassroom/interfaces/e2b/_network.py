"""E2B's per-sandbox network options, mapped onto the template's network policy.

E2B lets a client set ``network={allowOut, denyOut}`` and
``allow_internet_access`` at create, and replace them on a running sandbox with
``PUT /sandboxes/{id}/network``.  Here they are an *overlay* on the template's
``[network]`` section, applied by the sandbox's egress proxy:

* ``denyOut`` entries (IPs, CIDRs, host names, ``*.`` wildcards) refuse what they
  match; ``0.0.0.0/0`` (``ctx.all_traffic``) or ``allow_internet_access=false``
  refuses everything;
* ``allowOut`` entries take precedence over ``denyOut`` (E2B's rule), but only
  hand the request back to the template's own decision: the template's
  ``deny``, its address checks and its HTTP rules still apply.

So a tenant can only *narrow* what the template allows.  An ``allowOut`` entry
the template does not allow is refused at once (403, rule
``e2b.network.allowOut[i]``) rather than accepted and silently ineffective.
The operator allows more by giving the tenant a template whose ``[network]``
allows it.  The overlay is kept in the proxy's decider, which is asked for
every new connection and every plain-HTTP request, so ``PUT /network`` takes
effect on the next one; an HTTPS tunnel already open goes on until it closes.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import dataclass, field
from typing import Any

from ...egress import Decision, NetworkOptions, PlanDecider, Request
from ...plan import HostRule
from ...policy import Policy
from ...policy._network import Entry, network_plan, parse_entry
from ..http._service import ApiError, SandboxService
from ..http._service import Entry as SvcEntry

#: E2B's ``ctx.all_traffic`` (and its IPv6 twin): "every destination".
ALL_TRAFFIC = frozenset({"0.0.0.0/0", "::/0"})
RULE_INTERNET = "e2b.allow_internet_access"
#: Fields of E2B's network config that glassroom does not implement: refused,
#: naming the field, rather than accepted and ignored.
_UNSUPPORTED = {
    "maskRequestHost": "the Host header of inbound traffic is not rewritten here",
    "egressProxy": "traffic leaves only through glassroom's own egress proxy",
    "dnsServers": "the egress proxy resolves names; the sandbox has no DNS of its own",
    "httpsPorts": "inbound ports are not configured per sandbox here",
    "rules": "per-host transforms are not implemented; use the template's [network] rules",
}
MAX_ENTRIES = 256


@dataclass(frozen=True)
class Overlay:
    """One sandbox's E2B network options, parsed."""

    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    #: ``allow_internet_access`` as sent (None: not sent).
    internet: bool | None = None
    allow: tuple[HostRule, ...] = field(default=(), repr=False)
    deny: tuple[HostRule, ...] = field(default=(), repr=False)
    #: The rule that refuses everything not in ``allow_out``, or None.
    deny_all: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.allow_out or self.deny_out) and self.deny_all is None

    def describe(self) -> dict[str, Any]:
        """What the audit record and ``GET /sandboxes/{id}`` show."""
        out: dict[str, Any] = {"allowOut": list(self.allow_out), "denyOut": list(self.deny_out)}
        if self.internet is not None:
            out["allowInternetAccess"] = self.internet
        return out


def _entries(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, "invalid", f"{where}: must be a list of strings", rule=where)
    if len(value) > MAX_ENTRIES:
        raise ApiError(400, "invalid", f"{where}: at most {MAX_ENTRIES} entries", rule=where)
    return list(value)


def _rules(entries: list[tuple[int, str]], where: str) -> tuple[HostRule, ...]:
    """Each ``(index, entry)`` parsed; the rule names the index the client sent."""
    out = []
    for i, text in entries:
        try:
            e = parse_entry(text)
        except ValueError as exc:
            raise ApiError(400, "invalid", f"{where}[{i}]: {exc}", rule=f"{where}[{i}]") from None
        out.append(HostRule(e.kind, e.value, e.port, f"{where}[{i}]"))
    return tuple(out)


def parse(net: object, internet: object, *, where: str = "network") -> Overlay:
    """``network`` (E2B's ``SandboxNetworkConfig`` or ``SandboxNetworkUpdateConfig``)
    and ``allow_internet_access``, checked; 400 naming the field on anything else."""
    if net is None:
        net = {}
    if not isinstance(net, dict):
        raise ApiError(400, "invalid", f"{where}: must be an object", rule=where)
    if internet is not None and not isinstance(internet, bool):
        raise ApiError(400, "invalid", "allow_internet_access: must be a boolean",
                       rule=RULE_INTERNET)  # fmt: skip
    for key, why in _UNSUPPORTED.items():
        if net.get(key) not in (None, [], {}):
            raise ApiError(400, "unsupported", f"{where}.{key}: not supported: {why}",
                           rule=f"e2b.{where}.{key}")  # fmt: skip
    public = net.get("allowPublicTraffic")
    if public is not None and not isinstance(public, bool):
        raise ApiError(400, "invalid", f"{where}.allowPublicTraffic: must be a boolean",
                       rule=f"e2b.{where}.allowPublicTraffic")  # fmt: skip
    if public is True:
        raise ApiError(
            400, "unsupported",
            f"{where}.allowPublicTraffic: glassroom serves a sandbox's ports only to "
            "holders of its access token; public traffic cannot be turned on",
            rule=f"e2b.{where}.allowPublicTraffic",
        )  # fmt: skip
    # the update body carries allow_internet_access beside allowOut/denyOut
    known = {"allowOut", "denyOut", "allowPublicTraffic", "allow_internet_access", *_UNSUPPORTED}
    unknown = sorted(set(net) - known)
    if unknown:
        raise ApiError(400, "invalid", f"{where}.{unknown[0]}: unknown field",
                       rule=f"e2b.{where}.{unknown[0]}")  # fmt: skip
    allow_out = _entries(net.get("allowOut"), f"e2b.{where}.allowOut")
    deny_out = _entries(net.get("denyOut"), f"e2b.{where}.denyOut")
    everything = [i for i, text in enumerate(deny_out) if text in ALL_TRAFFIC]
    deny_all = f"e2b.{where}.denyOut[{everything[0]}]" if everything else None
    if internet is False:
        deny_all = deny_all or RULE_INTERNET
    specific = [(i, t) for i, t in enumerate(deny_out) if t not in ALL_TRAFFIC]
    return Overlay(
        allow_out=tuple(allow_out),
        deny_out=tuple(deny_out),
        internet=internet if isinstance(internet, bool) else None,
        allow=_rules(list(enumerate(allow_out)), f"e2b.{where}.allowOut"),
        deny=_rules(specific, f"e2b.{where}.denyOut"),
        deny_all=deny_all,
    )


# -- narrowing: what a tenant adds must be inside the template ----------------------


def _covers(t: HostRule, e: HostRule) -> bool:
    """Does the template entry ``t`` allow everything the overlay entry ``e`` names?"""
    if t.port is not None and t.port != e.port:
        return False
    if e.kind in ("ip", "cidr"):
        net = ipaddress.ip_network(e.value)
        if t.kind == "ip":
            return net.num_addresses == 1 and net.network_address == ipaddress.ip_address(t.value)
        if t.kind == "cidr":
            tnet = ipaddress.ip_network(t.value)
            return net.version == tnet.version and net.subnet_of(tnet)  # type: ignore[arg-type]
        return False
    if e.kind == "name":
        return Entry(t.kind, t.value, None).matches_name(e.value, 0)
    # a wildcard: only a wildcard at or above it
    return t.kind == "wildcard" and (e.value == t.value or e.value.endswith("." + t.value))


def check_narrowing(overlay: Overlay, policy: Policy, template: str) -> None:
    """403 naming the rule when ``overlay`` would need more than ``policy`` allows."""
    plan = network_plan(policy)
    if plan.mode != "proxy":
        if overlay.allow:
            first = overlay.allow[0]
            raise ApiError(
                403, "forbidden",
                f"allowOut {overlay.allow_out[0]!r}: template {template!r} has no "
                f"network ({plan.rule}); per-sandbox options can only narrow the "
                "template's network, so the operator must give a template that allows it",
                rule=first.rule,
            )  # fmt: skip
        if overlay.internet is True:
            raise ApiError(
                403, "forbidden",
                f"allow_internet_access: template {template!r} has no network "
                f"({plan.rule}); the operator must give a template whose [network] "
                "allows the hosts it needs",
                rule=RULE_INTERNET,
            )  # fmt: skip
        return
    admitted = (*plan.allow, *plan.ask)
    for i, e in enumerate(overlay.allow):
        if not any(_covers(t, e) for t in admitted):
            raise ApiError(
                403, "forbidden",
                f"allowOut {overlay.allow_out[i]!r} is not allowed by template "
                f"{template!r} (network.allow); per-sandbox options can only narrow the "
                "template's network",
                rule=e.rule,
            )  # fmt: skip


# -- the proxy's side -----------------------------------------------------------------


def _hit(rules: tuple[HostRule, ...], host: str, port: int) -> HostRule | None:
    addr = _ip(host)
    for r in rules:
        e = Entry(r.kind, r.value, r.port)
        if e.matches_address(addr, port) if addr is not None else e.matches_name(host, port):
            return r
    return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` names, IPv4 where an IPv6 form embeds one
    (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``): a ``denyOut`` of an IPv4
    address must hold whatever spelling the sandbox connects with."""
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr in _NAT64:
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


class OverlayDecider:
    """The template's :class:`PlanDecider` with a replaceable E2B overlay in front.

    It only ever turns an ``allow`` into a ``deny``: an ``allowOut`` match hands
    the request to the template's decision, which may still refuse it.
    """

    def __init__(self, base: PlanDecider, overlay: Overlay) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._overlay = overlay

    @property
    def overlay(self) -> Overlay:
        return self._overlay

    def replace(self, overlay: Overlay) -> Overlay:
        """Swap the overlay (one reference: the next decision sees all of it)."""
        with self._lock:
            old, self._overlay = self._overlay, overlay
        return old

    def _refuse(self, o: Overlay, host: str, port: int) -> Decision | None:
        if _hit(o.allow, host, port) is not None:
            return None  # allowOut takes precedence: the template decides
        hit = _hit(o.deny, host, port)
        if hit is not None:
            return Decision("deny", hit.rule, f"{host} is listed in the sandbox's denyOut")
        if o.deny_all is not None:
            return Decision("deny", o.deny_all, "the sandbox's network options deny all traffic")
        return None

    def decide(self, req: Request) -> Decision:
        return self._refuse(self._overlay, req.host, req.port) or self.base.decide(req)

    def check_address(self, req: Request, ip: str, trusted: bool) -> Decision:
        o = self._overlay
        if _hit(o.allow, req.host, req.port) is None:
            refused = self._refuse(o, ip, req.port)
            if refused is not None:
                return Decision(refused.action, refused.rule,
                                f"{req.host} resolved to {ip}: {refused.reason}")  # fmt: skip
        return self.base.check_address(req, ip, trusted)


def decider_for(policy: Policy, overlay: Overlay) -> OverlayDecider:
    return OverlayDecider(PlanDecider(network_plan(policy)), overlay)


# -- the control plane's side --------------------------------------------------------

#: Where an entry keeps its decider (``Entry.extra``).
EXTRA_KEY = "e2b.network"
RULE_UPDATE = "e2b.network"


def at_create(svc: SandboxService, body: dict[str, Any], template: str,
              snapshot: str | None) -> NetworkOptions | None:  # fmt: skip
    """The egress options of a create: the overlay's decider, checked against the
    template.  A create from a snapshot takes the snapshot's policy as it is."""
    overlay = parse(body.get("network"), body.get("allow_internet_access"))
    given = not overlay.empty or overlay.internet is not None
    if snapshot is not None:
        if given:
            raise ApiError(
                400, "unsupported",
                "network: a sandbox made from a snapshot has the snapshot's policy; "
                "per-sandbox network options are not applied to it",
                rule=RULE_UPDATE,
            )  # fmt: skip
        return None
    policy = svc.cfg.templates.get(template)
    if policy is None:
        return None  # the create answers 404 for the template
    check_narrowing(overlay, policy, template)
    return NetworkOptions(decider=decider_for(policy, overlay))


def admitted(svc: SandboxService, e: SvcEntry, opts: NetworkOptions | None) -> None:
    """Keep the decider beside the entry and say what the sandbox got."""
    if opts is None or not isinstance(opts.decider, OverlayDecider):
        return
    e.extra[EXTRA_KEY] = opts.decider
    overlay = opts.decider.overlay
    if not overlay.empty:
        svc.audit.append(e.id, "network.policy_changed",
                         {"at": "create", "before": None, "after": overlay.describe()},
                         decision="allow", rule=RULE_UPDATE)  # fmt: skip


def update(svc: SandboxService, e: SvcEntry, body: dict[str, Any]) -> None:
    """``PUT /network``: replace the overlay (omitted fields are cleared, as E2B
    does).  The next connection is judged by the new rules; open HTTPS tunnels
    are not cut."""
    decider = e.extra.get(EXTRA_KEY)
    if not isinstance(decider, OverlayDecider):
        raise ApiError(
            409, "unsupported",
            f"sandbox {e.id} was made from a snapshot or forked: its network follows "
            "its policy and takes no per-sandbox options",
            rule=RULE_UPDATE,
        )  # fmt: skip
    overlay = parse(body, body.get("allow_internet_access"))
    check_narrowing(overlay, e.sb.policy, e.template or "custom")
    before = decider.replace(overlay)
    svc.audit.append(e.id, "network.policy_changed",
                     {"at": "update", "before": before.describe(), "after": overlay.describe(),
                      "open_connections": "kept"},
                     decision="allow", rule=RULE_UPDATE)  # fmt: skip


def detail(e: SvcEntry) -> dict[str, Any]:
    """``network`` of ``GET /sandboxes/{id}`` when options were given."""
    decider = e.extra.get(EXTRA_KEY)
    if not isinstance(decider, OverlayDecider) or decider.overlay.empty:
        return {}
    o = decider.overlay
    out: dict[str, Any] = {"network": {"allowOut": list(o.allow_out),
                                       "denyOut": list(o.deny_out)}}  # fmt: skip
    if o.internet is not None:
        out["allowInternetAccess"] = o.internet
    return out


def check_fork(e: SvcEntry) -> None:
    """A fork gets its parent's policy but not the overlay: refused while the
    parent has options, so a narrowed sandbox never forks into a wider one."""
    decider = e.extra.get(EXTRA_KEY)
    if isinstance(decider, OverlayDecider) and not decider.overlay.empty:
        raise ApiError(
            409, "unsupported",
            f"sandbox {e.id} has per-sandbox network options, which a fork would not "
            "keep; clear them with update_network({}) first, or create a new sandbox",
            rule=RULE_UPDATE,
        )  # fmt: skip
