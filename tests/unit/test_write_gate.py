"""The write gate's name matching (``_sys/fusegate.Protection``) and ``filesystem.unprotect``."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from glassroom._sys import fusegate
from glassroom.policy import parse_policy
from glassroom.policy._load import PolicyError
from glassroom.policy._protected import PROTECTED


def _protection(unprotected: tuple[str, ...] = ()) -> fusegate.Protection:
    rules = [fusegate.Rule(tuple(fusegate.norm(p) for p in path.split("/")), tree, path, why)
             for path, tree, why in PROTECTED]  # fmt: skip
    return fusegate.Protection(rules, unprotected)


@pytest.mark.parametrize("path", [
    ".git", ".git/hooks", ".git/hooks/pre-commit", ".git/config", "sub/deep/.git/config",
    ".envrc", "a/b/c/.envrc", ".bashrc", ".vscode", ".vscode/tasks.json", ".VSCode/x",
    ".github/workflows", ".github/workflows/ci.yml", "x/.github/workflows/a/b.yml",
    ".claude/settings.json", ".codex", ".cursor/mcp.json", ".GIT/HOOKS/x",
    ".g\u200bit/config", ".git/modules/m/hooks/post-checkout", ".git/commondir",
])  # fmt: skip
def test_protected(path: str) -> None:
    assert _protection().match(path.split("/")) is not None, path


@pytest.mark.parametrize("path", [
    "README", "src/main.py", ".git/objects/ab/cdef", ".git/HEAD", ".git/refs/heads/main",
    ".git/index", ".github", ".github/CODEOWNERS", "hooks", "config", "x/.gitignore",
    ".github/x/workflows", "envrc",
])  # fmt: skip
def test_not_protected(path: str) -> None:
    assert _protection().match(path.split("/")) is None, path


def test_unprotected_paths_lift_only_beneath_them() -> None:
    p = _protection((".git/hooks",))
    assert p.match([".git", "hooks", "pre-commit"]) is None
    assert p.match([".git", "config"]) is not None
    assert p.match([".envrc"]) is not None


def test_a_moved_tree_that_would_complete_a_protected_path(tmp_path: Path) -> None:
    (tmp_path / "t" / "workflows").mkdir(parents=True)
    (tmp_path / "u" / "other").mkdir(parents=True)
    p = _protection()
    assert p.completes(["sub", ".github"], str(tmp_path / "t")) is not None
    assert p.completes(["sub", ".GitHub"], str(tmp_path / "t")) is not None
    assert p.completes(["sub", ".github"], str(tmp_path / "u")) is None
    assert p.completes(["sub", "t2"], str(tmp_path / "t")) is None


def test_symlink_prefix_names(tmp_path: Path) -> None:
    """A symlink named .github (or .config) would complete .github/workflows elsewhere."""
    p = _protection()
    assert p.prefix(["a", ".github"]) is not None
    assert p.prefix([".config"]) is not None
    assert p.prefix(["a", "github"]) is None
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "workflows").symlink_to("/nonexistent")
    assert p.completes([".github"], str(tmp_path / "t")) is not None


@pytest.fixture
def write_dir() -> Iterator[str]:
    """A dir a policy may list in filesystem.write (not beneath /tmp, the sandbox's own)."""
    d = tempfile.mkdtemp(prefix="gr-unit-w-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unprotect_must_be_beneath_a_write_path(write_dir: str) -> None:
    w = write_dir
    ok = parse_policy(f'[filesystem]\nwrite = ["{w}"]\nunprotect = ["{w}/.git/hooks"]\n')
    assert ok.filesystem.unprotect == [f"{w}/.git/hooks"]
    text = f'[filesystem]\nwrite = ["{w}"]\nunprotect = [\n  "{w}/.envrc",\n  "/elsewhere/.envrc",\n]\n'
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="p.toml")
    assert "filesystem.unprotect[1]" in str(info.value)
    assert "not beneath any filesystem.write path" in str(info.value)
    assert "p.toml:5" in str(info.value)


@pytest.mark.parametrize("bad", ["relative/.git", "/w/../x", "/w/./x", "/w/x/"])
def test_unprotect_paths_are_validated_like_other_paths(bad: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(f'[filesystem]\nunprotect = ["{bad}"]\n', source="p.toml")
    assert "filesystem.unprotect[0]" in str(info.value) and "p.toml:2" in str(info.value)


def test_plan_carries_the_list_only_with_write_dirs(write_dir: str) -> None:
    from glassroom.policy import compile as compile_plan

    w = write_dir
    plan = compile_plan(parse_policy(f'[filesystem]\nwrite = ["{w}"]\nunprotect = ["{w}/.envrc"]\n'))
    assert len(plan.protected) == len(PROTECTED) and plan.unprotect == (f"{w}/.envrc",)
    assert compile_plan(parse_policy("")).protected == ()
