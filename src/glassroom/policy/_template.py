"""Compiling a policy that names a template (``template = "NAME"``).

With a template the sandbox's ``/`` is the template's tree, bound read-only,
instead of a few host paths.  What changes in the plan, and why:

- **Mounts.** Each top-level entry of the tree is bound read-only (a
  symlink is recreated), onto bwrap's own empty root, rather than the tree
  itself as ``/``: the sandbox's mount points (``/workspace``, ``/tmp``,
  ``/proc``, ``/dev``, ``/run``) are then made in that root, never in the
  read-only tree.  The names glassroom owns are not taken from the tree.
- **The whole template is readable, nothing of the host is.**  Landlock's
  read rules are the template's top-level entries; ``filesystem.read`` binds
  nothing of the host.  ``filesystem.write`` still binds a host dir, only
  where the template has nothing (a bind under a read-only template dir
  could not be made).
- **Tools are found in the template**, through its own symlinks, resolved
  as the sandbox will see them; so are their ELF loaders.
- **The template's Env** (an image's PATH, LANG ...) applies, except the
  variables glassroom sets for the walls (HOME, TMPDIR, USER, proxies).

Nothing here can widen a wall: the tree is read-only, the seccomp filter,
Landlock, namespaces and cgroups are built exactly as without a template,
and its setuid bits were dropped at import (and no_new_privs holds anyway).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Literal

from .._errors import PlanError
from ..plan import Mount, Tool

#: Top-level names the sandbox's own mounts own; the template's are not used.
OWN_NAMES = frozenset({"proc", "dev", "sys", "tmp", "workspace", "run", "home", ".glassroom",
                       ".glassroom-host", ".glassroom-net"})
#: Where the host's /usr is bound for the in-sandbox init's interpreter only
#: (no Landlock rule: the task cannot read it); see backends/namespaces.py.
HOST_USR_INSIDE = "/.glassroom-host/usr"
#: The in-sandbox init's own env under a template (never the commands'): the C
#: locale and a full POSIX TZ rule, so neither glibc nor Python opens the
#: template's locale or zoneinfo files before the walls are up.
INIT_ENV_UNDER_TEMPLATE = (("LC_ALL", "C"), ("TZ", "UTC0"))
#: Env variables a template may not set: glassroom's own, for the walls.
PROTECTED_ENV = frozenset({"HOME", "TMPDIR", "USER", "LOGNAME", "SHELL"})


def resolve(root: Path, path: str, *, follow_last: bool = True) -> str | None:
    """``path`` as the sandbox sees it, with every symlink resolved inside
    ``root`` (an absolute link target starts again at ``root``, never the
    host's ``/``); None if it does not exist.  At most 40 links, like the kernel."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        host = root.joinpath(*done, name)
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        done.append(name)
    return "/" + "/".join(done)


def mounts(root: Path, write: list[str] | tuple[str, ...], *,
           writable: bool = False) -> list[Mount]:  # fmt: skip
    """The template's top-level entries as read-only binds and links
    (``writable``: a build step's private tree, bound read-write)."""
    out: list[Mount] = []
    for name in sorted(os.listdir(root)):
        if name in OWN_NAMES:
            continue
        host = root / name
        st = os.lstat(host)
        if stat.S_ISLNK(st.st_mode):
            out.append(Mount("symlink", f"/{name}", "template", source=os.readlink(host)))
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            kind: Literal["ro-bind", "tree-bind"] = "tree-bind" if writable else "ro-bind"
            out.append(Mount(kind, f"/{name}", "template", source=str(host)))
    for i, path in enumerate(write):
        top = path.strip("/").split("/")[0]
        if top and top not in OWN_NAMES and os.path.lexists(root / top):
            rule = f"filesystem.write[{i}]"
            raise PlanError(
                f"{rule}: {path} is inside the template's read-only /{top}; with a "
                "template a host dir can only be bound where the template has nothing",
                rule=rule,
            )
    return out


def read_rules(root: Path, read: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """``(path, rule)`` Landlock read rules: every top-level entry of the template.

    The whole template is readable: it holds only what its recipe or image
    put there, nothing of the host, and a task needs its libraries wherever
    the image keeps them.  ``filesystem.read`` therefore adds nothing; a path
    in it that names the sandbox's own mounts (``/tmp``, ``/run`` ...) is
    refused, since the template does not provide it."""
    for i, path in enumerate(read):
        top = path.strip("/").split("/")[0]
        if top in OWN_NAMES:
            rule = f"filesystem.read[{i}]"
            raise PlanError(f"{rule}: {path} is the sandbox's own, not the template's",
                            rule=rule)  # fmt: skip
    out = []
    for name in sorted(os.listdir(root)):
        if name in OWN_NAMES:
            continue
        p = root / name
        if not os.path.islink(p) and (os.path.isdir(p) or os.path.isfile(p)):
            out.append((f"/{name}", "template"))
    return out


def covered(inside: str, read: list[str] | tuple[str, ...], root: Path) -> bool:
    """Is ``inside`` (a resolved path in the template) beneath one of ``read``?"""
    for r in read:
        real = resolve(root, r)
        if real is None:
            continue
        if inside == real or inside.startswith(real.rstrip("/") + "/"):
            return True
    return False


def tool(root: Path, name: str, i: int, read: list[str] | tuple[str, ...],
         search: tuple[str, ...]) -> Tool:  # fmt: skip
    """A ``tools.allow`` entry, found in the template (``read``: the readable
    paths, i.e. the template's top-level entries)."""
    rule = f"tools.allow[{i}]"
    candidates = [name] if name.startswith("/") else [f"{d}/{name}" for d in search]
    for cand in candidates:
        inside = resolve(root, cand)
        if inside is None:
            continue
        host = root / inside.lstrip("/")
        top = inside.strip("/").split("/")[0]
        if top in OWN_NAMES or host.is_symlink():
            continue
        if host.is_file() and os.stat(host).st_mode & 0o111:
            if not covered(inside, read, root):
                raise PlanError(
                    f"{rule}: {name} resolves to {inside} in the template, which is the "
                    "sandbox's own (not the template's), so it could not run",
                    rule=rule,
                )
            return Tool(name, inside, rule)
    raise PlanError(
        f"{rule}: {name!r} not found in the template (searched {':'.join(search)})", rule=rule
    )


def programs(root: Path, search: tuple[str, ...], limit: int = 4096) -> list[str]:
    """Every program of the template's ``search`` dirs, by name, that
    :func:`tool` would accept: for a template whose author chose its programs
    (E2B's template build API) and wants them runnable, each still one
    Landlock rule on its own file.  First one of a name wins, as on PATH."""
    from ._paths import tool_problem

    read = [p for p, _ in read_rules(root, [])]
    found: dict[str, None] = {}
    for d in search:
        inside = resolve(root, d)
        if inside is None or not (root / inside.lstrip("/")).is_dir():
            continue
        for name in sorted(os.listdir(root / inside.lstrip("/"))):
            if name in found or tool_problem(name) is not None:
                continue
            try:
                tool(root, name, 0, read, (d,))
            except PlanError:
                continue
            found[name] = None
            if len(found) >= limit:
                return list(found)
    return list(found)


def interpreter(root: Path, inside: str, rule: str) -> str | None:
    """PT_INTERP of a template executable, resolved in the template: a
    regular file under one of the template's own entries, or refused.  (An
    image could name a loader path that, in the tree, is a link to ``/`` or
    into glassroom's own names: Landlock would then grant execute on it.)"""
    from ._compile import elf_interp_raw

    raw = elf_interp_raw(root / inside.lstrip("/"))
    if not raw:
        return None
    real = resolve(root, raw)
    top = (real or "/").strip("/").split("/")[0]
    host = root / (real or "/").lstrip("/")
    if real is None or not top or top in OWN_NAMES or host.is_symlink() or not host.is_file():
        raise PlanError(
            f"{rule}: {inside} names the loader {raw!r}, which is not a regular file of "
            "the template", rule=rule,
        )  # fmt: skip
    return real


def check_tree(root: Path) -> None:
    """What a template must never hold at run time (the store strips it at
    every commit; a tree changed on disk since is refused here)."""
    from ..templates._store import LOADER_FILES

    for path in LOADER_FILES:
        for follow in (False, True):
            inside = resolve(root, path, follow_last=follow)
            if inside is not None and os.path.lexists(root / inside.lstrip("/")):
                raise PlanError(
                    f"template: the tree holds {path}, which the host's loader would read "
                    "inside the sandbox before its walls are up; refused", rule="template",
                )  # fmt: skip
    etc = root / "etc"
    if etc.is_symlink():
        raise PlanError("template: its /etc is a symlink; refused (glassroom binds its "
                        "identity files there)", rule="template")  # fmt: skip


def env(template_env: dict[str, str], proxied: set[str]) -> tuple[tuple[str, str], ...]:
    """The template's variables that may apply (PATH first among them)."""
    return tuple((k, v) for k, v in template_env.items()
                 if k not in PROTECTED_ENV and k not in proxied)  # fmt: skip
