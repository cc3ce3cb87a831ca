"""inject = "proxy": the real value exists only in the supervisor's proxy.

The sandbox holds a placeholder (``glsr-…``, as long as the value).  On the
way out, for a request the proxy can see (plain HTTP, or HTTPS under TLS
inspection) to one of the credential's ``hosts`` — host *and* port: a bare
host means port 80 for plain HTTP and 443 for HTTPS — the placeholder is
replaced by the value, and only inside the header the credential names
(``header = "Authorization: ..."``), only where the sandbox put it.

Nothing is added when the sandbox did not send the placeholder.  Why: an
implicit header would authenticate every request to the host, including
ones the task never meant to authenticate (a URL it was handed, a redirect,
an echo endpoint), and would hand the secret to a request that carries no
trace of it in the sandbox's own code.  The task asks for the credential
explicitly, with ``$GLASSROOM_SECRET_NAME``, and each use is audited.

A placeholder sent anywhere else (another host or port, another header)
stays the placeholder, and is audited as blocked.

On the way back, every form of every proxy secret is taken out of the
response's reason phrase, headers and body (``_redact``), whatever host it comes from.  A
request that carries a secret, or goes to a host:port that was sent one
before, asks for an unencoded body (``Accept-Encoding: identity``) and for
the whole of it (``Range`` is dropped, so the value cannot be fetched a
slice at a time); an encoded response to it is refused, because it cannot
be scanned.  Every use, block and redaction is audited by name and host,
never by value.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from .._errors import CredentialError
from ..policy._network import Entry, parse_entry
from . import Issued
from ._redact import Pair, Redactor, forms

#: ``(event, details, decision, rule)``: how uses are reported to the audit log.
Report = Callable[[str, dict[str, Any], str, "str | None"], object]
Headers = list[tuple[bytes, bytes]]

#: Request headers dropped when a secret is at stake, so the body comes back
#: whole and readable (see the module docstring).
_GUARDED = (b"accept-encoding", b"range", b"if-range")


def host_listed(entries: list[Entry], host: str, port: int, scheme: str) -> bool:
    """Does a ``hosts`` entry name exactly this host and port?

    An entry without a port means the scheme's default: 80 for plain HTTP,
    443 for HTTPS.  A name matches a name only; an address matches the same
    address only (``[::1]:8443`` and ``::1`` compare as addresses).
    """
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        addr = None
    default = 443 if scheme == "https" else 80
    for e in entries:
        if port != (e.port if e.port is not None else default):
            continue
        if addr is not None and e.matches_address(addr, port):
            return True
        if addr is None and e.matches_name(host, port):
            return True
    return False


class _Cred:
    def __init__(self, issued: Issued, hosts: list[str], header: str, owner: int) -> None:
        assert issued.placeholder is not None
        self.name, self.rule = issued.name, issued.rule
        self.placeholder = issued.placeholder.encode()
        self.value = issued.value.encode()
        self.entries = [parse_entry(h) for h in hosts]
        self.header = header.partition(":")[0].strip().lower().encode()
        self.forms: list[Pair] = forms(self.value, self.placeholder, owner)
        #: (host, port) pairs this value has been sent to, in this sandbox.
        self.sent: set[tuple[str, int]] = set()


class ProxyCredentials:
    """The sandbox's proxy credentials; ``exchange`` is the proxy's ``exchange_filter``."""

    def __init__(self, issued: list[Issued], hosts: dict[str, list[str]],
                 headers_tpl: dict[str, str], report: Report) -> None:  # fmt: skip
        proxied = [c for c in issued if c.inject == "proxy" and c.placeholder]
        self.creds = [_Cred(c, hosts[c.name], headers_tpl[c.name], i)
                      for i, c in enumerate(proxied)]  # fmt: skip
        self.pairs = [p for c in self.creds for p in c.forms]
        self.report = report

    def exchange(self, req: Any) -> _Exchange | None:
        return _Exchange(self, req) if self.creds else None


class _Exchange:
    """One request and its response (see egress ExchangeFilter)."""

    def __init__(self, owner: ProxyCredentials, req: Any) -> None:
        self.o, self.req = owner, req
        self.where = {"host": req.host, "port": req.port, "path": req.path}
        self.guarded: list[_Cred] = []
        self.body = Redactor(owner.pairs)
        self.head = Redactor(owner.pairs)

    def request(self, headers: Headers) -> Headers:
        out = list(headers)
        req = self.req
        for cred in self.o.creds:
            ph = cred.placeholder
            listed = host_listed(cred.entries, req.host, req.port, req.scheme)
            carried = [k.decode("latin-1").lower() for k, v in out if ph in v]
            if not listed:
                if carried:
                    self.o.report("credential.placeholder_blocked",
                                  {"name": cred.name, **self.where, "headers": carried},
                                  "deny", f"{cred.rule}.hosts")  # fmt: skip
                continue
            other = sorted({k for k in carried if k.encode() != cred.header})
            if other:
                self.o.report("credential.placeholder_blocked",
                              {"name": cred.name, **self.where, "headers": other},
                              "deny", f"{cred.rule}.header")  # fmt: skip
            swapped = 0
            for i, (k, v) in enumerate(out):
                if k.lower() == cred.header and ph in v:
                    swapped += v.count(ph)
                    out[i] = (k, v.replace(ph, cred.value))
            if swapped:
                cred.sent.add((req.host, req.port))
                self.o.report("credential.used",
                              {"name": cred.name, **self.where, "header": cred.header.decode()},
                              "allow", cred.rule)  # fmt: skip
            if swapped or (req.host, req.port) in cred.sent:
                self.guarded.append(cred)
        if self.guarded:
            out = [(k, v) for k, v in out if k.lower() not in _GUARDED]
            out.append((b"accept-encoding", b"identity"))
        return out

    def response_head(self, status: int, reason: bytes,
                      headers: Headers) -> tuple[bytes, Headers]:  # fmt: skip
        bodiless = self.req.method == "HEAD" or status in (204, 304)
        if self.guarded and not bodiless:
            # Redacted: the value is quoted in the refusal and in the audit record.
            enc = self.head.apply(b",".join(v for k, v in headers
                                            if k.lower() == b"content-encoding"))  # fmt: skip
            if enc.strip().lower() not in (b"", b"identity"):
                cred = self.guarded[0]
                raise CredentialError(
                    f"the response from {self.req.host}:{self.req.port} is encoded "
                    f"({enc.decode('latin-1')}) although identity was asked for: it cannot "
                    f"be checked for {cred.name}, so it is refused", rule=f"{cred.rule}.inject")
        return self.head.apply(reason), [(self.head.apply(k), self.head.apply(v))
                                         for k, v in headers]  # fmt: skip

    def response_body(self, data: bytes) -> bytes:
        return self.body.feed(data)

    def response_end(self) -> bytes:
        return self.body.end()

    def close(self) -> None:
        for cred in self.o.creds:
            owner = cred.forms[0][2]
            n_head, n_body = self.head.counts[owner], self.body.counts[owner]
            if n_head or n_body:
                self.o.report("credential.redacted",
                              {"name": cred.name, **self.where, "count": n_head + n_body,
                               "in_headers": n_head, "in_body": n_body},
                              "deny", f"{cred.rule}.inject")  # fmt: skip


def header_hook(
    issued: list[Issued], hosts: dict[str, list[str]], headers_tpl: dict[str, str], report: Report
) -> Callable[[Any], _Exchange | None]:
    """The proxy's ``exchange_filter`` for the sandbox's proxy credentials."""
    return ProxyCredentials(issued, hosts, headers_tpl, report).exchange
