"""E2B's control plane (``api.e2b.app``): create, connect, timeout, info, list, kill.

Authenticated with ``X-API-Key`` (a glassroom key; E2B's SDKs want the
``e2b_`` + 40 hex form).  A template ID names a glassroom template (a
policy), so the tier follows the policy's risk.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from typing import Any

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..http._config import Tenant
from ..http._edge import read_json
from ..http._service import (
    ApiError,
    Entry,
    SandboxService,
    check_mapping,
    check_timeout,
    rfc3339,
)

log = logging.getLogger("glassroom.serve")

ENVD_VERSION = "0.5.7"
CLIENT_ID = "glassroom"


def _svc(request: Request) -> SandboxService:
    svc: SandboxService = request.app.state.service
    return svc


def _tenant(request: Request) -> Tenant:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return _svc(request).authenticate(key)


def _err(exc: ApiError) -> JSONResponse:
    msg = exc.message + (f" (rule {exc.rule})" if exc.rule else "")
    return JSONResponse({"code": exc.status, "message": msg}, status_code=exc.status)


def _sandbox(e: Entry) -> dict[str, Any]:
    return {
        "templateID": e.template or "custom",
        "sandboxID": e.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": e.access_token,
        # the code interpreter's calls carry this one instead of X-Access-Token
        "trafficAccessToken": e.access_token,
    }


def _detail(svc: SandboxService, e: Entry) -> dict[str, Any]:
    res = e.sb.policy.resources
    info = svc.info(e)
    return {
        **_sandbox(e),
        "startedAt": rfc3339(e.created),
        "endAt": rfc3339(e.end_at),
        "cpuCount": max(1, int(res.cpus)),
        "memoryMB": res.memory_mib,
        "diskSizeMB": res.disk_mib,
        "state": "running" if info.state == "running" else "paused",
        "metadata": e.metadata,
    }


async def _json(request: Request) -> dict[str, Any]:
    body = await read_json(request)  # strict: no NaN/Infinity, surrogates or deep nesting
    if not isinstance(body, dict):
        raise ApiError(400, "invalid", "body must be a JSON object")
    return body


async def create(request: Request) -> Response:
    try:
        tenant = _tenant(request)
        body = await _json(request)
        template = body.get("templateID")
        if not isinstance(template, str) or not template:
            raise ApiError(400, "invalid", "templateID is required")
        raw_timeout = body.get("timeout")
        timeout = 15.0 if raw_timeout is None else check_timeout(raw_timeout, "timeout")
        env = check_mapping(body.get("envVars"), "envVars", env=True)
        meta = check_mapping(body.get("metadata"), "metadata")
        if body.get("allow_internet_access") or body.get("allowInternetAccess"):
            # E2B defaults to open internet; glassroom's network follows the policy.
            pass
        svc = _svc(request)
        e = await anyio.to_thread.run_sync(
            lambda: svc.create(
                tenant,
                template=template,
                timeout_s=timeout,
                env=env,
                metadata=meta,
            )
        )
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_sandbox(e), status_code=201)


async def connect(request: Request) -> Response:
    try:
        svc, tenant = _svc(request), _tenant(request)
        e = svc.get(tenant, request.path_params["sandbox_id"])
        body = await _json(request)
        timeout = body.get("timeout")
        secs = 0.0 if timeout in (None, 0) else check_timeout(timeout, "timeout")
        # Connecting extends the deadline, never shortens it (as E2B does).
        if secs > 0 and e.end_at < time.time() + secs:
            svc.set_timeout(e, secs)
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_sandbox(e), status_code=200)


async def set_timeout(request: Request) -> Response:
    try:
        svc, tenant = _svc(request), _tenant(request)
        e = svc.get(tenant, request.path_params["sandbox_id"])
        body = await _json(request)
        # E2B: "timeout in seconds from the current time after which the sandbox
        # should expire", minimum 0: set_timeout(0) ends the sandbox now.
        secs = check_timeout(body.get("timeout"), "timeout", allow_zero=True)
        svc.set_timeout(e, secs, allow_zero=True)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def get_info(request: Request) -> Response:
    try:
        svc, tenant = _svc(request), _tenant(request)
        e = svc.get(tenant, request.path_params["sandbox_id"])
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_detail(svc, e))


async def list_sandboxes(request: Request) -> Response:
    try:
        svc, tenant = _svc(request), _tenant(request)
    except ApiError as exc:
        return _err(exc)
    want: dict[str, str] = {}
    raw = request.query_params.get("metadata")
    if raw:
        want = dict(urllib.parse.parse_qsl(raw))
    state = request.query_params.getlist("state")
    out = []
    for e in svc.list(tenant):
        if any(e.metadata.get(k) != v for k, v in want.items()):
            continue
        try:  # one sandbox that cannot be shown must not break the listing
            d = _detail(svc, e)
            item = json.dumps(d, ensure_ascii=False, allow_nan=False).encode()
        except Exception as exc:  # said without a traceback: it is not a crash
            log.warning("sandbox %s left out of a listing: %r", e.id, exc)
            continue
        if state and d["state"] not in state:
            continue
        out.append(item)
    return Response(b"[" + b",".join(out) + b"]", media_type="application/json")


async def kill(request: Request) -> Response:
    try:
        svc, tenant = _svc(request), _tenant(request)
        e = svc.get(tenant, request.path_params["sandbox_id"])
        await anyio.to_thread.run_sync(svc.destroy, e)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)
