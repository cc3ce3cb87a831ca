"""The tool underneath the microvm tier's checkpoints: plain QEMU, no glassroom.

``raw(n)`` boots the same kernel and root image with the same command line
(``qemu.argv``: the default high-risk VM shape, the scratch disk as the
second virtio-blk disk, the monitor on a socketpair) but no supervisor,
policy, uid drop, cgroups or walls, until the guest agent answers.  Then,
``n`` times:

* checkpoint: QMP ``stop``, ``migrate`` to a file (``getfd`` + ``fd:``),
  until ``query-migrate`` says completed: the VM's stopped time;
* cont: ``cont`` after that (a snapshot or fork goes on);
* restore: a new QEMU with ``-incoming fd:N`` from the file, ``cont`` once
  it is loaded, and the agent's answer to ``hello``: restore to first output.

Medians, for ``bench/snapshot.py`` to set glassroom's figures against.
Under TCG every figure is emulation-bound.  Prints JSON when run alone.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


class _Vm:
    """One plain QEMU: its process, control channel, monitor and scratch disk."""

    def __init__(self, img: Any, accel: Any, incoming: str | None = None) -> None:
        from glassroom.backends.microvm import qemu

        ram, _ = qemu.vm_size(512 << 20, 512 << 20, 1.0)
        self.chan, chan_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.mon, mon_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.disk = qemu.scratch_disk(512 << 20, mkfs=False)
        fd = os.open(incoming, os.O_RDONLY) if incoming else None
        argv = qemu.argv(img, accel, ram, 1, chan_qemu.fileno(), console=None, incoming_fd=fd,
                         qmp=mon_qemu.fileno(), scratch_fds=self.disk)  # fmt: skip
        passed = [chan_qemu.fileno(), mon_qemu.fileno(), *self.disk]
        passed += [fd] if fd is not None else []
        quiet = subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdin=quiet, stdout=quiet, stderr=quiet, env={},
                                     pass_fds=passed)  # fmt: skip
        for s in (chan_qemu, mon_qemu):
            s.close()
        if fd is not None:
            os.close(fd)
        self.qmp = qemu.monitor(self.mon)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for s in (self.chan, self.mon):
            s.close()
        for d in self.disk:
            os.close(d)


def _ready(vm: _Vm) -> None:
    from glassroom.backends.microvm import qemu

    qemu.handshake(vm.chan, qemu.BOOT_TIMEOUT_S)


def _checkpoint(vm: _Vm, path: str) -> tuple[float, float]:
    """(stop + migrate ms, cont ms)."""
    from glassroom.backends.microvm import qemu

    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.monotonic()
        qemu.save_state(vm.qmp, out)
        os.fsync(out)
        t1 = time.monotonic()
    finally:
        os.close(out)
    qemu.cont(vm.qmp)
    return (t1 - t0) * 1000, (time.monotonic() - t1) * 1000


def _restore(img: Any, accel: Any, path: str) -> float:
    """Spawn with ``-incoming`` to the agent's ``ready`` (ms)."""
    from glassroom.backends.microvm import qemu

    t0 = time.monotonic()
    vm = _Vm(img, accel, incoming=path)
    try:
        if qemu.await_incoming(vm.qmp) == "paused":
            qemu.cont(vm.qmp)
        _ready(vm)
        return (time.monotonic() - t0) * 1000
    finally:
        vm.close()


def raw(n: int = 3) -> dict[str, Any]:
    os.environ.setdefault("GLASSROOM_MICROVM_ALLOW_TCG", "1")
    from glassroom.backends.microvm import image, qemu

    img, accel = image.prepare(), qemu.choose_accel()
    work = tempfile.mkdtemp(prefix="glassroom-bench-snap-", dir="/var/tmp")
    state = os.path.join(work, "vm.state")
    res: dict[str, list[float]] = {"boot": [], "checkpoint": [], "cont": [], "restore": [],
                                   "state_bytes": []}  # fmt: skip
    try:
        t0 = time.monotonic()
        vm = _Vm(img, accel)
        try:
            _ready(vm)
            res["boot"].append((time.monotonic() - t0) * 1000)
            for _ in range(n):
                save_ms, cont_ms = _checkpoint(vm, state)
                res["checkpoint"].append(save_ms)
                res["cont"].append(cont_ms)
                res["state_bytes"].append(os.stat(state).st_size)
                res["restore"].append(_restore(img, accel, state))
        finally:
            vm.close()
    finally:
        for f in os.listdir(work):
            os.unlink(os.path.join(work, f))
        os.rmdir(work)
    med = {k: round(statistics.median(v), 1) for k, v in res.items() if v}
    return {
        "tool": "qemu-system-x86_64 (plain: no supervisor, uid drop, cgroups or walls)",
        "accel": accel.detail,
        "runs": n,
        "median_ms": {
            "cold_boot_to_agent_ready": med["boot"],
            "checkpoint_stop_migrate_to_file": med["checkpoint"],
            "cont_after_checkpoint": med["cont"],
            "restore_incoming_to_agent_ready": med["restore"],
        },
        "median_bytes": {"state": int(med["state_bytes"])},
        "samples_ms": {k: [round(x, 1) for x in v] for k, v in res.items()
                       if k != "state_bytes"},  # fmt: skip
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    print(json.dumps(raw(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=2))
