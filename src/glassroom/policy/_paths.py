"""Checks that refuse policy entries which would open a hole in the sandbox.

Each ``*_problem`` function returns ``None`` for a safe entry or a one-line
reason for a dangerous one.  They are plain functions (no pydantic) so the
rules can be read, tested and documented on their own; ``_model`` turns a
reason into a validation error.

Paths are compared as written *and*, when the path exists on this host, as
``os.path.realpath`` resolves it: a bind mount follows symlinks, so
``/srv/x -> /etc`` must be judged as ``/etc``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
from collections.abc import Callable

#: Provided by the sandbox itself; listing them (or anything beneath) is meaningless at
#: best and, for /proc and /dev, would expose the host's.
RESERVED = ("/workspace", "/tmp", "/proc", "/dev")

#: Never readable, nor anything beneath or above them (an ancestor exposes them too).
READ_REFUSED: dict[str, str] = {
    "/sys": "kernel and hardware interfaces must not be exposed",
    "/root": "the administrator's home holds keys and credentials",
    "/home": "users' homes hold keys, tokens and credentials",
    "/run": "runtime sockets (docker, dbus, systemd) allow escaping the sandbox",
    "/var/run": "runtime sockets (docker, dbus, systemd) allow escaping the sandbox",
    "/boot": "kernel images and boot configuration are not for sandboxed code",
}

#: Container runtime sockets: connect() works through a read-only bind, so
#: exposing one hands the sandbox the host.
RUNTIME_SOCKETS = ("docker.sock", "containerd.sock", "podman.sock")
KNOWN_SOCKET_PATHS = (
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
    "/var/run/podman/podman.sock",
)

#: Never writable, nor any ancestor of them: the host's system would be modifiable.
WRITE_REFUSED_TREES = (
    "/usr",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/var",
    "/opt",
    "/srv",
)
#: Nothing beneath these may be writable either (binaries, libraries, configuration, kernel).
WRITE_REFUSED_BENEATH = ("/usr", "/etc", "/boot", "/bin", "/sbin", "/lib", "/lib64")

_TOOL_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_TLD_WILDCARD = re.compile(r"^\*\.?[^.]*$")


def is_within(path: str, base: str) -> bool:
    """True if ``path`` is ``base`` or beneath it (both normalized, absolute)."""
    return path == base or base == "/" or path.startswith(base + "/")


def home_dirs() -> list[str]:
    """Home directories of this host's real users and of the current user.

    ``/`` is skipped: some service accounts use it as home, and refusing "/"
    for that reason would be wrong (it is refused anyway, as the whole host).
    """
    homes = {os.path.expanduser("~")}
    with contextlib.suppress(OSError):  # a broken NSS must not break validation
        homes.update(p.pw_dir for p in pwd.getpwall() if p.pw_uid >= 1000)
    return sorted(
        os.path.normpath(h) for h in homes if h.startswith("/") and os.path.normpath(h) != "/"
    )


def syntax_problem(path: str) -> str | None:
    """Refuse paths that are not absolute and normalized, so rules compare exactly."""
    if path == "":
        return "path is empty"
    if "\0" in path:
        return "path contains a NUL byte"
    if not path.startswith("/"):
        return f"path {path!r} is not absolute"
    parts = path.split("/")[1:]
    if ".." in parts:
        return f"path {path!r} contains a '..' component"
    if "." in parts:
        return f"path {path!r} contains a '.' component (not normalized)"
    if path != "/" and path.endswith("/"):
        return f"path {path!r} has a trailing '/' (not normalized)"
    if "//" in path:
        return f"path {path!r} contains '//' (not normalized)"
    return None


def _reserved_problem(path: str) -> str | None:
    for base in RESERVED:
        if path == base:
            return f"{path!r} is reserved: the sandbox provides its own"
        if is_within(path, base):
            return f"{path!r} is beneath {base!r}, which the sandbox provides itself (reserved)"
    return None


def _resolved(path: str) -> list[str]:
    """The path as written, plus its host resolution when that differs."""
    real = os.path.realpath(path)
    return [path] if real == path else [path, real]


def _read_rules(path: str) -> str | None:
    if path == "/":
        return "'/' would expose the whole host filesystem"
    refused = dict(READ_REFUSED)
    for home in home_dirs():
        refused.setdefault(home, "a user's home holds keys, tokens and credentials")
    for base, why in refused.items():
        if path == base:
            return f"{path!r} is refused: {why}"
        if is_within(path, base):
            return f"{path!r} is beneath {base!r}: {why}"
        if is_within(base, path):
            return f"{path!r} contains {base!r}: {why}"
    name = path.rsplit("/", 1)[-1]
    if name in RUNTIME_SOCKETS or any(p in RUNTIME_SOCKETS for p in path.split("/")):
        return f"{path!r} is a container runtime socket: it hands the sandbox the host"
    for sock in KNOWN_SOCKET_PATHS:
        if is_within(sock, path):
            return f"{path!r} contains the container runtime socket {sock!r}"
    for sock in RUNTIME_SOCKETS:
        if os.path.lexists(os.path.join(path, sock)):
            return f"{path!r} contains a container runtime socket ({sock})"
    return None


def _write_rules(path: str) -> str | None:
    if path == "/":
        return "'/' would make the whole host writable"
    for base in WRITE_REFUSED_TREES:
        if is_within(base, path):
            rel = "refused" if path == base else f"an ancestor of {base!r}"
            return f"{path!r} is {rel}: the host's system must never be writable"
    for base in WRITE_REFUSED_BENEATH:
        if is_within(path, base):
            return f"{path!r} is beneath {base!r}: the host's system must never be writable"
    return None


_Rule = Callable[[str], str | None]


def _check(path: str, rules: tuple[_Rule, ...]) -> str | None:
    problem = syntax_problem(path) or _reserved_problem(path)
    if problem:
        return problem
    for candidate in _resolved(path):
        for rule in rules:
            found = rule(candidate)
            if found:
                if candidate != path:
                    return f"{path!r} resolves to {candidate!r} on this host; {found}"
                return found
    return None


def read_problem(path: str) -> str | None:
    """Why ``path`` may not be made visible read-only, or None."""
    return _check(path, (_read_rules,))


def write_problem(path: str) -> str | None:
    """Why ``path`` may not be made writable, or None (stricter than read)."""
    return _check(path, (_write_rules, _read_rules))


def tool_problem(entry: str) -> str | None:
    """Why ``entry`` is not an acceptable ``tools.allow`` entry, or None."""
    if entry == "":
        return "tool name is empty"
    if any(c in entry for c in "*?["):
        return f"{entry!r}: wildcards are not allowed; list each executable"
    if "/" in entry:
        if not entry.startswith("/"):
            return f"{entry!r}: a tool is a bare name (found via PATH) or an absolute path"
        problem = syntax_problem(entry)
        if problem:
            return problem
        for base in RESERVED:
            if is_within(entry, base):
                return (
                    f"{entry!r} is beneath {base!r}, which the sandbox provides or can write: "
                    "allowing it would allow running anything"
                )
        return None
    if entry in (".", "..") or not _TOOL_NAME.match(entry):
        return f"{entry!r}: a tool name may only contain letters, digits and ._+-"
    return None


def network_problem(entry: str) -> str | None:
    """Why ``entry`` is not an acceptable ``network.allow`` entry, or None."""
    if entry.strip() == "":
        return "network entry is empty"
    if entry == "*":
        return "'*' would allow the whole network; list the hosts that are needed"
    if _TLD_WILDCARD.match(entry):
        return f"{entry!r} matches a whole top-level domain; list the hosts that are needed"
    return None
