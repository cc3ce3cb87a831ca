"""One exception tree for everything glassroom raises.

Callers catch :class:`GlassroomError` to handle any glassroom failure, or a
subclass to handle one kind.  Lower layers (``_sys``, ``plan``, ``audit``)
translate OS errors into this tree at their boundary, so nothing above them
has to interpret raw ``OSError`` values::

    GlassroomError
    ├── PolicyError              the policy file or object is invalid (field path, line)
    ├── PlanError                a backend cannot enforce a rule of the policy (names the rule)
    ├── WallError                a wall could not be built at start (names the wall); exit 125
    │   └── BackendUnavailable   the backend or a tool it needs is missing on this host
    ├── CredentialError          a credential could not be issued, injected or verified
    ├── TemplateError            a template could not be imported, built, found or verified
    ├── SandboxError             misuse or failure of a running sandbox
    │   ├── SandboxClosed        the sandbox was destroyed or hit its deadline
    │   ├── SandboxPathError     a path outside the sandbox's view
    │   └── CommandError         a command could not be started (not found, not allowed)
    └── AuditError               the audit log cannot be written or read
        └── AuditIntegrityError  verification found a changed/missing/inserted/reordered record

``exit_code`` is what the CLI exits with: glassroom's own refusals use 125 so
they can never be mistaken for the command's status.
"""

from __future__ import annotations

REFUSED_EXIT = 125


class GlassroomError(Exception):
    """Base of every error glassroom raises."""

    exit_code: int = REFUSED_EXIT

    def __init__(self, message: str, *, rule: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The policy rule or wall this error is about, when there is one.
        self.rule = rule

    def __str__(self) -> str:
        return self.message


class PolicyError(GlassroomError):
    """Invalid policy: malformed TOML, unknown field, wrong type or dangerous rule."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        where = source or "policy"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: " + (f"{field}: " if field else "")
        super().__init__(prefix + message, rule=field)
        self.field = field
        self.line = line
        self.source = source


class PlanError(GlassroomError):
    """The chosen backend cannot enforce a rule of the policy."""


class WallError(GlassroomError):
    """A wall (namespace, seccomp, Landlock, cgroup, ...) could not be built."""


class BackendUnavailable(WallError):
    """The backend, or a host feature it needs, is not available here."""


class CredentialError(GlassroomError):
    """A credential could not be issued or injected (the sandbox does not start),
    or a broker token failed verification."""


class TemplateError(GlassroomError):
    """A template could not be imported, built, found or verified (names the entry)."""


class SandboxError(GlassroomError):
    """Misuse or failure of a running sandbox."""


class SandboxClosed(SandboxError):
    """The sandbox is destroyed, or was killed at its deadline."""


class SandboxPathError(SandboxError):
    """A file operation named a path outside what the sandbox can see."""


class CommandError(SandboxError):
    """A command could not be started inside the sandbox."""


class SnapshotError(SandboxError):
    """A pause, resume, snapshot or fork could not be done (the rule names why:
    ``snapshot.memory`` for a tier that cannot save processes, ``snapshot.limit``
    for a tenant's size, count or age limit, ``snapshot.state`` for a sandbox in
    the wrong state)."""


class SnapshotIntegrityError(SnapshotError):
    """A stored snapshot or paused image does not match what was saved: it is
    refused, never restored."""


class AuditError(GlassroomError):
    """The audit log could not be written or read."""


class AuditIntegrityError(AuditError):
    """Verification found the log was changed; ``problems`` lists each finding."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems
