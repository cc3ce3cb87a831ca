"""E2B's template build API (``e2b.Template``): a tenant builds its own templates.

The unmodified SDK's flow, and what each call does here:

1. ``POST /v3/templates`` (``Template.build(t, "name[:tag]", tags=...)``): a
   template of the tenant (made on first use) and a build, ``waiting``.
2. ``GET /templates/{id}/files/{hash}``, per ``copy()``: is that upload here,
   and where to PUT it (``_template_files``: a single-use URL of this server).
3. ``POST /v2/templates/{id}/builds/{build}``: the steps are checked and made a
   glassroom recipe (templates/_recipe.py), then built in the background
   (templates/_build.py, every RUN in a sandbox) into the server's template
   store as ``e2b-<tenant>-<name>-<build>``.  At most :data:`WORKERS` builds
   run at once; :data:`MAX_PENDING` wait (:data:`MAX_PENDING_PER_TENANT` each).
4. ``GET /templates/{id}/builds/{build}/status``: ``building`` then ``ready``
   or ``error`` (the reason names the step, as the SDK's ``step`` index), with
   the builder's progress as log entries, paged by ``logsOffset``.

Then ``Sandbox.create("name[:tag]")`` runs in it: the built-in ``base``
policy with ``template`` set and the tools the template has
(:func:`for_create`).  Also: ``GET /templates/aliases/{name}``
(``Template.exists``), tags (``POST``/``DELETE /templates/tags``, ``GET
/templates/{id}/tags``), and ``DELETE /templates/{id}``.  Everything is the
tenant's own: another tenant's template is "not found", everywhere.

What maps to what, and what is refused, is in docs/templates.md ("E2B's
template build API").
"""

from __future__ import annotations

import logging
import posixpath
import queue
import re
import shutil
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..._errors import GlassroomError, TemplateError
from ...egress import NetworkOptions
from ...policy import Policy, validate_policy
from ...templates import Recipe, TemplateStore
from ...templates import build as build_recipe
from ...templates._debian import SUITE, check
from ...templates._recipe import Step, apt_packages
from ..http._config import Tenant, builtin_templates
from ..http._service import ApiError, SandboxService
from . import _network
from ._control import _err, _json, _svc, _tenant
from ._template_files import (
    MAX_ENTRIES,
    MAX_UNPACKED_BYTES,
    UPLOAD_HEADERS,
    Uploads,
    check_hash,
    unpack,
)
from ._template_registry import (
    Build,
    Registry,
    Tpl,
    check_name,
    check_tags,
    split_ref,
    store_name,
)

log = logging.getLogger("glassroom.serve")

WORKERS = 2
MAX_PENDING = 8
#: One per tenant: a tenant never holds every worker (the review's finding).
MAX_PENDING_PER_TENANT = 1
#: A build's whole wall-clock bound: its steps share it (templates.build).
BUILD_DEADLINE_S = 3600.0
MAX_STEPS = 256
MAX_ARG_BYTES = 64 << 10
#: After a sandbox in a deleted template ends, how long before its tree is removed.
GC_DELAY_S = 5.0
#: What a build request may ask of its sandboxes' resources (E2B's cpuCount,
#: memoryMB, minFreeDiskMB), applied to the sandboxes made from it.
MAX_CPUS = 4
MAX_MEMORY_MB = 4096
MAX_DISK_MB = 8192
#: The store template ``e2bdev/base`` (the SDK's default) and ``from_base_image()`` mean.
BASE_TEMPLATE = "base"
LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3}
#: A RUN that installs Debian packages (it needs root, which a build step has not).
_APT = re.compile(
    r"(^|[\s;&|(`/])(apt-get|apt|aptitude)(\s+-\S+)*\s+"
    r"(install|update|upgrade|dist-upgrade|full-upgrade|remove|purge|autoremove)\b"
    r"|(^|[\s;&|(`/])dpkg(\s+-\S+)*\s+(-i|--install|--configure|--unpack|-r|--remove|-P|--purge)\b"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STEP_OF = re.compile(r"^step (\d+)\b")


@dataclass
class _Copy:
    files_hash: str
    src: str
    mode: int | None
    number: int  # the SDK's step number (1-based)


@dataclass
class _Plan:
    base: str  # a store template name, or debian:SUITE
    steps: list[Step]
    copies: dict[int, _Copy] = field(default_factory=dict)  # by index in steps
    notes: list[str] = field(default_factory=list)
    #: A debian:SUITE base's packages (the SDK's leading apt_install steps)
    packages: list[str] = field(default_factory=list)
    apt_steps: int = 0


class Builds:
    """One per service: the tenants' templates, their uploads and the build queue."""

    def __init__(self, svc: SandboxService) -> None:
        root = svc.cfg.data_dir / "e2b-templates"
        self.svc = svc
        self.registry = Registry(root)
        self.uploads = Uploads(root / "files")
        self.contexts = root / "contexts"
        shutil.rmtree(self.contexts, ignore_errors=True)  # a crashed build's
        self._queue: queue.Queue[tuple[Tpl, Build, _Plan]] = queue.Queue()
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        svc.on_destroy(self._destroyed)

    def _destroyed(self, e: Any) -> None:
        """A sandbox ends: the template it ran in may be one to remove now.  Its
        teardown is still under way, so the removal waits a little."""
        if getattr(e.sb.policy, "template", None) in self.registry.doomed:
            timer = threading.Timer(GC_DELAY_S, self.gc)
            timer.daemon = True
            timer.start()

    # -- the queue --------------------------------------------------------------

    def enqueue(self, t: Tpl, b: Build, plan: _Plan) -> None:
        with self._lock:
            if b.status != "waiting":  # two concurrent starts of one build: one is queued
                raise ApiError(409, "conflict", f"build {b.id} was started already ({b.status})")
            mine = self._pending.get(t.tenant, 0)
            if mine >= MAX_PENDING_PER_TENANT or sum(self._pending.values()) >= MAX_PENDING:
                raise ApiError(
                    429, "limit",
                    f"too many template builds waiting (at most {MAX_PENDING_PER_TENANT} per "
                    f"tenant, {MAX_PENDING} in all); try again when one has finished",
                    rule="template.build_queue",
                )  # fmt: skip
            self._pending[t.tenant] = mine + 1
            b.status = "building"
            if len(self._workers) < WORKERS:
                w = threading.Thread(target=self._work, name="glassroom-template-build",
                                     daemon=True)  # fmt: skip
                self._workers.append(w)
                w.start()
        self.registry.save()
        self._queue.put((t, b, plan))

    @property
    def base_policy(self) -> dict[str, Any]:
        """The operator's ``[templates.base]`` as it is now (the built-in one
        where unset): a tenant's template never runs on a weaker tier, or with
        more than that base gives."""
        base = self.svc.cfg.templates.get("base") or builtin_templates()["base"]
        return base.model_dump()

    def _work(self) -> None:
        while True:
            t, b, plan = self._queue.get()
            try:
                self._build(t, b, plan)
            except Exception:  # a bug: the build fails, the worker lives on
                log.exception("template build %s failed", b.id)
                self._fail(t, b, "internal error; the server log has the details", None)
            finally:
                with self._lock:
                    self._pending[t.tenant] -= 1
                self.gc()

    # -- one build --------------------------------------------------------------

    def _build(self, t: Tpl, b: Build, plan: _Plan) -> None:
        reg = self.registry
        if t.id not in reg.templates:
            self._fail(t, b, "the template was deleted before its build started", None)
            return
        current: list[str | None] = [None]

        def say(msg: str) -> None:
            m = re.match(r"^step (\d+)/\d+:", msg)
            if m:  # the builder's numbering, less the apt steps it took in its base
                current[0] = str(int(m.group(1)) + plan.apt_steps)
            for line in msg.splitlines()[-200:] or [""]:
                reg.log(b, line, step=current[0])

        for note in plan.notes:
            reg.log(b, note, "warn")
        ctx = self.contexts / b.id
        ctx.mkdir(parents=True, mode=0o700)
        name = store_name(t.tenant, t.name, b.id)
        store = TemplateStore()
        try:
            budget = [MAX_UNPACKED_BYTES, MAX_ENTRIES]  # all COPY steps together
            for i, c in plan.copies.items():
                current[0] = str(c.number)
                self._context(t, c.number - 1, c, ctx, plan.steps[i], budget)
            current[0] = None  # the base, then the builder's own "step N/M" lines
            base = plan.base if plan.base.startswith("debian:") else f"template:{plan.base}"
            # RUN steps may run every program the tree has (the tenant's own
            # choice of software, as in E2B), each step in a walled sandbox.
            recipe = Recipe(base, plan.steps, ctx, list(self.svc.cfg.template_build_network),
                            ["*"], f"e2b:{t.name}", packages=list(plan.packages))  # fmt: skip
            tpl = build_recipe(recipe, store, name, audit_log=self.svc.cfg.audit_log,
                               progress=say, deadline_s=BUILD_DEADLINE_S)  # fmt: skip
            current[0] = "finalize"
            tools = self._tools(tpl.rootfs, tpl.meta.env)
            b.tools = tools
            b.store_name = name
            try:
                self._check(b)
            except BaseException:
                b.store_name = None
                store.remove(name)
                raise
        except GlassroomError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            m = _STEP_OF.match(msg)
            self._fail(t, b, msg, m.group(1) if m else current[0] or "base")
            return
        finally:
            shutil.rmtree(ctx, ignore_errors=True)
        if "bash" not in tools:
            reg.log(b, "the template has no bash: E2B's SDK runs commands with "
                       "/bin/bash -l -c, so commands.run will not work in it", "warn")  # fmt: skip
        reg.log(b, f"built {name}@{tpl.digest}; tools: {', '.join(tools)}")
        with reg.lock:
            b.status = "ready"
            gone = t.id not in reg.templates
            if gone:
                b.store_name = None
                reg.doomed.add(name)
        if not gone:
            reg.assign(t, b, b.tags)
        self.svc.audit.append(
            _audit_id(b), "template.build_ready",
            {"tenant": t.tenant, "template": t.id, "name": t.name, "build": b.id,
             "store_name": name, "digest": tpl.digest, "tags": b.tags, "tools": tools},
            decision="allow",
        )  # fmt: skip

    def _context(self, t: Tpl, i: int, c: _Copy, ctx: Path, step: Step,
                 budget: list[int]) -> None:  # fmt: skip
        """Unpack step ``i``'s upload into ``ctx/i`` and point the step at it."""
        label = f"step {i + 1}: COPY {c.src}"
        tar = self.uploads.path(t.tenant, t.id, c.files_hash)
        if tar is None:
            raise TemplateError(f"{label}: its files (hash {c.files_hash}) were not uploaded",
                                rule="template.upload")  # fmt: skip
        here = ctx / str(i)
        used, n = unpack(tar, here, label, max_bytes=budget[0], max_entries=budget[1])
        budget[0] -= used  # a build's COPY steps share one budget (one small upload,
        budget[1] -= n  # unpacked by 256 steps, would be 256 GiB)
        src = posixpath.normpath(c.src).lstrip("/")
        if any(ch in src for ch in "*?["):
            import glob

            found = sorted(set(glob.glob(src, root_dir=here, recursive=True, include_hidden=True)))
        else:
            found = [src] if (here / src).exists() else []
        if not found:
            raise TemplateError(f"{label}: the upload holds nothing that matches",
                                rule="template.upload")  # fmt: skip
        step.sources = [f"{i}/{f}" for f in found]
        if len(found) > 1 and not step.dest.endswith("/"):
            step.dest += "/"
        if c.mode is not None:
            for f in found:
                p = here / f
                todo = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
                for q in todo:
                    q.chmod(c.mode & 0o777)

    def _tools(self, rootfs: Path, env: dict[str, str]) -> list[str]:
        """Every program on the template's PATH: what its author installed
        (apt_install, npm_install -g ...) is what its sandboxes are for.  Each
        is still its own Landlock rule, and nothing outside the tree runs."""
        from ...policy import _template as pt
        from ...policy._compile import SANDBOX_PATH, TOOL_PATH

        path = env.get("PATH") or SANDBOX_PATH
        search = tuple(d for d in dict.fromkeys([*path.split(":"), *TOOL_PATH])
                       if d.startswith("/"))  # fmt: skip
        found = pt.programs(rootfs, search)
        if not found:
            raise TemplateError("finalize: the template has no program on its PATH",
                                rule="template.build")  # fmt: skip
        return found

    def policy(self, b: Build) -> Policy:
        """The policy of a sandbox made from the build: ``base``'s, in its template."""
        raw = dict(self.base_policy)
        raw["template"] = b.store_name
        raw["tools"] = {**raw["tools"], "allow": list(b.tools)}
        raw["resources"] = {**raw["resources"], **b.resources}
        return validate_policy(raw)

    def _check(self, b: Build) -> None:
        """A sandbox can be made from it: the plan compiles (tools, loaders, tree)."""
        from ...policy._compile import compile as compile_plan

        try:
            compile_plan(self.policy(b))
        except GlassroomError as exc:
            raise TemplateError(f"finalize: a sandbox cannot run in the built template: {exc}",
                                rule="template.build") from None  # fmt: skip

    def _fail(self, t: Tpl, b: Build, message: str, step: str | None) -> None:
        reg = self.registry
        reg.log(b, message, "error", step)
        with reg.lock:
            b.status, b.reason, b.step = "error", message, step
        reg.save()
        self.svc.audit.append(
            _audit_id(b), "template.build_failed",
            {"tenant": t.tenant, "template": t.id, "name": t.name, "build": b.id,
             "step": step, "error": message[:500]},
        )  # fmt: skip

    # -- the store --------------------------------------------------------------

    def gc(self) -> None:
        """Remove the store templates no tag points at, unless a sandbox runs in one."""
        reg = self.registry
        in_use = {getattr(e.sb.policy, "template", None) for e in self.svc.live()}
        with reg.lock:
            todo = sorted(reg.doomed - in_use)
        if not todo:
            return
        store = TemplateStore()
        for name in todo:
            try:
                store.remove(name)
            except (TemplateError, OSError) as exc:
                log.warning("template %s could not be removed: %s", name, exc)
                continue
            with reg.lock:
                reg.doomed.discard(name)
        reg.save()

    def delete(self, t: Tpl) -> None:
        self.registry.delete(t)
        self.uploads.drop(t.tenant, t.id)
        self.svc.audit.append(
            "tpl-" + t.id, "template.deleted", {"tenant": t.tenant, "template": t.id,
                                                "name": t.name}, decision="allow",
        )  # fmt: skip
        self.gc()


def _audit_id(b: Build) -> str:
    return "tb-" + b.id.replace("-", "")[:12]


_managers: weakref.WeakKeyDictionary[SandboxService, Builds] = weakref.WeakKeyDictionary()
_managers_lock = threading.Lock()


def manager(svc: SandboxService) -> Builds:
    with _managers_lock:
        m = _managers.get(svc)
        if m is None:
            m = _managers[svc] = Builds(svc)
        return m


# -- the steps, as a recipe -----------------------------------------------------------


def _bad(msg: str, rule: str = "template.build") -> ApiError:
    return ApiError(400, "invalid", msg, rule=rule)


def _store_names(store: TemplateStore) -> list[str]:
    return [t.name for t in store.list() if t.name and not t.name.startswith("e2b-")]


def _store_template(store: TemplateStore, name: str) -> str | None:
    """``name`` if it is a template of the store that every tenant may build on."""
    from ...templates._store import NAME

    if not NAME.match(name) or name.startswith("e2b-"):
        return None
    try:
        store.get(name)
    except TemplateError:
        return None
    return name


def _base(m: Builds, tenant: Tenant, body: dict[str, Any], store: TemplateStore) -> str:
    if body.get("fromImageRegistry") is not None:
        raise _bad("fromImageRegistry: glassroom pulls from no registry (none is reachable from "
                   "here); import the image with `glassroom template import` and build "
                   "from_template(NAME)")  # fmt: skip
    known = ", ".join(_store_names(store)[:20]) or "none"
    ref = body.get("fromTemplate")
    if ref is not None:
        if not isinstance(ref, str) or not ref or len(ref) > 200:
            raise _bad("fromTemplate: a template name")
        found = m.registry.find(tenant.name, ref)
        if found is not None:
            b = m.registry.tagged(*found)
            assert b.store_name is not None
            return b.store_name
        name = _store_template(store, ref)
        if name is None:
            raise _bad(f"fromTemplate {ref[:80]!r}: neither a template of yours nor of the "
                       f"template store (the store has: {known})")  # fmt: skip
        return name
    image = body.get("fromImage") or "e2bdev/base"
    if not isinstance(image, str) or len(image) > 300:
        raise _bad("fromImage: an image reference")
    plain = re.sub(r"^(docker\.io/|index\.docker\.io/)?(library/)?", "", image)
    plain = plain.removesuffix(":latest")
    if plain in ("e2bdev/base", "e2b/base"):
        plain = BASE_TEMPLATE
    name = _store_template(store, plain)
    if name is not None:
        return name
    repo, _, tag = plain.partition(":")
    if repo == "debian":  # from_debian_image(): a bootstrap, with apt_install's packages
        suite = tag or "stable"
        if not SUITE.match(suite):
            raise _bad(f"fromImage {image[:80]!r}: {suite[:40]!r} is not a Debian suite name")
        return f"debian:{suite}"
    hint = ""
    if repo == "ubuntu":
        hint = ("; a Debian base is from_debian_image(SUITE) (its packages with "
                "apt_install before any other step)")  # fmt: skip
    raise _bad(
        f"fromImage {image[:80]!r}: the template store has no {plain[:80]!r} (it has: {known}), "
        "and glassroom pulls from no registry (none is reachable from here); import the image "
        "with `glassroom template import` (a docker save tar or an OCI layout) and use "
        f"from_template(NAME) or from_image(NAME){hint}"
    )  # fmt: skip


def _path(value: str, where: str, what: str) -> str:
    """A path the file system can take (ENAMETOOLONG would be a 500 later)."""
    if len(value.encode()) > 4096 or any(len(p.encode()) > 255 for p in value.split("/")):
        raise _bad(f"{where}: {what} {value[:80]!r}...: a path is at most 4096 bytes, "
                   "each of its names at most 255")  # fmt: skip
    return value


def _args(s: dict[str, Any], where: str, lo: int, hi: int) -> list[str]:
    args = s.get("args") or []
    ok = isinstance(args, list) and lo <= len(args) <= hi
    if not ok or not all(isinstance(a, str) and "\0" not in a for a in args):
        raise _bad(f"{where}: args must be {lo} to {hi} strings without NUL")
    if sum(len(a) for a in args) > MAX_ARG_BYTES:
        raise _bad(f"{where}: args longer than {MAX_ARG_BYTES} bytes")
    return list(args)


def plan(m: Builds, tenant: Tenant, t: Tpl, body: dict[str, Any]) -> _Plan:
    """The build request as a recipe of the store's builder, or a 400 naming the step."""
    from ...policy._template import resolve

    for key in ("startCmd", "readyCmd"):
        if body.get(key):
            raise _bad(f"{key}: glassroom runs no start or ready command when a sandbox "
                       "starts (set_start_cmd / set_ready_cmd are not supported); start the "
                       "service from your code after Sandbox.create")  # fmt: skip
    store = TemplateStore()
    base = _base(m, tenant, body, store)
    debian = base.startswith("debian:")
    rootfs = None if debian else store.get(base).rootfs
    workdir = "/" if debian else store.get(base).meta.workdir or "/"
    raw = body.get("steps") or []
    if not isinstance(raw, list) or len(raw) > MAX_STEPS:
        raise _bad(f"steps: a list of at most {MAX_STEPS} steps")
    out = _Plan(base, [])
    envs: dict[str, str] = {}
    for i, s in enumerate(raw):
        where = f"step {i + 1}"
        if not isinstance(s, dict) or not isinstance(s.get("type"), str):
            raise _bad(f"{where}: a step is an object with a type")
        kind = s["type"]
        if kind == "COPY":
            src, dest, user, mode = [*_args(s, where, 2, 4), "", ""][:4]
            h = s.get("filesHash")
            if not isinstance(h, str):
                raise _bad(f"{where}: COPY needs its filesHash")
            check_hash(h)
            if m.uploads.path(tenant.name, t.id, h) is None:
                raise _bad(f"{where}: COPY {src[:80]}: its files (hash {h}) were not uploaded",
                           rule="template.upload")  # fmt: skip
            norm = posixpath.normpath(_path(src, where, "COPY source"))
            if not src or norm == ".." or norm.startswith(("../", "/")):
                raise _bad(f"{where}: COPY {src[:80]!r}: a path inside the context")
            if src.count("**") > 1:  # each more '**' multiplies the matches (and the time)
                raise _bad(f"{where}: COPY {src[:80]!r}: at most one '**' in a pattern")
            if not dest:
                raise _bad(f"{where}: COPY needs a destination")
            dest = _path(posixpath.join(workdir, dest), where, "COPY destination")
            if not dest.endswith("/") and rootfs is not None:
                inside = resolve(rootfs, dest)
                if inside is not None and (rootfs / inside.lstrip("/")).is_dir():
                    dest += "/"  # Docker's COPY: into an existing directory
            try:
                perm = int(mode, 8) if mode else None
            except ValueError:
                raise _bad(f"{where}: COPY mode {mode[:20]!r} is not octal") from None
            if perm is not None and not 0 <= perm <= 0o7777:
                raise _bad(f"{where}: COPY mode {mode!r} is out of range")
            if user:
                out.notes.append(f"{where}: COPY owner {user!r} is not kept: a template's "
                                 "files belong to the sandbox's user")  # fmt: skip
            out.copies[len(out.steps)] = _Copy(h, src, perm, i + 1)
            out.steps.append(Step("copy", where, sources=[], dest=dest))
        elif kind == "RUN":
            args = _args(s, where, 1, 2)
            if not args[0].strip():
                raise _bad(f"{where}: RUN needs a command")
            pkgs = apt_packages(args[0]) if debian and not out.steps else None
            if pkgs is not None:  # E2B's apt_install on a Debian base: the bootstrap's
                try:
                    check(None, pkgs, where)
                except TemplateError as exc:
                    raise _bad(str(exc)) from None
                out.packages += [p for p in pkgs if p not in out.packages]
                out.apt_steps += 1
                continue
            if _APT.search(args[0]):
                raise _bad(f"{where}: RUN {args[0][:80]!r}: apt and dpkg cannot run in a build "
                           "step (it runs as uid 1000 with no capabilities); build a Debian base "
                           "with its packages from a recipe with from = \"debian:SUITE\" "
                           "(docs/templates.md) and build from_template(it)")  # fmt: skip
            if len(args) > 1 and args[1]:
                out.notes.append(f"{where}: RUN as {args[1]!r}: build steps run as the "
                                 "sandbox's uid 1000, with no root")  # fmt: skip
            out.steps.append(Step("run", where, argv=["/bin/sh", "-c", args[0]]))
        elif kind == "ENV":
            args = _args(s, where, 2, 2 * 256)
            if len(args) % 2:
                raise _bad(f"{where}: ENV args are name, value pairs")
            env = dict(zip(args[::2], args[1::2], strict=True))
            for k in env:
                if not _ENV_NAME.match(k):
                    raise _bad(f"{where}: ENV {k[:80]!r} is not a variable name")
            envs.update(env)  # every command gets them all: too many and no exec works
            if sum(len(k) + len(v) + 2 for k, v in envs.items()) > MAX_ARG_BYTES:
                raise _bad(f"{where}: the template's ENV would be over {MAX_ARG_BYTES} bytes")
            out.steps.append(Step("env", where, env=env))
        elif kind == "WORKDIR":
            (wd,) = _args(s, where, 1, 1)
            workdir = _path(posixpath.normpath(posixpath.join(workdir, wd)), where, "WORKDIR")
            out.steps.append(Step("workdir", where, value=workdir))
        elif kind == "USER":
            (user,) = _args(s, where, 1, 1)
            out.notes.append(f"{where}: USER {user!r} is kept in the template's metadata; build "
                             "steps and sandboxes run as uid 1000 whatever it says")  # fmt: skip
            out.steps.append(Step("user", where, value=user))
        else:
            raise _bad(f"{where}: step type {kind[:40]!r} is not one of COPY, RUN, ENV, "
                       "WORKDIR, USER")  # fmt: skip
    return out


def _resources(body: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The build's asked resources, each at most the operator's ``base`` gives."""
    out: dict[str, Any] = {}
    for key, lo, cap, to in (("cpuCount", 1, MAX_CPUS, "cpus"),
                             ("memoryMB", 128, MAX_MEMORY_MB, "memory_mib"),
                             ("minFreeDiskMB", 0, MAX_DISK_MB, "disk_mib")):  # fmt: skip
        v = body.get(key)
        if v is None:
            continue
        hi = min(cap, int(base[to]))
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ApiError(400, "invalid", f"{key}: a whole number from {lo} to {hi}",
                           rule=f"template.{key}")  # fmt: skip
        if to == "cpus":
            out[to] = float(v)
        elif to == "disk_mib":
            if v:
                out[to] = max(int(base["disk_mib"]), v)
        else:
            out[to] = v
    return out


# -- handlers -------------------------------------------------------------------------


def _m(request: Request) -> tuple[Builds, Tenant]:
    tenant = _tenant(request)
    return manager(_svc(request)), tenant


def _template_json(t: Tpl, b: Build) -> dict[str, Any]:
    return {"templateID": t.id, "buildID": b.id, "public": False, "names": [t.name],
            "tags": list(b.tags), "aliases": [t.name]}  # fmt: skip


async def request_build(request: Request) -> Response:
    """``POST /v3/templates`` (and v2's, with ``alias``): 202, a build waiting for its steps."""
    try:
        m, tenant = _m(request)
        body = await _json(request)
        raw = body.get("name") if body.get("name") is not None else body.get("alias")
        name, tag = check_name(raw)
        tags = check_tags(body.get("tags"))
        if tag is not None:
            tags = list(dict.fromkeys([tag, *tags]))
        if name in m.svc.cfg.templates:
            raise ApiError(409, "conflict", f"{name!r} is a template of this server; "
                                            "choose another name")  # fmt: skip
        res = _resources(body, m.base_policy["resources"])
        t, b = await anyio.to_thread.run_sync(m.registry.request, tenant.name, name, tags, res)
    except ApiError as exc:
        return _err(exc)
    return JSONResponse(_template_json(t, b), status_code=202)


async def file_link(request: Request) -> Response:
    """``GET /templates/{id}/files/{hash}``: 201 ``{present, url, headers}``."""
    try:
        m, tenant = _m(request)
        t = m.registry.get(tenant.name, request.path_params["template_id"])
        h = check_hash(request.path_params["files_hash"])
        present = await anyio.to_thread.run_sync(m.uploads.path, tenant.name, t.id, h)
        token = m.uploads.ticket(tenant.name, t.id, h)
    except ApiError as exc:
        return _err(exc)
    url = f"{str(request.base_url).rstrip('/')}/e2b-template-files/{token}"
    return JSONResponse({"present": present is not None, "url": url, "headers": UPLOAD_HEADERS},
                        status_code=201)  # fmt: skip


async def upload(request: Request) -> Response:
    """``PUT /e2b-template-files/{ticket}``: the ticket is the credential (the SDK
    sends no API key with an upload)."""
    try:
        m = manager(_svc(request))
        body = await request.body()
        tenant, tid, _ = await anyio.to_thread.run_sync(
            m.uploads.put, request.path_params["token"], body
        )
        if m.registry.find(tenant, tid) is None:  # deleted meanwhile
            m.uploads.drop(tenant, tid)
            raise ApiError(404, "not_found", f"template {tid} was not found", rule="template")
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=200)


async def start_build(request: Request) -> Response:
    """``POST /v2/templates/{id}/builds/{build}``: 202, the build queued; 400 naming
    the step when a step cannot be built here."""
    try:
        m, tenant = _m(request)
        p = request.path_params
        t, b = m.registry.build(tenant.name, p["template_id"], p["build_id"])
        if b.status != "waiting":
            raise ApiError(409, "conflict", f"build {b.id} was started already ({b.status})")
        body = await _json(request)
        try:
            recipe = await anyio.to_thread.run_sync(plan, m, tenant, t, body)
        except ApiError as exc:
            at = _STEP_OF.match(exc.message)
            if b.status == "waiting":  # not one that a concurrent start queued
                m._fail(t, b, exc.message, at.group(1) if at else "base")
            raise
        m.enqueue(t, b, recipe)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=202)


def _int_param(raw: str | None, name: str, default: int, hi: int) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 9 or int(raw) > hi:
        raise ApiError(400, "invalid", f"{name}: a whole number from 0 to {hi}")
    return int(raw)


async def build_status(request: Request) -> Response:
    """``GET /templates/{id}/builds/{build}/status``: status, reason, and the log
    entries from ``logsOffset`` (at most ``limit``, 100; ``level``: the least)."""
    try:
        m, tenant = _m(request)
        p, q = request.path_params, request.query_params
        t, b = m.registry.build(tenant.name, p["template_id"], p["build_id"])
        offset = _int_param(q.get("logsOffset"), "logsOffset", 0, 10**9)
        limit = _int_param(q.get("limit"), "limit", 100, 100)
        level = q.get("level")
        if level is not None and level not in LEVELS:
            raise ApiError(400, "invalid", f"level: one of {', '.join(LEVELS)}")
        with m.registry.lock:
            logs = list(b.logs)
            status, reason, step = b.status, b.reason, b.step
    except ApiError as exc:
        return _err(exc)
    if level is not None:
        logs = [e for e in logs if LEVELS.get(e["level"], 1) >= LEVELS[level]]
    out: dict[str, Any] = {"logs": [], "logEntries": logs[offset : offset + limit],
                           "templateID": t.id, "buildID": b.id, "status": status}  # fmt: skip
    if status == "error":
        out["reason"] = {"message": reason or "build failed",
                         "logEntries": [e for e in logs if e["level"] == "error"][-5:]}  # fmt: skip
        if step is not None:
            out["reason"]["step"] = step
    return JSONResponse(out)


async def alias(request: Request) -> Response:
    """``GET /templates/aliases/{name}`` (``Template.exists``): the tenant's own only."""
    try:
        m, tenant = _m(request)
        name = request.path_params["alias"]
        found = m.registry.find(tenant.name, name)
        if found is None or found[0].name != split_ref(name)[0]:
            raise ApiError(404, "not_found", f"template {name[:80]!r} was not found",
                           rule="template")  # fmt: skip
    except ApiError as exc:
        return _err(exc)
    return JSONResponse({"templateID": found[0].id, "public": False})


async def assign_tags(request: Request) -> Response:
    """``POST /templates/tags`` ``{target: "name:tag", tags}``: 201 ``{tags, buildID}``."""
    try:
        m, tenant = _m(request)
        body = await _json(request)
        name, tag = check_name(body.get("target"), "target")
        tags = check_tags(body.get("tags"))
        if not tags:
            raise ApiError(400, "invalid", "tags: at least one tag")
        t = m.registry.get(tenant.name, name)
        b = m.registry.tagged(t, tag)
        await anyio.to_thread.run_sync(m.registry.assign, t, b, tags)
        await anyio.to_thread.run_sync(m.gc)
    except ApiError as exc:
        return _err(exc)
    return JSONResponse({"tags": tags, "buildID": b.id}, status_code=201)


async def remove_tags(request: Request) -> Response:
    """``DELETE /templates/tags`` ``{name, tags}``: 204; a build left untagged goes."""
    try:
        m, tenant = _m(request)
        body = await _json(request)
        name, _ = check_name(body.get("name"))
        raw = body.get("tags")
        tags = check_tags(raw)
        if not tags:
            raise ApiError(400, "invalid", "tags: at least one tag")
        t = m.registry.get(tenant.name, name)
        await anyio.to_thread.run_sync(m.registry.untag, t, tags)
        await anyio.to_thread.run_sync(m.gc)
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


async def list_tags(request: Request) -> Response:
    """``GET /templates/{id}/tags``: ``[{tag, buildID, createdAt}]``."""
    from ..http._service import rfc3339

    try:
        m, tenant = _m(request)
        t = m.registry.get(tenant.name, request.path_params["template_id"])
        with m.registry.lock:
            items = sorted(t.tags.items())
    except ApiError as exc:
        return _err(exc)
    return JSONResponse([{"tag": k, "buildID": v[0], "createdAt": rfc3339(v[1])}
                         for k, v in items])  # fmt: skip


async def delete(request: Request) -> Response:
    """``DELETE /templates/{id}``: the tenant's template (by id or name) and its
    builds; anything else is a snapshot's id (``Sandbox.delete_snapshot``)."""
    from . import _control

    try:
        m, tenant = _m(request)
        ref = request.path_params["template_id"]
        found = m.registry.find(tenant.name, ref)
        if found is None or split_ref(ref)[1] is not None:
            return await _control.delete_template(request)
        await anyio.to_thread.run_sync(m.delete, found[0])
    except ApiError as exc:
        return _err(exc)
    return Response(status_code=204)


# -- Sandbox.create -----------------------------------------------------------------


@dataclass
class Built:
    """What a create from a tenant's built template gets."""

    policy: Policy
    label: str

    def network(self, body: dict[str, Any]) -> NetworkOptions:
        overlay = _network.parse(body.get("network"), body.get("allow_internet_access"))
        _network.check_narrowing(overlay, self.policy, self.label)
        return NetworkOptions(decider=_network.decider_for(self.policy, overlay))


def for_create(svc: SandboxService, tenant: Tenant, ref: str) -> Built | None:
    """The tenant's built template ``ref`` (``name[:tag]`` or its id) names, or None
    (then it is the server's template, a snapshot, or not found).  A template of
    the server's config wins, as it does over snapshots."""
    if ref in svc.cfg.templates or len(ref) > 200:
        return None
    m = manager(svc)
    found = m.registry.find(tenant.name, ref)
    if found is None:
        return None
    b = m.registry.tagged(*found)
    name = found[0].name
    return Built(m.policy(b), name if found[1] is None else f"{name}:{found[1]}")


def add_routes(add: Any) -> None:
    """Register the routes (before ``DELETE /templates/{id:path}``, which is :func:`delete`)."""
    for prefix in ("/v3", "/v2"):
        add(f"{prefix}/templates", request_build, methods=["POST"])
    add("/v2/templates/{template_id}/builds/{build_id}", start_build, methods=["POST"])
    add("/templates/{template_id}/builds/{build_id}/status", build_status, methods=["GET"])
    add("/templates/{template_id}/files/{files_hash}", file_link, methods=["GET"])
    add("/e2b-template-files/{token}", upload, methods=["PUT"])
    add("/templates/aliases/{alias}", alias, methods=["GET"])
    add("/templates/tags", assign_tags, methods=["POST"])
    add("/templates/tags", remove_tags, methods=["DELETE"])
    add("/templates/{template_id}/tags", list_tags, methods=["GET"])
    add("/templates/{template_id:path}", delete, methods=["DELETE"])


__all__ = ["Built", "add_routes", "for_create", "manager"]
