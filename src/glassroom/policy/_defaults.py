"""The built-in default policy: the strictest policy that is still useful.

An empty policy file means exactly these values, so they are kept here as
plain constants that the models, the docs and the tests all read.
"""

from __future__ import annotations

from typing import Final, Literal

Risk = Literal["low", "medium", "high", "maximum"]

DEFAULT_RISK: Final[Risk] = "low"

AuditLevel = Literal["actions", "files", "syscalls"]
#: What the supervisor does and sees; ``files`` adds every access inside (docs/audit.md).
DEFAULT_AUDIT_LEVEL: Final[AuditLevel] = "actions"

#: Programs and libraries, the alternatives symlinks they go through, and TLS roots.
#: Kept fixed (not filtered by what exists here) so a policy means the same on every
#: host; compiling the policy deals with paths this host lacks.
DEFAULT_READ: Final = ("/usr", "/etc/alternatives", "/etc/ssl/certs")
#: Nothing of the host is writable; /workspace and /tmp always are.
DEFAULT_WRITE: Final[tuple[str, ...]] = ()
#: No network at all.
DEFAULT_NETWORK_ALLOW: Final[tuple[str, ...]] = ()

DEFAULT_TOOLS: Final = (
    # shells and the interpreter most agent code is written for
    "sh", "bash", "python3", "env",
    # coreutils: files and directories
    "ls", "cat", "cp", "mv", "rm", "mkdir", "rmdir", "touch", "ln", "stat", "chmod",
    "readlink", "realpath", "basename", "dirname", "pwd", "mktemp", "du", "df",
    # coreutils: text
    "echo", "printf", "head", "tail", "wc", "sort", "uniq", "cut", "tr", "tee",
    # coreutils: control and environment
    "true", "false", "test", "sleep", "date", "id", "uname",
    # searching and editing (findutils, grep, sed, diffutils)
    "find", "xargs", "grep", "sed", "diff",
)  # fmt: skip

CPUS: Final = 1.0
MEMORY_MIB: Final = 512
PIDS: Final = 64
DISK_MIB: Final = 512
MAX_RUNTIME_S: Final = 60.0
MAX_OUTPUT_BYTES: Final = 1024 * 1024
