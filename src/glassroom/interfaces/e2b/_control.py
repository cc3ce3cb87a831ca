"""E2B's control plane (``api.e2b.app``): create, connect, timeout, info, list,
kill, and pause, resume, snapshots and fork (docs/snapshots.md).

Authenticated with ``X-API-Key`` (a glassroom key; E2B's SDKs want the
``e2b_`` + 40 hex form).  A template ID names a glassroom template (a
policy), so the tier follows the policy's risk, or one of the tenant's
snapshots (by id or name), as E2B's ``Sandbox.create(snapshot_id)`` sends.

What glassroom does not do is refused, never pretended: ``autoResume``
(traffic to a paused sandbox does not reach it here; ``connect()`` resumes
it), and a resume "without memory" of a pause that kept the memory.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..http._config import Tenant
from ..http._edge import read_json
from ..http._service import (
    MAX_FORK_COUNT,
    ApiError,
    Entry,
    SandboxService,
    check_bool,
    check_count,
    check_mapping,
    check_name,
    check_timeout,
    rfc3339,
)
from . import _metrics, _network

log = logging.getLogger("glassroom.serve")

#: The envd version the SDK is told: it gates client-side features (0.6.3: watch
#: events with EntryInfo, 0.6.4: ``allow_network_mounts`` on a watch, both served
#: by _watch; 0.6.2: file metadata, kept as user.e2b.* xattrs by _metadata).
ENVD_VERSION = "0.6.4"
CLIENT_ID = "glassroom"
#: A listing's page size: E2B's default and largest.
PAGE_DEFAULT = 100
PAGE_MAX = 100
#: E2B's default deadline for a create or a fork.
DEFAULT_TIMEOUT_S = 15.0

_D = TypeVar("_D", bool, None)


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
    return JSONResponse(_error(exc), status_code=exc.status)


def _error(exc: ApiError) -> dict[str, Any]:
    """E2B's error body: ``{code, message}``, the rule said in the message."""
    return {
        "code": exc.status,
        "message": exc.message + (f" (rule {exc.rule})" if exc.rule else ""),
    }


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
    paused = svc.state(e) == "paused"
    out = {
        **_sandbox(e),
        "startedAt": rfc3339(e.created),
        "endAt": rfc3339(e.end_at),
        "cpuCount": max(1, int(res.cpus)),
        "memoryMB": res.memory_mib,
        "diskSizeMB": res.disk_mib,
        "state": "paused" if paused else "running",
        "metadata": e.metadata,
        "lifecycle": {"autoResume": False, "onTimeout": "pause" if e.auto_pause else "kill"},
    }
    out.update(_network.detail(e))
    facts = e.pause_facts
    if paused and facts is not None:
        out["pauseMode"] = "full" if facts.get("memory") else "filesystem"
    return out


async def _json(request: Request) -> dict[str, Any]:
    body = await read_json(request)  # strict: no NaN/Infinity, surrogates or deep nesting
    if not isinstance(body, dict):
        raise ApiError(400, "invalid", "body must be a JSON object")
    return body


def _entry(request: Request) -> tuple[SandboxService, Entry]:
    """The service and the caller's sandbox that the path names (401/404 else)."""
    svc = _svc(request)
    return svc, svc.get(_tenant(request), request.path_params["sandbox_id"])


async def _entry_body(request: Request) -> tuple[SandboxService, Entry, dict[str, Any]]:
    """As :func:`_entry`, and the request's JSON object."""
    svc, e = _entry(request)
    return svc, e, await _json(request)


def _bool(body: dict[str, Any], key: str, default: _D) -> bool | _D:
    """``body[key]`` as a JSON boolean (400 naming ``key`` else), ``default`` unset."""
    value = body.get(key)
    return default if value is None else check_bool(value, key)


def _timeout(body: dict[str, Any]) -> float:
    """``timeout`` of a create or a fork: E2B's default when unset."""
    value = body.get("timeout")
    return DEFAULT_TIMEOUT_S if value is None else check_timeout(value, "timeout")


def _new_timeout(body: dict[str, Any]) -> float | None:
    """``timeout`` of a connect or a resume: None (unset or 0) keeps the deadline."""
    value = body.get("timeout")
    return None if value in (None, 0) else check_timeout(value, "timeout")


async def create(request: Request) -> Response:
    try:
        tenant = _tenant(request)
        body = await _json(request)
        template = body.get("templateID")
        if not isinstance(template, str) or not template:
            raise ApiError(400, "invalid", "templateID is required")
        timeout = _timeout(body)
        env = check_mapping(body.get("envVars"), "envVars", env=True)
        meta = check_mapping(body.get("metadata"), "metadata")
        auto_pause, auto_memory = _auto_pause(body)
        svc = _svc(request)
        from ._template_build import for_create  # a template the tenant built

        built = await anyio.to_thread.run_sync(for_create, svc, tenant, template)
        snapshot = None
        if built is None:
            snapshot = await anyio.to_thread.run_sync(_snapshot_for, svc, tenant, template)
        network = (
            built.network(body) if built else _network.at_create(svc, body, template, snapshot)
        )
        e = await anyio.to_thread.run_sync(
            lambda: svc.create(
                tenant,
                template=None if snapshot or built else template,
                policy=built.policy if built else None,
                snapshot=snapshot,
                timeout_s=timeout,
                env=env,
                metadata=meta,
                auto_pause=auto_pause,
                auto_pause_memory=auto_memory,
                network=network,
            )
        )
        if built:
            e.template = built.label
        _network.admitted(svc, e, network)
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_sandbox(e), status_code=201)


def _auto_pause(body: dict[str, Any]) -> tuple[bool, bool]:
    """``autoPause`` / ``autoPauseMemory`` (the SDK's ``lifecycle.on_timeout``).
    ``autoResume`` on is refused: traffic to a paused sandbox never reaches it
    here, so the sandbox would stay paused while the client believed otherwise."""
    auto = _bool(body, "autoPause", False)
    memory = _bool(body, "autoPauseMemory", True)
    resume = body.get("autoResume")
    if resume is not None:
        if not isinstance(resume, dict):
            raise ApiError(400, "invalid", "autoResume: must be an object", rule="autoResume")
        if resume.get("enabled") not in (None, False):
            raise ApiError(
                400,
                "unsupported",
                "autoResume: glassroom does not resume a paused sandbox on traffic; "
                "resume it with connect() (leave auto_resume off)",
                rule="autoResume",
            )
    return auto, memory


def _snapshot_for(svc: SandboxService, tenant: Tenant, template: str) -> str | None:
    """The snapshot a ``templateID`` names, or None for a template.  A template
    of the server's config wins; then a snapshot id; then the tenant's newest
    snapshot of that name (E2B's ``Sandbox.create("my-snapshot")``)."""
    if template in svc.cfg.templates or len(template) > 200:
        return None
    try:
        return svc.get_snapshot(tenant, template).id
    except ApiError as exc:
        if exc.status != 404:
            raise
    named = svc.list_snapshots(tenant, name=template)
    return named[0].id if named else None


async def connect(request: Request) -> Response:
    """A running sandbox: 200 (the deadline extended, never shortened, as E2B
    does).  A paused one is resumed: 201."""
    try:
        svc, e, body = await _entry_body(request)
        secs = _new_timeout(body)
        if e.paused:
            _check_resume_memory(e, body.get("memory"))
            await anyio.to_thread.run_sync(svc.resume, e, secs)
            return JSONResponse(_sandbox(e), status_code=201)
        if secs is not None and e.end_at < time.time() + secs:
            svc.set_timeout(e, secs)
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_sandbox(e), status_code=200)


def _check_resume_memory(e: Entry, memory: object) -> None:
    """E2B's ``memory: false`` (``on_resume="reboot"``): resume from the files
    only.  Done when the pause kept only the files; refused when it kept the
    memory (glassroom's resume restores what was saved), never downgraded."""
    if memory is None or check_bool(memory, "memory"):
        return
    if e.pause_facts is not None and e.pause_facts.get("memory"):
        raise ApiError(
            400,
            "unsupported",
            "memory: false: this sandbox was paused with its memory, and glassroom "
            "resumes what was saved; pause it with keep_memory=False for a cold start",
            rule="snapshot.memory",
        )


async def pause(request: Request) -> Response:
    """204; 409 if it is paused already (the SDK's ``pause()`` is then False)."""
    try:
        svc, e, body = await _entry_body(request)
        memory = _bool(body, "memory", True)
        await anyio.to_thread.run_sync(lambda: svc.pause(e, memory=memory))
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def resume(request: Request) -> Response:
    """201 with the sandbox; 409 if it is not paused."""
    try:
        svc, e, body = await _entry_body(request)
        secs = _new_timeout(body)
        auto = _bool(body, "autoPause", None)
        _check_resume_memory(e, body.get("memory"))
        await anyio.to_thread.run_sync(svc.resume, e, secs)
        if auto is not None:
            e.auto_pause = auto
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_sandbox(e), status_code=201)


async def create_snapshot(request: Request) -> Response:
    """201 ``{snapshotID, names}``; the sandbox keeps running.  ``memory`` unset
    is the tier's best; ``true`` where the tier cannot save processes is a 400
    (rule ``snapshot.memory``), never a files-only snapshot said to be full."""
    try:
        svc, e, body = await _entry_body(request)
        name = body.get("name")
        name = None if name in (None, "") else check_name(name)
        memory = _bool(body, "memory", None)
        info = await anyio.to_thread.run_sync(lambda: svc.snapshot(e, name=name, memory=memory))
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_snapshot_json(info), status_code=201)


def _snapshot_json(info: Any) -> dict[str, Any]:
    return {"snapshotID": info.id, "names": list(info.names)}


async def list_snapshots(request: Request) -> Response:
    """``GET /snapshots``: the tenant's, newest first, paged with ``limit`` and
    the ``x-next-token`` header."""
    try:
        svc, tenant = _svc(request), _tenant(request)
        q = request.query_params
        limit = _limit(q.get("limit"))
        found = await anyio.to_thread.run_sync(
            lambda: svc.list_snapshots(
                tenant, sandbox_id=q.get("sandboxID") or None, name=q.get("name") or None
            )
        )
        page, token = _page([_snapshot_json(i) for i in found], limit, q.get("nextToken"))
    except ApiError as exc:
        return _err(exc)
    return _page_response(page, token)


async def delete_template(request: Request) -> Response:
    """``DELETE /templates/{id}``: what the SDK's ``Sandbox.delete_snapshot``
    calls.  A snapshot of the tenant is deleted (204); anything else is 404:
    templates are the server's config, not the client's to delete."""
    try:
        svc, tenant = _svc(request), _tenant(request)
        sid = request.path_params["template_id"]
        if not await anyio.to_thread.run_sync(svc.delete_snapshot, tenant, sid):
            raise ApiError(404, "not_found", f"snapshot {sid} was not found")
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def fork(request: Request) -> Response:
    """201 with one ``SandboxForkResult`` per fork: ``{sandbox}`` or ``{error}``."""
    try:
        svc, e, body = await _entry_body(request)
        count = body.get("count")
        count = 1 if count is None else check_count(count, "count", MAX_FORK_COUNT)
        secs = _timeout(body)
        _network.check_fork(e)
        results = await anyio.to_thread.run_sync(lambda: svc.fork(e, count, timeout_s=secs))
    except ApiError as exc:
        return _err(exc)
    out = []
    for r in results:
        if isinstance(r, ApiError):
            out.append({"error": _error(r)})
        else:
            out.append({"sandbox": _sandbox(r)})
    return JSONResponse(out, status_code=201)


def _limit(raw: str | None) -> int:
    if raw is None:
        return PAGE_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= PAGE_MAX:
        raise ApiError(400, "invalid", f"limit: must be a whole number from 1 to {PAGE_MAX}")
    return int(raw)


def _page(items: list[Any], limit: int, token: str | None) -> tuple[list[Any], str | None]:
    """One page of ``items`` and the token of the next (None at the end).  The
    token is the offset: listings are small and in a stable order."""
    start = 0
    if token:
        if not token.isdigit() or len(token) > 9:
            raise ApiError(400, "invalid", "nextToken: not a token this server gave")
        start = int(token)
    end = start + limit
    return items[start:end], (str(end) if end < len(items) else None)


def _page_response(items: list[bytes] | list[Any], token: str | None) -> Response:
    raw = [i if isinstance(i, bytes) else json.dumps(i, allow_nan=False).encode() for i in items]
    headers = {"x-next-token": token} if token else {}
    return Response(b"[" + b",".join(raw) + b"]", media_type="application/json", headers=headers)


async def set_timeout(request: Request) -> Response:
    try:
        svc, e, body = await _entry_body(request)
        # E2B: "timeout in seconds from the current time after which the sandbox
        # should expire", minimum 0: set_timeout(0) ends the sandbox now.
        secs = check_timeout(body.get("timeout"), "timeout", allow_zero=True)
        svc.set_timeout(e, secs, allow_zero=True)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def get_info(request: Request) -> Response:
    try:
        svc, e = _entry(request)
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_detail(svc, e))


async def list_sandboxes(request: Request) -> Response:
    """The tenant's sandboxes, newest first (``order=asc``: oldest), filtered by
    ``metadata``, ``state`` (comma-separated or repeated), ``template`` and
    ``startedAfter``, paged with ``limit`` and ``x-next-token``."""
    try:
        svc, tenant = _svc(request), _tenant(request)
        q = request.query_params
        keep = _filters(q.get("metadata"), q.getlist("state"), q.get("template"))
        after = _started_after(q.get("startedAfter"))
        order = q.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise ApiError(400, "invalid", "order: must be asc or desc")
        limit = _limit(q.get("limit"))
        entries = sorted(svc.list(tenant), key=lambda e: e.created, reverse=order == "desc")
        out = []
        for e in entries:
            if after is not None and e.created < after:
                continue
            try:  # one sandbox that cannot be shown must not break the listing
                d = _detail(svc, e)
                item = json.dumps(d, ensure_ascii=False, allow_nan=False).encode()
            except Exception as exc:  # said without a traceback: it is not a crash
                log.warning("sandbox %s left out of a listing: %r", e.id, exc)
                continue
            if keep(e, d):
                out.append(item)
        page, token = _page(out, limit, q.get("nextToken"))
    except ApiError as exc:
        return _err(exc)
    return _page_response(page, token)


def _filters(
    metadata: str | None, states: list[str], template: str | None
) -> Callable[[Entry, dict[str, Any]], bool]:
    want: dict[str, str] = dict(urllib.parse.parse_qsl(metadata)) if metadata else {}
    state = {s for raw in states for s in raw.split(",") if s}
    bad = state - {"running", "paused"}
    if bad:
        raise ApiError(400, "invalid", f"state: {sorted(bad)[0]!r} is not running or paused")

    def keep(e: Entry, d: dict[str, Any]) -> bool:
        if any(e.metadata.get(k) != v for k, v in want.items()):
            return False
        if template and d["templateID"] != template:
            return False
        return not state or d["state"] in state

    return keep


def _started_after(raw: str | None) -> float | None:
    """``startedAfter`` (RFC 3339) as a timestamp; a sandbox started at that very
    instant is included, as E2B's listing does."""
    if not raw:
        return None
    try:
        ts = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "invalid", "startedAfter: must be an RFC 3339 time") from None
    if ts.tzinfo is None:
        raise ApiError(400, "invalid", "startedAfter: must carry a time zone")
    # rfc3339() shows microseconds: compare at that precision
    return ts.timestamp() - 1e-6


async def update_network(request: Request) -> Response:
    """``PUT /sandboxes/{id}/network``: 204; the rules apply to the next connection."""
    try:
        svc, e, body = await _entry_body(request)
        _network.update(svc, e, body)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def kill(request: Request) -> Response:
    try:
        svc, e = _entry(request)
        await anyio.to_thread.run_sync(svc.destroy, e)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def get_metrics(request: Request) -> Response:
    """``GET /sandboxes/{id}/metrics``: CPU, memory and disk samples (_metrics)."""
    try:
        _, e = _entry(request)
        q = request.query_params
        out = await anyio.to_thread.run_sync(_metrics.metrics, e, q.get("start"), q.get("end"))
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(out)
