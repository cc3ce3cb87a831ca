"""Template recipes: a TOML file, or a Dockerfile subset, parsed into steps.

TOML::

    from = "template:busy"        # template:NAME, or oci:PATH (relative to the recipe)
    network = ["pypi.org"]        # what RUN steps may reach ([network] entry syntax)
    tools = ["sh", "python3"]     # what RUN steps may run (default: a shell's usual set)
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

Dockerfile subset: ``FROM`` (a template name, ``template:NAME`` or
``oci:PATH``), ``RUN`` (shell or JSON exec form), ``COPY SRC... DEST``,
``ENV K=V ...`` (or ``ENV K V``), ``WORKDIR``, ``USER``; ``#`` comments and
``\\`` continuations.  Anything else is refused with its line, since a
builder that skipped an instruction would build something else than asked.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import TemplateError

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
    base: str  # "template:NAME" | "oci:PATH"
    steps: list[Step]
    context: Path  # COPY sources are relative to it
    network: list[str] = field(default_factory=list)
    tools: list[str] | None = None
    source: str = ""


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
    if kind in ("debian", "ubuntu"):
        raise _err(where, f"FROM {text}: building from a distribution needs debootstrap, "
                          "which this builder does not run yet (docs/templates.md); start "
                          "from an imported image (oci:PATH) or a template")  # fmt: skip
    raise _err(where, f"FROM {text!r}: expected a template name, template:NAME or oci:PATH")


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
_STEP_KEYS = {"run", "copy", "env", "workdir", "user"}


def parse_toml(text: str, source: str, context: Path) -> Recipe:
    try:
        raw: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _err(source, f"not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _TOML_KEYS)
    if unknown:
        raise _err(source, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_TOML_KEYS))})")
    if not isinstance(raw.get("from"), str):
        raise _err(source, "from: a template name, template:NAME or oci:PATH is required")
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
    return Recipe(_base(raw["from"], f"{source}: from", context), steps, context, list(net),
                  list(tools) if tools is not None else None, source)  # fmt: skip


def _step(kind: str, v: Any, where: str) -> Step:
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
    return Recipe(base, steps, context, [], None, source)


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
