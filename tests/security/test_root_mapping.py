"""Root outside, nobody inside: the uid mapping when glassroom runs as root.

Inside, the sandbox is uid/gid 1000 ("agent") and nothing else; on the host
every one of its processes is uid 65534 with no capabilities.

Helpers are local to this file on purpose (tests/conftest.py is owned elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import build_compiled_init
from glassroom import Sandbox
from glassroom._sys import cgroups

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="this is about glassroom running as root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

NOBODY = 65534
ZERO_CAPS = "0000000000000000"


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Sandbox, str]]:
    root = Path(tempfile.mkdtemp(prefix="gr-rootmap-"))
    os.chmod(root, 0o755)  # the sandbox (65534) must read its init from the state dir
    parent = f"gr-test-rootmap-{secrets.token_hex(4)}"
    monkeypatch.setenv("GLASSROOM_STATE_DIR", str(root / "state"))
    monkeypatch.setenv("GLASSROOM_AUDIT_LOG", str(root / "audit.jsonl"))
    monkeypatch.setenv("GLASSROOM_CGROUP_PARENT", parent)
    monkeypatch.delenv("GLASSROOM_SANDBOX_UID", raising=False)
    monkeypatch.delenv("GLASSROOM_SANDBOX_GID", raising=False)
    build_compiled_init(root / "state")  # the session's init
    sb = Sandbox()
    try:
        yield sb, parent
    finally:
        sb.destroy()
        for name in cgroups.list_names(parent):
            with contextlib.suppress(Exception):
                cs = cgroups.CgroupSet.open(name, parent=parent)
                cs.kill_all(timeout=5.0)
                cs.remove()
        lay = cgroups.layout()
        for d in {os.path.join(m, parent) for _, m in lay.values()}:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        shutil.rmtree(root, ignore_errors=True)


def _fields(text: str, *names: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[key] = value.strip()
    return out


def test_inside_is_uid_1000_only(sandbox: tuple[Sandbox, str]) -> None:
    sb, _ = sandbox
    r = sb.run(["cat", "/proc/self/uid_map", "/proc/self/gid_map"])
    assert r.exit_code == 0, r
    uid_map, gid_map = (line.split() for line in r.stdout.splitlines())
    # One id, 1000, and nothing else: no root inside.  The middle field is
    # relative to the *parent* user namespace, which with bwrap's
    # --disable-userns is an intermediate namespace (it reads 0 there); the
    # host's view of the same map is checked in the next test.
    assert uid_map[0] == "1000" and uid_map[2] == "1", uid_map
    assert gid_map[0] == "1000" and gid_map[2] == "1", gid_map
    r = sb.run(["id", "-u"])
    assert r.stdout == "1000\n"
    r = sb.run(
        ["sh", "-c", "grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status"]
    )
    inside = _fields(r.stdout, "Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs")
    assert inside["Uid"].split() == ["1000"] * 4
    assert inside["Gid"].split() == ["1000"] * 4
    assert inside["CapEff"] == inside["CapPrm"] == inside["CapBnd"] == ZERO_CAPS
    assert inside["NoNewPrivs"] == "1"


def test_workspace_file_is_owned_by_1000_inside(sandbox: tuple[Sandbox, str]) -> None:
    sb, _ = sandbox
    r = sb.run(["sh", "-c", "echo hi > /workspace/f && stat -c '%u:%g' /workspace/f"])
    assert r.exit_code == 0, r
    assert r.stdout == "1000:1000\n"
    sb.files.write("/workspace/g", "via the file API")
    assert sb.run(["stat", "-c", "%u:%g", "/workspace/g"]).stdout == "1000:1000\n"


def test_host_sees_nobody_without_capabilities(sandbox: tuple[Sandbox, str]) -> None:
    sb, parent = sandbox
    cs = cgroups.CgroupSet.open(sb.id, parent=parent)
    t = threading.Thread(target=sb.run, args=(["sleep", "5"],), daemon=True)
    t.start()
    seen: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + 10
    try:
        while time.monotonic() < end and not any(
            v["cmd"].startswith(b"sleep\0") for v in seen.values()
        ):
            for pid in cs.pids():
                try:
                    seen[pid] = {
                        "cmd": Path(f"/proc/{pid}/cmdline").read_bytes(),
                        "status": _fields(
                            Path(f"/proc/{pid}/status").read_text(),
                            "Uid",
                            "Gid",
                            "CapEff",
                            "CapPrm",
                            "NoNewPrivs",
                        ),  # fmt: skip
                        "uid_map": Path(f"/proc/{pid}/uid_map").read_text().split(),
                        "gid_map": Path(f"/proc/{pid}/gid_map").read_text().split(),
                    }
                except OSError:
                    continue
            time.sleep(0.05)
    finally:
        t.join(timeout=15)
    sleepers = [v for v in seen.values() if v["cmd"].startswith(b"sleep\0")]
    assert sleepers, f"never saw the sandboxed sleep among {seen}"
    assert len(seen) >= 2  # the sandbox's init too, not only the command
    for pid, v in seen.items():
        st = v["status"]
        assert st["Uid"].split() == [str(NOBODY)] * 4, (pid, v)  # real, effective, saved, fs
        assert st["Gid"].split() == [str(NOBODY)] * 4, (pid, v)
        assert st["CapEff"] == ZERO_CAPS, (pid, v)
        assert st["CapPrm"] == ZERO_CAPS, (pid, v)
        # Read from the host, the map is relative to the host: 1000 inside is 65534 here.
        assert v["uid_map"] == ["1000", str(NOBODY), "1"], (pid, v)
        assert v["gid_map"] == ["1000", str(NOBODY), "1"], (pid, v)
    assert all(v["status"]["NoNewPrivs"] == "1" for v in sleepers)
