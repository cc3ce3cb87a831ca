"""LaunchPlan: the immutable, typed list of operations a backend carries out.

A backend receives a plan and never the raw policy, so every rule of the
policy is turned into an operation in exactly one place (``policy.compile``)
and each operation carries the name of the rule that produced it.  That name
is what error messages and audit records quote ("filesystem.read[2]").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: ``scratch``: the sandbox's files (/workspace, /tmp) on one disk of
#: ``size_bytes`` accounted apart from its memory (``_sys/scratch.py``).
#: "tree-bind": a read-write bind of a template build's private tree (namespaces only).
MountKind = Literal["ro-bind", "bind", "tree-bind", "tmpfs", "scratch", "proc", "dev", "symlink",
                    "dir", "file"]
Access = Literal["read", "write"]

WORKSPACE = "/workspace"
#: E2B's home and default workdir: a symlink to the workspace, so paths and
#: shells written for E2B (``/home/user``, ``cd ~``) reach the same files.
HOME_LINK = "/home/user"
#: A per-sandbox tmpfs for credentials injected as files (mode 0400 each).
SECRETS_DIR = "/run/glassroom/secrets"


@dataclass(frozen=True)
class Mount:
    """One entry of the sandbox's new, initially empty root."""

    kind: MountKind
    target: str
    rule: str
    source: str | None = None  # host path (bind), link target (symlink), content (file)
    size_bytes: int | None = None  # tmpfs size cap
    mode: int | None = None


@dataclass(frozen=True)
class FsRule:
    """A Landlock rule: what the sandbox may do beneath ``path``."""

    path: str  # path as the sandbox sees it (same as the host path for binds)
    access: Access
    rule: str


@dataclass(frozen=True)
class Protected:
    """A name in every writable host dir that stays read-only (``policy._protected``)."""

    path: str  # relative, matched at any depth ("." components never)
    tree: bool  # the entry and everything beneath it
    reason: str


@dataclass(frozen=True)
class Tool:
    """An executable the sandbox may execve (Landlock EXECUTE on ``path``)."""

    name: str
    path: str  # fully resolved path, identical inside and outside
    rule: str


@dataclass(frozen=True)
class Limits:
    cpus: float
    memory_bytes: int
    pids: int
    disk_bytes: int
    max_runtime_s: float
    max_output_bytes: int


@dataclass(frozen=True)
class HostRule:
    """One ``network.allow|deny|ask`` entry as data (see ``policy._network``)."""

    kind: Literal["name", "wildcard", "ip", "cidr"]
    value: str
    port: int | None
    rule: str  # "network.allow[0]"


@dataclass(frozen=True)
class HttpRule:
    """One ``[[network.rules]]`` table: methods/paths allowed for a host (empty: any)."""

    host: HostRule
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    inspect_tls: bool
    rule: str  # "network.rules[0]"


#: Where the egress dir (proxy socket, CA bundle) appears inside the sandbox.
EGRESS_DIR_INSIDE = "/.glassroom-net"
#: The loopback port inside the sandbox's netns that leads to the proxy.
PROXY_PORT_INSIDE = 3128


@dataclass(frozen=True)
class NetworkPlan:
    """``none``: a private network namespace with only loopback.

    ``proxy``: the same namespace, plus one way out: a loopback port bridged
    to the supervisor's egress proxy, which applies ``allow/deny/ask/rules``.
    ``host_dir`` is filled in per sandbox by the supervisor (plans are cached).
    """

    mode: Literal["none", "proxy"] = "none"
    rule: str = "network.allow"
    allow: tuple[HostRule, ...] = ()
    deny: tuple[HostRule, ...] = ()
    ask: tuple[HostRule, ...] = ()
    rules: tuple[HttpRule, ...] = ()
    ask_timeout_s: float = 60.0
    inspect_tls: bool = False  # some rule inspects TLS: the sandbox gets a CA bundle
    host_dir: str | None = None
    #: Log direct connect/sendto attempts (seccomp user notification).
    watch_direct: bool = True


@dataclass(frozen=True)
class LaunchPlan:
    backend: str
    risk: str
    mounts: tuple[Mount, ...]
    fs_rules: tuple[FsRule, ...]
    tools: tuple[Tool, ...]
    limits: Limits
    network: NetworkPlan
    env: tuple[tuple[str, str], ...]
    seccomp_profile: str = "default"
    workspace: str = WORKSPACE
    policy_digest: str = ""
    #: Extra executables the loader needs (the ELF interpreter); not tools.
    loaders: tuple[str, ...] = field(default=())
    #: ``audit.level``: "actions", "files" or "syscalls" (see docs/audit.md).
    audit_level: str = "actions"
    #: Names no writable host dir lets the sandbox change (rule filesystem.protected),
    #: and the paths (as seen inside) where ``filesystem.unprotect`` lifts that.
    protected: tuple[Protected, ...] = field(default=())
    unprotect: tuple[str, ...] = field(default=())
    #: ``template = NAME``: the host path of its read-only tree, the sandbox's
    #: ``/`` (policy/_template.py), and ``NAME@sha256:...`` for the record.
    root: str | None = None
    template: str = ""

    def walls(self) -> list[str]:
        """Human-readable names of the walls this plan asks for."""
        return [
            "namespaces:user,mount,pid,net,ipc,uts,cgroup",
            f"mounts:{len(self.mounts)}",
            f"seccomp:{self.seccomp_profile}",
            f"landlock:{len(self.fs_rules)} paths,{len(self.tools)} tools",
            "cgroups:memory,pids,cpu",
            "rlimits",
            "no_new_privs",
            "capabilities:none",
            *([f"template:{self.template}"] if self.template else []),
        ]
