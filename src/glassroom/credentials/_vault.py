"""Vault/OpenBao through hvac: secrets read, child tokens minted, leases revoked.

The supervisor's own Vault address and token come from ITS environment
(``VAULT_ADDR``/``VAULT_TOKEN``, or ``BAO_ADDR``/``BAO_TOKEN``); they are
never visible inside a sandbox, whose environment is built from scratch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .._errors import CredentialError

TIMEOUT_S = 5


def _client(rule: str) -> Any:
    import hvac
    import requests

    url = os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
    token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    if not url or not token:
        raise CredentialError(
            f"{rule}: no Vault configured for the supervisor (set VAULT_ADDR and VAULT_TOKEN)",
            rule=rule,
        )
    client = hvac.Client(url=url, token=token, timeout=TIMEOUT_S)
    try:
        client.lookup_token()
    except requests.exceptions.RequestException as exc:
        raise CredentialError(f"{rule}: cannot reach Vault at {url}: {type(exc).__name__}",
                              rule=rule) from None  # fmt: skip
    except Exception as exc:
        raise CredentialError(f"{rule}: Vault at {url} refused the supervisor's token: {exc}",
                              rule=rule) from None  # fmt: skip
    return client


def read_secret(path: str, field: str, rule: str) -> tuple[str, str | None, Callable[[], None]]:
    """(value, lease id, revoke).  KV v2 (``data.data``) and v1/dynamic (``data``) shapes."""
    client = _client(rule)
    try:
        resp = client.read(path)
    except Exception as exc:
        raise CredentialError(f"{rule}: cannot read {path}: {exc}", rule=rule) from None
    if not resp or "data" not in resp:
        raise CredentialError(f"{rule}: {path}: no such secret", rule=rule)
    data = resp["data"]
    if isinstance(data.get("data"), dict):
        data = data["data"]
    if field not in data:
        raise CredentialError(f"{rule}: {path} has no field {field!r}", rule=rule)
    lease = resp.get("lease_id") or None

    def revoke() -> None:
        if lease:
            client.sys.revoke_lease(lease_id=lease)

    return str(data[field]), lease, revoke


def child_token(
    policies: list[str], ttl_s: float, meta: dict[str, str], rule: str
) -> tuple[str, str, Callable[[], None]]:
    """(token, accessor, revoke): a non-renewable child token that dies with its TTL."""
    client = _client(rule)
    try:
        resp = client.auth.token.create(
            policies=policies or None,
            ttl=f"{max(1, int(ttl_s))}s",
            explicit_max_ttl=f"{max(1, int(ttl_s))}s",
            renewable=False,
            meta=meta,
        )
    except Exception as exc:
        raise CredentialError(f"{rule}: cannot create a child token: {exc}", rule=rule) from None
    auth = resp["auth"]
    accessor = auth["accessor"]

    def revoke() -> None:
        client.auth.token.revoke_accessor(accessor)

    return str(auth["client_token"]), str(accessor), revoke
