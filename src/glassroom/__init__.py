"""glassroom: run an AI agent's code in a disposable, policy-first, audited sandbox.

The public surface is exactly ``__all__`` (pinned by tests/unit/test_public_api.py).
"""

from typing import TYPE_CHECKING

from ._errors import (
    AuditError,
    AuditIntegrityError,
    BackendUnavailable,
    CommandError,
    CredentialError,
    GlassroomError,
    PlanError,
    PolicyError,
    SandboxClosed,
    SandboxError,
    SandboxPathError,
    SnapshotError,
    SnapshotIntegrityError,
    TemplateError,
    WallError,
)
from ._lazy import exports

if TYPE_CHECKING:
    from ._sandbox import Files, RunResult, Sandbox, SandboxPool
    from .backends.base import FileEntry, Receipt
    from .lifecycle.snapshots import SnapshotInfo, SnapshotLimits, SnapshotStore
    from .lifecycle.supervisor import Blocked
    from .policy import Policy, default_policy, load_policy, parse_policy

# Imported on first use (see _lazy.py): the CLI and the in-sandbox helpers
# should not pay for pydantic and the proxy before they need them.
__getattr__, __dir__ = exports(__name__, {
    **dict.fromkeys(("Files", "RunResult", "Sandbox", "SandboxPool"), "._sandbox"),
    **dict.fromkeys(("FileEntry", "Receipt"), ".backends.base"),
    **dict.fromkeys(("SnapshotInfo", "SnapshotLimits", "SnapshotStore"), ".lifecycle.snapshots"),
    "Blocked": ".lifecycle.supervisor",
    **dict.fromkeys(("Policy", "default_policy", "load_policy", "parse_policy"), ".policy"),
})  # fmt: skip

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "AuditIntegrityError",
    "BackendUnavailable",
    "Blocked",
    "CommandError",
    "CredentialError",
    "FileEntry",
    "Files",
    "GlassroomError",
    "PlanError",
    "Policy",
    "PolicyError",
    "Receipt",
    "RunResult",
    "Sandbox",
    "SandboxClosed",
    "SandboxError",
    "SandboxPathError",
    "SandboxPool",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotIntegrityError",
    "SnapshotLimits",
    "SnapshotStore",
    "TemplateError",
    "WallError",
    "__version__",
    "default_policy",
    "load_policy",
    "parse_policy",
]
