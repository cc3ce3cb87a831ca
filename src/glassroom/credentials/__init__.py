"""Credentials: issued per task at create, injected at runtime, revoked at destroy.

``issue`` turns one ``[[credentials]]`` entry into an :class:`Issued`: the
value (kept in supervisor memory only), what the audit log may say about it
(name, scheme, scope, TTL, lease id or accessor — never the value), and how
to revoke it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._errors import CredentialError
from ..plan import SECRETS_DIR
from ..policy._credentials import CredentialPolicy
from ._broker import Broker, Claims

MAX_SECRET_BYTES = 64 * 1024
#: inject = "proxy": shorter values cannot be told apart from ordinary text
#: when the proxy takes them back out of responses (see _redact).
MIN_PROXY_SECRET_BYTES = 8
_PLACEHOLDER_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"

__all__ = ["SECRETS_DIR", "Broker", "Claims", "Issued", "env_name", "issue"]


def env_name(name: str) -> str:
    """The env var a credential appears as (real value for env, placeholder for proxy)."""
    return "GLASSROOM_SECRET_" + name.upper()


@dataclass
class Issued:
    name: str
    rule: str
    value: str = field(repr=False)
    inject: str
    expires_at: float
    facts: dict[str, Any]
    revoke: Callable[[], None] | None = None
    #: inject = "proxy": what the sandbox sees instead of the value.
    placeholder: str | None = None
    #: inject = "env"/"proxy": the variable it is put in (the policy's ``env``).
    var: str = ""

    def audit_details(self) -> dict[str, Any]:
        return {"name": self.name, "inject": self.inject,
                "expires_in_s": round(self.expires_at - time.time(), 3), **self.facts}  # fmt: skip


def issue(
    cred: CredentialPolicy, index: int, sandbox_id: str, max_runtime_s: float,
    broker: Broker | None = None,
) -> Issued:  # fmt: skip
    rule = f"credentials[{index}]"
    ttl = cred.ttl_s or max_runtime_s
    scheme, _, addr = cred.source.partition(":")
    facts: dict[str, Any] = {"source": scheme, "scope": list(cred.scope), "ttl_s": ttl}
    revoke: Callable[[], None] | None = None
    if scheme == "env":
        value = os.environ.get(addr)
        if value is None:
            raise CredentialError(f"{rule}: the supervisor has no env var {addr}", rule=rule)
        facts["var"] = addr
    elif scheme == "file":
        try:
            with open(addr, "rb") as f:
                raw = f.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            msg = f"{rule}: cannot read {addr}: {exc.strerror}"
            raise CredentialError(msg, rule=rule) from None
        if len(raw) > MAX_SECRET_BYTES:
            raise CredentialError(f"{rule}: {addr} is larger than 64 KiB", rule=rule)
        value = raw.decode().strip()
        facts["path"] = addr
    elif scheme == "broker":
        b = broker or Broker()
        value, claims = b.mint(sandbox_id, cred.name, list(cred.scope), ttl)
        facts["token_id"] = claims.jti

        def revoke() -> None:
            b.revoke(claims.jti)

    elif scheme == "vault":
        from ._vault import read_secret

        path, _, fld = addr.partition("#")
        value, lease, revoke = read_secret(path, fld, rule)
        facts.update({"path": path, "field": fld, "lease_id": lease})
    elif scheme == "vault-token":
        from ._vault import child_token

        value, accessor, revoke = child_token(
            list(cred.scope), ttl, {"glassroom_sandbox": sandbox_id, "name": cred.name}, rule
        )
        facts["accessor"] = accessor
    else:  # the policy model refuses unknown schemes; keep the check for API misuse
        raise CredentialError(f"{rule}: unknown source scheme {scheme!r}", rule=rule)
    try:
        placeholder = _placeholder(value, rule) if cred.inject == "proxy" else None
    except CredentialError:
        if revoke is not None:  # minted already: do not leave it valid
            revoke()
        raise
    expires = time.time() + ttl
    var = cred.var or env_name(cred.name)
    return Issued(cred.name, rule, value, cred.inject, expires, facts, revoke, placeholder, var)


def _placeholder(value: str, rule: str) -> str:
    """``glsr-`` and random letters, exactly as many bytes as the value.

    Why the same length: the proxy puts the placeholder back where a
    response echoes the value, and a body must keep its size for its
    Content-Length to stay right (docs/credentials.md).
    """
    size = len(value.encode())
    if size < MIN_PROXY_SECRET_BYTES:
        raise CredentialError(
            f"{rule}: a proxy credential must be at least {MIN_PROXY_SECRET_BYTES} bytes long "
            f"(this one has {size}): a shorter value cannot be found reliably in responses",
            rule=f"{rule}.inject",
        )
    if any(c in value for c in "\r\n\0"):
        raise CredentialError(f"{rule}: a proxy credential cannot contain CR, LF or NUL "
                              "(it goes into a header)", rule=f"{rule}.inject")  # fmt: skip
    while True:
        ph = "glsr-" + "".join(secrets.choice(_PLACEHOLDER_CHARS) for _ in range(size - 5))
        if ph != value:
            return ph
