"""The public surface is exactly ``glassroom.__all__``: pinned here, on purpose.

Adding or removing a name is an API change; update this list in the same
change, deliberately.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import glassroom

EXPECTED_ALL = [
    "AuditError",
    "AuditIntegrityError",
    "BackendUnavailable",
    "Blocked",
    "CommandError",
    "CredentialError",
    "FileEntry",
    "Files",
    "GlassroomError",
    "PlanError",
    "Policy",
    "PolicyError",
    "Receipt",
    "RunResult",
    "Sandbox",
    "SandboxClosed",
    "SandboxError",
    "SandboxPathError",
    "SandboxPool",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotIntegrityError",
    "SnapshotLimits",
    "SnapshotStore",
    "TemplateError",
    "WallError",
    "__version__",
    "default_policy",
    "load_policy",
    "parse_policy",
]

EXPECTED_ERRORS = {
    "AuditError",
    "AuditIntegrityError",
    "BackendUnavailable",
    "CommandError",
    "CredentialError",
    "GlassroomError",
    "PlanError",
    "PolicyError",
    "SandboxClosed",
    "SandboxError",
    "SandboxPathError",
    "SnapshotError",
    "SnapshotIntegrityError",
    "TemplateError",
    "WallError",
}


def test_all_is_pinned() -> None:
    assert list(glassroom.__all__) == EXPECTED_ALL


def test_every_name_in_all_exists() -> None:
    for name in glassroom.__all__:
        assert hasattr(glassroom, name), name


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from glassroom import *", ns)
    assert set(ns) - {"__builtins__"} == set(EXPECTED_ALL)


def test_every_exported_error_is_a_glassroom_error() -> None:
    errors = {
        name
        for name in glassroom.__all__
        if inspect.isclass(obj := getattr(glassroom, name)) and issubclass(obj, BaseException)
    }
    assert errors == EXPECTED_ERRORS
    for name in errors:
        assert issubclass(getattr(glassroom, name), glassroom.GlassroomError), name


def test_error_tree() -> None:
    g = glassroom
    assert issubclass(g.BackendUnavailable, g.WallError)
    assert issubclass(g.AuditIntegrityError, g.AuditError)
    for sub in (g.SandboxClosed, g.SandboxPathError, g.CommandError):
        assert issubclass(sub, g.SandboxError)
    for name in EXPECTED_ERRORS - {"GlassroomError"}:
        assert getattr(g, name).exit_code == 125, name


def test_version() -> None:
    assert isinstance(glassroom.__version__, str) and glassroom.__version__


def test_py_typed_marker_exists() -> None:
    assert (Path(glassroom.__file__).parent / "py.typed").is_file()
