"""glassroom: run an AI agent's code in a disposable, policy-first, audited sandbox.

The public surface is exactly ``__all__`` (pinned by tests/unit/test_public_api.py).
"""

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
from ._sandbox import Files, RunResult, Sandbox, SandboxPool
from .backends.base import FileEntry, Receipt
from .lifecycle.snapshots import SnapshotInfo, SnapshotLimits, SnapshotStore
from .lifecycle.supervisor import Blocked
from .policy import Policy, default_policy, load_policy, parse_policy

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
