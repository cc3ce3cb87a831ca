"""The gvisor tier's memory checkpoint and restore (``runsc checkpoint`` / ``runsc restore``).

Driven at the backend level (``GvisorBackend`` / ``GvisorInstance``), below
the lifecycle that stores and signs the images: what is proved here is what
the tier itself promises.  A process's memory survives (a counter held only
in a Python variable goes on from where it was), so do the files on the
scratch disk, a restore under another id is a separate sandbox, every
instance destroys clean, and the walls of a restored sandbox refuse what they
refused before, with the same errno.  Needs root and runsc, as the tier does.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glassroom._errors import SnapshotError
from glassroom.backends import gvisor
from glassroom.backends.base import Checkpoint, ExecRequest, ExecResult
from glassroom.plan import LaunchPlan
from glassroom.policy import compile, default_policy

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runsc") is None,
    reason="the gvisor tier runs as root with runsc",
)

#: A detached loop holding its count only in memory; each value is written
#: with a rename, so a reader never sees a half-written file.  ``tag`` is
#: drawn once at the start: a restarted process would show a new one.
COUNTER = (
    "import os, time\n"
    "tag = os.urandom(4).hex()\n"
    "i = 0\n"
    "while True:\n"
    "    i += 1\n"
    "    with open('/workspace/.counter', 'w') as f:\n"
    "        f.write(f'{tag} {i}')\n"
    "    os.replace('/workspace/.counter', '/workspace/counter')\n"
    "    time.sleep(0.02)\n"
)
#: Harmless, then malicious: a connect to a public address and an exec of a
#: tool the policy does not allow; both errnos are printed.
PROBE = (
    "import os, socket\n"
    "s = socket.socket()\n"
    "try:\n"
    "    s.connect(('192.0.2.1', 80))\n"
    "    print('connect ok')\n"
    "except OSError as e:\n"
    "    print('connect', e.errno)\n"
    "try:\n"
    "    os.execv('/usr/bin/perl', ['perl', '-e', '1'])\n"
    "except OSError as e:\n"
    "    print('exec', e.errno)\n"
)


class Events:
    """An ``EventSink`` that keeps what it was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any], str, str | None]] = []

    def __call__(self, event: str, details: dict[str, Any], decision: str,
                 rule: str | None) -> None:  # fmt: skip
        self.seen.append((event, details, decision, rule))


@pytest.fixture
def plan() -> LaunchPlan:
    return compile(default_policy(), "gvisor")


@pytest.fixture
def instances() -> Iterator[list[gvisor.GvisorInstance]]:
    """Every instance a test made; destroyed at teardown whatever happened."""
    made: list[gvisor.GvisorInstance] = []
    yield made
    for inst in made:
        inst.destroy()


@pytest.fixture
def image_dir(tmp_path: Path) -> Callable[[], Path]:
    """A fresh empty 0700 directory, as the snapshot store gives one."""
    n = iter(range(100))

    def make() -> Path:
        d = tmp_path / f"ckpt-{next(n)}"
        d.mkdir(mode=0o700)
        return d

    return make


def sh(inst: gvisor.GvisorInstance, plan: LaunchPlan, script: str) -> ExecResult:
    return inst.exec(ExecRequest(argv=("sh", "-c", script), env=dict(plan.env),
                                 cwd="/workspace", timeout_s=30))  # fmt: skip


def py(inst: gvisor.GvisorInstance, plan: LaunchPlan, code: str) -> str:
    res = inst.exec(ExecRequest(argv=("python3", "-c", code), env=dict(plan.env),
                                cwd="/workspace", timeout_s=30))  # fmt: skip
    assert res.exit_code == 0, res
    return res.stdout.decode()


def start_counter(inst: gvisor.GvisorInstance, plan: LaunchPlan) -> None:
    res = sh(inst, plan, f"python3 -c {_quote(COUNTER)} </dev/null >/dev/null 2>&1 & echo ok")
    assert res.stdout == b"ok\n", res
    assert counter(inst, plan, above=3)[1] > 3


def counter(inst: gvisor.GvisorInstance, plan: LaunchPlan, above: int = 0) -> tuple[str, int]:
    """(tag, count) once the count is past ``above`` (the loop is running)."""
    deadline = time.monotonic() + 15
    while True:
        res = sh(inst, plan, "cat /workspace/counter 2>/dev/null")
        tag, _, n = res.stdout.decode().partition(" ")
        if n.isdigit() and int(n) > above:
            return tag, int(n)
        assert time.monotonic() < deadline, f"the counter stayed at {res.stdout!r}"
        time.sleep(0.05)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def assert_clean(inst: gvisor.GvisorInstance) -> None:
    receipt = inst.destroy()
    assert receipt.clean, receipt.as_dict()
    left = [m for m in Path("/proc/self/mountinfo").read_text().splitlines()
            if inst.sandbox_id in m]  # fmt: skip
    assert left == []
    loops = [f.read_text() for f in Path("/sys/block").glob("loop*/loop/backing_file")]
    assert not [b for b in loops if inst.sandbox_id in b], loops


def test_pause_and_restore_keeps_memory_and_files(
    plan: LaunchPlan, instances: list[gvisor.GvisorInstance], image_dir: Callable[[], Path]
) -> None:
    backend = gvisor.GvisorBackend()
    a = backend.start(plan, "sb-ckpt-pause", Events())
    instances.append(a)
    sh(a, plan, "echo kept > /workspace/file; mkdir -p /tmp/d; echo also > /tmp/d/t")
    start_counter(a, plan)
    tag, before = counter(a, plan)
    dest = image_dir()
    ck = a.checkpoint(dest, leave_running=False)
    assert (ck.tier, ck.memory) == ("gvisor", True)
    assert sorted(ck.files) == sorted(p.name for p in dest.iterdir())
    assert {"checkpoint.img", "scratch.qcow2"} <= set(ck.files)
    assert ck.details["bytes"] == sum((dest / f).stat().st_size for f in ck.files)
    assert ck.details["runsc"] and ck.details["command"].startswith("runsc checkpoint")
    assert not a.alive()  # the processes are gone: a pause
    assert_clean(a)

    b = backend.restore(plan, "sb-ckpt-pause", Events(), dest, Checkpoint.from_dict(ck.as_dict()))
    instances.append(b)
    assert b.walls["start"]["how"] == "runsc restore"
    tag2, after = counter(b, plan, above=before)
    assert tag2 == tag and after > before  # the same process, its memory intact
    res = sh(b, plan, "cat /workspace/file /tmp/d/t")
    assert res.stdout == b"kept\nalso\n", res
    assert_clean(b)


def test_leave_running_and_a_fork_under_a_new_id(
    plan: LaunchPlan, instances: list[gvisor.GvisorInstance], image_dir: Callable[[], Path]
) -> None:
    backend = gvisor.GvisorBackend()
    a = backend.start(plan, "sb-ckpt-orig", Events())
    instances.append(a)
    start_counter(a, plan)
    # A process spawned before the checkpoint: its host-side handle goes on too.
    ticker = a.spawn(ExecRequest(argv=("sh", "-c", "while :; do echo tick; sleep 0.1; done"),
                                 env=dict(plan.env), cwd="/workspace"))  # fmt: skip
    tag, before = counter(a, plan)
    dest = image_dir()
    ck = a.checkpoint(dest, leave_running=True)
    assert a.alive() and ck.details["leave_running"] and ck.details["restart_ms"] > 0
    tag_a, n_a = counter(a, plan, above=before)
    assert tag_a == tag
    _events, index, _done = ticker.events_since(0, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new, _index, _done = ticker.events_since(index, 1)
        if new:
            break
    assert new and ticker.result is None, "the spawned process's handle stopped"

    b = backend.restore(plan, "sb-ckpt-fork", Events(), dest, ck)
    instances.append(b)
    tag_b, n_b = counter(b, plan, above=before)
    assert tag_b == tag  # the fork carries the same process, from the saved moment
    sh(a, plan, "echo a > /workspace/only-a")
    sh(b, plan, "echo b > /workspace/only-b")
    ls_a = sh(a, plan, "ls /workspace").stdout.split()
    ls_b = sh(b, plan, "ls /workspace").stdout.split()
    assert b"only-a" in ls_a and b"only-b" not in ls_a
    assert b"only-b" in ls_b and b"only-a" not in ls_b
    # Each counter runs on in its own sandbox.
    assert counter(a, plan, above=n_a)[1] > n_a and counter(b, plan, above=n_b)[1] > n_b
    ticker.signal(9)
    assert ticker.wait(10) is not None
    assert_clean(a)
    assert_clean(b)


def test_walls_hold_after_restore(
    plan: LaunchPlan, instances: list[gvisor.GvisorInstance], image_dir: Callable[[], Path]
) -> None:
    backend = gvisor.GvisorBackend()
    a = backend.start(plan, "sb-ckpt-walls", Events())
    instances.append(a)
    before = py(a, plan, PROBE)
    assert "connect ok" not in before and "exec 13" in before, before
    dest = image_dir()
    ck = a.checkpoint(dest, leave_running=False)
    assert_clean(a)
    events = Events()
    b = backend.restore(plan, "sb-ckpt-walls2", events, dest, ck)
    instances.append(b)
    assert py(b, plan, PROBE) == before  # the same refusals, the same errnos
    # A process started after the restore inherits the saved init's seccomp filter.
    userns = py(b, plan, "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                         "print(libc.unshare(0x10000000), ctypes.get_errno())")  # fmt: skip
    assert userns.split()[0] == "-1" and userns.split()[1] != "0", userns
    assert b.walls["cgroups"]["paths"] and all("sb-ckpt-walls2" in p
                                               for p in b.walls["cgroups"]["paths"])  # fmt: skip
    assert "--network=none" in b.walls["network"]
    # The tracer of the restored sandbox audits it: the refused exec is logged.
    b.destroy()
    denied = [d for e, d, dec, _r in events.seen if e == "exec" and dec == "deny"]
    assert any(d.get("path") == "/usr/bin/perl" for d in denied), events.seen
    assert_clean(b)


def test_freeze_is_refused_by_name(
    plan: LaunchPlan, instances: list[gvisor.GvisorInstance]
) -> None:
    a = gvisor.GvisorBackend().start(plan, "sb-ckpt-freeze", Events())
    instances.append(a)
    for call in (a.freeze, a.thaw):
        with pytest.raises(SnapshotError) as info:
            call()
        assert info.value.rule == "snapshot.freeze" and "checkpoint" in str(info.value)
    assert a.alive()
    assert_clean(a)


def test_restore_refuses_an_image_of_another_runsc(
    plan: LaunchPlan, instances: list[gvisor.GvisorInstance], image_dir: Callable[[], Path]
) -> None:
    ck = Checkpoint(tier="gvisor", memory=True, files=["checkpoint.img", "scratch.qcow2"],
                    details={"runsc": "runsc version 0.0~19990101.0"})  # fmt: skip
    with pytest.raises(SnapshotError) as info:
        gvisor.GvisorBackend().restore(plan, "sb-ckpt-other", Events(), image_dir(), ck)
    assert info.value.rule == "snapshot.memory" and "19990101" in str(info.value)
