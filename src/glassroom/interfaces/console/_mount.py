"""Sessions, the login/logout routes and the static pages of the console.

Why a server-side session map and not the key in the browser: the key never
sits in page-readable storage; a session token is random, expires, and a
logout ends it on the server.  The cookie is HttpOnly (no script reads it),
SameSite=Strict (no other site's page sends it), host-only (no Domain), and
Secure over https.  A state-changing request authenticated by the cookie must
also carry the session's CSRF token in a header (double submit: only a page
of this origin can read the readable CSRF cookie) and, if the browser sent an
Origin, this origin.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from ..http._config import Tenant
from ..http._service import ApiError, SandboxService

SESSION_COOKIE = "glassroom_session"
CSRF_COOKIE = "glassroom_csrf"
CSRF_HEADER = "X-Glassroom-CSRF"
SESSION_TTL_S = 8 * 3600.0
#: Methods that change state: these need the CSRF header under a cookie.
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: Strict: the pages load only their own files; no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript"}
_FILES = ("index.html", "console.css", "console.js")


#: Live console sessions per tenant (a login past it ends the oldest).
MAX_PER_TENANT = 20


@dataclass
class Session:
    tenant: str
    csrf: str
    expires: float


class Sessions:
    """Token -> session, in memory: a restart logs everyone out, which is fine."""

    def __init__(self, ttl_s: float = SESSION_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._items: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, tenant: str) -> tuple[str, Session]:
        """A new session; a tenant keeps at most MAX_PER_TENANT, the oldest go."""
        token = secrets.token_urlsafe(32)
        s = Session(tenant, secrets.token_urlsafe(24), time.time() + self.ttl_s)
        with self._lock:
            now = time.time()
            for k in [k for k, v in self._items.items() if v.expires <= now]:
                del self._items[k]
            mine = [k for k, v in self._items.items() if v.tenant == tenant]  # oldest first
            for k in mine[: max(0, len(mine) - MAX_PER_TENANT + 1)]:
                del self._items[k]
            self._items[token] = s
        return token, s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._items.get(token)
            if s is not None and s.expires <= time.time():
                del self._items[token]
                return None
            return s

    def close(self, token: str | None) -> None:
        with self._lock:
            self._items.pop(token or "", None)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def session_tenant(request: Request, svc: SandboxService) -> Tenant | None:
    """The tenant of the request's console session, or None without a cookie.

    Raises 401 for a stale session and 403 for an unsafe request without the
    CSRF header or from another origin."""
    sessions: Sessions | None = getattr(request.app.state, "sessions", None)
    token = request.cookies.get(SESSION_COOKIE)
    if sessions is None or token is None:
        return None
    s = sessions.get(token)
    if s is None:
        raise ApiError(401, "unauthenticated", "the console session has ended; log in again")
    if request.method in UNSAFE:
        sent = request.headers.get(CSRF_HEADER, "")
        if not secrets.compare_digest(sent.encode(), s.csrf.encode()):
            raise ApiError(403, "forbidden", f"missing or wrong {CSRF_HEADER} header", rule="csrf")
        if not _same_origin(request):
            raise ApiError(403, "forbidden", "cross-origin request refused", rule="csrf")
    return svc.tenant(s.tenant)


class Login(BaseModel):
    key: str = Field(min_length=1, max_length=500)


def _page(name: str) -> Response:
    data = resources.files(__package__).joinpath("static", name).read_bytes()
    ctype = _TYPES["." + name.rsplit(".", 1)[1]]
    return Response(data, media_type=ctype, headers=SECURITY_HEADERS)


def mount(app: FastAPI) -> None:
    """Add the console's routes to ``app`` (outside the OpenAPI spec: they are
    the console's, not the API's)."""
    app.state.sessions = Sessions()

    @app.get("/console", include_in_schema=False)
    @app.get("/console/", include_in_schema=False)
    def index() -> Response:
        return _page("index.html")

    @app.get("/console/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _FILES:
            raise ApiError(404, "not_found", "no such file")
        return _page(name)

    @app.post("/console/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            raise ApiError(403, "forbidden", "cross-origin login refused", rule="csrf")
        # JSON only: a cross-site form or text/plain post (login CSRF) would need
        # a CORS preflight for this content type, which is never granted.
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "invalid", "login takes a JSON body {\"key\": ...}",
                           rule="csrf")  # fmt: skip
        try:
            body = Login.model_validate_json(await request.body())
        except ValidationError:
            raise ApiError(400, "invalid", "login takes a JSON body {\"key\": \"...\"}") from None
        svc: SandboxService = request.app.state.service
        try:
            tenant = svc.authenticate(body.key)
        except ApiError:
            client = request.client.host if request.client else "?"
            svc.audit.append("console", "console.login_failed", {"client": client},
                             decision="deny", rule="auth")  # fmt: skip
            raise
        token, s = app.state.sessions.open(tenant.name)
        resp = JSONResponse({"tenant": tenant.name, "csrf": s.csrf}, headers=SECURITY_HEADERS)
        secure = request.url.scheme == "https"
        common: dict[str, Any] = {"path": "/", "samesite": "strict", "secure": secure}
        ttl = int(app.state.sessions.ttl_s)
        resp.set_cookie(SESSION_COOKIE, token, max_age=ttl, httponly=True, **common)
        resp.set_cookie(CSRF_COOKIE, s.csrf, max_age=ttl, httponly=False, **common)
        return resp

    @app.post("/console/logout", include_in_schema=False)
    def logout(request: Request) -> Response:
        if not _same_origin(request):
            raise ApiError(403, "forbidden", "cross-origin logout refused", rule="csrf")
        app.state.sessions.close(request.cookies.get(SESSION_COOKIE))
        resp = JSONResponse({"ok": True}, headers=SECURITY_HEADERS)
        resp.delete_cookie(SESSION_COOKIE, path="/", samesite="strict", httponly=True)
        resp.delete_cookie(CSRF_COOKIE, path="/", samesite="strict")
        return resp
