"""``glassroom serve`` settings: flags, or a TOML file.

```toml
host = "127.0.0.1"
port = 8049
data_dir = "/var/lib/glassroom/serve"      # its audit.jsonl; default: beside the audit log
max_request_bytes = 16777216
default_timeout_s = 300                     # a sandbox's deadline unless the client says
shutdown_timeout_s = 10                     # SIGTERM: stopped, sandboxes gone, within this
max_sandboxes_per_session = 10              # glassroom mcp: one MCP session's share
max_handle_sandboxes = 20                   # glassroom mcp: session-less (handle) share per tenant
[tenants.alice]
max_sandboxes = 20
api_keys_sha256 = ["<sha256 hex of the key>"]   # keys are never stored in clear
[templates.data-job]
policy = "/etc/glassroom/data-job.toml"     # a template is a named policy
[snapshots]                                 # per tenant (docs/snapshots.md)
max_count = 20
max_bytes = 8589934592
max_age_s = 604800                          # also how long a paused sandbox is kept
[e2b]
template_build_network = ["pypi.org"]      # what RUN steps of E2B template builds reach
```

A key is any string of at least 16 characters; ``glassroom serve --new-key
TENANT`` prints one in E2B's format (``e2b_`` + 40 hex) with the line to
add to the config.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..._config import audit_log_path
from ..._errors import GlassroomError, PolicyError
from ...lifecycle.snapshots import SnapshotLimits
from ...policy import Policy, default_policy, load_policy, validate_policy

DEFAULT_PORT = 8049
#: The sandbox's hard wall-clock cap in the built-in templates (the E2B default
#: timeout is 300 s; ``set_timeout`` may extend up to this).
TEMPLATE_MAX_RUNTIME_S = 3600.0
#: How long ``glassroom serve`` may take to stop (docs/service.md, "Stopping").
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
#: ``glassroom mcp``: how many live sandboxes one MCP session may hold, and how
#: many the session-less (2026-07-28 handle) clients of one tenant may hold
#: together (docs/service.md, "MCP: authentication and caps").
DEFAULT_MAX_SANDBOXES_PER_SESSION = 10
DEFAULT_MAX_HANDLE_SANDBOXES = 20
MAX_MCP_CAP = 1000
#: ``[snapshots]``: each key and the largest value it may take (a bound no
#: host could mean is a typo, not a limit).
SNAPSHOT_LIMIT_KEYS = {"max_count": 100_000, "max_bytes": 1 << 50, "max_age_s": 10 * 365 * 86400}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A key in E2B's format, so the unmodified E2B SDKs accept it."""
    return "e2b_" + secrets.token_hex(20)


@dataclass
class Tenant:
    name: str
    max_sandboxes: int = 20


#: git's helpers the built-in ``base`` template allows with git (host paths).
GIT_HELPERS = ("/usr/lib/git-core/git", "/usr/lib/git-core/git-daemon")


#: The store template serve's ``code-interpreter-v1`` runs in, when the store has it.
CODE_INTERPRETER_TEMPLATE = "code-interpreter"


def _store_has(name: str) -> bool:
    from ...templates import TemplateStore

    try:
        TemplateStore().get(name)
    except GlassroomError:
        return False
    return True


def builtin_templates() -> dict[str, Policy]:
    """``base`` and ``code-interpreter-v1`` (E2B's names): the default policy
    (bash, coreutils, python3; no network), with the cap E2B's timeouts need."""
    base = default_policy().model_dump()
    base["resources"]["max_runtime_s"] = TEMPLATE_MAX_RUNTIME_S
    # E2B's base image has ncurses: a terminal (``sandbox.pty``) asks ``tput``
    # for its size.  Read-only, like every tool; terminfo is under /usr.
    base["tools"]["allow"].append("tput")
    # E2B's base image has tar and base64, and clients archive the workspace
    # with them: the openai-agents E2B session saves it at the end of every run
    # as ``tar -C /workspace -cf - . | base64 -w0`` and restores it with
    # ``tar -xf`` (tests/clients/test_openai_agents.py).  Both are in the
    # microvm guest image (coreutils, tar).
    base["tools"]["allow"] += ["tar", "base64"]
    if shutil.which("git", path="/usr/bin:/bin"):
        # E2B's base template has git, and clients use it (its SDK's git API).
        # The host's own, read-only like the rest of /usr (and in the microvm
        # guest image); where it is absent the template is the default policy,
        # not a template that fails.  With its helpers: git runs its own copy
        # in git-core for subcommands (clone starts upload-pack), and E2B's
        # tests serve a repository with git daemon (loopback in the sandbox).
        base["tools"]["allow"].append("git")
        base["tools"]["allow"] += [p for p in GIT_HELPERS if os.access(p, os.X_OK)]
    ci = default_policy().model_dump()
    if _store_has(CODE_INTERPRETER_TEMPLATE):
        # numpy, pandas, matplotlib and Pillow, as E2B's code interpreter has
        # them (clients such as smolagents' E2B executor import them): the
        # built-in Debian template, where `glassroom template builtin` made it.
        # Without it the tier's own python3 runs, with its standard library only.
        ci["template"] = CODE_INTERPRETER_TEMPLATE
    ci["resources"]["max_runtime_s"] = TEMPLATE_MAX_RUNTIME_S
    ci["resources"]["max_output_bytes"] = 64 << 20  # the kernel is long-lived
    ci["resources"]["memory_mib"] = 1024
    return {"base": validate_policy(base), "code-interpreter-v1": validate_policy(ci)}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: Path(audit_log_path()).parent / "serve")
    max_request_bytes: int = 16 << 20
    default_timeout_s: float = 300.0
    #: The bound on stopping (SIGTERM/SIGINT): streams end, every sandbox is
    #: destroyed and the process exits within this many seconds.
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    #: ``glassroom mcp`` only: one client must not take the whole tenant's share.
    max_sandboxes_per_session: int = DEFAULT_MAX_SANDBOXES_PER_SESSION
    max_handle_sandboxes: int = DEFAULT_MAX_HANDLE_SANDBOXES
    #: sha256(key) -> tenant name
    key_hashes: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, Tenant] = field(default_factory=dict)
    templates: dict[str, Policy] = field(default_factory=builtin_templates)
    default_template: str = "base"
    #: ``[e2b] template_build_network``: what the RUN steps of E2B's template
    #: build API may reach ([network] entries; e.g. the package registries).
    template_build_network: list[str] = field(default_factory=list)
    #: ``[snapshots]``: the per-tenant limits of the snapshot store.
    snapshot_limits: SnapshotLimits = field(default_factory=SnapshotLimits)

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def audit_log(self) -> Path:
        return self.data_dir / "audit.jsonl"

    def add_key(self, tenant: str, key: str, *, max_sandboxes: int | None = None) -> None:
        t = self.tenants.setdefault(tenant, Tenant(tenant))
        if max_sandboxes is not None:
            t.max_sandboxes = max_sandboxes
        self.key_hashes[hash_key(key)] = tenant

    def tenant_for(self, key: str | None) -> Tenant | None:
        if not key:
            return None
        digest = hash_key(key)
        found: str | None = None
        # Every hash is compared, even after a match: the time taken must not
        # depend on which (or whether any) configured key matched.
        for known, tenant in self.key_hashes.items():
            if hmac.compare_digest(known, digest) and found is None:
                found = tenant
        return None if found is None else self.tenants.get(found)

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        p = Path(path)
        try:
            raw: dict[str, Any] = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"cannot read serve config: {exc}", source=str(p)) from None
        cfg = cls()
        for key in ("host", "default_template"):
            if key in raw:
                setattr(cfg, key, str(raw[key]))
        for key in ("port", "max_request_bytes"):
            if key in raw:
                setattr(cfg, key, int(raw[key]))
        if "default_timeout_s" in raw:
            cfg.default_timeout_s = float(raw["default_timeout_s"])
        if "shutdown_timeout_s" in raw:
            cfg.shutdown_timeout_s = _shutdown_bound(raw["shutdown_timeout_s"], p)
        for key in ("max_sandboxes_per_session", "max_handle_sandboxes"):
            if key in raw:
                setattr(cfg, key, check_mcp_cap(raw[key], key, str(p)))
        if "data_dir" in raw:
            cfg.data_dir = Path(raw["data_dir"])
        for name, t in dict(raw.get("tenants", {})).items():
            cfg.tenants[name] = Tenant(name, int(t.get("max_sandboxes", 20)))
            for h in t.get("api_keys_sha256", []):
                cfg.key_hashes[str(h).lower()] = name
        for name, t in dict(raw.get("templates", {})).items():
            src = t.get("policy")
            if not isinstance(src, str):
                raise PolicyError(
                    "a policy file path is required",
                    source=str(p),
                    field=f"templates.{name}.policy",
                )
            cfg.templates[name] = load_policy(src if Path(src).is_absolute() else p.parent / src)
        if "snapshots" in raw:
            cfg.snapshot_limits = snapshot_limits(raw["snapshots"], str(p))
        if "e2b" in raw:
            cfg.template_build_network = _build_network(raw["e2b"], str(p))
        return cfg


def _build_network(table: Any, source: str) -> list[str]:
    """``[e2b]``: its one key, a list of [network] entries, each checked."""
    from ...policy import validate_policy

    if not isinstance(table, dict) or set(table) - {"template_build_network"}:
        raise PolicyError("must be a table with only template_build_network", source=source,
                          field="e2b")  # fmt: skip
    net = table.get("template_build_network", [])
    if not isinstance(net, list) or not all(isinstance(x, str) for x in net):
        raise PolicyError("a list of [network] entries", source=source,
                          field="e2b.template_build_network")  # fmt: skip
    try:
        validate_policy({"network": {"allow": net}})
    except PolicyError as exc:
        raise PolicyError(str(exc), source=source, field="e2b.template_build_network") from None
    return list(net)


def snapshot_limits(table: Any, source: str = "serve config") -> SnapshotLimits:
    """The ``[snapshots]`` table as :class:`SnapshotLimits`.  An unknown key is
    refused, naming it: a misspelt ``max_age`` would silently keep the default, and
    a limit the operator believes is set but is not is worse than none."""
    if not isinstance(table, dict):
        raise PolicyError("must be a table", source=source, field="snapshots")
    unknown = sorted(set(table) - set(SNAPSHOT_LIMIT_KEYS))
    if unknown:
        raise PolicyError(
            f"unknown key {unknown[0]!r} (known: {', '.join(SNAPSHOT_LIMIT_KEYS)})",
            source=source,
            field=f"snapshots.{unknown[0]}",
        )
    got: dict[str, Any] = {}
    for key, top in SNAPSHOT_LIMIT_KEYS.items():
        if key in table:
            got[key] = _limit(table[key], key, top, source)
    return SnapshotLimits(**got)


def _limit(value: Any, key: str, top: int, source: str) -> int | float:
    """A limit from 1 to ``top``: a whole number, or (only ``max_age_s``) a finite
    number of seconds.  ``true``, a string, 0 or NaN would mean "none" or "never"."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key != "max_age_s" and not isinstance(value, int):
        number = False
    if not number or not (math.isfinite(value) and 1 <= value <= top):
        what = "a number of seconds" if key == "max_age_s" else "a whole number"
        raise PolicyError(
            f"must be {what} from 1 to {top}, not {value!r}",
            source=source,
            field=f"snapshots.{key}",
        )
    out: int | float = value
    return out


def _shutdown_bound(value: Any, source: Path) -> float:
    """A finite bound of 1..300 s: a NaN or huge value would make "stop within" mean never."""
    try:
        bound = float(value)
    except (TypeError, ValueError):
        bound = float("nan")
    if not math.isfinite(bound) or not 1.0 <= bound <= 300.0:
        raise PolicyError(
            f"shutdown_timeout_s must be a number of seconds from 1 to 300, not {value!r}",
            source=str(source),
            field="shutdown_timeout_s",
        )
    return bound


def check_mcp_cap(value: Any, name: str, source: str = "serve config") -> int:
    """A whole number of sandboxes from 1 to :data:`MAX_MCP_CAP`.

    Refused otherwise (0, negative, a float, ``true``, a string): a cap that
    silently meant "none" or "unbounded" would undo what it is for.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MCP_CAP:
        raise PolicyError(
            f"{name} must be a whole number of sandboxes from 1 to {MAX_MCP_CAP}, not {value!r}",
            source=source,
            field=name,
        )
    return value
