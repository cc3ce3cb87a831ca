"""E2B's git API (``sandbox.git``) against serve's ``base`` template (issue 16).

E2B's base template has git and its SDK drives it with commands; ``base`` here
allows the host's git, read-only like the rest of ``/usr``.  Pair: the git
workflow works in the sandbox's home; git cannot write outside the writable
dirs (a clone into ``/etc`` fails as any write there does).
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest

e2b = pytest.importorskip("e2b")

pytestmark = pytest.mark.skipif(
    shutil.which("git", path="/usr/bin:/bin") is None, reason="the host has no git"
)


def test_git_init_add_commit_status_branches(sbx: Any) -> None:
    repo = "/home/user/repo"
    sbx.git.init(repo, initial_branch="main")
    sbx.git.configure_user("Agent", "agent@example.invalid")
    sbx.files.write(f"{repo}/README.md", "hello\n")
    status = sbx.git.status(repo)
    assert [f.name for f in status.file_status] == ["README.md"]
    sbx.git.add(repo, all=True)
    sbx.git.commit(repo, "first")
    assert sbx.git.status(repo).is_clean
    sbx.git.create_branch(repo, "feature")
    branches = sbx.git.branches(repo)
    assert branches.current_branch == "feature"
    assert set(branches.branches) >= {"main", "feature"}
    log = sbx.commands.run(f"git -C {repo} log --format=%an:%s")
    assert log.stdout == "Agent:first\n"


def test_git_cannot_write_outside_the_writable_dirs(sbx: Any) -> None:
    sbx.git.init("/home/user/src", initial_branch="main")
    with pytest.raises(e2b.CommandExitException) as exc:
        sbx.git.clone("/home/user/src", "/etc/stolen")
    assert "/etc/stolen" in str(exc.value)
    assert not sbx.files.exists("/etc/stolen")
