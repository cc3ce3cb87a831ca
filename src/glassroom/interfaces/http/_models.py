"""The own API's data, defined once: the HTTP routes, the OpenAPI spec
(``docs/openapi.json``), the remote SDK and the MCP tools all use these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid")

MAX_TIMEOUT_S = 86400.0


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable: not_found, invalid, forbidden, limit, ...")
    message: str
    rule: str | None = Field(None, description="the policy or service rule that decided")


class ErrorResponse(BaseModel):
    error: ErrorBody


class CreateSandbox(BaseModel):
    model_config = _STRICT
    template: str | None = Field(
        None, max_length=200, description="a named template (default: the server's default)"
    )
    policy: str | dict[str, Any] | None = Field(
        None, description="a policy: TOML text or the same as a JSON object; overrides template"
    )
    backend: str | None = Field(None, max_length=50)
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=MAX_TIMEOUT_S,
        strict=True,  # a number: not true, not "10"
        allow_inf_nan=False,
        description="deadline from now; at most the policy's resources.max_runtime_s",
    )
    env: dict[str, str] = Field(default_factory=dict, description="added to every command")
    metadata: dict[str, str] = Field(default_factory=dict)


class SandboxInfo(BaseModel):
    sandbox_id: str
    tenant: str
    template: str | None
    backend: str
    tier: str
    state: Literal["running", "destroyed"]
    started_at: str = Field(description="RFC 3339 UTC")
    end_at: str = Field(description="RFC 3339 UTC: the deadline; the sandbox is reaped then")
    timeout_s: float = Field(description="seconds left until end_at")
    max_runtime_s: float
    metadata: dict[str, str]
    walls: dict[str, Any] = Field(default_factory=dict)


class SetTimeout(BaseModel):
    model_config = _STRICT
    timeout_s: float = Field(
        gt=0,
        le=MAX_TIMEOUT_S,
        strict=True,
        allow_inf_nan=False,
        description="new deadline, from now",
    )


class RunCommand(BaseModel):
    model_config = _STRICT
    argv: list[str] | None = Field(None, min_length=1, description="run this argv")
    command: str | None = Field(None, description="or run this through `sh -c`")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    stdin: str | None = None
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, strict=True, allow_inf_nan=False)


class BlockedAction(BaseModel):
    action: str
    target: str
    rule: str


class CommandResult(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    truncated: bool
    timed_out: bool
    signal: int | None = None
    blocked: list[BlockedAction] = Field(default_factory=list)


class FileEntryModel(BaseModel):
    name: str
    type: str
    size: int


class FileWritten(BaseModel):
    path: str
    size: int


class ReceiptModel(BaseModel):
    sandbox_id: str
    clean: bool
    removed: dict[str, Any]
    leftovers: dict[str, list[str]]


class AuditRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int
    ts: str
    sandbox: str
    event: str
    details: dict[str, Any]
    decision: str
    rule: str | None
    prev: str
    hash: str


class Approval(BaseModel):
    approval_id: str
    sandbox_id: str
    action: str
    target: str
    rule: str
    requested_at: str
    state: Literal["pending", "approved", "denied"]


class Decide(BaseModel):
    model_config = _STRICT
    decision: Literal["approve", "deny"]
    reason: str | None = Field(None, max_length=1000)


class Health(BaseModel):
    status: Literal["ok"]
    version: str
