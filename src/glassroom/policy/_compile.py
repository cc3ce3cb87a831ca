"""compile(policy, backend) -> LaunchPlan: the one place rules become operations.

Each operation records the rule it came from, and a rule the backend
cannot enforce stops compilation with a ``PlanError`` naming it: a policy
never runs with a rule quietly dropped.
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .._errors import PlanError, TemplateError
from ..plan import (
    HOME_LINK,
    SECRETS_DIR,
    WORKSPACE,
    FsRule,
    LaunchPlan,
    Limits,
    Mount,
    Protected,
    Tool,
)
from . import _template
from ._model import Policy
from ._network import EGRESS_DIR_INSIDE, proxy_env
from ._network import network_plan as _network_plan
from ._protected import PROTECTED

if TYPE_CHECKING:
    from ..templates import Template

MIB = 1024 * 1024
#: Strength order of the tiers; a weaker backend never serves a higher risk.
TIERS = {"namespaces": 0, "gvisor": 1, "microvm": 2}
RISK_BACKEND = {"low": "namespaces", "medium": "gvisor", "high": "microvm", "maximum": "microvm"}
#: Where bare tool names are looked up on the host; also the sandbox's PATH.
TOOL_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
BASE_ENV = (
    ("PATH", SANDBOX_PATH),
    ("HOME", WORKSPACE),
    ("TMPDIR", "/tmp"),
    ("LANG", "C.UTF-8"),
    ("USER", "agent"),
    ("LOGNAME", "agent"),
    ("SHELL", "/bin/sh"),
)


def backend_for(policy: Policy, backend: str | None) -> str:
    """The backend a policy runs on; an explicit one may be stronger, never weaker."""
    wanted = RISK_BACKEND[policy.risk]
    if backend is None:
        return wanted
    if backend not in TIERS:
        raise PlanError(f"unknown backend {backend!r} (known: {', '.join(TIERS)})", rule="backend")
    if TIERS[backend] < TIERS[wanted]:
        raise PlanError(
            f"risk {policy.risk!r} needs backend {wanted!r}; {backend!r} is a weaker tier",
            rule="risk",
        )
    return backend


#: Plans by (policy digest, backend).  Compiling resolves every tool on the
#: host (stat + realpath + ELF parse): milliseconds that every sandbox start
#: would otherwise pay again for the same policy.
_PLANS: dict[tuple[str, str | None, str], LaunchPlan] = {}


def _template_of(policy: Policy) -> Template | None:
    """The template the policy names, from the local store (by name: its digest
    is part of the plan cache's key, so a re-imported template is seen)."""
    if policy.template is None:
        return None
    from ..templates import TemplateStore

    try:
        return TemplateStore().get(policy.template)
    except TemplateError as exc:
        raise PlanError(f"template: {exc}", rule="template") from None


def compile(policy: Policy, backend: str | None = None) -> LaunchPlan:
    """Compile (or reuse) the plan for ``policy`` on ``backend``."""
    tpl = _template_of(policy)
    if tpl is not None:  # at every start, cached plan or not: a few lstat calls
        _template.check_tree(tpl.rootfs)
    key = (policy.digest(), backend, tpl.digest if tpl is not None else "")
    plan = _PLANS.get(key)
    if plan is None:
        plan = _compile(policy, backend, tpl)
        if len(_PLANS) >= 64:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def compile_build(policy: Policy, tree: Path, env: dict[str, str], label: str) -> LaunchPlan:
    """The plan of a template *build* step (templates/_build.py): ``tree``, a
    private copy being built, is the sandbox's ``/`` and is writable.  Only on
    the namespaces tier; never cached (the tree changes with every step).
    ``label`` names the build in the sandbox's record (``template``)."""
    return replace(_compile(policy, "namespaces", None, build=(tree, env)), template=label)


def _compile(policy: Policy, backend: str | None, tpl: Template | None = None,
             build: tuple[Path, dict[str, str]] | None = None) -> LaunchPlan:  # fmt: skip
    name = backend_for(policy, backend)
    if name not in ("namespaces", "gvisor", "microvm"):
        raise PlanError(f"backend {name!r} has no compiler yet", rule="backend")
    root = tpl.rootfs if tpl is not None else build[0] if build is not None else None
    root_env = tpl.meta.env if tpl is not None else build[1] if build is not None else {}
    tree_access: Literal["read", "write"] = "write" if build is not None else "read"
    if name == "microvm":
        from ._microvm import check as _microvm_check

        _microvm_check(policy)
    network = _network_plan(policy)
    mounts: list[Mount] = []
    rules: list[FsRule] = []
    if root is not None:  # the template is /; read paths are the template's
        _template.check_tree(root)  # (a build step's tree: compile() checks the others)
        mounts += _template.mounts(root, policy.filesystem.write, writable=build is not None)
        for path, rule in _template.read_rules(root, policy.filesystem.read):
            rules.append(FsRule(path, tree_access, rule))
    for i, path in enumerate(policy.filesystem.read if root is None else ()):
        rule = f"filesystem.read[{i}]"
        mounts.append(Mount("ro-bind", path, rule, source=_existing(path, rule)))
        rules.append(FsRule(path, "read", rule))
    for i, path in enumerate(policy.filesystem.write):
        rule = f"filesystem.write[{i}]"
        mounts.append(Mount("bind", path, rule, source=_existing(path, rule)))
        rules.append(FsRule(path, "write", rule))
    if root is None:
        mounts += _usr_merge_links(policy.filesystem.read)
    lim = policy.resources
    mounts += [
        Mount("proc", "/proc", "sandbox.proc"),
        Mount("dev", "/dev", "sandbox.dev"),
        Mount("tmpfs", "/dev/shm", "sandbox.tmp", size_bytes=64 * MIB),
        # One scratch disk of disk_mib holds both, accounted apart from memory
        # (each backend realises "scratch"; see _sys/scratch.py and docs/backends.md).
        Mount("scratch", "/tmp", "sandbox.tmp", size_bytes=lim.disk_mib * MIB, mode=0o1777),
        Mount("scratch", WORKSPACE, "resources.disk_mib", size_bytes=lim.disk_mib * MIB,
              mode=0o755),
    ]
    # /home/user -> /workspace: a link in the sandbox's own root, nothing of the
    # host; the walls are those of /workspace (Landlock sees the target). Left out
    # where the policy binds something of the host there.
    host_paths = (*policy.filesystem.read, *policy.filesystem.write)
    if not any(_overlaps(p, HOME_LINK) for p in host_paths):
        mounts.append(Mount("symlink", HOME_LINK, "sandbox.home", source=WORKSPACE))
    rules += [
        FsRule("/proc", "read", "sandbox.proc"),
        FsRule("/dev/shm", "write", "sandbox.tmp"),
        FsRule("/tmp", "write", "sandbox.tmp"),
        FsRule(WORKSPACE, "write", "workspace"),
    ]
    if network.mode == "proxy":
        rules.append(FsRule(EGRESS_DIR_INSIDE, "read", "network.proxy"))
    if any(c.inject == "file" for c in policy.credentials):
        mounts.append(Mount("tmpfs", SECRETS_DIR, "credentials", size_bytes=MIB, mode=0o700))
        rules.append(FsRule(SECRETS_DIR, "write", "credentials"))
    for i, cred in enumerate(policy.credentials):
        if cred.inject == "proxy" and not policy.network.allow:
            raise PlanError(
                f"credentials[{i}].inject: 'proxy' needs the egress proxy: list the "
                "credential's hosts in network.allow",
                rule=f"credentials[{i}].inject",
            )
    env = BASE_ENV + proxy_env(network)
    if root is None:
        tools = tuple(_resolve_tool(t, i, policy) for i, t in enumerate(policy.tools.allow))
        loaders = sorted({ld for t in tools if (ld := _elf_interpreter(t.path))})
    else:
        own = dict(env)
        extra = _template.env(root_env, set(own) - {"PATH", "LANG"})
        merged = {**own, **dict(extra)}
        env = tuple(merged.items())
        search = tuple(dict.fromkeys([*merged["PATH"].split(":"), *TOOL_PATH]))
        search = tuple(d for d in search if d.startswith("/"))
        readable = [r.path for r in rules if r.rule == "template"]
        tools = tuple(_template.tool(root, t, i, readable, search)
                      for i, t in enumerate(policy.tools.allow))  # fmt: skip
        loaders = sorted({ld for t in tools if (ld := _template.interpreter(root, t.path, t.rule))})
    return LaunchPlan(
        backend=name,
        risk=policy.risk,
        mounts=tuple(mounts),
        fs_rules=tuple(rules),
        tools=tools,
        loaders=tuple(loaders),
        limits=Limits(
            cpus=lim.cpus,
            memory_bytes=lim.memory_mib * MIB,
            pids=lim.pids,
            disk_bytes=lim.disk_mib * MIB,
            max_runtime_s=float(lim.max_runtime_s),
            max_output_bytes=lim.max_output_bytes,
        ),
        network=network,
        env=env,
        root=str(root) if root is not None else None,
        template=f"{policy.template}@{tpl.digest}" if tpl is not None else "",
        policy_digest=policy.digest(),
        audit_level=policy.audit.level,
        protected=tuple(Protected(p, tree, why) for p, tree, why in PROTECTED)
        if policy.filesystem.write else (),
        unprotect=tuple(policy.filesystem.unprotect),
    )


def _overlaps(path: str, other: str) -> bool:
    """Is one of the two paths the other or beneath it?"""
    a, b = path.rstrip("/") or "/", other.rstrip("/") or "/"
    return a == b or b.startswith(a.rstrip("/") + "/") or a.startswith(b + "/")


def _existing(path: str, rule: str) -> str:
    """The host source for a bind: it must exist; symlinks are resolved on the host."""
    if not os.path.lexists(path):
        raise PlanError(f"{rule}: {path} does not exist on this host", rule=rule)
    return os.path.realpath(path)


def _usr_merge_links(read: tuple[str, ...] | list[str]) -> list[Mount]:
    """On merged-/usr hosts /bin, /lib, ... are links into /usr: recreate them."""
    out = []
    if "/usr" in read:
        for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
            host = "/" + name
            if os.path.islink(host) and f"/{name}" not in read:
                out.append(
                    Mount("symlink", host, "filesystem.read(/usr)", source=os.readlink(host))
                )
    return out


def _covered(path: str, read: list[str] | tuple[str, ...]) -> bool:
    """Is ``path`` visible inside, i.e. beneath some read path (by its real path)?"""
    for r in read:
        real = os.path.realpath(r)
        if path == real or path.startswith(real.rstrip("/") + "/"):
            return True
    return False


def _resolve_tool(name: str, i: int, policy: Policy) -> Tool:
    rule = f"tools.allow[{i}]"
    candidates = [name] if name.startswith("/") else [f"{d}/{name}" for d in TOOL_PATH]
    for cand in candidates:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            real = os.path.realpath(cand)
            if not _covered(real, policy.filesystem.read):
                raise PlanError(
                    f"{rule}: {name} resolves to {real}, which is not under any "
                    "filesystem.read path, so it would not exist inside",
                    rule=rule,
                )
            return Tool(name, real, rule)
    raise PlanError(
        f"{rule}: {name!r} not found on this host (searched {':'.join(TOOL_PATH)})", rule=rule
    )


def _elf_interpreter(path: str) -> str | None:
    """PT_INTERP of an ELF executable: the loader the kernel must also execute."""
    raw = elf_interp_raw(Path(path))
    return os.path.realpath(raw) if raw else None


def elf_interp_raw(path: Path) -> str | None:
    """PT_INTERP as written in the file (not resolved), or None."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only (x86_64/aarch64)
                return None
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            for n in range(phnum):
                f.seek(phoff + n * phentsize)
                p_type, _flags, p_offset = struct.unpack("<IIQ", f.read(16))
                if p_type == 3:  # PT_INTERP
                    f.seek(p_offset + 0)
                    f.seek(phoff + n * phentsize + 32)
                    (p_filesz,) = struct.unpack("<Q", f.read(8))
                    f.seek(p_offset)
                    return f.read(p_filesz).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None
