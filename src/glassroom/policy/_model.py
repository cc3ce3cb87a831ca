"""Pydantic models of a policy: the one validated, immutable form of it.

Every section and field has a default (see ``_defaults``), so an empty file is
the default policy.  Unknown keys are refused rather than ignored: a typo such
as ``raed`` must not silently drop a rule.  Numbers are strict (no ``"2"`` or
``true`` for a count) because a policy is a security document.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from glassroom.policy import _defaults as d
from glassroom.policy import _network, _paths
from glassroom.policy._credentials import CredentialPolicy

#: Error type of every glassroom-specific refusal; ``ctx["at"]`` (a loc suffix)
#: points a cross-field error at the offending list item.
ERROR_TYPE = "glassroom_policy"


def refuse(reason: str, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error whose message is exactly ``reason``."""
    return PydanticCustomError(ERROR_TYPE, "{reason}", {"reason": reason, "at": at})


def _checked(check: Callable[[str], str | None]) -> AfterValidator:
    def validate(value: str) -> str:
        problem = check(value)
        if problem:
            raise refuse(problem)
        return value

    return AfterValidator(validate)


ReadPath = Annotated[str, _checked(_paths.read_problem)]
WritePath = Annotated[str, _checked(_paths.write_problem)]
UnprotectPath = Annotated[str, _checked(_paths.syntax_problem)]
ToolName = Annotated[str, _checked(_paths.tool_problem)]
NetworkEntry = Annotated[str, _checked(_network.entry_problem)]
RuleHost = Annotated[str, _checked(_network.rule_host_problem)]
HttpMethod = Annotated[str, _checked(_network.method_problem)]
PathPattern = Annotated[str, _checked(_network.path_problem)]


def _no_duplicates(values: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            raise refuse(f"{value!r} is listed twice (first at [{seen[value]}])", (i,))
        seen[value] = i
    return values


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)


class FilesystemPolicy(_Section):
    """Host paths the sandbox sees; everything else is absent."""

    read: list[ReadPath] = Field(default_factory=lambda: list(d.DEFAULT_READ))
    write: list[WritePath] = Field(default_factory=lambda: list(d.DEFAULT_WRITE))
    #: Paths beneath a ``write`` dir where the protected names (``policy._protected``:
    #: git hooks and config, shell rc files, direnv, editor, CI and agent config) may
    #: be changed after all; each one is named in the audit log.  Empty: all protected.
    unprotect: list[UnprotectPath] = Field(default_factory=list)

    _unique = field_validator("read", "write", "unprotect")(_no_duplicates)

    @model_validator(mode="after")
    def _disjoint(self) -> FilesystemPolicy:
        read = set(self.read)
        for i, path in enumerate(self.write):
            if path in read:
                raise refuse(f"{path!r} is listed in both read and write", ("write", i))
        # Each writable dir is served by a write gate of its own, which keeps a
        # table of the tree's names; two gates over one tree (a dir and a
        # symlink into it, or a dir and its subdir) would each miss the other's
        # renames.  Resolved on this host, as the binds will be.
        real = [os.path.realpath(w) for w in self.write]
        for i, path in enumerate(self.write):
            for j, other in enumerate(self.write):
                if i != j and _paths.is_within(real[i], real[j]):
                    raise refuse(f"{path!r} overlaps filesystem.write {other!r} (as "
                                 f"{real[i]!r} within {real[j]!r}): list one dir per tree",
                                 ("write", i))  # fmt: skip
        for i, path in enumerate(self.unprotect):
            if not any(_paths.is_within(path, w) for w in self.write):
                why = "only a writable dir has protected names"
                raise refuse(f"{path!r} is not beneath any filesystem.write path: {why}",
                             ("unprotect", i))  # fmt: skip
        return self


class ToolsPolicy(_Section):
    """The only executables that may run."""

    allow: list[ToolName] = Field(default_factory=lambda: list(d.DEFAULT_TOOLS))

    _unique = field_validator("allow")(_no_duplicates)


class NetworkRule(_Section):
    """A finer HTTP rule for one host: only these methods and paths (empty: any)."""

    host: RuleHost
    methods: list[HttpMethod] = Field(default_factory=list)
    paths: list[PathPattern] = Field(default_factory=list)
    inspect_tls: bool = Field(default=False, strict=True)

    _unique = field_validator("methods", "paths")(_no_duplicates)


class NetworkPolicy(_Section):
    """Hosts the sandbox may reach through the egress proxy (see docs/network.md).

    ``allow`` and ``ask`` both empty: no network at all (no proxy either).
    """

    mode: Literal["proxy", "none"] = "proxy"
    allow: list[NetworkEntry] = Field(default_factory=lambda: list(d.DEFAULT_NETWORK_ALLOW))
    deny: list[NetworkEntry] = Field(default_factory=list)
    ask: list[NetworkEntry] = Field(default_factory=list)
    ask_timeout_s: float = Field(default=60.0, gt=0, le=3600, strict=True)
    rules: list[NetworkRule] = Field(default_factory=list)

    _unique = field_validator("allow", "deny", "ask")(_no_duplicates)

    @model_validator(mode="after")
    def _consistent(self) -> NetworkPolicy:
        if self.mode == "none":
            for name in ("allow", "ask", "rules"):
                if getattr(self, name):
                    raise refuse(
                        f"mode 'none' means no network at all; {name} must be empty", (name, 0)
                    )
        for name in ("allow", "ask"):
            for i, entry in enumerate(getattr(self, name)):
                if _network.parse_entry(entry).kind == "cidr":
                    raise refuse(
                        f"{entry!r}: a CIDR block may only be denied; allow or ask for "
                        "single addresses",
                        (name, i),
                    )
        admitted = [_network.parse_entry(e) for e in (*self.allow, *self.ask)]
        for i, rule in enumerate(self.rules):
            if not _network.rule_covered(_network.parse_entry(rule.host), admitted):
                raise refuse(
                    f"{rule.host!r} is not admitted by allow or ask: a rule only narrows them",
                    ("rules", i, "host"),
                )
        return self


class ResourcesPolicy(_Section):
    """Caps that keep one run from exhausting the host."""

    cpus: float = Field(default=d.CPUS, gt=0, le=64, strict=True)
    memory_mib: int = Field(default=d.MEMORY_MIB, ge=16, le=1024 * 1024, strict=True)
    pids: int = Field(default=d.PIDS, ge=4, le=32768, strict=True)
    disk_mib: int = Field(default=d.DISK_MIB, ge=1, le=1024 * 1024, strict=True)
    max_runtime_s: float = Field(default=d.MAX_RUNTIME_S, gt=0, le=86400, strict=True)
    max_output_bytes: int = Field(
        default=d.MAX_OUTPUT_BYTES, ge=1024, le=1024 * 1024 * 1024, strict=True
    )


class AuditPolicy(_Section):
    """How much of what happens inside the sandbox the audit log sees (docs/audit.md).

    ``actions``: what the supervisor does and sees (commands, files moved in
    and out, network, denials it can attribute).  ``files``: also every file
    access attempt and every exec inside, each with its result.
    ``syscalls``: also the metadata calls (stat, access, readlink, chdir, ...).
    """

    level: d.AuditLevel = d.DEFAULT_AUDIT_LEVEL


class Policy(_Section):
    """A whole, validated policy; build it with ``parse_policy``/``load_policy``."""

    risk: d.Risk = d.DEFAULT_RISK
    #: A template from the template store (docs/templates.md): the sandbox's
    #: read-only ``/``.  None: the host's /usr and the paths filesystem.read lists.
    template: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    filesystem: FilesystemPolicy = Field(default_factory=FilesystemPolicy)
    tools: ToolsPolicy = Field(default_factory=ToolsPolicy)
    network: NetworkPolicy = Field(default_factory=NetworkPolicy)
    resources: ResourcesPolicy = Field(default_factory=ResourcesPolicy)
    #: Credentials handed to the task at runtime.  Empty: none at all.
    credentials: list[CredentialPolicy] = Field(default_factory=list)
    audit: AuditPolicy = Field(default_factory=AuditPolicy)

    @model_validator(mode="after")
    def _credentials_fit(self) -> Policy:
        seen: dict[str, int] = {}
        for i, cred in enumerate(self.credentials):
            if cred.name in seen:
                raise refuse(
                    f"credential name {cred.name!r} is used twice "
                    f"(first at credentials[{seen[cred.name]}])",
                    ("credentials", i, "name"),
                )
            seen[cred.name] = i
            if cred.var is not None:
                prior = seen.get("$" + cred.var)
                if prior is not None:
                    raise refuse(
                        f"credentials[{prior}] and credentials[{i}] both go in "
                        f"${cred.var}: one variable holds one credential",
                        ("credentials", i, "env"),
                    )
                seen["$" + cred.var] = i
            if cred.ttl_s is not None and cred.ttl_s > self.resources.max_runtime_s:
                raise refuse(
                    f"ttl_s {cred.ttl_s:g} is longer than resources.max_runtime_s "
                    f"{self.resources.max_runtime_s:g}: a credential must not outlive its task",
                    ("credentials", i, "ttl_s"),
                )
        return self

    @model_validator(mode="after")
    def _air_gap(self) -> Policy:
        if self.risk == "maximum" and (self.network.allow or self.network.ask):
            raise refuse(
                "risk 'maximum' is air-gapped: no network, no proxy; allow must be empty",
                ("network", "allow", 0) if self.network.allow else ("network", "ask", 0),
            )
        return self

    @model_validator(mode="after")
    def _tools_not_writable(self) -> Policy:
        for i, tool in enumerate(self.tools.allow):
            for j, path in enumerate(self.filesystem.write):
                if tool.startswith("/") and _paths.is_within(tool, path):
                    raise refuse(
                        f"{tool!r} is beneath filesystem.write[{j}] {path!r}: "
                        "the sandbox could replace it with anything",
                        ("tools", "allow", i),
                    )
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON form: names this exact policy in audit records."""
        text = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_toml(self) -> str:
        """The policy as a complete TOML file (every field explicit)."""
        out = [f"risk = {_toml_value(self.risk)}"]
        if self.template is not None:
            out.append(f"template = {_toml_value(self.template)}")
        for name in ("filesystem", "tools", "network", "resources", "audit"):
            section: BaseModel = getattr(self, name)
            out.append(f"\n[{name}]")
            data = section.model_dump()
            tables = data.pop("rules", []) if name == "network" else []
            out.extend(f"{k} = {_toml_value(v)}" for k, v in data.items())
            for table in tables:
                out.append(f"\n[[{name}.rules]]")
                out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        for cred in self.credentials:
            out.append("\n[[credentials]]")
            out.extend(
                f"{k} = {_toml_value(v)}" for k, v in cred.model_dump().items() if v is not None
            )
        return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        items = [_toml_value(v) for v in value]
        flat = "[" + ", ".join(items) + "]"
        if len(flat) <= 80:
            return flat
        return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string; control characters are escaped (TOML forbids them raw)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
