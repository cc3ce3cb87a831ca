"""Build a template from a recipe (``glassroom template build``).

The base tree (a template of the store, or an imported OCI image) is copied
into a staging directory of the store; each step then changes that copy:

- ``COPY`` copies from the recipe's directory, with the workspace rules
  (lifecycle/workspace.py): a symlink or special file, or a source outside
  the recipe's directory, refuses the build.  The destination is resolved
  inside the tree, through the tree's own links, never the host's.
- ``RUN`` runs in a **glassroom sandbox** on the namespaces tier, with every
  wall on: user/pid/net/mount namespaces, seccomp, Landlock, cgroups, no
  capabilities.  Its ``/`` is the staging tree, bound read-write (nothing
  else of the host is in it), owned for the step by the uid the sandbox runs
  as, so the step's uid 1000 can change it and nothing more.  Its network is
  the recipe's ``network`` list through the egress proxy (empty: none).  It
  is audited like any task: ``sandbox.created``, its command, its exit.
- ``ENV``, ``WORKDIR`` and ``USER`` go into the template's metadata.

A failed step removes the staging tree and names the step; setuid bits a
step made are dropped, as at import.  The result is committed like an
import: content-addressed, read-only, one rename.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import _config
from .._errors import GlassroomError, TemplateError
from ..policy._template import resolve
from ._debian import bootstrap
from ._recipe import Recipe, Step
from ._store import Template, TemplateMeta, TemplateStore, strip_loader_files

#: What RUN steps may run when the recipe names no ``tools``: those the tree has.
DEFAULT_BUILD_TOOLS = (
    "sh", "bash", "env", "python3", "pip", "pip3", "node", "npm", "npx", "ls", "cat", "cp",
    "mv", "rm", "mkdir", "ln", "chmod", "touch", "echo", "printf", "test", "true", "false",
    "sed", "grep", "find", "tar", "gzip", "base64", "head", "tail", "wc", "sort", "tr",
)  # fmt: skip
#: A build step's resources: more than a task's defaults (pip and npm are big).
BUILD_RESOURCES = {"cpus": 2.0, "memory_mib": 2048, "pids": 512, "disk_mib": 4096,
                   "max_runtime_s": 1800, "max_output_bytes": 8 << 20}  # fmt: skip


def _err(step: Step, msg: str) -> TemplateError:
    return TemplateError(f"{step.where}: {msg}", rule="template.build")


def _walk_fix(root: Path, uid: int | None, gid: int | None) -> int:
    """Owner-writable dirs and files, setuid/setgid dropped; chown when asked.
    Returns how many setuid/setgid bits were dropped."""
    dropped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, None]:
            p = dirpath if name is None else os.path.join(dirpath, name)
            st = os.lstat(p)
            if uid is not None and gid is not None:
                os.lchown(p, uid, gid)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o6000:
                dropped += 1
            os.chmod(p, (mode & ~0o6000) | 0o200 | (0o100 if stat.S_ISDIR(st.st_mode) else 0))
    return dropped


def _debian_base(recipe: Recipe, suite: str, store: TemplateStore, staged: Path,
                 log: Path | None, progress: Callable[[str], None]) -> TemplateMeta:  # fmt: skip
    """Debian ``suite`` with the recipe's packages, bootstrapped into ``staged``
    (downloads are kept in the store's ``apt-cache``: a second bootstrap
    fetches only what the first did not)."""
    meta = bootstrap(suite, recipe.packages, staged, cache=store.root / "apt-cache",
                     audit_log=log, progress=progress)  # fmt: skip
    _walk_fix(staged, None, None)
    meta.source = {"kind": "recipe", "from": f"debian:{suite}",
                   "packages": list(recipe.packages)}  # fmt: skip
    return meta


def _base(recipe: Recipe, store: TemplateStore, staged: Path, log: Path | None,
          progress: Callable[[str], None]) -> TemplateMeta:  # fmt: skip
    kind, _, ref = recipe.base.partition(":")
    if kind == "debian":
        return _debian_base(recipe, ref, store, staged, log, progress)
    if kind == "oci":
        from ._oci import import_oci

        progress(f"importing {ref}")
        base = import_oci(ref, store, None)
    else:
        base = store.get(ref)
    progress(f"from {base.name or ''}@{base.digest}")
    shutil.copytree(base.rootfs, staged, symlinks=True, dirs_exist_ok=True)
    _walk_fix(staged, None, None)
    m = base.meta
    return TemplateMeta(digest="", env=dict(m.env), workdir=m.workdir, user=m.user,
                        entrypoint=list(m.entrypoint), cmd=list(m.cmd),
                        source={"kind": "recipe", "from": base.digest})  # fmt: skip


def _inside(tree: Path, path: str, step: Step, *, make: bool) -> Path:
    """``path`` of the tree as a host path, resolved in the tree (its links,
    never the host's); its parent made when ``make``."""
    parent, _, name = path.rstrip("/").rpartition("/")
    real = resolve(tree, parent or "/")
    if real is None:
        if not make:
            raise _err(step, f"{parent} does not exist in the tree")
        cur = "/"
        for part in [p for p in parent.split("/") if p]:
            nxt = resolve(tree, f"{cur.rstrip('/')}/{part}")
            if nxt is None:
                nxt = f"{cur.rstrip('/')}/{part}"
                os.mkdir(tree / nxt.lstrip("/"), 0o755)
            cur = nxt
        real = cur
    host = tree / real.lstrip("/")
    if not host.is_dir() or host.is_symlink():
        raise _err(step, f"{parent} is not a directory in the tree")
    return host / name if name else host


def _copy(recipe: Recipe, step: Step, tree: Path) -> None:
    ctx = recipe.context.resolve()
    dest_dir = step.dest.endswith("/") or len(step.sources) > 1
    for src in step.sources:
        host = (ctx / src).resolve() if not os.path.islink(ctx / src) else ctx / src
        if host != ctx and ctx not in host.parents:
            raise _err(step, f"COPY {src}: outside the recipe's directory {ctx}")
        if os.path.islink(host):
            raise _err(step, f"COPY {src}: a symlink (it would bring in what it points at)")
        items: list[tuple[Path, str]] = []  # (host file or dir, path inside)
        base_inside = step.dest.rstrip("/") or "/"
        if host.is_dir():
            for dirpath, dirnames, filenames in os.walk(host):
                rel = os.path.relpath(dirpath, host)
                for n in sorted(dirnames) + sorted(filenames):
                    p = Path(dirpath) / n
                    items.append((p, f"{base_inside}/{'' if rel == '.' else rel + '/'}{n}"))
            _inside(tree, base_inside + "/x", step, make=True)
        elif host.is_file():
            target = f"{base_inside}/{host.name}" if dest_dir else base_inside
            items.append((host, target))
        else:
            raise _err(step, f"COPY {src}: not found, or a special file")
        for p, inside in items:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode)
                                                 or stat.S_ISDIR(st.st_mode)):  # fmt: skip
                raise _err(step, f"COPY {p}: a symlink or special file")
            out = _inside(tree, inside, step, make=True)
            if stat.S_ISDIR(st.st_mode):
                if not out.is_dir() or out.is_symlink():
                    if out.exists() or out.is_symlink():
                        out.unlink()
                    out.mkdir(0o755)
                continue
            if out.is_symlink() or out.exists():
                if out.is_dir() and not out.is_symlink():
                    raise _err(step, f"COPY {p}: {inside} is a directory in the tree")
                out.unlink()
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f, open(p, "rb") as src_f:
                shutil.copyfileobj(src_f, f)
            os.chmod(out, stat.S_IMODE(st.st_mode) & 0o755)


def _tree_bytes(root: Path) -> int:
    """Bytes the tree's files take on disk (allocated blocks, as du counts)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _watch(proc: Any, tree: Path, limit: int) -> tuple[Any, bytes, bytes, bool]:
    """Follow a RUN step to its end: (result, stdout, stderr, over the disk).

    Why a watch and not a quota: the tree is a directory of the store's own
    file system (so the commit is a rename), which has no per-directory
    quota.  The file system's free space is read twice a second; only when
    it fell by more than ``limit`` is the tree itself measured, and a tree
    grown by more than ``limit`` has its step killed (RLIMIT_FSIZE bounds
    each file meanwhile).  At the end the tree is measured once more."""
    start_free, start_tree = _free(tree), _tree_bytes(tree)
    out: list[bytes] = []
    err: list[bytes] = []
    idx, over = 0, False
    while True:
        events, idx, done = proc.events_since(idx, 0.5)
        for stream, data in events:
            (err if stream == "stderr" else out).append(data)
        if done:
            break
        if (not over and start_free - _free(tree) > limit
                and _tree_bytes(tree) - start_tree > limit):  # fmt: skip
            over = True
            proc.signal(signal.SIGKILL)
    res = proc.wait(30)
    # a step quicker than the watch: the tree as it ended, the same bound
    over = over or _tree_bytes(tree) - start_tree > limit
    return res, b"".join(out), b"".join(err), over


def _run(recipe: Recipe, step: Step, tree: Path, meta: TemplateMeta, audit_log: Path | None,
         progress: Callable[[str], None], name: str, end: float) -> None:  # fmt: skip
    from .._sandbox import Sandbox
    from ..lifecycle.supervisor import Supervised
    from ..policy import validate_policy
    from ..policy._compile import compile_build

    if recipe.tools == ["*"]:  # every program of the tree as the step starts
        from ..policy._compile import SANDBOX_PATH
        from ..policy._template import programs

        path = meta.env.get("PATH") or SANDBOX_PATH
        recipe = replace(recipe, tools=programs(tree, tuple(d for d in path.split(":")
                                                             if d.startswith("/"))))  # fmt: skip
    tools = recipe.tools if recipe.tools is not None else [
        t for t in DEFAULT_BUILD_TOOLS
        if any(resolve(tree, f"{d}/{t}") for d in ("/usr/local/bin", "/usr/bin", "/bin"))
    ]  # fmt: skip
    policy_raw: dict[str, Any] = {"tools": {"allow": tools}, "resources": BUILD_RESOURCES,
                                  "network": {"allow": list(recipe.network)}}  # fmt: skip
    # What an earlier step left for the host's loader is gone before this
    # step's init starts on it (see _store.LOADER_FILES).
    gone = strip_loader_files(tree)
    if gone:
        meta.dropped["/etc/ld.so.preload"] = meta.dropped.get("/etc/ld.so.preload", 0) + gone
    try:
        policy = validate_policy(policy_raw)
        plan = compile_build(policy, tree, meta.env, f"build:{name} {step.where}")
    except GlassroomError as exc:
        raise _err(step, f"the build sandbox cannot be made: {exc}") from None
    uid, gid = _config.sandbox_ids()
    as_root = _config.is_root()
    if as_root:  # the step's uid 1000 is this host uid: it owns the tree for the step
        _walk_fix(tree, uid, gid)
    try:
        sup = Supervised(policy, backend="namespaces", audit_log=audit_log, plan=plan)
        left = end - time.monotonic()
        if left <= 0:
            raise _err(step, "the build's deadline has passed")
        limit = int(BUILD_RESOURCES["disk_mib"]) << 20
        with Sandbox._wrap(sup) as sb:
            progress(f"{step.where}: RUN {' '.join(step.argv)[:120]} (in {sb.id})")
            cap = min(float(BUILD_RESOURCES["max_runtime_s"]), left)
            proc = sb.spawn(step.argv, cwd=meta.workdir or "/", timeout_s=cap)
            r, out, err, over = _watch(proc, tree, limit)
    finally:
        if as_root:
            _walk_fix(tree, 0, 0)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if stdout:
        progress(stdout.rstrip()[-2000:])
    if over:
        raise _err(step, f"RUN wrote more than the build's disk ({limit >> 20} MiB, "
                         "resources.disk_mib) into the tree: killed")  # fmt: skip
    if r is None or r.exit_code != 0:
        tail = (stderr or stdout).strip()[-400:]
        code = "no exit" if r is None else r.exit_code
        why = " (timed out)" if r is not None and r.timed_out else ""
        raise _err(step, f"RUN exited {code}{why}: {tail}")


def build(
    recipe: Recipe, store: TemplateStore, name: str, *, audit_log: str | Path | None = None,
    progress: Callable[[str], None] | None = None, deadline_s: float | None = None,
) -> Template:  # fmt: skip
    """Build ``recipe`` into ``store`` as ``name``; every RUN step in a sandbox.
    ``deadline_s``: the whole build's bound, which its RUN steps share."""
    end = time.monotonic() + (deadline_s if deadline_s is not None else float("inf"))
    say = progress or (lambda _m: None)
    log = Path(audit_log) if audit_log is not None else None
    staged = store.staging()
    try:
        meta = _base(recipe, store, staged, log, say)
        for i, step in enumerate(recipe.steps):
            say(f"step {i + 1}/{len(recipe.steps)}: {step.kind} ({step.where})")
            if step.kind == "copy":
                _copy(recipe, step, staged)
            elif step.kind == "run":
                _run(recipe, step, staged, meta, log, say, name, end)
            elif step.kind == "env":
                meta.env.update(step.env)
            elif step.kind == "workdir":
                _inside(staged, step.value + "/x", step, make=True)
                meta.workdir = step.value
            elif step.kind == "user":
                meta.user = step.value
        dropped = _walk_fix(staged, None, None)
        if dropped:
            meta.dropped["setuid/setgid bits"] = dropped
        meta.source.update({"recipe": recipe.source, "steps": len(recipe.steps),
                            "recipe_digest": recipe.digest})
    except BaseException:
        store._discard(staged)
        raise
    t = store.commit(staged, meta, name)
    from ..audit import AuditLog

    AuditLog(log or _config.audit_log_path()).append(
        "tb-" + secrets.token_hex(6), "template.built",
        {"name": name, "digest": t.digest, "recipe": recipe.source, "from": meta.source["from"],
         "steps": len(recipe.steps)}, decision="allow",
    )  # fmt: skip
    return t
