"""Signed file URLs: E2B's ``download_url`` / ``upload_url``.

A signed URL is ``GET``/``POST /files?path=P&username=U&signature=S
[&signature_expiration=T]`` with no header at all: a browser or ``curl`` can
use it.  E2B defines the signature (v1) as
``"v1_" + base64(sha256("P:OP:U:TOKEN[:T]"))`` without padding, where OP is
``read`` or ``write``, U is empty for the default user, TOKEN is the
sandbox's envd access token and T the Unix second it expires.  The token is
the secret: whoever holds a signature can do that one operation on that one
path, as that user, until T, and nothing else.

With ``E2B_SANDBOX_URL`` set the URL names no sandbox (real E2B puts the id
in the host name), so when neither ``E2b-Sandbox-Id`` nor a
``{port}-{id}.domain`` host names it, the signature itself is matched
against the live sandboxes' tokens: at most one can produce it.  Then the
operation goes through the same file API, walls and audit as a
token-authenticated one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from fastapi import Request

from ..http._service import ApiError, Entry, SandboxService

#: The query parameters E2B's SDK puts in a signed URL.
SIGNATURE = "signature"
EXPIRATION = "signature_expiration"
#: Longest signature and expiration accepted: v1 is 3 + 43 characters.
MAX_SIGNATURE = 64
MAX_EXPIRATION_DIGITS = 12


def sign(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """The v1 signature E2B's SDK makes for ``path`` (as the URL carries it)."""
    raw = f"{path}:{operation}:{user}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode("utf-8")).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def is_signed(request: Request) -> bool:
    """The request carries a signature instead of the access token."""
    return SIGNATURE in request.query_params


def _expiration(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdigit() and len(digits) <= MAX_EXPIRATION_DIGITS):
        raise ApiError(400, "invalid", f"{EXPIRATION}: must be a Unix time in seconds")
    return int(raw)


def entry_for_signed(svc: SandboxService, request: Request, operation: str) -> Entry:
    """The sandbox whose token made the request's signature, for ``operation``
    (``read`` for GET, ``write`` for POST) on the query's ``path`` and
    ``username``.  401 ``invalid signature`` when none did (a wrong path,
    user, operation or token), 401 ``signature is already expired`` past
    ``signature_expiration``; 502 for a named sandbox that is gone."""
    q = request.query_params
    given = q.get(SIGNATURE, "")
    expiration = _expiration(q.get(EXPIRATION))
    path = q.get("path", "")
    user = q.get("username", "")
    if not given.startswith("v1_") or len(given) > MAX_SIGNATURE:
        raise ApiError(401, "unauthenticated", "invalid signature")
    named = request.headers.get("e2b-sandbox-id") or _host_sandbox(request)
    candidates = [e for e in svc.live() if not named or e.id == named]
    if named and not candidates:
        raise ApiError(502, "not_found", f"The sandbox {named} was not found")
    found = None
    for e in candidates:
        want = sign(path, operation, user, e.access_token, expiration)
        if hmac.compare_digest(want.encode(), given.encode()):
            found = e
            break
    if found is None:
        raise ApiError(401, "unauthenticated", "invalid signature")
    if expiration is not None and expiration < time.time():
        raise ApiError(401, "unauthenticated", "signature is already expired")
    if found.paused:
        return svc.get_by_token(found.id, found.access_token)  # E2B's 502 for a paused one
    return found


def _host_sandbox(request: Request) -> str:
    """The id in a ``{port}-{id}.domain`` host, as ``get_host`` forms it ('' else)."""
    host = request.headers.get("host", "").split(":", 1)[0]
    first = host.split(".", 1)[0]
    port, sep, sid = first.partition("-")
    return sid if sep and port.isdigit() and sid and "." in host else ""
