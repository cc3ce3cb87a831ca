"""The microvm tier's checkpoint and restore (QEMU migration to a file, ``-incoming``).

Driven through the backend itself (``MicrovmBackend``), so what is checked is
the tier's contract: a pause keeps the processes and their memory, a fork
runs apart from its parent, a restored VM has the walls a started one has,
and every teardown is clean.  Each VM is a TCG VM here: few of them.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glassroom import SandboxPathError, SnapshotError
from glassroom.backends.base import Checkpoint, ExecRequest
from glassroom.backends.microvm import MicrovmBackend, MicrovmInstance, qemu
from glassroom.backends.microvm._channel import GuestChannel
from glassroom.guest import protocol
from glassroom.policy import compile as compile_policy
from glassroom.policy import validate_policy

#: Keeps a counter in memory and writes it, with a token drawn at its start,
#: to /workspace/counter (atomically): after a restore the same token and a
#: larger count prove the same process went on with its memory.
COUNTER = (
    "import os, time\n"
    "tok = os.urandom(4).hex()\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    with open('/workspace/.counter', 'w') as f:\n"
    "        f.write(f'{tok} {n}')\n"
    "    os.replace('/workspace/.counter', '/workspace/counter')\n"
    "    time.sleep(0.05)\n"
)


class Sink:
    """The audit sink: every event the backend reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], str, str | None]] = []

    def __call__(self, event: str, details: dict[str, Any], decision: str,
                 rule: str | None) -> None:  # fmt: skip
        self.events.append((event, details, decision, rule))

    def anomalies(self) -> list[Any]:
        return [e for e in self.events if e[0] == "anomaly"]


def _skip_without_qemu() -> None:
    if qemu.qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 is not installed")


def _plan(policy: dict[str, Any] | None = None) -> Any:
    return compile_policy(validate_policy(policy or {"risk": "high"}), "microvm")


def _id() -> str:
    return f"sb-{secrets.token_hex(6)}"


def _req(*argv: str) -> ExecRequest:
    return ExecRequest(argv=argv, env={"PATH": "/usr/bin:/bin"}, cwd="/workspace")


def _run(inst: MicrovmInstance, *argv: str) -> tuple[int, str, str]:
    r = inst.exec(_req(*argv))
    return r.exit_code, r.stdout.decode(), r.stderr.decode()


def _counter(inst: MicrovmInstance) -> tuple[str, int]:
    tok, n = inst.read_file("/workspace/counter", 64).decode().split()
    return tok, int(n)


def _wait_count_past(inst: MicrovmInstance, n: int, timeout: float = 30.0) -> tuple[str, int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = _counter(inst)
        except SandboxPathError:  # not written yet
            got = ("", 0)
        if got[1] > n:
            return got
        time.sleep(0.1)
    raise AssertionError(f"the counter did not pass {n}")


@pytest.fixture
def ckpt_dir() -> Iterator[Path]:
    """An empty 0700 directory, as the snapshot store hands a backend."""
    d = Path(tempfile.mkdtemp(prefix="glassroom-ckpt-", dir="/var/tmp"))
    os.chmod(d, 0o700)
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


@pytest.fixture
def vms() -> Iterator[list[MicrovmInstance]]:
    """Every instance a test made is destroyed at teardown, whatever happened."""
    made: list[MicrovmInstance] = []
    yield made
    for inst in made:
        inst.destroy()


def _check_files(ckpt: Checkpoint, d: Path) -> None:
    assert ckpt.tier == "microvm" and ckpt.memory is True
    assert sorted(ckpt.files) == sorted(p.name for p in d.iterdir())
    for name in ckpt.files:
        st = (d / name).stat()
        assert st.st_mode & 0o077 == 0 and st.st_uid == os.geteuid()
    det = ckpt.details
    assert det["state_bytes"] == (d / "vm.state").stat().st_size > 1 << 20
    # The disk copy is sparse: its size is the disk's, its blocks what was written.
    assert (d / "scratch.img").stat().st_size == det["disk_size"]
    assert (d / "scratch.img").stat().st_blocks * 512 < det["disk_size"] // 4
    assert "migrate fd:checkpoint" in det["qemu"]["monitor"]


def test_pause_keeps_processes_memory_and_files(ckpt_dir: Path, vms: list[Any]) -> None:
    """checkpoint(leave_running=False) + destroy + restore: the counter goes on."""
    _skip_without_qemu()
    be, sink, plan = MicrovmBackend(), Sink(), _plan()
    a = be.start(plan, _id(), sink)
    vms.append(a)
    a.spawn(_req("python3", "-c", COUNTER))
    tok, n0 = _wait_count_past(a, 3)
    assert _run(a, "sh", "-c", "mkdir -p /workspace/notes && echo kept > /workspace/notes/k")[0] == 0
    a.write_file("/workspace/data.bin", bytes(range(256)) * 64, 0o600)
    ckpt = a.checkpoint(ckpt_dir, leave_running=False)
    _check_files(ckpt, ckpt_dir)
    assert not a.alive()
    with pytest.raises(Exception, match="paused"):
        a.exec(_req("true"))
    receipt = a.destroy()
    assert receipt.clean, receipt.as_dict()

    t0 = time.monotonic()
    b = be.restore(plan, _id(), sink, ckpt_dir, Checkpoint.from_dict(ckpt.as_dict()))
    vms.append(b)
    code, out, _ = _run(b, "echo", "first")
    first_ms = (time.monotonic() - t0) * 1000
    assert (code, out) == (0, "first\n")
    assert b.walls["start"] == "checkpoint restore" and b.boot["start"] == "checkpoint restore"
    assert b.walls["restored_from"]["sandbox_id"] == a.sandbox_id
    # The same process (its token), with its memory (the count went on).
    tok2, n1 = _wait_count_past(b, _counter(b)[1])
    assert tok2 == tok and n1 > n0
    assert b.read_file("/workspace/data.bin", 1 << 20) == bytes(range(256)) * 64
    assert _run(b, "cat", "/workspace/notes/k")[1] == "kept\n"
    # Every operation works on the restored VM.
    p = b.spawn(_req("sh", "-c", "echo spawned; exit 3"))
    res = p.wait(60)
    assert res is not None and res.exit_code == 3 and res.stdout == b"spawned\n"
    b.make_dir("/workspace/new")
    b.write_file("/workspace/new/f", b"x", 0o644)
    assert [e.name for e in b.list_dir("/workspace/new")] == ["f"]
    b.remove("/workspace/new/f")
    assert b.list_dir("/workspace/new") == []
    assert b.alive()
    receipt = b.destroy()
    assert receipt.clean, receipt.as_dict()
    assert not sink.anomalies(), sink.anomalies()
    print(f"checkpoint {ckpt.details['total_ms']} ms, restore to first output "
          f"{first_ms:.0f} ms ({b.boot}), state {ckpt.details['state_bytes']} bytes")  # fmt: skip


def test_fork_runs_apart_from_its_parent(ckpt_dir: Path, vms: list[Any]) -> None:
    """checkpoint(leave_running=True): the parent goes on (its running command
    too), and a VM restored under a new id is on its own."""
    _skip_without_qemu()
    be, sink, plan = MicrovmBackend(), Sink(), _plan()
    a = be.start(plan, _id(), sink)
    vms.append(a)
    a.write_file("/workspace/shared", b"before", 0o644)
    # Output flowing while the checkpoint is taken: the channel must stay whole.
    ticker = a.spawn(_req("sh", "-c", "while :; do echo tick; sleep 0.02; done"))
    time.sleep(0.5)
    ckpt = a.checkpoint(ckpt_dir, leave_running=True)
    _check_files(ckpt, ckpt_dir)
    assert ckpt.details["resumed"] is True and a.alive()
    seen = len(ticker.events_since(0, 0)[0])
    b = be.restore(plan, _id(), sink, ckpt_dir, ckpt)
    vms.append(b)
    assert b.sandbox_id != a.sandbox_id
    end = time.monotonic() + 20
    while len(ticker.events_since(0, 0)[0]) <= seen + 2 and time.monotonic() < end:
        time.sleep(0.1)
    assert len(ticker.events_since(0, 0)[0]) > seen + 2  # the parent's command went on
    a.write_file("/workspace/shared", b"parent", 0o644)
    b.write_file("/workspace/shared", b"child", 0o644)
    assert _run(a, "sh", "-c", "echo p > /workspace/only-parent")[0] == 0
    assert a.read_file("/workspace/shared", 64) == b"parent"
    assert b.read_file("/workspace/shared", 64) == b"child"
    assert _run(b, "test", "-e", "/workspace/only-parent")[0] == 1
    # Two VMs, two QEMUs, two host uids (as root), two cgroups.
    assert a.proc is not None and b.proc is not None and a.proc.pid != b.proc.pid
    assert a.walls["cgroups"]["paths"] != b.walls["cgroups"]["paths"]
    if os.geteuid() == 0:
        assert a.walls["vmm_uid"] != b.walls["vmm_uid"]
    ticker.signal(9)
    for inst in (a, b):
        receipt = inst.destroy()
        assert receipt.clean, receipt.as_dict()
    assert not sink.anomalies(), sink.anomalies()


def test_walls_hold_after_restore(ckpt_dir: Path, vms: list[Any]) -> None:
    """The harmless/malicious pair, on a restored VM: writing the workspace works,
    writing the root image or reaching the network does not; QEMU is confined
    as at start; and a plan with other walls cannot take the saved guest."""
    _skip_without_qemu()
    be, sink, plan = MicrovmBackend(), Sink(), _plan({"risk": "maximum"})
    a = be.start(plan, _id(), sink)
    vms.append(a)
    ckpt = a.checkpoint(ckpt_dir, leave_running=False)
    assert a.destroy().clean
    with pytest.raises(SnapshotError) as exc:  # other in-guest walls: refused first
        be.restore(_plan({"risk": "maximum", "resources": {"pids": 17}}), _id(), sink,
                   ckpt_dir, ckpt)  # fmt: skip
    assert exc.value.rule == "snapshot.restore" and "walls" in str(exc.value)
    b = be.restore(plan, _id(), sink, ckpt_dir, ckpt)
    vms.append(b)
    ok = _run(b, "sh", "-c", "echo ok > /workspace/ok && cat /workspace/ok && id -u")
    assert ok[0] == 0 and ok[1] == "ok\n1000\n", ok
    bad = _run(b, "sh", "-c", "echo x > /usr/evil")
    assert bad[0] != 0 and "Read-only file system" in bad[2], bad
    net = _run(b, "python3", "-c", "import socket; socket.create_connection(('10.0.2.2', 80), 2)")
    assert net[0] != 0
    assert b.walls["seccomp"]["where"] == "in the guest"
    assert b.walls["guest_cgroup"] == a.walls["guest_cgroup"]
    assert b.walls["network"] == "no network device"
    assert b.proc is not None
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{b.proc.pid}/status").read_text().splitlines())  # fmt: skip
    assert status["NoNewPrivs"].strip() == "1" and status["CapEff"].strip() == "0" * 16
    if os.geteuid() == 0:
        assert int(status["Uid"].split()[0]) == b.walls["vmm_uid"] != 0
    cmd = Path(f"/proc/{b.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-incoming" in cmd and any(arg.startswith(b"on,obsolete=deny") for arg in cmd)
    assert str(b.proc.pid) in Path(b.walls["cgroups"]["paths"][0], "cgroup.procs").read_text()
    receipt = b.destroy()
    assert receipt.clean, receipt.as_dict()


def test_a_vm_with_a_nic_refuses_a_checkpoint(ckpt_dir: Path) -> None:
    """Never a partial save: its user networking is not in the migrated state."""
    inst = MicrovmInstance(_plan(), _id(), Sink())
    inst.shape = {"nic": True}
    with pytest.raises(SnapshotError) as exc:
        inst.checkpoint(ckpt_dir, leave_running=True)
    assert exc.value.rule == "snapshot.memory" and "network" in str(exc.value)
    assert not list(ckpt_dir.iterdir())


def test_freeze_is_not_how_a_vm_pauses() -> None:
    inst = MicrovmInstance(_plan(), _id(), Sink())
    for call in (inst.freeze, inst.thaw):
        with pytest.raises(SnapshotError) as exc:
            call()
        assert exc.value.rule == "snapshot.freeze" and "checkpoint" in str(exc.value)


def test_a_checkpoint_of_another_vm_is_refused(ckpt_dir: Path) -> None:
    bad = Checkpoint(tier="microvm", memory=True, files=["vm.state", "scratch.img"],
                     details={"shape": {"image": "other"}})  # fmt: skip
    with pytest.raises(SnapshotError) as exc:
        MicrovmBackend().restore(_plan(), _id(), Sink(), ckpt_dir, bad)
    assert exc.value.rule == "snapshot.restore" and "another VM" in str(exc.value)
    with pytest.raises(SnapshotError):
        MicrovmBackend().restore(_plan(), _id(), Sink(), ckpt_dir,
                                 Checkpoint(tier="gvisor", memory=True, files=[]))  # fmt: skip


def test_a_restored_channel_keeps_apart_the_guests_earlier_requests() -> None:
    """Frames of requests from before the restore are checked, then dropped (no
    anomaly); a trace report of one still reaches the audit; new ids never meet
    old ones; an unknown id is still an anomaly."""
    ours, theirs = socket.socketpair()
    seen: list[str] = []
    traces: list[tuple[int, bool]] = []
    ch = GuestChannel(ours, seen.append, first_id=9, orphans=frozenset({4}))
    ch.on_trace(lambda m, running: traces.append((m["id"], running)))
    got: list[Any] = []
    assert ch.register(lambda m, p: got.append(m)) == 9
    frames = [({"op": "out", "id": 4, "stream": "stdout"}, b"old"),
              ({"op": "trace", "id": 4, "events": []}, b""),
              ({"op": "exit", "id": 4, "code": 0, "signal": None}, b""),
              ({"op": "out", "id": 4, "stream": "stdout"}, b"after its exit"),
              ({"op": "done", "id": 9, "code": 0}, b"")]  # fmt: skip
    ch.feed(b"".join(protocol.encode(h, p) for h, p in frames))
    assert traces == [(4, True)]
    assert got == [{"op": "done", "id": 9, "code": 0}]
    assert seen == ["'out' frame for unknown request id 4"]  # once it exited, not an orphan
    assert ch.state() == (10, [9])
    ours.close()
    theirs.close()
