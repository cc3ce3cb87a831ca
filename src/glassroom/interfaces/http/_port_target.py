"""Which requests are for a port inside a sandbox (see ``_ports``).

Apart from ``_ports`` because the edge must know too, before it reads a body:
a relayed body is the sandbox server's data, never decoded or parsed here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

#: Where the edge leaves its decision in the ASGI scope: the Target, or None.
SCOPE_PORT = "glassroom.port"
#: envd and the code interpreter: never relayed, they have their own routes.
RESERVED_PORTS = frozenset({49983, 49999})
_OWN_PATH = re.compile(r"^/v1/sandboxes/([^/]{1,200})/ports/([0-9]{1,5})(/.*)?$", re.ASCII)
#: Only a sandbox id's shape (``sb-`` and hex) after the port: a deployment
#: whose own name looks like ``8443-prod.example.com`` is not a port request.
_HOST = re.compile(r"^([0-9]{1,5})-(sb-[0-9a-f]{6,64})\.", re.ASCII)
_PORT = re.compile(r"^[0-9]{1,5}$", re.ASCII)


@dataclass(frozen=True)
class Target:
    """Which sandbox and port a request is for, and how it authenticates."""

    sandbox_id: str
    port: int
    path: str  # the target (path and query) as the sandbox's server sees it
    own_api: bool


def target_of(
    path: str, query: str, headers: Mapping[str, str], raw_path: bytes | None = None
) -> Target | None:
    """The port request this is, or None for any other request.

    The target passed on is built from ``raw_path`` (as the client sent it):
    the decoded path would turn ``%3F`` into a query and ``%2F..`` into a
    traversal that the sandbox's server never asked for."""
    qs = f"?{query}" if query else ""
    raw = raw_path.decode("latin-1") if raw_path else path
    m = _OWN_PATH.match(path)
    if m:
        r = _OWN_PATH.match(raw)
        rest = (r.group(3) if r else m.group(3)) or "/"
        return Target(m.group(1), int(m.group(2)), rest + qs, True)
    port = headers.get("e2b-sandbox-port", "")
    sid = headers.get("e2b-sandbox-id", "")
    if _PORT.match(port) and sid and int(port) not in RESERVED_PORTS:
        return Target(sid, int(port), raw + qs, False)
    m = _HOST.match(headers.get("host", ""))
    if m and int(m.group(1)) not in RESERVED_PORTS:
        return Target(m.group(2), int(m.group(1)), raw + qs, False)
    return None
