"""One wording, and one rule, for what the agent refuses, on every tier.

The three tiers' agents answer a refused path or exec with the same errno;
the user must read the same message, and the audit log must name the same
rule, whichever tier ran it.
"""

from __future__ import annotations

import errno
import os

from .._errors import SandboxError, SandboxPathError

#: Why a file op's errno means the policy (or the sandbox's view) said no.
_PATH_WHYS = {
    errno.EACCES: "outside the sandbox's view or not allowed by the policy",
    errno.EPERM: "not allowed by the policy",
    errno.ENOENT: "no such file in the sandbox",
    errno.EROFS: "read-only in the sandbox",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EXDEV: "crosses a mount the policy keeps apart",
}
_WRITES = ("write", "mkdir", "remove")


def path_error(kind: str, path: str, err: int, text: str | None = None) -> SandboxError:
    """A file op ``kind`` on ``path`` failed with ``err`` in the sandbox.

    ``text`` is the agent's own wording of an errno outside the policy's set
    (else the host's ``strerror``).  The error carries ``errno``."""
    name = errno.errorcode.get(err, str(err))
    if err in _PATH_WHYS:
        exc: SandboxError = SandboxPathError(
            f"{kind} {path}: {_PATH_WHYS[err]} ({name})",
            rule="filesystem.write" if kind in _WRITES else "filesystem.read",
        )
    else:
        if text is None:
            text = os.strerror(err) if 0 < err < 200 else str(err)
        exc = SandboxError(f"{kind} {path}: {text} ({name})")
    exc.errno = err  # type: ignore[attr-defined]
    return exc


def exec_message(argv0: str, err: int, text: str) -> str:
    """The stderr line of a command that never started (its exit is 127)."""
    if err == errno.EACCES:
        return f"glassroom: {argv0}: exec denied by the policy (tools.allow)\n"
    if err == errno.ENOENT:
        return f"glassroom: {argv0}: command not found\n"
    return f"glassroom: {argv0}: {text}\n"
