"""The SDK's remote mode: ``Sandbox(policy, url=..., api_key=...)``.

Same API as the in-process :class:`Sandbox`, spoken over ``glassroom
serve``'s own API (``/v1``) with httpx.  Server errors come back as the same
exception tree: a 404 is ``SandboxClosed`` (or ``SandboxPathError`` for a
path), 403 ``SandboxPathError``, other 4xx ``SandboxError``/``PolicyError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ._errors import PolicyError, SandboxClosed, SandboxError, SandboxPathError
from ._sandbox import DEFAULT_READ_MAX, RunResult, Sandbox
from .backends.base import FileEntry, Receipt
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
    if r.status_code == 403 or (r.status_code == 404 and rule and rule.startswith("filesystem")):
        raise SandboxPathError(msg, rule=rule)
    if r.status_code == 404:
        raise SandboxClosed(msg, rule=rule)
    raise SandboxError(f"{msg} (HTTP {r.status_code})", rule=rule)


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
        key = api_key or os.environ.get("GLASSROOM_API_KEY")
        if not url or not key:
            raise SandboxError("remote mode needs url= and api_key= (or $GLASSROOM_API_KEY)")
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"X-API-Key": key},
            timeout=httpx.Timeout(600, connect=10),
        )
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
        r = self._http.post("/v1/sandboxes", json={k: v for k, v in body.items() if v is not None})
        try:
            _raise(r)
        except BaseException:
            self._http.close()
            raise
        self._info: dict[str, Any] = r.json()
        self._receipt: Receipt | None = None
        self.files = RemoteFiles(self)  # type: ignore[assignment]

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
