"""inject = "proxy": the real value exists only in the supervisor's proxy.

The sandbox holds a placeholder (``glsr-…``).  On a request whose host is
listed in the credential's ``hosts`` (and that the proxy can see: plain
HTTP, or HTTPS under TLS inspection), the hook replaces the placeholder
with the value wherever it appears in a header, and adds the policy's
``header`` if the request has none of that name.  A request to any other
host keeps the placeholder: the value never leaves for an unlisted host.
Each substitution, and each placeholder seen going elsewhere, is audited
(by name and host, never by value).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import Issued

#: ``(event, details, decision, rule)``: how uses are reported to the audit log.
Report = Callable[[str, dict[str, Any], str, "str | None"], object]


def _host_listed(host: str, hosts: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in hosts:
        name = entry.lower().rsplit(":", 1)[0] if entry.count(":") == 1 else entry.lower()
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def header_hook(
    issued: list[Issued], hosts: dict[str, list[str]], headers_tpl: dict[str, str], report: Report
) -> Callable[[Any, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]:
    """A proxy ``rewrite_headers`` hook for the sandbox's proxy credentials."""
    creds = [c for c in issued if c.inject == "proxy" and c.placeholder]

    def hook(req: Any, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        out = list(headers)
        for cred in creds:
            assert cred.placeholder is not None
            ph = cred.placeholder.encode()
            carried = any(ph in v for _, v in out)
            if not _host_listed(req.host, hosts[cred.name]):
                if carried:
                    report("credential.placeholder_blocked",
                           {"name": cred.name, "host": req.host, "path": req.path},
                           "deny", f"{cred.rule}.hosts")  # fmt: skip
                continue
            value = cred.value.encode()
            out = [(k, v.replace(ph, value)) for k, v in out]
            name, _, tpl = headers_tpl[cred.name].partition(":")
            key = name.strip().lower().encode()
            if not any(k.lower() == key for k, _ in out):
                out.append((key, tpl.strip().replace("{secret}", cred.value).encode()))
            report("credential.used", {"name": cred.name, "host": req.host, "path": req.path,
                                       "how": "placeholder" if carried else "header"},
                   "allow", cred.rule)  # fmt: skip
        return out

    return hook
