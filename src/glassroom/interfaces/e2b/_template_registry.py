"""The tenants' E2B templates: names, builds and tags, kept beside the serve's data.

A template belongs to one tenant.  Its name (E2B's alias) is private to that
tenant: another tenant may use the same name for its own, and sees nothing
of this one.  Each build that succeeds is a store template named
``e2b-<tenant>-<name>-<build>`` (:func:`store_name`); tags (``default``
unless the build names others) point at builds, and a build no tag points
at leaves the store, once no live sandbox runs in it.

The index is ``registry.json`` in ``data_dir/e2b-templates`` (0600, replaced
in one rename); build logs are kept in memory only.  A build that was
running when the server stopped is an error after a restart.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..http._service import ApiError
from ._template_files import tenant_slug

#: E2B's template names, within what a store name may hold.
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_TAG = "default"
MAX_TEMPLATES = 50
MAX_BUILDS_KEPT = 10
MAX_TAGS = 32
MAX_LOG_ENTRIES = 2000


@dataclass
class Build:
    id: str
    created: float
    status: str = "waiting"  # waiting -> building -> ready | error
    finished: float = 0.0
    store_name: str | None = None
    tools: list[str] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    step: str | None = None
    tags: list[str] = field(default_factory=list)  # assigned when it is ready
    logs: list[dict[str, Any]] = field(default_factory=list)  # not persisted


@dataclass
class Tpl:
    id: str
    tenant: str
    name: str
    created: float
    builds: dict[str, Build] = field(default_factory=dict)
    #: tag -> [build id, when assigned]
    tags: dict[str, list[Any]] = field(default_factory=dict)


def store_name(tenant: str, name: str, build_id: str) -> str:
    return f"e2b-{tenant_slug(tenant)}-{name[:28]}-{uuid.UUID(build_id).hex[:12]}"


def split_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name:tag``."""
    name, sep, tag = ref.partition(":")
    return name, (tag if sep else None)


def check_name(raw: object, what: str = "name") -> tuple[str, str | None]:
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, "invalid", f"{what}: a template name is required")
    name, tag = split_ref(raw)
    if not NAME.match(name):
        raise ApiError(
            400, "invalid",
            f"{what} {raw[:80]!r}: a name is lowercase letters, digits, '-' and '_' "
            "(at most 48), optionally with ':TAG'",
        )  # fmt: skip
    if tag is not None:
        check_tag(tag, what)
    return name, tag


def check_tag(raw: object, what: str = "tags") -> str:
    if not isinstance(raw, str) or not TAG.match(raw):
        raise ApiError(
            400, "invalid",
            f"{what}: tag {str(raw)[:80]!r} must be letters, digits, '.', '-' and '_' (at most 64)",
        )  # fmt: skip
    return raw


def check_tags(raw: object, what: str = "tags") -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_TAGS:
        raise ApiError(400, "invalid", f"{what}: a list of at most {MAX_TAGS} tags")
    return list(dict.fromkeys(check_tag(t, what) for t in raw))


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.templates: dict[str, Tpl] = {}
        #: store names to remove once no sandbox runs in them
        self.doomed: set[str] = set()
        self._load()

    # -- persistence ------------------------------------------------------------

    @property
    def _file(self) -> Path:
        return self.root / "registry.json"

    def _load(self) -> None:
        try:
            raw = json.loads(self._file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):  # damaged: start afresh, keep the file for a human
            os.replace(self._file, self._file.with_suffix(f".damaged-{int(time.time())}"))
            return
        for t in raw.get("templates", []):
            builds = {b["id"]: Build(**b) for b in t.pop("builds", [])}
            tpl = Tpl(**t, builds=builds)
            for b in builds.values():
                if b.status in ("waiting", "building"):
                    b.status, b.reason = "error", "the server restarted during the build"
            self.templates[tpl.id] = tpl
        self.doomed = set(raw.get("doomed", []))

    def save(self) -> None:
        with self.lock:
            templates: list[dict[str, Any]] = []
            out = {"templates": templates, "doomed": sorted(self.doomed)}
            for t in self.templates.values():
                d = asdict(t)
                d["builds"] = [{k: v for k, v in asdict(b).items() if k != "logs"}
                               for b in t.builds.values()]  # fmt: skip
                templates.append(d)
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.root / f".registry.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(out, f)
            os.replace(tmp, self._file)

    # -- lookups ----------------------------------------------------------------

    def find(self, tenant: str, ref: str) -> tuple[Tpl, str | None] | None:
        """The tenant's template that ``ref`` (id or name, ``:tag`` optional) names."""
        key, tag = split_ref(ref)
        with self.lock:
            for t in self.templates.values():
                if t.tenant == tenant and key in (t.id, t.name):
                    return t, tag
        return None

    def get(self, tenant: str, template_id: str) -> Tpl:
        found = self.find(tenant, template_id)
        if found is None:
            raise ApiError(404, "not_found", f"template {template_id[:80]!r} was not found",
                           rule="template")  # fmt: skip
        return found[0]

    def build(self, tenant: str, template_id: str, build_id: str) -> tuple[Tpl, Build]:
        t = self.get(tenant, template_id)
        b = t.builds.get(build_id)
        if b is None:
            raise ApiError(404, "not_found", f"build {build_id[:80]!r} of template {t.id} "
                                             "was not found")  # fmt: skip
        return t, b

    def tagged(self, t: Tpl, tag: str | None) -> Build:
        """The ready build ``tag`` (default: ``default``) of ``t`` points at."""
        want = tag or DEFAULT_TAG
        entry = t.tags.get(want)
        b = t.builds.get(entry[0]) if entry else None
        if b is None or b.status != "ready" or b.store_name is None:
            raise ApiError(404, "not_found",
                           f"template {t.name!r} has no ready build tagged {want!r}",
                           rule="template")  # fmt: skip
        return b

    # -- changes ------------------------------------------------------------------

    def request(self, tenant: str, name: str, tags: list[str],
                resources: dict[str, Any]) -> tuple[Tpl, Build]:  # fmt: skip
        with self.lock:
            found = self.find(tenant, name)
            if found is None:
                if sum(1 for t in self.templates.values() if t.tenant == tenant) >= MAX_TEMPLATES:
                    raise ApiError(429, "limit", f"a tenant has at most {MAX_TEMPLATES} templates",
                                   rule="template.limit")  # fmt: skip
                t = Tpl(secrets.token_hex(10), tenant, name, time.time())
                self.templates[t.id] = t
            else:
                t = found[0]
                if t.name != name:  # the id of another template was given as a name
                    raise ApiError(409, "conflict", f"{name!r} is a template id, not a name")
            b = Build(str(uuid.uuid4()), time.time(), tags=tags or [DEFAULT_TAG],
                      resources=resources)  # fmt: skip
            t.builds[b.id] = b
            pointed = {v[0] for v in t.tags.values()}
            old = [x for x in t.builds.values()  # never one that is queued or running
                   if x.status in ("waiting", "ready", "error") and x.id not in pointed
                   and x.id != b.id]  # fmt: skip
            for x in old[: max(0, len(t.builds) - MAX_BUILDS_KEPT)]:
                self._forget(t, x)
            self.save()
            return t, b

    def _forget(self, t: Tpl, b: Build) -> None:
        t.builds.pop(b.id, None)
        for tag in [k for k, v in t.tags.items() if v[0] == b.id]:
            del t.tags[tag]
        if b.store_name:
            self.doomed.add(b.store_name)

    def log(self, b: Build, message: str, level: str = "info", step: str | None = None) -> None:
        from ..http._service import rfc3339

        with self.lock:
            if len(b.logs) >= MAX_LOG_ENTRIES:
                return
            if len(b.logs) == MAX_LOG_ENTRIES - 1:
                message, level = "(the rest of the build log is left out)", "warn"
            entry: dict[str, Any] = {"timestamp": rfc3339(time.time()),
                                     "message": message[:4000], "level": level}  # fmt: skip
            if step is not None:
                entry["step"] = step
            b.logs.append(entry)

    def assign(self, t: Tpl, b: Build, tags: list[str]) -> None:
        """Point ``tags`` at ``b``; builds no tag points at any more leave the store."""
        with self.lock:
            now = time.time()
            for tag in tags:
                t.tags[tag] = [b.id, now]
            self._unreferenced(t)
            self.save()

    def untag(self, t: Tpl, tags: list[str]) -> None:
        with self.lock:
            missing = [x for x in tags if x not in t.tags]
            if missing:
                raise ApiError(404, "not_found",
                               f"template {t.name!r} has no tag {missing[0]!r}")  # fmt: skip
            for tag in tags:
                del t.tags[tag]
            self._unreferenced(t)
            self.save()

    def _unreferenced(self, t: Tpl) -> None:
        pointed = {v[0] for v in t.tags.values()}
        for x in t.builds.values():
            if x.status == "ready" and x.id not in pointed and x.store_name:
                self.doomed.add(x.store_name)
                x.store_name = None  # still "ready" to a poller; no longer usable

    def delete(self, t: Tpl) -> None:
        with self.lock:
            for b in list(t.builds.values()):
                self._forget(t, b)
            self.templates.pop(t.id, None)
            self.save()
