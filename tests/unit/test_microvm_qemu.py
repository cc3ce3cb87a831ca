"""Who QEMU may run as: the reachability check behind dropping root with a NIC."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from glassroom._reach import reachable_by

NOBODY = 65534


@pytest.fixture
def tree() -> Iterator[Path]:
    # Not tmp_path: pytest's base dir is 0700, and every parent counts here.
    root = Path(tempfile.mkdtemp(prefix="glassroom-reach-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            os.unlink(os.path.join(dirpath, f))
        os.rmdir(dirpath)


def _file(path: Path, mode: int, owner: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to uid 65534")
def test_reachable_only_through_searchable_dirs(tree: Path) -> None:
    open_dir, shut_dir = tree / "open", tree / "shut"
    script = _file(open_dir / "relay.py", 0o644)
    mine = _file(open_dir / "sock", 0o600, owner=NOBODY)
    roots = _file(open_dir / "roots", 0o644)
    hidden = _file(shut_dir / "sock", 0o600, owner=NOBODY)
    os.chmod(shut_dir, 0o700)  # like a mkdtemp state dir: root only
    assert reachable_by(script, NOBODY, NOBODY, write=False)
    assert reachable_by(mine, NOBODY, NOBODY, write=True)
    assert not reachable_by(roots, NOBODY, NOBODY, write=True)  # others may not write
    assert not reachable_by(hidden, NOBODY, NOBODY, write=True)  # the dir above is shut
    assert not reachable_by(tree / "missing", NOBODY, NOBODY, write=False)
