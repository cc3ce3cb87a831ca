"""The own API's data, defined once: the HTTP routes, the OpenAPI spec
(``docs/openapi.json``), the remote SDK and the MCP tools all use these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid")

MAX_TIMEOUT_S = 86400.0

#: A number of seconds: a number (not true, not "10"), more than 0, at most
#: ``MAX_TIMEOUT_S``, finite.
Seconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, strict=True, allow_inf_nan=False)]


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
    timeout_s: Seconds | None = Field(
        None, description="deadline from now; at most the policy's resources.max_runtime_s"
    )
    env: dict[str, str] = Field(default_factory=dict, description="added to every command")
    metadata: dict[str, str] = Field(default_factory=dict)
    snapshot: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="make it from this snapshot (its files and policy); "
        "not with template or policy",
    )
    auto_pause: bool = Field(
        False, strict=True, description="at the deadline, pause instead of destroy"
    )
    auto_pause_memory: bool = Field(
        True, strict=True, description="with auto_pause: keep the memory where the tier can"
    )


class SandboxInfo(BaseModel):
    sandbox_id: str
    tenant: str
    template: str | None
    backend: str
    tier: str
    state: Literal["running", "paused", "destroyed"]
    started_at: str = Field(description="RFC 3339 UTC")
    end_at: str = Field(
        description="RFC 3339 UTC: the deadline; the sandbox is reaped then (paused: "
        "the end of the time it is kept paused)"
    )
    timeout_s: float = Field(description="seconds left until end_at")
    max_runtime_s: float = Field(description="of running time: paused time does not count")
    metadata: dict[str, str]
    walls: dict[str, Any] = Field(default_factory=dict)
    paused_at: str | None = Field(None, description="RFC 3339 UTC, while paused")
    pause: dict[str, Any] | None = Field(
        None, description="while paused: what the pause saved (tier, how, memory, bytes, ms)"
    )
    auto_pause: bool = Field(False, description="the deadline pauses it instead of destroying")
    parent: str | None = Field(None, description="the sandbox it was forked or snapshotted from")
    snapshot: str | None = Field(None, description="the snapshot it was made from")


class SetTimeout(BaseModel):
    model_config = _STRICT
    timeout_s: Seconds = Field(description="new deadline, from now")


class PauseSandbox(BaseModel):
    model_config = _STRICT
    memory: bool = Field(
        True,
        strict=True,
        description="keep the processes and memory where the tier can; false: the files only",
    )


class ResumeSandbox(BaseModel):
    model_config = _STRICT
    timeout_s: Seconds | None = Field(
        None, description="new deadline, from now (default: the time it had left when paused)"
    )


class CreateSnapshot(BaseModel):
    model_config = _STRICT
    name: str | None = Field(None, min_length=1, max_length=200)
    memory: bool | None = Field(
        None,
        strict=True,
        description="save the processes too (refused, rule snapshot.memory, where the tier "
        "cannot); default: the tier's best",
    )
    include_tmp: bool = Field(False, strict=True, description="also save /tmp")


class ForkSandbox(BaseModel):
    model_config = _STRICT
    count: int = Field(1, ge=1, le=20, strict=True, description="how many forks")
    timeout_s: Seconds | None = Field(
        None, description="each fork's deadline, from now (default: the server's)"
    )


class SnapshotModel(BaseModel):
    snapshot_id: str
    names: list[str]
    sandbox_id: str | None = Field(description="the sandbox it was taken from")
    tier: str
    memory: bool = Field(description="whether the processes and memory were saved")
    memory_refused: str | None = Field(None, description="why not, when they were not")
    size_bytes: int
    created_at: str = Field(description="RFC 3339 UTC")


class RunCommand(BaseModel):
    model_config = _STRICT
    argv: list[str] | None = Field(None, min_length=1, description="run this argv")
    command: str | None = Field(None, description="or run this through `sh -c`")
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    stdin: str | None = None
    timeout_s: Seconds | None = None


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
    expires_at: str | None = Field(None, description="RFC 3339 UTC: when an unanswered hold ends")


class PolicyView(BaseModel):
    sandbox_id: str
    written: str = Field(description="the policy as TOML, as the sandbox was created with it")
    walls: dict[str, Any] = Field(description="the policy compiled to the tier's walls")


class Usage(BaseModel):
    sandbox_id: str
    cpu_usec: int | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    disk_used: int | None = None
    disk_total: int | None = None


class AuditVerify(BaseModel):
    ok: bool
    records: int
    problems: list[str]
    last_seq: int | None = None
    anchor: str | None = Field(None, description="one line about the anchor, for display")


class Decide(BaseModel):
    model_config = _STRICT
    decision: Literal["approve", "deny"]
    reason: str | None = Field(None, max_length=1000)


class Health(BaseModel):
    status: Literal["ok"]
    version: str
