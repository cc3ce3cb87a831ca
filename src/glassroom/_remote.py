"""The SDK's remote mode: ``Sandbox(policy, url=..., api_key=...)``.

Same API as the in-process :class:`Sandbox`, spoken over ``glassroom
serve``'s own API (``/v1``) with httpx.  Server errors come back as the same
exception tree: a 404 is ``SandboxClosed`` (or ``SandboxPathError`` for a
path), 403 ``SandboxPathError``, other 4xx ``SandboxError``/``PolicyError``;
an error whose rule is ``snapshot.*`` is a ``SnapshotError`` (and
``snapshot.integrity`` a ``SnapshotIntegrityError``), whatever its status, so
a missing snapshot is never mistaken for a destroyed sandbox.

Pause, resume, snapshot and fork are the server's ``/v1`` endpoints of the
same names (docs/snapshots.md); a snapshot lives in the server's data dir,
so :meth:`RemoteSandbox.list_snapshots` and friends list the server's store
for the key's tenant, never the local one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ._errors import (
    PolicyError,
    SandboxClosed,
    SandboxError,
    SandboxPathError,
    SnapshotError,
    SnapshotIntegrityError,
)
from ._sandbox import DEFAULT_READ_MAX, RunResult, Sandbox
from .backends.base import FileEntry, Receipt
from .lifecycle.snapshots import SnapshotInfo, SnapshotStore
from .lifecycle.supervisor import Blocked
from .policy import Policy


def _raise(r: httpx.Response) -> None:
    if r.is_success:
        return
    try:
        err = r.json().get("error", {})
    except ValueError:
        err = {}
    msg = str(err.get("message") or r.text or f"HTTP {r.status_code}")
    rule = err.get("rule")
    code = err.get("code")
    if code == "invalid_policy":
        raise PolicyError(msg, source="glassroom serve")
    if rule == "snapshot.integrity":
        raise SnapshotIntegrityError(f"{msg} (HTTP {r.status_code})", rule=rule)
    if rule and rule.startswith("snapshot."):
        raise SnapshotError(f"{msg} (HTTP {r.status_code})", rule=rule)
    if r.status_code == 403 or (r.status_code == 404 and rule and rule.startswith("filesystem")):
        raise SandboxPathError(msg, rule=rule)
    if r.status_code == 404:
        raise SandboxClosed(msg, rule=rule)
    raise SandboxError(f"{msg} (HTTP {r.status_code})", rule=rule)


def _connect(url: str | None, api_key: str | None) -> httpx.Client:
    """An httpx client for the server at ``url``, sending the key as ``X-API-Key``."""
    key = api_key or os.environ.get("GLASSROOM_API_KEY")
    if not url or not key:
        raise SandboxError("remote mode needs url= and api_key= (or $GLASSROOM_API_KEY)")
    return httpx.Client(
        base_url=url.rstrip("/"),
        headers={"X-API-Key": key},
        timeout=httpx.Timeout(600, connect=10),
    )


def _snapshot_info(d: Mapping[str, Any]) -> SnapshotInfo:
    """The server's snapshot JSON (``SnapshotModel``: ``snapshot_id``, an RFC 3339
    ``created_at``) as the SDK's ``SnapshotInfo``, the same type as in-process.

    The API does not say the tenant (it is the key's) or the kind (it lists
    snapshots only): those are left empty and "snapshot"."""
    created = d.get("created_at", 0.0)
    if isinstance(created, str):
        created = datetime.strptime(created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        created = created.timestamp()
    return SnapshotInfo(
        id=str(d.get("snapshot_id") or d.get("id")),
        names=[str(n) for n in d.get("names") or []],
        kind=str(d.get("kind") or "snapshot"),
        tenant=str(d.get("tenant") or ""),
        sandbox_id=str(d.get("sandbox_id") or ""),
        tier=str(d.get("tier")),
        memory=bool(d.get("memory")),
        memory_refused=d.get("memory_refused"),
        size_bytes=int(d.get("size_bytes") or 0),
        created_at=float(created),
    )


class RemoteFiles:
    def __init__(self, sb: RemoteSandbox) -> None:
        self._sb = sb

    def _url(self, kind: str = "files") -> str:
        return f"/v1/sandboxes/{self._sb.id}/{kind}"

    def write(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        _raise(
            self._sb._client.put(
                self._url(),
                params={"path": path},
                content=raw,
                headers={"content-type": "application/octet-stream"},
            )
        )

    def read(self, path: str, max_bytes: int = DEFAULT_READ_MAX) -> bytes:
        r = self._sb._client.get(self._url(), params={"path": path})
        _raise(r)
        return r.content[:max_bytes]

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def list(self, path: str = "/workspace") -> list[FileEntry]:
        r = self._sb._client.get(self._url("dir"), params={"path": path})
        _raise(r)
        return [FileEntry(str(e["name"]), str(e["type"]), int(e["size"])) for e in r.json()]

    def make_dir(self, path: str) -> None:
        _raise(self._sb._client.post(self._url("dir"), params={"path": path}))

    def remove(self, path: str) -> None:
        _raise(self._sb._client.delete(self._url(), params={"path": path}))

    def exists(self, path: str) -> bool:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e.name == name for e in self.list(parent or "/"))
        except SandboxError:
            return False


class RemoteSandbox(Sandbox):
    """A sandbox in a ``glassroom serve``; created by ``Sandbox(..., url=...)``."""

    def __init__(
        self,
        policy: Policy | str | Path | Mapping[str, Any] | None = None,
        *,
        backend: str | None = None,
        audit_log: str | Path | None = None,
        url: str | None = None,
        api_key: str | None = None,
        template: str | None = None,
        timeout_s: float | None = None,
        network: object | None = None,
    ) -> None:
        if audit_log is not None or network is not None:
            raise SandboxError("audit_log= and network= are the server's business in remote mode")
        body: dict[str, Any] = {"template": template, "backend": backend, "timeout_s": timeout_s}
        if isinstance(policy, Policy):
            body["policy"] = policy.to_toml()
        elif isinstance(policy, Path):
            body["policy"] = policy.read_text()
        elif isinstance(policy, str):
            body["policy"] = (
                policy if ("\n" in policy or "=" in policy) else Path(policy).read_text()
            )
        elif isinstance(policy, Mapping):
            body["policy"] = dict(policy)
        self._create(_connect(url, api_key), body)

    def _create(self, http: httpx.Client, body: Mapping[str, Any]) -> None:
        """``POST /v1/sandboxes`` with ``body``; this object becomes that sandbox.

        The client is closed if the create fails: nothing else will use it."""
        r = http.post("/v1/sandboxes", json={k: v for k, v in body.items() if v is not None})
        try:
            _raise(r)
        except BaseException:
            http.close()
            raise
        self._adopt(http, r.json())

    def _adopt(self, http: httpx.Client, info: dict[str, Any]) -> None:
        self._http = http
        self._info: dict[str, Any] = info
        self._receipt: Receipt | None = None
        self.files = RemoteFiles(self)  # type: ignore[assignment]

    @classmethod
    def _from_info(cls, like: httpx.Client, info: dict[str, Any]) -> RemoteSandbox:
        """A sandbox the server made for us (a fork), with a client of its own:
        destroying one closes its client, never its parent's."""
        http = httpx.Client(base_url=like.base_url, headers=like.headers, timeout=like.timeout)
        sb = object.__new__(cls)
        sb._adopt(http, info)
        return sb

    @property
    def _client(self) -> httpx.Client:
        if self._receipt is not None:
            raise SandboxClosed(f"sandbox {self.id} has been destroyed")
        return self._http

    @property
    def id(self) -> str:
        return str(self._info["sandbox_id"])

    @property
    def backend(self) -> str:
        return str(self._info["backend"])

    @property
    def policy(self) -> Policy:
        raise SandboxError("the policy of a remote sandbox stays on the server")

    @property
    def walls(self) -> dict[str, Any]:
        return dict(self._info.get("walls", {}))

    def info(self) -> dict[str, Any]:
        r = self._client.get(f"/v1/sandboxes/{self.id}")
        _raise(r)
        self._info = r.json()
        return self._info

    @property
    def state(self) -> str:
        """``running``, ``paused`` or ``destroyed``, as the server sees it now
        (it may have reaped the sandbox at its deadline)."""
        if self._receipt is not None:
            return "destroyed"
        try:
            return str(self.info().get("state", "running"))
        except SandboxClosed:
            return "destroyed"

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    def pause(self, *, memory: bool = True) -> dict[str, Any]:
        """Pause on the server; ``memory=False`` keeps the files only (the
        processes end).  Returns the sandbox's info, ``state`` now ``paused``."""
        return self._post_info("pause", {"memory": memory})

    def resume(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Resume the paused sandbox (same id); ``timeout_s`` sets its new deadline."""
        body = {} if timeout_s is None else {"timeout_s": timeout_s}
        return self._post_info("resume", body)

    def _post_info(self, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self._client.post(f"/v1/sandboxes/{self.id}/{verb}", json=body)
        _raise(r)
        self._info = r.json()
        return dict(self._info)

    def snapshot(
        self, *, name: str | None = None, memory: bool | None = None, include_tmp: bool = False
    ) -> SnapshotInfo:
        """Save the sandbox in the server's store; it goes on running."""
        body = {"name": name, "memory": memory, "include_tmp": include_tmp}
        r = self._client.post(
            f"/v1/sandboxes/{self.id}/snapshots",
            json={k: v for k, v in body.items() if v is not None},
        )
        _raise(r)
        return _snapshot_info(r.json())

    def fork(self) -> RemoteSandbox:
        """A new, running sandbox from this one's state, with its own id and trail."""
        return self.forks(1)[0]

    def forks(self, count: int) -> list[RemoteSandbox]:
        """``count`` forks in one request: the server saves this sandbox once."""
        r = self._client.post(f"/v1/sandboxes/{self.id}/fork", json={"count": count})
        _raise(r)
        return [self._from_info(self._http, info) for info in r.json()]

    @classmethod
    def from_snapshot(
        cls,
        snapshot_id: str,
        *,
        store: SnapshotStore | None = None,
        tenant: str | None = None,
        audit_log: str | Path | None = None,
        network: object | None = None,
        backend: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = None,
    ) -> RemoteSandbox:
        """A new sandbox in the server at ``url`` from one of the key's tenant's
        snapshots (its files and its policy)."""
        if store is not None or audit_log is not None or network is not None:
            raise SandboxError(
                "store=, audit_log= and network= are the server's business in remote mode"
            )
        if tenant not in (None, "local"):
            raise SandboxError("tenant=: in remote mode the tenant is the API key's")
        sb = object.__new__(cls)
        body = {"snapshot": snapshot_id, "backend": backend, "timeout_s": timeout_s}
        sb._create(_connect(url, api_key), body)
        return sb

    @staticmethod
    def list_snapshots(  # type: ignore[override]
        *,
        url: str | None = None,
        api_key: str | None = None,
        sandbox_id: str | None = None,
        name: str | None = None,
    ) -> list[SnapshotInfo]:
        """The snapshots of the key's tenant in the server's store, optionally
        only those of ``sandbox_id`` or named ``name``."""
        params = {k: v for k, v in (("sandbox_id", sandbox_id), ("name", name)) if v is not None}
        with _connect(url, api_key) as http:
            r = http.get("/v1/snapshots", params=params)
            _raise(r)
            return [_snapshot_info(d) for d in r.json()]

    @staticmethod
    def get_snapshot(
        snapshot_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> SnapshotInfo:
        with _connect(url, api_key) as http:
            r = http.get(f"/v1/snapshots/{snapshot_id}")
            _raise(r)
            return _snapshot_info(r.json())

    @staticmethod
    def delete_snapshot(  # type: ignore[override]
        snapshot_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> bool:
        """Delete a snapshot from the server's store; False if it was not there."""
        with _connect(url, api_key) as http:
            r = http.delete(f"/v1/snapshots/{snapshot_id}")
            if r.status_code == 404:
                return False
            _raise(r)
            return True

    def set_timeout(self, timeout_s: float) -> None:
        _raise(self._client.post(f"/v1/sandboxes/{self.id}/timeout", json={"timeout_s": timeout_s}))

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        timeout_s: float | None = None,
    ) -> RunResult:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if not argv:
            raise SandboxError("run: empty command")
        body: dict[str, Any] = {
            "argv": argv,
            "cwd": cwd,
            "env": dict(env or {}),
            "timeout_s": timeout_s,
        }
        if stdin is not None:
            body["stdin"] = stdin.decode() if isinstance(stdin, bytes) else stdin
        r = self._client.post(
            f"/v1/sandboxes/{self.id}/commands",
            json={k: v for k, v in body.items() if v is not None},
        )
        _raise(r)
        d = r.json()
        return RunResult(
            exit_code=d["exit_code"],
            stdout=d["stdout"],
            stderr=d["stderr"],
            duration_ms=d["duration_ms"],
            truncated=d["truncated"],
            timed_out=d["timed_out"],
            signal=d.get("signal"),
            blocked=[Blocked(**b) for b in d.get("blocked", [])],
            stdout_bytes=d["stdout"].encode(),
            stderr_bytes=d["stderr"].encode(),
        )

    def spawn(self, *args: Any, **kw: Any) -> Any:
        raise SandboxError("spawn is in-process only; use the /commands/stream endpoint")

    def audit(self, blocked_only: bool = False) -> list[dict[str, Any]]:
        r = self._client.get(
            f"/v1/sandboxes/{self.id}/audit", params={"blocked_only": str(blocked_only).lower()}
        )
        _raise(r)
        out: list[dict[str, Any]] = r.json()
        return out

    def destroy(self) -> Receipt:
        if self._receipt is not None:
            return self._receipt
        r = self._client.delete(f"/v1/sandboxes/{self.id}")
        _raise(r)
        d = r.json()
        self._receipt = Receipt(d["sandbox_id"], d["removed"], d["leftovers"])
        self._http.close()
        return self._receipt

    close = destroy

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()
