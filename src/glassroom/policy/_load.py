"""Reading a policy from TOML, with every error pointing at FILE:LINE: field.

tomllib keeps no positions, so ``locate`` re-scans the raw text (already
known to be valid TOML) and maps each key path, and each array item, to the
line it starts on.  That is enough to point an error at the right line.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from glassroom._errors import PolicyError
from glassroom.policy._model import ERROR_TYPE, Policy

Loc = tuple[str | int, ...]


class PolicyValidationError(PolicyError):
    """A policy was refused; ``str()`` is the first problem (by line), ``errors`` all of them."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        source: str | None = None,
        errors: list[PolicyError] | None = None,
    ) -> None:
        super().__init__(message, field=field, line=line, source=source)
        self.reason = message
        self.errors: list[PolicyError] = errors or [
            PolicyError(message, field=field, line=line, source=source)
        ]


def default_policy() -> Policy:
    """The built-in policy, identical to what an empty policy file gives."""
    return Policy()


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate the policy file at ``path``."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyValidationError(
            f"cannot read policy file: {e.strerror or e}", source=source
        ) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PolicyValidationError(
            "cannot read policy file: not valid UTF-8", line=line, source=source
        ) from e
    return parse_policy(text, source)


def parse_policy(text: str, source: str | None = None) -> Policy:
    """Validate policy TOML ``text``; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg, line = _split_toml_error(str(e), text)
        raise PolicyValidationError(f"invalid TOML: {msg}", line=line, source=source) from e
    return validate_policy(data, source, text)


def validate_policy(
    data: Mapping[str, Any], source: str | None = None, text: str | None = None
) -> Policy:
    """Validate already-parsed policy data; ``text`` (the TOML) adds line numbers."""
    try:
        return Policy.model_validate(dict(data))
    except ValidationError as e:
        lines = locate(text) if text is not None else {}
        raise _convert(e, lines, source) from None


def _split_toml_error(message: str, text: str) -> tuple[str, int | None]:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if m:
        return f"{message[: m.start()]} (column {m.group(2)})", int(m.group(1))
    m = re.search(r"\s*\(at end of document\)\s*$", message)
    if m:
        return f"{message[: m.start()]} (at end of document)", text.count("\n") + 1
    return message, None


def _convert(exc: ValidationError, lines: dict[Loc, int], source: str | None) -> PolicyError:
    found: list[tuple[str, str | None, int | None]] = []
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == ERROR_TYPE:
            loc += tuple(err.get("ctx", {}).get("at", ()))
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_fields(loc[:-1])
            msg = "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        found.append((msg, format_loc(loc) or None, line_of(lines, loc)))
    found.sort(key=lambda f: (f[2] is None, f[2] or 0))
    errors = [PolicyError(m, field=f, line=n, source=source) for m, f, n in found]
    msg, field, line = found[0]
    return PolicyValidationError(msg, field=field, line=line, source=source, errors=errors)


def _allowed_fields(loc: Loc) -> list[str]:
    model: type[BaseModel] = Policy
    for part in loc:
        ann = model.model_fields[part].annotation if isinstance(part, str) else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def format_loc(loc: Loc) -> str:
    """``("filesystem", "read", 2)`` -> ``"filesystem.read[2]"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(lines: dict[Loc, int], loc: Loc) -> int | None:
    """Line of ``loc``, or of its nearest enclosing key that appears in the text."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def locate(text: str) -> dict[Loc, int]:
    """Map every key path (and array item) in TOML ``text`` to its 1-based line."""
    scanner = _Scanner(text)
    with contextlib.suppress(IndexError, ValueError):  # text was valid TOML; be safe anyway
        scanner.document()
    return scanner.lines


_BARE = re.compile(r"[A-Za-z0-9_-]*")


class _Scanner:
    """Just enough of a TOML reader to know where keys and items start."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[Loc, int] = {}
        self.aot: dict[Loc, int] = {}  # array-of-tables path -> number of elements

    def document(self) -> None:
        table: Loc = ()
        while True:
            self.skip(newlines=True)
            if self.i >= len(self.s):
                return
            start = self.i
            if self.s.startswith("[", self.i):
                table = self.header()
            else:
                self.keyval(table)
            if self.i == start:  # never loop on something unexpected
                self.advance(1)

    def advance(self, n: int) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def skip(self, newlines: bool) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c == "#":
                end = self.s.find("\n", self.i)
                self.i = len(self.s) if end < 0 else end
            elif c in " \t\r" or (newlines and c == "\n"):
                self.advance(1)
            else:
                return

    def record(self, path: Loc, line: int) -> None:
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], line)

    def header(self) -> Loc:
        line, aot = self.line, self.s.startswith("[[", self.i)
        self.advance(2 if aot else 1)
        parts = self.key()
        self.skip(newlines=False)
        self.advance(2 if aot else 1)
        path: Loc = ()
        for part in parts[:-1]:  # a dotted header walks into the latest element of an AoT
            path += (part,)
            if path in self.aot:
                path += (self.aot[path] - 1,)
        path += (parts[-1],)
        if aot:
            self.record(path, line)
            index = self.aot.get(path, 0)
            self.aot[path] = index + 1
            path += (index,)
        self.lines[path] = line  # a table's own header wins over an earlier implicit use
        return path

    def key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self.skip(newlines=False)
            if self.s.startswith(('"', "'"), self.i):
                start = self.i
                self.string()
                token = self.s[start : self.i]
                parts.append(str(tomllib.loads(f"k = {token}")["k"]))
            else:
                m = _BARE.match(self.s, self.i)
                assert m is not None
                parts.append(m.group())
                self.advance(m.end() - self.i)
            self.skip(newlines=False)
            if not self.s.startswith(".", self.i):
                return parts
            self.advance(1)

    def keyval(self, base: Loc) -> None:
        line = self.line
        path = base + tuple(self.key())
        self.record(path, line)
        self.skip(newlines=False)
        if self.s.startswith("=", self.i):
            self.advance(1)
            self.skip(newlines=False)
            self.value(path)

    def value(self, path: Loc) -> None:
        c = self.s[self.i : self.i + 1]
        if c in ('"', "'"):
            self.string()
        elif c == "[":
            self.container(path, "]")
        elif c == "{":
            self.container(path, "}")
        else:
            while self.i < len(self.s) and self.s[self.i] not in ",]}#\n":
                self.i += 1

    def container(self, path: Loc, close: str) -> None:
        self.advance(1)
        index = 0
        while True:
            self.skip(newlines=True)
            if self.i >= len(self.s) or self.s[self.i] == close:
                self.advance(1)
                return
            start = self.i
            if close == "]":
                self.record((*path, index), self.line)
                self.value((*path, index))
            else:
                self.keyval(path)
            self.skip(newlines=True)
            if self.s.startswith(",", self.i):
                self.advance(1)
                index += 1
            elif self.i == start:
                self.advance(1)

    def string(self) -> None:
        quote = self.s[self.i]
        triple = self.s.startswith(quote * 3, self.i)
        delim = quote * 3 if triple else quote
        j = self.i + len(delim)
        while j < len(self.s):
            if quote == '"' and self.s[j] == "\\":
                j += 2
            elif self.s.startswith(delim, j):
                j += len(delim)
                extra = 0  # up to two more quotes may end a multi-line string's content
                while triple and extra < 2 and self.s[j : j + 1] == quote:
                    j, extra = j + 1, extra + 1
                break
            else:
                j += 1
        self.advance(j - self.i)


def rule_line(text: str, rule: str) -> int | None:
    """The line of a rule name such as ``tools.allow[3]`` or ``risk`` in ``text``.

    Compile-time refusals (a rule the backend cannot enforce) name a rule,
    not a pydantic location; this maps them back to the policy file.
    """
    loc: list[str | int] = []
    for part in rule.split("."):
        name, _, index = part.partition("[")
        loc.append(name)
        if index.rstrip("]").isdigit():
            loc.append(int(index.rstrip("]")))
    lines = locate(text)
    while loc:
        if tuple(loc) in lines:
            return lines[tuple(loc)]
        loc.pop()
    return None
