"""Name resolution for the proxy: the sandbox has no resolver of its own.

The proxy resolves a name only after the name was allowed, and then
connects to the address it resolved itself (never to one the client
supplies), which defeats DNS rebinding between a check and the connect.

``HostsResolver`` is a fixed map, injected by tests and the drill (and by
operators who pin names).  Its addresses are the operator's own statement,
so they count as "allowed explicitly by address": they may be loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from typing import Protocol


class ResolveError(Exception):
    pass


class Resolver(Protocol):
    #: Addresses are the operator's own (a hosts map): internal ranges allowed.
    trusted: bool

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The host's resolver (getaddrinfo), run off the event loop."""

    trusted = False

    async def resolve(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout=10
            )
        except (OSError, TimeoutError) as exc:
            raise ResolveError(f"cannot resolve {host}: {exc}") from None
        out: list[str] = []
        for _fam, _t, _p, _c, addr in infos:
            ip = str(addr[0])
            if ip not in out:
                out.append(ip)
        return out


class HostsResolver:
    """A fixed hosts map: ``{"api.test": "127.0.0.1"}`` (or a list of addresses)."""

    def __init__(self, hosts: Mapping[str, str | Sequence[str]], *, trusted: bool = True) -> None:
        self.hosts: dict[str, list[str]] = {}
        for name, addrs in hosts.items():
            items = [addrs] if isinstance(addrs, str) else list(addrs)
            self.hosts[name.lower().rstrip(".")] = [str(ipaddress.ip_address(a)) for a in items]
        self.trusted = trusted

    async def resolve(self, host: str, port: int) -> list[str]:
        addrs = self.hosts.get(host.lower().rstrip("."))
        if not addrs:
            raise ResolveError(f"cannot resolve {host}: not in the hosts map")
        return list(addrs)
