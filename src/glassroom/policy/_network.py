"""The ``[network]`` entry language: ``host[:port]``, ``*.suffix``, IP and CIDR.

An entry is one of:

* a host name, ``pypi.org`` (exactly that name);
* a wildcard, ``*.pythonhosted.org`` (any name *beneath* it, not the name itself);
* an IP address, ``203.0.113.7`` or ``[2001:db8::1]`` (only that address);
* a CIDR block, ``169.254.0.0/16`` (every address in it; no port);

each optionally followed by ``:PORT``.  Without a port every port matches.
``"*"`` and wildcards over a whole top-level domain (``*.com``) are refused:
an allowlist that broad is not a list.  Names are compared in lower case.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

EntryKind = Literal["name", "wildcard", "ip", "cidr"]

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")


@dataclass(frozen=True)
class Entry:
    kind: EntryKind
    value: str  # lower-case name, suffix (without "*."), address or network
    port: int | None

    def matches_name(self, host: str, port: int) -> bool:
        """Does this entry cover the host NAME ``host`` on ``port``?"""
        if self.port is not None and self.port != port:
            return False
        host = host.lower().rstrip(".")
        if self.kind == "name":
            return host == self.value
        if self.kind == "wildcard":
            return host.endswith("." + self.value)
        return False

    def matches_address(
        self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
    ) -> bool:
        """Does this entry name the ADDRESS ``addr`` (explicitly, by IP or CIDR)?"""
        if self.port is not None and self.port != port:
            return False
        if self.kind == "ip":
            return addr == ipaddress.ip_address(self.value)
        if self.kind == "cidr":
            return addr in ipaddress.ip_network(self.value)
        return False


def parse_entry(text: str) -> Entry:
    """Parse one entry; raises ``ValueError`` with a one-line reason."""
    raw = text.strip()
    if not raw:
        raise ValueError("network entry is empty")
    if raw != text:
        raise ValueError(f"{text!r} has surrounding spaces")
    if raw == "*" or raw.startswith("*:"):
        raise ValueError("'*' would allow the whole network; list the hosts that are needed")
    if "://" in raw:
        raise ValueError(f"{raw!r}: write a host, not a URL")
    # CIDR (no port allowed).
    if "/" in raw:
        try:
            net = ipaddress.ip_network(raw, strict=True)
        except ValueError:
            raise ValueError(f"{raw!r} is not a CIDR block (address/prefix)") from None
        if net.prefixlen == 0:
            raise ValueError(f"{raw!r} is the whole address space")
        return Entry("cidr", str(net), None)
    host, port = _split_port(raw)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        return Entry("ip", str(addr), port)
    if host.startswith("[") or ":" in host:
        raise ValueError(f"{raw!r} is not a valid address")
    name = host.lower()
    if name.startswith("*."):
        suffix = name[2:].rstrip(".")
        if "*" in suffix or not _NAME.match(suffix):
            raise ValueError(f"{raw!r}: a wildcard is '*.' followed by a domain name")
        if "." not in suffix:
            raise ValueError(
                f"{raw!r} matches a whole top-level domain; list the hosts that are needed"
            )
        return Entry("wildcard", suffix, port)
    if "*" in name:
        raise ValueError(f"{raw!r}: '*' is only allowed as a leading '*.' label")
    if not _NAME.match(name):
        raise ValueError(f"{raw!r} is not a valid host name")
    return Entry("name", name.rstrip("."), port)


def _split_port(raw: str) -> tuple[str, int | None]:
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"{raw!r}: unclosed '['")
        host, rest = raw[1:end], raw[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"{raw!r}: expected ':PORT' after ']'")
        return host, _port(raw, rest[1:])
    if raw.count(":") == 1:
        host, _, port = raw.partition(":")
        return host, _port(raw, port)
    return raw, None  # a name, or a bare IPv6 address (no port)


def _port(raw: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{raw!r}: the port must be 1..65535")
    return int(text)


def entry_problem(text: str) -> str | None:
    """Why ``text`` is not an acceptable network entry, or None."""
    try:
        parse_entry(text)
    except ValueError as exc:
        return str(exc)
    return None


def rule_host_problem(text: str) -> str | None:
    """A ``[[network.rules]]`` host: a name or wildcard (with optional port), no address."""
    problem = entry_problem(text)
    if problem:
        return problem
    if parse_entry(text).kind in ("ip", "cidr"):
        return f"{text!r}: HTTP rules apply to host names; use allow/deny for addresses"
    return None


_METHOD = re.compile(r"^[A-Z]{1,16}$")


def rule_covered(rule: Entry, admitted: list[Entry]) -> bool:
    """Is every name the rule's host can match admitted by some allow/ask entry?"""
    for e in admitted:  # ports aside: a rule applies on whatever port its host is admitted
        name_ok = rule.kind == "name" and e.matches_name(rule.value, e.port or 0)
        wild_ok = (
            rule.kind == "wildcard"
            and e.kind == "wildcard"
            and (rule.value == e.value or rule.value.endswith("." + e.value))
        )
        if name_ok or wild_ok:
            return True
    return False


def method_problem(text: str) -> str | None:
    if not _METHOD.match(text):
        return f"{text!r}: a method is an upper-case HTTP method such as GET"
    if text == "CONNECT":
        return "'CONNECT' is how HTTPS reaches the proxy; it is not an HTTP rule method"
    return None


def path_problem(text: str) -> str | None:
    if not text.startswith("/"):
        return f"{text!r}: a path pattern starts with '/'"
    if any(c in text for c in " \t\r\n?#"):
        return f"{text!r}: a path pattern has no spaces, query or fragment"
    return None


def path_matches(pattern: str, path: str) -> bool:
    """``*`` matches any run of characters (including ``/``); the rest is literal."""
    path = path.split("?", 1)[0]
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, path) is not None


# -- compile: [network] -> NetworkPlan ------------------------------------------

from ..plan import (  # noqa: E402  (kept below: the entry language above is plan-free)
    EGRESS_DIR_INSIDE,
    PROXY_PORT_INSIDE,
    HostRule,
    HttpRule,
    NetworkPlan,
)

__all__ = ["EGRESS_DIR_INSIDE", "Entry", "network_plan", "parse_entry", "proxy_env"]


def _host_rules(entries: list[str], field: str) -> tuple[HostRule, ...]:
    out = []
    for i, text in enumerate(entries):
        e = parse_entry(text)
        out.append(HostRule(e.kind, e.value, e.port, f"network.{field}[{i}]"))
    return tuple(out)


def network_plan(policy: Any) -> NetworkPlan:
    """``none`` (no proxy, loopback only) unless something may be reached."""
    net = policy.network
    if net.mode == "none" or policy.risk == "maximum" or not (net.allow or net.ask):
        rule = "network.mode" if net.mode == "none" else "network.allow"
        return NetworkPlan(mode="none", rule=rule)
    rules = tuple(
        HttpRule(
            host=_host_rules([r.host], "rules")[0],
            methods=tuple(r.methods),
            paths=tuple(r.paths),
            inspect_tls=r.inspect_tls,
            rule=f"network.rules[{i}]",
        )
        for i, r in enumerate(net.rules)
    )
    return NetworkPlan(
        mode="proxy",
        rule="network.allow",
        allow=_host_rules(net.allow, "allow"),
        deny=_host_rules(net.deny, "deny"),
        ask=_host_rules(net.ask, "ask"),
        rules=rules,
        ask_timeout_s=float(net.ask_timeout_s),
        inspect_tls=any(r.inspect_tls for r in rules),
    )


def proxy_env(network: NetworkPlan) -> tuple[tuple[str, str], ...]:
    """HTTP(S)_PROXY/ALL_PROXY in both cases; the CA bundle when TLS is inspected."""
    if network.mode != "proxy":
        return ()
    url = f"http://127.0.0.1:{PROXY_PORT_INSIDE}"
    env = [(k, url) for n in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY") for k in (n, n.lower())]
    if network.inspect_tls:
        bundle = f"{EGRESS_DIR_INSIDE}/ca-bundle.pem"
        env += [
            ("SSL_CERT_FILE", bundle),
            ("REQUESTS_CA_BUNDLE", bundle),
            ("NODE_EXTRA_CA_CERTS", f"{EGRESS_DIR_INSIDE}/ca.pem"),
        ]
    return tuple(env)
