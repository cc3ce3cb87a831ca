"""Template recipes: a TOML file, or a Dockerfile subset, parsed into steps.

TOML::

    from = "template:busy"        # template:NAME, oci:PATH (relative to the recipe), debian:SUITE
    network = ["pypi.org"]        # what RUN steps may reach ([network] entry syntax)
    tools = ["sh", "python3"]     # what RUN steps may run (default: a shell's usual set;
                                  # ["*"]: every program of the tree as the step starts)
    [[steps]]
    copy = ["app/", "/opt/app"]   # from the recipe's dir into the tree
    [[steps]]
    env = { APP_MODE = "prod" }
    [[steps]]
    workdir = "/opt/app"
    [[steps]]
    run = "python3 -m pip install --no-index ./wheels/*"   # sh -c; or a list (exec form)
    [[steps]]
    user = "1000"

A recipe ``from = "debian:bookworm"`` may start with ``apt`` steps
(``[[steps]] apt = ["git", "curl"]``; in a Dockerfile, ``RUN apt-get
install -y git curl``, optionally after ``apt-get update &&``): they are
installed when the Debian base is bootstrapped (``_debian``), so they must
come before every other step, and only a Debian base may have them.

Dockerfile subset: ``FROM`` (a template name, ``template:NAME`` or
``oci:PATH`` or ``debian:SUITE``), ``RUN`` (shell or JSON exec form), ``COPY SRC... DEST``,
``ENV K=V ...`` (or ``ENV K V``), ``WORKDIR``, ``USER``; ``#`` comments and
``\\`` continuations.  Anything else is refused with its line, since a
builder that skipped an instruction would build something else than asked.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import TemplateError
from ._debian import check

INSTRUCTIONS = ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Step:
    kind: str  # "run" | "copy" | "env" | "workdir" | "user"
    where: str  # "recipe.toml: steps[2]" or "Dockerfile:7"
    argv: list[str] = field(default_factory=list)  # run
    sources: list[str] = field(default_factory=list)  # copy
    dest: str = ""  # copy
    env: dict[str, str] = field(default_factory=dict)  # env
    value: str = ""  # workdir, user


@dataclass
class Recipe:
    base: str  # "template:NAME" | "oci:PATH" | "debian:SUITE"
    steps: list[Step]
    context: Path  # COPY sources are relative to it
    network: list[str] = field(default_factory=list)
    tools: list[str] | None = None
    source: str = ""
    #: Debian packages of a ``debian:SUITE`` base (its ``apt`` steps).
    packages: list[str] = field(default_factory=list)
    #: sha256 of the recipe's text (kept in the template's metadata: a rebuild check).
    digest: str = ""


def _err(where: str, msg: str) -> TemplateError:
    return TemplateError(f"{where}: {msg}", rule="template.recipe")


def _base(text: str, where: str, context: Path) -> str:
    kind, sep, rest = text.partition(":")
    if not sep:  # a bare name: a template of the store
        return f"template:{text}"
    if kind == "template" and rest:
        return text
    if kind == "oci" and rest:
        p = Path(rest)
        return f"oci:{p if p.is_absolute() else context / p}"
    if kind == "debian" and rest:
        check(rest, [], where)
        return text
    raise _err(where, f"FROM {text!r}: expected a template name, template:NAME, oci:PATH "
                      "or debian:SUITE")


def _abs(value: str, where: str, what: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise _err(where, f"{what} {value!r} must be an absolute path")
    return value


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file: ``*.toml`` as TOML, anything else as a Dockerfile."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{p}: cannot read the recipe: {exc}", rule="template.recipe") from None
    if p.suffix == ".toml":
        return parse_toml(text, p.name, p.parent)
    return parse_dockerfile(text, p.name, p.parent)


_TOML_KEYS = {"from", "network", "tools", "steps"}
_STEP_KEYS = {"run", "copy", "env", "workdir", "user", "apt"}
#: ``RUN apt-get install ...`` in a Dockerfile (after an optional ``apt-get update &&``).
_APT_RUN = re.compile(
    r"^(?:apt(?:-get)?\s+update(?:\s+-\S+)*\s*&&\s*)?"
    r"(?:[A-Z_]+=\S*\s+)*apt(?:-get)?\s+install((?:\s+\S+)+?)"
    r"(?:\s*&&\s*rm\s+-rf\s+/var/lib/apt/lists/\*)?\s*$")


def parse_toml(text: str, source: str, context: Path) -> Recipe:
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _err(source, f"not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _TOML_KEYS)
    if unknown:
        raise _err(source, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOML_KEYS))})")
    if not isinstance(raw.get("from"), str):
        raise _err(source, "from: a template name, template:NAME, oci:PATH or debian:SUITE "
                           "is required")
    steps = []
    for i, s in enumerate(raw.get("steps") or []):
        where = f"{source}: steps[{i}]"
        if not isinstance(s, dict) or len(s) != 1 or next(iter(s)) not in _STEP_KEYS:
            raise _err(where, f"a step is one of {', '.join(sorted(_STEP_KEYS))}")
        (kind, v), = s.items()
        steps.append(_step(kind, v, where))
    net, tools = raw.get("network") or [], raw.get("tools")
    if not (isinstance(net, list) and all(isinstance(x, str) for x in net)):
        raise _err(source, "network: a list of [network] entries")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(x, str) for x in tools)):  # fmt: skip
        raise _err(source, "tools: a list of tool names")
    base = _base(raw["from"], f"{source}: from", context)
    return _hoist_apt(Recipe(base, steps, context, list(net),
                             list(tools) if tools is not None else None, source,
                             digest=_sha(text)))  # fmt: skip


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def apt_packages(command: str) -> list[str] | None:
    """The packages of a shell ``apt-get install`` line (as a Dockerfile RUN or
    E2B's ``apt_install`` writes it), or None when it is not one.  Every word
    that is not an option must then be a package name (``check``)."""
    m = _APT_RUN.match(command.strip())
    return None if m is None else [w for w in m.group(1).split() if not w.startswith("-")]


def _hoist_apt(recipe: Recipe) -> Recipe:
    """Move the leading ``apt`` steps into the Debian bootstrap (see above)."""
    lead = 0
    while lead < len(recipe.steps) and recipe.steps[lead].kind == "apt":
        lead += 1
    for step in recipe.steps[lead:]:
        if step.kind == "apt":
            raise _err(step.where, "apt steps come first: their packages are installed "
                                   "when the Debian base is bootstrapped")  # fmt: skip
    if lead and not recipe.base.startswith("debian:"):
        raise _err(recipe.steps[0].where,
                   f"apt packages need a Debian base (FROM debian:SUITE), not {recipe.base}: "
                   "a RUN step cannot run apt (docs/templates.md)")  # fmt: skip
    for step in recipe.steps[:lead]:
        recipe.packages += [p for p in step.sources if p not in recipe.packages]
    recipe.steps = recipe.steps[lead:]
    return recipe


def _step(kind: str, v: Any, where: str) -> Step:
    if kind == "apt":
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            check(None, list(v), where)
            return Step("apt", where, sources=list(v))
        raise _err(where, "apt: a list of Debian package names")
    if kind == "run":
        if isinstance(v, str) and v.strip():
            return Step("run", where, argv=["/bin/sh", "-c", v])
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            return Step("run", where, argv=list(v))
        raise _err(where, "run: a command line, or a list (exec form)")
    if kind == "copy":
        if (isinstance(v, list) and len(v) >= 2 and all(isinstance(x, str) for x in v)):
            return Step("copy", where, sources=list(v[:-1]), dest=_abs(v[-1], where, "COPY dest"))
        raise _err(where, "copy: [SRC..., DEST]")
    if kind == "env":
        if isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
            for k in v:
                if not _ENV_NAME.match(k):
                    raise _err(where, f"env: {k!r} is not a variable name")
            return Step("env", where, env=dict(v))
        raise _err(where, "env: a table of strings")
    if not isinstance(v, str) or not v:
        raise _err(where, f"{kind}: a string")
    if kind == "workdir":
        return Step("workdir", where, value=_abs(v, where, "WORKDIR"))
    return Step("user", where, value=v)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, buf.strip()))
        buf = ""
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def parse_dockerfile(text: str, source: str, context: Path) -> Recipe:
    base: str | None = None
    steps: list[Step] = []
    for n, line in _logical_lines(text):
        where = f"{source}:{n}"
        word, _, rest = line.partition(" ")
        instr, rest = word.upper(), rest.strip()
        if instr not in INSTRUCTIONS:
            raise _err(where, f"unknown instruction {word!r} (this subset: "
                              f"{', '.join(INSTRUCTIONS)})")  # fmt: skip
        if not rest:
            raise _err(where, f"{instr} needs an argument")
        if instr == "FROM":
            if base is not None:
                raise _err(where, "a second FROM: multi-stage builds are not supported")
            base = _base(rest.split()[0], where, context)
            continue
        if base is None:
            raise _err(where, f"{instr} before FROM")
        if instr == "RUN":
            pkgs = apt_packages(rest) if not rest.startswith("[") else None
            if pkgs is not None:
                steps.append(_step("apt", pkgs, where))
            else:
                steps.append(_step("run", _exec_form(rest, where) or rest, where))
        elif instr == "COPY":
            parts = _exec_form(rest, where) or shlex.split(rest)
            if any(p.startswith("--") for p in parts):
                raise _err(where, "COPY options (--from, --chown ...) are not supported")
            steps.append(_step("copy", parts, where))
        elif instr == "ENV":
            steps.append(_step("env", _env_pairs(rest, where), where))
        else:
            steps.append(_step(instr.lower(), rest, where))
    if base is None:
        raise _err(source, "no FROM")
    return _hoist_apt(Recipe(base, steps, context, [], None, source, digest=_sha(text)))


def _exec_form(rest: str, where: str) -> list[str] | None:
    if not rest.startswith("["):
        return None
    try:
        v = json.loads(rest)
    except ValueError:
        raise _err(where, "a JSON array that does not parse") from None
    if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
        raise _err(where, "the exec form is a JSON array of strings")
    return v


def _env_pairs(rest: str, where: str) -> dict[str, str]:
    parts = shlex.split(rest)
    if parts and "=" not in parts[0]:  # ENV K V (the legacy form)
        return {parts[0]: rest.split(None, 1)[1] if len(parts) > 1 else ""}
    out = {}
    for p in parts:
        k, sep, v = p.partition("=")
        if not sep:
            raise _err(where, f"ENV {p!r}: expected K=V")
        out[k] = v
    return out
