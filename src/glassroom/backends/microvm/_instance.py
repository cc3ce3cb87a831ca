"""The ``microvm`` backend (risk "high" and "maximum"): one QEMU microVM per sandbox.

Construction order:

1. The accel is chosen (KVM if real; TCG only when allowed: see ``qemu``),
   the image is prepared (cached), the plan's tools are checked against what
   the image holds (one it lacks: ``PlanError`` naming its ``tools.allow``
   rule), and the reaper record is written, listing the VM's directory,
   before any process exists.
2. QEMU starts from the booted-idle snapshot of this VM shape
   (``-incoming fd:N``), or boots cold when snapshots are off.  It runs with
   no NIC, a read-only root disk, a fresh ext4 scratch disk of disk_mib for
   /workspace and /tmp (so files are not guest RAM and the guest cgroup caps
   the task at memory_mib exactly), one virtio-serial port to a unix socket
   that the supervisor listens on, and QEMU's own seccomp sandbox.
3. The agent answers ``hello``; the supervisor sends the walls (Landlock
   rules, rlimits, cgroup limits, the seccomp program, the clock) and the
   agent applies them (mounting the scratch disk) and confirms.
4. A reader thread routes frames and enforces the deadline: at
   ``max_runtime_s`` it kills QEMU, and with it everything in the VM.

File audit (``[audit] level`` ``files``/``syscalls``): the host sends the
trace filter and the syscall table with the walls; in the guest a tracer
follows each command and file operation (see ``guest/agent.py``), and its
reports arrive as ``trace`` frames before the request's end.  They are the
guest's claim: each one is checked (bounded count, types, known syscalls,
a request that is running), turned into a record by the one schema
(``audit/_events.py``) with source "guest agent (untrusted)" and
``untrusted: true``, and anything off is an anomaly, never a crash.

Checkpoints (pause, snapshot, fork; see docs/snapshots.md): the agent is
asked to hold still (``quiesce``: it answers, then sends nothing until
``resume``), so the saved channel is between frames both ways; QEMU, told
over its monitor (a socketpair, like the channel), stops and migrates its
state to a file, and the scratch disk is copied sparse, both of that one
stopped instant.  A restore is a new QEMU of the same command line with
``-incoming`` from that file and a copy of the disk, under walls built as
``start`` builds them (its own uid, cgroups, QEMU's seccomp); the guest is
not configured again (its walls are in the restored memory, and the plan
must ask for the same ones: checked by digest), it is told ``resume``.
Requests still open at the checkpoint (a command left running) go on in
the guest: the new channel's ids start past them and their frames are
checked and dropped, their trace reports still logged.  A VM with a NIC
is never checkpointed (``snapshot.memory``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ... import _config
from ..._errors import SandboxClosed, SandboxError, SnapshotError, WallError
from ..._reach import reachable_by
from ..._sys import cgroups, netwatch, proc, seccomp, tracewatch
from ...audit._events import MAX_ARGV, MAX_PATH, syscalls_for, to_record
from ...guest import protocol
from ...plan import EGRESS_DIR_INSIDE, PROXY_PORT_INSIDE, SECRETS_DIR, LaunchPlan
from .._failures import exec_message, path_error
from .._files import FileOps
from .._lifecycle import InstanceBase, started
from ..base import (
    Checkpoint,
    EventSink,
    ExecRequest,
    ExecResult,
    Instance,
    Process,
    pty_size,
)
from . import image as _image
from . import qemu
from ._channel import GuestChannel, ProtocolViolation

CONFIG_TIMEOUT_S = 30.0
MAX_LISTING = 1 << 20
#: The ``source`` of every record built from the guest's trace reports.
TRACE_SOURCE = "guest agent (untrusted)"
#: Reports per ``trace`` frame (the agent sends at most 512).
MAX_TRACE_PER_FRAME = 1024
#: Reports per sandbox; past it one anomaly, and the rest are not logged.
MAX_TRACE_EVENTS = tracewatch.MAX_EVENTS
_TRACE_STR = ("syscall", "path", "path2", "flags", "mode", "result", "parent", "exe",
              "path_arg", "path_at_exit", "path2_at_exit")  # fmt: skip
_TRACE_INT = ("pid", "ppid")
_RESULT = re.compile(r"ok|E[A-Z0-9_]{1,30}|unfinished \(process ended\)|unknown \([a-z ]{1,60}\)")
Record = tuple[str, dict[str, Any], str, "str | None"]
#: A checkpoint's files, in its directory: QEMU's migrated state, the scratch disk.
STATE_FILE = "vm.state"
DISK_FILE = "scratch.img"
#: How long a guest agent gets to hold still (``quiesced``) for a checkpoint.
QUIESCE_TIMEOUT_S = 30.0


AGENT_CHOICES = ("auto", "compiled", "python")


def choose_agent(img: _image.Image) -> tuple[str, str]:
    """Which guest agent a VM boots, and why: ``GLASSROOM_INIT``, as on the other tiers.

    ``auto`` (the default): the compiled agent (``_sys/agent``, ``--guest``)
    when the image holds it, else the Python agent (``guest/agent.py``); the
    reason is recorded in the sandbox's walls.  Both give the file audit (a
    tracer per request).  ``compiled``: that agent or a WallError (fail
    closed: never silently the other).  ``python``: the Python agent."""
    want = os.environ.get("GLASSROOM_INIT", "auto").strip().lower() or "auto"
    if want not in AGENT_CHOICES:
        raise WallError(f"init: GLASSROOM_INIT={want!r} is not one of {', '.join(AGENT_CHOICES)}",
                        rule="init")  # fmt: skip
    if want == "python":
        return "python", "GLASSROOM_INIT=python"
    if not img.compiled:
        if want == "compiled":
            raise WallError(
                "init: GLASSROOM_INIT=compiled, but this guest image has no compiled agent: "
                "build it with `glassroom init build` (gcc and libc6-dev), and the image is "
                "built again with it", rule="init")  # fmt: skip
        return "python", "the compiled agent is not built (glassroom init build)"
    return "compiled", ""


def snapshots_enabled() -> bool:
    return os.environ.get("GLASSROOM_MICROVM_SNAPSHOT", "1") not in ("0", "no", "false")


class MicrovmBackend:
    name: ClassVar[str] = "microvm"
    risks: ClassVar[Sequence[str]] = ("high", "maximum")

    def start(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> MicrovmInstance:
        inst = MicrovmInstance(plan, sandbox_id, on_event)
        return started(inst, inst.build)

    def restore(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink, src: Path,
                checkpoint: Checkpoint) -> MicrovmInstance:  # fmt: skip
        """A VM again from :meth:`MicrovmInstance.checkpoint`'s files, under
        ``sandbox_id`` (a new one for a fork), with the walls ``start`` builds."""
        if checkpoint.tier != self.name or not checkpoint.memory:
            raise SnapshotError(f"microvm: cannot restore a {checkpoint.tier!r} checkpoint",
                                rule="snapshot.restore")  # fmt: skip
        inst = MicrovmInstance(plan, sandbox_id, on_event)
        return started(inst, lambda: inst.build(restore=(src, checkpoint)))


class MicrovmProcess:
    """A command running in the VM (see :class:`base.Process`)."""

    def __init__(self, inst: MicrovmInstance, req: ExecRequest) -> None:
        self._inst = inst
        self.req = req
        self.pid = 0
        self.started = time.monotonic()
        self.events: list[tuple[str, bytes]] = []
        self.result: ExecResult | None = None
        self.rid = 0
        self._cond = threading.Condition()
        self._first = threading.Event()
        self._error: dict[str, Any] | None = None
        self._budget = req.max_output_bytes
        self._truncated = False
        self._timed_out = False
        self._stdin_open = True
        self._on_exit: list[Callable[[ExecResult], None]] = []
        self._timer: threading.Timer | None = None

    # -- frames from the reader thread ---------------------------------------------

    def _frame(self, msg: dict[str, Any], payload: bytes) -> None:
        op = msg["op"]
        if op == "started":
            self.pid = int(msg["pid"])
            self._first.set()
        elif op == "out":
            if self.result is not None:
                self._inst._anomaly(f"output for request {self.rid} after its exit")
                return
            if self._truncated:
                return
            if (msg["stream"] == "pty") != (self.req.pty is not None):
                # a pty's command has one output stream; any other has no pty
                self._inst._anomaly(f"{msg['stream']} output for request {self.rid}")
                return
            chunk = payload
            if len(chunk) > self._budget:
                chunk, self._truncated = chunk[: self._budget], True
            self._budget -= len(chunk)
            with self._cond:
                if chunk:
                    self.events.append((msg["stream"], chunk))
                self._cond.notify_all()
            if self._truncated:
                self.signal(int(signal.SIGKILL))
        elif op == "error":
            self._error = msg
            self._finish(None)
            self._first.set()
        elif op == "exit":
            self._inst._stats_from(msg)
            self._finish(msg)
            self._first.set()
        elif op == "closed":
            self._finish({"signal": int(signal.SIGKILL), "code": None, "closed": True})
            self._first.set()
        else:
            self._inst._anomaly(f"unexpected {op!r} frame for a command")

    def _finish(self, exit_msg: dict[str, Any] | None) -> None:
        with self._cond:
            if self.result is not None:
                return
            self._inst.channel_forget(self.rid)
            if self._timer is not None:
                self._timer.cancel()
            dur = (time.monotonic() - self.started) * 1000
            if exit_msg is None:  # exec failed in the guest
                err = self._error or {"errno": errno.EIO, "error": "failed"}
                e = int(err["errno"])
                text = exec_message(self.req.argv[0] if self.req.argv else "", e, str(err["error"]))
                self.events.append(("stderr", text.encode()))
                self.result = ExecResult(
                    exit_code=126 if e == errno.EACCES else 127, signal=None, stdout=b"",
                    stderr=text.encode(), duration_ms=dur, truncated=False, exec_errno=e,
                    exec_error=str(err["error"]),
                )  # fmt: skip
            else:
                sig, code = exit_msg.get("signal"), exit_msg.get("code")
                by_deadline = bool(exit_msg.get("closed") and self._inst.killed_by_deadline)
                limits = ["output"] if self._truncated else []
                if by_deadline:
                    limits.append("max_runtime")
                self.result = ExecResult(
                    exit_code=128 + sig if sig else int(code or 0), signal=sig,
                    stdout=b"".join(d for s, d in self.events if s in ("stdout", "pty")),
                    stderr=b"".join(d for s, d in self.events if s == "stderr"),
                    duration_ms=dur, truncated=self._truncated,
                    timed_out=self._timed_out or by_deadline, limits_hit=limits,
                )  # fmt: skip
            callbacks, self._on_exit = self._on_exit, []
            self._cond.notify_all()
        for cb in callbacks:
            cb(self.result)

    # -- the Process protocol ------------------------------------------------------------

    def events_since(self, index: int, timeout: float) -> tuple[list[tuple[str, bytes]], int, bool]:
        end = time.monotonic() + timeout
        with self._cond:
            while len(self.events) <= index and self.result is None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            new = self.events[index:]
            return new, index + len(new), self.result is not None and not new

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        with self._cond:
            self._cond.wait_for(lambda: self.result is not None, timeout)
            return self.result

    def signal(self, sig: int) -> None:
        if self.result is None and self.rid:
            with contextlib.suppress(SandboxClosed):
                self._inst._send({"op": "signal", "id": self.rid, "sig": int(sig)})

    def write_stdin(self, data: bytes) -> None:
        if not self._stdin_open or self.result is not None:
            raise BrokenPipeError("stdin is closed")
        view = memoryview(data)
        while view:
            self._inst._send({"op": "stdin", "id": self.rid}, bytes(view[: protocol.CHUNK]))
            view = view[protocol.CHUNK :]

    def close_stdin(self) -> None:
        if self._stdin_open and self.result is None:
            self._stdin_open = False
            with contextlib.suppress(SandboxClosed):
                self._inst._send({"op": "stdin", "id": self.rid, "eof": True})

    def resize(self, rows: int, cols: int) -> None:
        if self.req.pty is None:
            raise SandboxError(f"process {self.pid} has no pty to resize", rule="pty")
        rows, cols = pty_size(rows, cols)
        if self.result is None and self.rid:
            with contextlib.suppress(SandboxClosed):
                self._inst._send({"op": "resize", "id": self.rid, "rows": rows, "cols": cols})

    def on_exit(self, callback: Callable[[ExecResult], None]) -> None:
        with self._cond:
            if self.result is None:
                self._on_exit.append(callback)
                return
        callback(self.result)

    def _on_timeout(self) -> None:
        self._timed_out = True
        self.signal(int(signal.SIGKILL))


class MicrovmInstance(InstanceBase, FileOps):
    """One running microVM, driven over its control channel."""

    _listing_kw: ClassVar[dict[str, Any]] = {"limit": MAX_LISTING}

    def __init__(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> None:
        super().__init__(plan, sandbox_id, on_event)
        self.vmdir = self.state / "microvm" / sandbox_id
        self.channel: GuestChannel | None = None
        self.boot: dict[str, Any] = {}
        self._pidfd: int | None = None
        self._reader: threading.Thread | None = None
        self._untagged: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stats: dict[str, int] = {"oom_kill": 0, "pids_max_hits": 0}
        self._workspace: tuple[int, int] | None = None
        #: The flock'ed slot of QEMU's own host uid (as root), held until QEMU is gone.
        self._uid_lock: int | None = None
        #: QEMU's monitor (our end of a socketpair), spoken to for checkpoints only.
        self._mon: socket.socket | None = None
        self._qmp: qemu._Qmp | None = None
        #: A read-only fd of the scratch disk (an unlinked file), to copy it.
        self._disk_fd: int | None = None
        #: What a checkpoint's VM must match to be restored here.
        self.shape: dict[str, Any] = {}
        self.walls_sha256 = ""
        self._has_watch = False
        self._checkpoint_lock = threading.Lock()
        #: Why the VM is gone on purpose (a pause's checkpoint), for later errors.
        self._ended: str | None = None
        self._lock = threading.Lock()
        self._trace_calls = frozenset(syscalls_for(plan.audit_level))
        self.max_trace_events = MAX_TRACE_EVENTS
        self.trace_events = 0
        self.trace_dropped = 0

    # -- construction ----------------------------------------------------------------

    def build(self, restore: tuple[Path, Checkpoint] | None = None) -> None:
        """Start the VM: from the booted-idle template (or cold), or with ``restore``
        from a checkpoint's saved state and a copy of its disk.  Same walls either way."""
        t0 = time.monotonic()
        accel = qemu.choose_accel()
        img = _image.prepare()
        if self.plan.root is not None:  # a template: its own root image (_template_image.py)
            from . import _template_image

            img = _template_image.build(img, Path(self.plan.root),
                                        self.plan.template.rpartition("@")[2])  # fmt: skip
        # Before any VM exists: a tool the guest image lacks is refused, naming its rule.
        _image.check_tools(img, self.plan)
        if restore is not None:  # the agent in the saved memory is the one that goes on
            agent = str((restore[1].details.get("shape") or {}).get("agent", "python"))
            why = "restored"
        else:
            agent, why = choose_agent(img)
        img = dataclasses.replace(img, agent=agent)
        self.walls["init"] = agent
        if why:
            self.walls["init_reason"] = why
        lim = self.plan.limits
        ram, vcpus = qemu.vm_size(lim.memory_bytes, lim.disk_bytes, lim.cpus)
        proxy_sock = None
        if self.plan.network.mode == "proxy":
            if not self.plan.network.host_dir:
                raise WallError("network: the egress proxy is not running", rule="network")
            proxy_sock = str(Path(self.plan.network.host_dir) / "proxy.sock")
        snap = None
        disk_mib = -(-lim.disk_bytes // (1 << 20))
        self.shape = {"image": img.image_id, "accel": accel.name, "ram_mib": ram, "vcpus": vcpus,
                      "disk_mib": disk_mib, "nic": proxy_sock is not None,
                      "agent": agent}  # fmt: skip
        cfg, walls_payload = self._guest_walls()
        self.walls_sha256 = _walls_digest(cfg, walls_payload)
        if restore is not None:
            _check_restorable(restore[1], self.shape, self.walls_sha256)
            snap = restore[0] / STATE_FILE
        # A VM with a NIC boots cold: its user-networking state is not snapshotted.
        elif snapshots_enabled() and proxy_sock is None:
            snap = qemu.ensure_snapshot(img, accel, ram, vcpus, self.state / "microvm", disk_mib)
        self.vmdir.mkdir(parents=True, exist_ok=False, mode=0o700)
        # Root outside, nobody inside: as root, QEMU runs as a host uid of its
        # own (one per VM) with no capabilities.  With a NIC, slirp execs the
        # relay per connection as that uid: the egress dir becomes that uid's,
        # and the relay and the socket must be reachable, or the VM does not
        # start (never a root QEMU instead).
        run_as = None
        if os.geteuid() == 0:
            uid, self._uid_lock = qemu.claim_uid(self.state)
            run_as = (uid, uid)
            if proxy_sock is not None:
                self._give_egress(Path(proxy_sock), uid)
                for path, write in ((qemu.relay_script(), False), (Path(proxy_sock), True)):
                    if not reachable_by(path, uid, uid, write=write):
                        raise WallError(
                            f"microvm: QEMU's uid {uid} cannot reach {path}: make the "
                            "directories above it searchable (the state dir's default "
                            "/run/glassroom is 0755)", rule="vmm")  # fmt: skip
        self._write_record()
        # The control channel and the monitor are socketpairs: QEMU gets its
        # ends as fds, so no socket path has to be reachable by QEMU's uid, and
        # nothing else can connect in their place.
        conn, qemu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._mon, mon_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            snap_fd = self._open_state(snap, restore is not None, img, accel, ram, vcpus,
                                       disk_mib)  # fmt: skip
        except BaseException:
            for s in (conn, qemu_end, mon_qemu):
                s.close()
            raise
        # /workspace and /tmp: a fresh ext4 of disk_mib as a second virtio-blk
        # disk, so files are not guest RAM (fails closed: resources.disk_mib);
        # a restore gets a copy of the checkpoint's.
        try:
            disk_fds = (qemu.scratch_disk_from(restore[0] / DISK_FILE, disk_mib << 20)
                        if restore is not None else qemu.scratch_disk(disk_mib << 20))  # fmt: skip
            # The host's own read-only view, for a checkpoint's copy of the disk.
            self._disk_fd = os.dup(disk_fds[1])
        except BaseException:
            for s in (conn, qemu_end, mon_qemu):
                s.close()
            if snap_fd is not None:
                os.close(snap_fd)
            raise
        log = open(self.vmdir / "qemu.log", "wb")  # noqa: SIM115
        t1 = time.monotonic()
        passed = [qemu_end.fileno(), mon_qemu.fileno(), *disk_fds]
        passed += [snap_fd] if snap_fd is not None else []
        try:
            self.proc = subprocess.Popen(
                qemu.argv(img, accel, ram, vcpus, qemu_end.fileno(), console=None,
                          incoming_fd=snap_fd, qmp=mon_qemu.fileno(), proxy_sock=proxy_sock,
                          run_as=run_as, scratch_fds=disk_fds),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env={},
                cwd="/", close_fds=True, pass_fds=passed,
            )  # fmt: skip
        except BaseException:
            conn.close()
            raise
        finally:
            log.close()
            qemu_end.close()
            mon_qemu.close()
            for fd in disk_fds:  # QEMU's copies (and the host's read-only dup) are all now
                os.close(fd)
            if snap_fd is not None:
                os.close(snap_fd)
        qemu_pid = self.proc.pid
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
            self._write_record()
            self._cgroup(ram, vcpus)
        except BaseException:
            conn.close()
            raise
        if restore is not None:
            reply = self._resume_restored(conn, restore[1])
        else:
            reply = self._first_boot(conn, cfg, walls_payload)
        t2 = time.monotonic()
        if proxy_sock is not None:
            self._send_net_files()
        start = ("checkpoint restore" if restore is not None
                 else "snapshot restore" if snap else "cold boot")  # fmt: skip
        self.boot = {"start": start, "vmm_ms": round((t2 - t1) * 1000, 1),
                     "total_ms": round((time.monotonic() - t0) * 1000, 1)}  # fmt: skip
        self._record_walls(qemu_pid, accel, img, cfg, reply, bool(proxy_sock))
        if restore is not None:
            saved = restore[1].details
            self.walls["restored_from"] = {
                "sandbox_id": str(saved.get("sandbox_id", ""))[:80],
                "how": "QEMU -incoming from the checkpoint's saved state, a copy of its "
                       "scratch disk; the guest's walls are the ones it applied at first boot "
                       "(the same policy: checked by digest)",
                "state_bytes": saved.get("state_bytes"),
            }  # fmt: skip

    def _open_state(self, snap: Path | None, restoring: bool, img: _image.Image,
                    accel: qemu.Accel, ram: int, vcpus: int,
                    disk_mib: int) -> int | None:  # fmt: skip
        """An fd of the state QEMU loads with ``-incoming`` (None: a cold boot)."""
        if snap is None:
            return None
        try:
            return os.open(snap, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if restoring:
                raise SnapshotError(f"microvm: the checkpoint has no {STATE_FILE}",
                                    rule="snapshot.integrity") from None  # fmt: skip
        # The template was removed meanwhile (`microvm prepare` pruned it): made again.
        snap = qemu.ensure_snapshot(img, accel, ram, vcpus, self.state / "microvm", disk_mib)
        return os.open(snap, os.O_RDONLY | os.O_CLOEXEC)

    def _first_boot(self, conn: socket.socket, cfg: dict[str, Any],
                    payload: bytes) -> dict[str, Any]:  # fmt: skip
        """The agent answers ``hello``, gets the walls and confirms them."""
        assert self.proc is not None
        try:
            qemu.handshake(conn, qemu.BOOT_TIMEOUT_S)
        except WallError:
            conn.close()
            self._raise_if_exited()
            raise
        self.attach(conn)
        self._send(cfg, payload)
        reply = self._await_untagged(("configured", "fatal"), "apply the walls")
        if reply["op"] == "fatal":
            wall = str(reply.get("wall", "init"))
            raise WallError(f"{wall}: {reply.get('error', 'failed')} (in the guest)", rule=wall)
        level = self.plan.audit_level
        if reply.get("audit", "actions") != level:
            said = str(reply.get("audit"))[:40]
            raise WallError(f"audit.level: the guest agent did not enable level {level!r} "
                            f"(it said {said!r})", rule="audit.level")  # fmt: skip
        return reply

    def _resume_restored(self, conn: socket.socket, ckpt: Checkpoint) -> dict[str, Any]:
        """A restored VM: QEMU loads the state (paused), goes on, and the agent,
        which was holding still in ``quiesce``, answers ``resume``.  No ``hello``
        and no config: the guest applied its walls at its first boot, and they
        are in the memory that was restored."""
        try:
            qmp = self._monitor()
            qemu.await_incoming(qmp)
            qemu.cont(qmp)
        except (qemu.MigrationError, OSError, ValueError) as exc:
            conn.close()
            self._raise_if_exited()
            raise WallError(f"microvm: the checkpoint did not restore: {exc}", rule="vmm") from None
        chan = ckpt.details.get("channel") or {}
        self.attach(conn, first_id=int(chan.get("next_id", 1)),
                    orphans=frozenset(int(i) for i in chan.get("open", ())))  # fmt: skip
        # a restored (or forked) guest gets its own entropy, like a fresh one
        self._send({"op": "resume", "time": time.time(), "seed": secrets.token_hex(32)})
        reply = self._await_untagged(("resumed",), "resume")
        if reply.get("version") != protocol.VERSION:
            raise WallError("microvm: the restored guest agent speaks another protocol version",
                            rule="init")  # fmt: skip
        if reply.get("reseeded") != 1:  # else it would share its RNG with its twins
            raise WallError("microvm: the restored guest could not reseed its RNG from the "
                            "host's entropy", rule="rng")  # fmt: skip
        guest = ckpt.details.get("guest") or {}
        # What the guest said at its first boot (its claim then, recorded by the host).
        return {"kernel": str(guest.get("kernel", ""))[:80],
                "landlock_abi": int(guest.get("landlock_abi", 0))}  # fmt: skip

    def _await_untagged(self, ops: tuple[str, ...], what: str) -> dict[str, Any]:
        """The next untagged frame, which must be one of ``ops`` (else the VM does not start)."""
        try:
            reply = self._untagged.get(timeout=CONFIG_TIMEOUT_S)
        except queue.Empty:
            raise WallError(f"microvm: the guest agent did not {what}", rule="init") from None
        if reply["op"] == "closed":
            self._raise_if_exited()
            raise WallError(f"microvm: the VM ended before its agent could {what} "
                            f"({reply.get('reason')})", rule="init")  # fmt: skip
        if reply["op"] not in ops:
            raise WallError(f"microvm: unexpected reply {reply['op']!r} ({what})", rule="init")
        return reply

    def _raise_if_exited(self) -> None:
        """Say why, in QEMU's own words, when QEMU is gone."""
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=0.5)
        if self.proc.poll() is not None:
            raise WallError(f"microvm: qemu exited ({self.proc.returncode}): "
                            f"{self._qemu_log()}", rule="vmm") from None  # fmt: skip

    def _guest_walls(self) -> tuple[dict[str, Any], bytes]:
        """The ``config`` frame and its payload (seccomp, watch and trace filters)."""
        cfg = self._config()
        # The profile's notify entries (setuid/setgid modes) go into the watch
        # filter: the guest agent answers them EPERM and reports them (its claim).
        bpf = seccomp.compile_bpf(self.plan.seccomp_profile, notify_apart=True)
        watch = netwatch.filter_program(self.plan.network.watch_direct, self.plan.seccomp_profile)
        cfg["refuse"] = {str(nr): -errno.EPERM if es[0].errno == "EPERM" else -errno.ENOSYS
                         for nr, es in netwatch.denied_calls(self.plan.seccomp_profile).items()}
        level = self.plan.audit_level
        trace = tracewatch.filter_program(level) if level != "actions" else b""
        self._has_watch = bool(watch)
        return {**cfg, "seccomp_len": len(bpf), "trace_len": len(trace)}, bpf + watch + trace

    def _record_walls(self, qemu_pid: int, accel: qemu.Accel, img: _image.Image,
                      cfg: dict[str, Any], reply: dict[str, Any], nic: bool) -> None:  # fmt: skip
        lim, level = self.plan.limits, self.plan.audit_level
        self.walls.update({
            "vmm": "qemu -M microvm",
            # The host uid QEMU runs as: the VM's own (no capabilities) when
            # glassroom is root, else the caller's.
            "vmm_uid": proc.real_uid(qemu_pid),
            "accel": accel.detail if accel.emulated else accel.name,
            "emulated": accel.emulated,
            "guest_kernel": str(reply.get("kernel", img.kernel_release)),
            "vcpus": self.shape["vcpus"],
            "ram_mib": self.shape["ram_mib"],
            "network": (f"QEMU user networking, restrict=on: the only route is "
                        f"{qemu.PROXY_ADDR}:{qemu.PROXY_PORT}, relayed to the egress proxy; "
                        f"the guest forwards 127.0.0.1:{PROXY_PORT_INSIDE} there")
            if nic else "no network device",
            "network_watch": "in-guest seccomp user notification: connect, sendto, sendmsg, raw"
            if self._has_watch else "off",
            "root": "read-only ext4 image",
            "workspace": {"kind": "ext4 scratch disk (virtio-blk, an unlinked host file)",
                          "holds": ["/tmp", "/workspace"], "disk_bytes": lim.disk_bytes,
                          "counts_in": "resources.disk_mib (guest page cache, reclaimable)"},
            "start": self.boot["start"],
            "qemu_sandbox": "seccomp: obsolete, resourcecontrol denied"
            + ("" if nic else "; elevateprivileges, spawn denied"),
            "landlock": {"abi": int(reply.get("landlock_abi", 0)),
                         "tools": [t.path for t in self.plan.tools]},
            "seccomp": {"profile": self.plan.seccomp_profile, "where": "in the guest"},
            "guest_cgroup": {"memory_bytes": cfg["memory_bytes"], "pids": cfg["pids"]},
            "rlimits": cfg["rlimits"],
            "guest_uid": _config.INSIDE_UID,
        })  # fmt: skip
        if level != "actions":
            self.walls["file_audit"] = {
                "level": level,
                "how": "ptrace in the guest, reported by the agent (untrusted)",
                "syscalls": sorted(self._trace_calls),
                "source": TRACE_SOURCE,
                "enforced_by": "Landlock and the guest kernel; the records are the guest's claim",
                "per_sandbox_max": self.max_trace_events,
            }

    def attach(self, conn: socket.socket, *, first_id: int = 1,
               orphans: frozenset[int] = frozenset()) -> None:  # fmt: skip
        """Drive the guest on ``conn`` (the VM's channel, or a fake guest in tests)."""
        self.channel = GuestChannel(conn, self._anomaly, first_id=first_id, orphans=orphans)
        self.channel.on_untagged(self._untagged_frame)
        self.channel.on_trace(self._trace_frame)
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                         name=f"glassroom-{self.sandbox_id}")  # fmt: skip
        self._reader.start()

    def _cgroup(self, ram_mib: int, vcpus: int) -> None:
        """QEMU itself in host cgroups: the VMM cannot take more than the VM's share."""
        assert self.proc is not None
        mem = (ram_mib + qemu.VMM_OVERHEAD_MIB) << 20
        self.cg = cgroups.CgroupSet.create(
            self.sandbox_id, cgroups.CgroupLimits(memory_bytes=mem, pids=qemu.VMM_PIDS,
                                                  cpus=max(self.plan.limits.cpus, 0.1)),
            parent=_config.cgroup_parent(),
        )  # fmt: skip
        self._write_record()
        self.cg.add_pid(self.proc.pid)
        self.walls["cgroups"] = {"paths": list(self.cg.paths), "memory_bytes": mem,
                                 "pids": qemu.VMM_PIDS, "cpus": self.plan.limits.cpus,
                                 "holds": "the qemu process"}  # fmt: skip

    def _send_net_files(self) -> None:
        """The proxy's CA files, for TLS inspection (the guest cannot see the host's dir)."""
        assert self.plan.network.host_dir is not None
        for f in sorted(Path(self.plan.network.host_dir).glob("*.pem")):
            data = memoryview(f.read_bytes())
            self._send({"op": "netfile", "name": f.name, "start": True})
            while data:
                self._send({"op": "netfile", "name": f.name}, bytes(data[: protocol.CHUNK]))
                data = data[protocol.CHUNK :]

    def _config(self) -> dict[str, Any]:
        plan, lim = self.plan, self.plan.limits
        read = [r.path for r in plan.fs_rules if r.access == "read"] + ["/etc/passwd", "/etc/group"]
        write = [r.path for r in plan.fs_rules if r.access == "write"]
        return {
            "op": "config",
            "time": time.time(),
            # Every VM starts from one booted-idle snapshot, RNG state and all:
            # without fresh entropy two sandboxes would draw the same "random"
            # bytes (keys, uuids, boot_id).  The agent mixes this in and reseeds.
            "seed": secrets.token_hex(32),
            "read": sorted(set(read)),
            "write": write,
            "execute": sorted({t.path for t in plan.tools} | set(plan.loaders)),
            "rlimits": {"RLIMIT_FSIZE": lim.disk_bytes, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 1024},
            # Exactly the policy's: the files are on the scratch disk.
            "memory_bytes": lim.memory_bytes,
            "pids": lim.pids,
            "disk_bytes": lim.disk_bytes,
            "secrets": [m.target for m in plan.mounts if m.target == SECRETS_DIR],
            "audit": {
                "level": plan.audit_level,
                "syscalls": {
                    str(nr): name for nr, name in tracewatch.syscall_table(plan.audit_level).items()
                },
            }
            if plan.audit_level != "actions"
            else None,
            "net": {
                "addr": qemu.GUEST_ADDR,
                "mask": "255.255.255.0",
                "port": PROXY_PORT_INSIDE,
                "proxy": [qemu.PROXY_ADDR, qemu.PROXY_PORT],
                "dir": EGRESS_DIR_INSIDE,
            }
            if plan.network.mode == "proxy"
            else None,
        }

    @staticmethod
    def _give_egress(sock: Path, uid: int) -> None:
        """The egress dir and socket to QEMU's uid: only its relay connects there."""
        for path in (sock.parent, sock):
            os.chown(path, uid, uid)

    def _qemu_log(self) -> str:
        try:
            return (self.vmdir / "qemu.log").read_text(errors="replace").strip()[-300:]
        except OSError:
            return ""

    def _write_record(self) -> None:
        self._save_record(
            "microvm", [self.proc.pid if self.proc else None],
            cgroup={"name": self.sandbox_id, "parent": _config.cgroup_parent()}
            if self.cg is not None else None,
            paths=[str(self.vmdir)]
            + ([self.plan.network.host_dir] if self.plan.network.host_dir else []),
        )  # fmt: skip

    # -- the reader thread ----------------------------------------------------------------

    def _untagged_frame(self, msg: dict[str, Any], _payload: bytes) -> None:
        if msg["op"] == "refused":  # a setuid/setgid mode the agent answered EPERM
            entries = netwatch.denied_calls(self.plan.seccomp_profile).get(msg["nr"])
            if not entries:
                self._anomaly(f"refused: a call that is not refused ({msg['nr']})")
                return
            entry = entries[0]
            name = next((n for n in entry.syscalls if seccomp.syscall_number(n) == msg["nr"]),
                        str(msg["nr"]))  # fmt: skip
            details = {"syscall": name, "pid": msg["pid"], "reason": entry.reason,
                       "seen_by": "guest agent (the guest's own report)"}  # fmt: skip
            self.on_event("blocked", {"action": details["syscall"], **details}, "deny",
                          str(entry.rule))  # fmt: skip
            return
        if msg["op"] != "netdirect":
            self._untagged.put(msg)
            return
        info = {k: v for k, v in msg.items() if k != "op"}
        info["reason"] = "no route: the VM has no network device"
        info["seen_by"] = "guest agent (the guest's own report)"
        net = self.plan.network
        if net.mode == "proxy":
            info["reason"] = "no route: the only way out is the egress proxy"
        rule = "network.direct" if net.mode == "proxy" else net.rule
        self.on_event("network.direct", info, "deny", rule)

    # -- the file audit: the guest's trace reports ----------------------------------------

    def _trace_frame(self, msg: dict[str, Any], running: bool) -> None:
        """One ``trace`` frame (its schema is checked): log what holds up, flag the rest."""
        rid = msg["id"]
        if not self._trace_calls:
            self._anomaly(f"trace report for request {rid} but the file audit is off")
            return
        if not running:
            self._anomaly(f"trace report for request {rid}, which is not running")
            return
        if msg.get("error"):
            # Reports may be missing from here on: fail closed, as on namespaces.
            self.on_event("anomaly", {"reason": "the guest's tracer ended abnormally; "
                                      "reports may be missing", "detail": msg["error"],
                                      "request": rid, "seen_by": TRACE_SOURCE,
                                      "action": "sandbox killed"},
                          "deny", "audit.level")  # fmt: skip
            threading.Thread(target=self.kill, daemon=True, name="audit-kill").start()
        events: list[Any] = msg.get("events", [])
        if len(events) > MAX_TRACE_PER_FRAME:
            self._anomaly(f"trace frame for request {rid} with {len(events)} reports "
                          f"(at most {MAX_TRACE_PER_FRAME}); the rest are dropped")  # fmt: skip
            events = events[:MAX_TRACE_PER_FRAME]
        batch: list[Record] = []
        bad = 0
        for ev in events:
            if self.trace_events >= self.max_trace_events:
                self.trace_dropped += 1
                continue
            clean = self._trace_event(ev)
            if clean is None:
                bad += 1
                continue
            event, details, decision, rule = to_record(clean, TRACE_SOURCE)
            details["untrusted"] = True
            batch.append((event, details, decision, rule))
            self.trace_events += 1
            if self.trace_events == self.max_trace_events:
                # Fail closed, as on the other tiers: a task must not outrun
                # its audit and then act unseen.
                why = (f"more than {self.max_trace_events} traced calls: the audit budget "
                       "is spent")  # fmt: skip
                batch.append(("anomaly", {"reason": why, "seen_by": TRACE_SOURCE,
                                          "action": "sandbox killed"},
                              "deny", "audit.level"))  # fmt: skip
                threading.Thread(target=self.kill, daemon=True, name="audit-kill").start()
        if batch:
            self._log_many(batch)
        if bad:
            self._anomaly(f"trace frame for request {rid}: {bad} malformed report(s) dropped")

    def _trace_event(self, ev: Any) -> dict[str, Any] | None:
        """The known keys of one report, each of the right type and bounded; None if off."""
        if not isinstance(ev, dict):
            return None
        syscall = ev.get("syscall")
        if not isinstance(syscall, str) or syscall not in self._trace_calls:
            return None
        out: dict[str, Any] = {}
        for key in _TRACE_STR:
            value = ev.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                return None
            out[key] = _text(value)
        for key in _TRACE_INT:
            value = ev.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 32:
                return None
            out[key] = value
        for key in ("argv", "argv_arg"):
            argv = ev.get(key)
            if argv is None:
                continue
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv[:MAX_ARGV]):
                return None
            out[key] = [_text(a) for a in argv[:MAX_ARGV]]
        for flag in ("path_changed", "path_unreadable", "path2_unreadable"):
            if ev.get(flag) is True:
                out[flag] = True
        if not _RESULT.fullmatch(out.get("result", "")):
            return None
        return out

    def _log_many(self, batch: list[Record]) -> None:
        """Hand a batch to the sink: in one go if it can take one (one fsync)."""
        many = getattr(self.on_event, "many", None)
        if callable(many):
            many(batch)
            return
        for event, details, decision, rule in batch:
            self.on_event(event, details, decision, rule)

    def _anomaly(self, what: str) -> None:
        self.on_event("anomaly", {"reason": "protocol violation by the guest", "detail": what},
                      "deny", "guest.protocol")  # fmt: skip

    def _read_loop(self) -> None:
        assert self.channel is not None
        reason = "sandbox exited"
        try:
            reason = self._pump()
        except Exception as exc:  # fail closed
            reason = f"supervisor error: {type(exc).__name__}"
            self._anomaly(f"reader stopped: {exc!r}")
        finally:
            self.dead_reason = self._ended or reason
            self.kill()
            self.channel.close(reason)
            self._untagged.put({"op": "closed", "reason": reason})

    def _pump(self) -> str:
        assert self.channel is not None
        sock = self.channel.sock
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return self._expired("VM")
            try:
                r, _, _ = select.select([sock], [], [], min(remaining, 3600))
            except (OSError, ValueError):
                return "channel closed"
            if not r:
                continue
            try:
                data = sock.recv(1 << 16)
            except OSError:
                return "channel closed"
            if not data:
                return "sandbox exited"
            try:
                self.channel.feed(data)
            except ProtocolViolation as exc:
                self._anomaly(str(exc))
                return "protocol violation"

    # -- operations ---------------------------------------------------------------------------

    def _send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self.channel is None or self._destroyed is not None:
            raise SandboxClosed("the sandbox has been destroyed")
        try:
            self.channel.send(header, payload)
        except SandboxClosed:
            raise self._closed_error() from None

    def channel_forget(self, rid: int) -> None:
        if self.channel is not None and rid:
            self.channel.forget(rid)

    def _stats_from(self, msg: dict[str, Any]) -> None:
        for key in ("oom_kill", "pids_max_hits"):
            if isinstance(msg.get(key), int):
                self._stats[key] = max(self._stats[key], int(msg[key]))
        ws = msg.get("workspace")
        if ws is not None:
            self._workspace = (int(ws[0]), int(ws[1]))

    def cgroup_stats(self) -> dict[str, int]:
        """The guest cgroup's counters, as last reported (the guest's claim)."""
        return dict(self._stats)

    def workspace_usage(self) -> tuple[int, int] | None:
        return self._workspace

    def spawn(self, req: ExecRequest) -> MicrovmProcess:
        if self.channel is None or self._destroyed is not None:
            raise self._closed_error()
        p = MicrovmProcess(self, req)
        try:
            p.rid = self.channel.register(p._frame)
        except SandboxClosed:
            raise self._closed_error() from None
        msg: dict[str, Any] = {"op": "exec", "id": p.rid, "argv": list(req.argv),
                               "env": dict(req.env), "cwd": req.cwd}  # fmt: skip
        if req.pty is not None:  # made in the guest (guest/agent.py)
            msg["pty"] = list(pty_size(*req.pty))
        self._send(msg)
        if req.timeout_s:
            p._timer = threading.Timer(req.timeout_s, p._on_timeout)
            p._timer.daemon = True
            p._timer.start()
        p._first.wait()
        err = p._error
        if err is not None and err.get("wall"):
            # A wall could not be built for this command (no tracer could
            # follow it): it never ran.  Refused, like a sandbox that cannot start.
            wall, text = str(err["wall"]), str(err.get("error", ""))
            self.on_event("blocked", {"action": "exec", "target": req.argv[0] if req.argv else "",
                                      "error": text, "seen_by": TRACE_SOURCE},
                          "deny", wall)  # fmt: skip
            raise WallError(f"{wall}: {text} (in the guest); the command did not run", rule=wall)
        if req.stdin is not None:
            # Given stdin is all of it; without, a spawned command's stdin stays
            # open for write_stdin (as on the other tiers), and exec closes it.
            if p.result is None:
                with contextlib.suppress(BrokenPipeError, SandboxClosed):
                    p.write_stdin(req.stdin)
            p.close_stdin()
        return p

    def exec(self, req: ExecRequest) -> ExecResult:
        p = self.spawn(req)
        p.close_stdin()
        res = p.wait()
        assert res is not None
        return res

    # -- files --------------------------------------------------------------------------------

    def _file_op(self, kind: str, path: str, *, data: bytes = b"", max_bytes: int = 0,
                 mode: int = 0o644, limit: int = 0) -> bytes:  # fmt: skip
        if not path.startswith("/"):
            path = f"{self.plan.workspace}/{path}"
        if self.channel is None or self._destroyed is not None:
            raise self._closed_error()
        q: queue.Queue[tuple[dict[str, Any], bytes]] = queue.Queue()
        try:
            rid = self.channel.register(lambda m, p: q.put((m, p)))
        except SandboxClosed:
            raise self._closed_error() from None
        out = bytearray()
        cap = limit or max_bytes
        try:
            self._send({"op": "file", "id": rid, "kind": kind, "path": path, "max": max_bytes,
                        "mode": mode})  # fmt: skip
            if kind == "write":
                view = memoryview(data)
                while view:
                    self._send({"op": "data", "id": rid}, bytes(view[: protocol.CHUNK]))
                    view = view[protocol.CHUNK :]
                self._send({"op": "eof", "id": rid})
            while True:
                # Bounded (FILE_OP_TIMEOUT_S without a frame): the agent does file
                # ops in its main loop, so one that never ends must not hang us too.
                msg, payload = self._file_reply(q, kind, path, size=len(data))
                op = msg["op"]
                if op == "closed":
                    raise self._closed_error()
                if op == "data":
                    if kind not in ("read", "list") or len(out) + len(payload) > cap:
                        self._anomaly(f"{kind} {path}: the guest sent more data than asked for")
                        raise SandboxError(f"{kind} {path}: malformed reply from the sandbox")
                    out += payload
                elif op == "done":
                    code = int(msg["code"])
                    if code:
                        raise path_error(kind, path, code)
                    return bytes(out)
                elif op == "error":
                    wall = msg.get("wall")
                    if wall:
                        why = f"{msg.get('error', '')} (in the guest); {kind} {path} did not run"
                        raise WallError(f"{wall}: {why}", rule=str(wall))
                    raise path_error(kind, path, int(msg["errno"]))
                else:
                    self._anomaly(f"{kind} {path}: unexpected {op!r} frame")
                    raise SandboxError(f"{kind} {path}: malformed reply from the sandbox")
        finally:
            self.channel_forget(rid)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, dest: Path, *, leave_running: bool) -> Checkpoint:
        """Save the VM into ``dest``: QEMU's migrated state and a sparse copy of the disk.

        The agent holds still first (``quiesce``), so the saved control
        channel sits between frames; QEMU stops, migrates to a file and the
        disk is copied, both of that one stopped instant.  Then the VM goes
        on (``leave_running``: a snapshot or fork) or QEMU quits (a pause;
        the caller's :meth:`destroy` releases the rest)."""
        self._check_checkpointable()
        with self._checkpoint_lock:
            t0 = time.monotonic()
            qmp = self._monitor()
            self._quiesce()
            try:
                facts = self._save(qmp, dest)
            except BaseException as exc:
                self._go_on(qmp)  # the sandbox keeps running; nothing was saved
                if isinstance(exc, (qemu.MigrationError, OSError, ValueError)):
                    raise SnapshotError(f"microvm: checkpoint failed: {exc}",
                                        rule="snapshot.memory") from None  # fmt: skip
                raise
            if leave_running:
                facts["resumed"] = self._go_on(qmp)
            else:
                self._end_paused(qmp)
            facts["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
        return Checkpoint(tier="microvm", memory=True, files=[STATE_FILE, DISK_FILE],
                          details=facts)  # fmt: skip

    def _check_checkpointable(self) -> None:
        """Refuse, with the reason, what cannot be saved whole (never a partial save)."""
        if self.shape.get("nic"):
            raise SnapshotError(
                "microvm: a VM with a network device (network through the egress proxy) "
                "cannot be checkpointed: its QEMU user networking keeps the guest's TCP "
                "connections as host sockets to relay processes QEMU started, which are not "
                "part of the migrated state, so a restored guest would hold connections that "
                "lead nowhere (the same reason such a VM boots cold, not from the snapshot)",
                rule="snapshot.memory")  # fmt: skip
        if not self.alive() or self.channel is None or self._mon is None:
            raise SnapshotError(f"microvm: sandbox {self.sandbox_id} is not running",
                                rule="snapshot.state")  # fmt: skip

    def _monitor(self) -> qemu._Qmp:
        if self._qmp is None:
            assert self._mon is not None
            self._qmp = qemu.monitor(self._mon)
        return self._qmp

    def _quiesce(self) -> None:
        """The agent stops talking (``quiesced``); our senders wait until ``_go_on``."""
        assert self.channel is not None
        with contextlib.suppress(queue.Empty):
            while True:  # nothing stale may pass for the answer
                self._untagged.get_nowait()
        try:
            self.channel.hold({"op": "quiesce"})
        except SandboxClosed:
            raise SnapshotError(f"microvm: sandbox {self.sandbox_id} is not running",
                                rule="snapshot.state") from None  # fmt: skip
        try:
            reply = self._untagged.get(timeout=QUIESCE_TIMEOUT_S)
        except queue.Empty:
            reply = {"op": "timeout"}
        if reply.get("op") != "quiesced":
            with contextlib.suppress(SandboxClosed):
                self.channel.release({"op": "resume", "time": time.time()})
            raise SnapshotError(f"microvm: the guest agent did not hold still for the checkpoint "
                                f"({reply.get('op')})", rule="snapshot.memory")  # fmt: skip

    def _save(self, qmp: qemu._Qmp, dest: Path) -> dict[str, Any]:
        """Stop, migrate to ``dest/vm.state``, copy the disk to ``dest/scratch.img``."""
        assert self.channel is not None and self._disk_fd is not None
        t0 = time.monotonic()
        out = os.open(dest / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                      0o600)  # fmt: skip
        try:
            mig = qemu.save_state(qmp, out)
            t1 = time.monotonic()
            os.fsync(out)
        finally:
            os.close(out)
        size = os.fstat(self._disk_fd).st_size
        disk = os.open(dest / DISK_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                       0o600)  # fmt: skip
        try:
            copied = qemu.copy_sparse(self._disk_fd, disk, size)
            os.fsync(disk)
        finally:
            os.close(disk)
        t2 = time.monotonic()
        next_id, open_ids = self.channel.state()
        ram = mig.get("ram") if isinstance(mig.get("ram"), dict) else {}
        assert isinstance(ram, dict)
        return {
            "sandbox_id": self.sandbox_id,
            "how": "QEMU migration to a file while the VM is stopped, with a sparse copy "
                   "of the scratch disk",
            "qemu": {"monitor": ["stop", "migrate-set-parameters max-bandwidth",
                                 "getfd checkpoint", "migrate fd:checkpoint"],
                     "restore": "-incoming fd:N, then cont",
                     "total_time_ms": mig.get("total-time"), "downtime_ms": mig.get("downtime"),
                     "ram_transferred": ram.get("transferred")},
            "state_bytes": os.stat(dest / STATE_FILE).st_size,
            "disk_bytes": copied,
            "disk_size": size,
            "migrate_ms": round((t1 - t0) * 1000, 1),
            "disk_copy_ms": round((t2 - t1) * 1000, 1),
            "stopped_ms": round((time.monotonic() - t0) * 1000, 1),
            "shape": dict(self.shape),
            "walls_sha256": self.walls_sha256,
            # The host's own channel state: a restored channel's ids start past
            # these, and frames of the requests still open are not routed.
            "channel": {"next_id": next_id, "open": open_ids},
            "guest": {"kernel": self.walls.get("guest_kernel", ""),
                      "landlock_abi": (self.walls.get("landlock") or {}).get("abi", 0)},
        }  # fmt: skip

    def _go_on(self, qmp: qemu._Qmp) -> bool:
        """The VM runs again and the agent resumes; False if it did not say so."""
        assert self.channel is not None
        with contextlib.suppress(qemu.MigrationError, OSError, ValueError):
            if str(qemu._ok(qmp, "query-status").get("status")) != "running":
                qemu.cont(qmp)
        try:
            self.channel.release({"op": "resume", "time": time.time()})
        except SandboxClosed:
            return False
        try:
            reply = self._untagged.get(timeout=QUIESCE_TIMEOUT_S)
        except queue.Empty:
            reply = {"op": "timeout"}
        if reply.get("op") != "resumed":
            self._anomaly(f"the guest agent did not resume after a checkpoint ({reply.get('op')})")
            return False
        return True

    def _end_paused(self, qmp: qemu._Qmp) -> None:
        """A pause: QEMU quits (its state is on disk); destroy() does the rest."""
        assert self.proc is not None and self.channel is not None
        self._ended = "paused: its state was saved and the VM stopped"
        qemu.quit_vm(qmp)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.dead_reason = self._ended
        self.channel.release()
        self.channel.close(self._ended)

    def freeze(self) -> None:
        raise SnapshotError("microvm: the VM is not frozen in place; the microvm tier pauses "
                            "by checkpoint (QEMU migration to a file, then QEMU exits)",
                            rule="snapshot.freeze")  # fmt: skip

    def thaw(self) -> None:
        raise SnapshotError("microvm: nothing to thaw; the microvm tier pauses by checkpoint "
                            "and resumes by restore", rule="snapshot.freeze")  # fmt: skip

    # -- teardown -----------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.dead_reason is None

    def kill(self) -> None:
        """SIGKILL QEMU (through its pidfd): the VM and everything in it end at once."""
        with self._lock:
            if self._pidfd is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            elif self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.proc.kill()
            if self.cg is not None:
                with contextlib.suppress(OSError, WallError):
                    self.cg.kill_all(timeout=5.0)

    def _teardown(self, removed: dict[str, Any]) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            removed["processes"] = {"qemu": self.proc.pid}
        if self.channel is not None:
            self.channel.close("destroyed")
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None
        if self._mon is not None:
            self._mon.close()
        if self._disk_fd is not None:  # the disk's last reference, now QEMU is gone
            os.close(self._disk_fd)
            self._disk_fd = None
        if self.cg is not None:
            removed["cgroups"] = self.cg.remove()
        if self._uid_lock is not None and (self.proc is None or self.proc.poll() is not None):
            os.close(self._uid_lock)  # QEMU is gone: its uid may serve another VM
            self._uid_lock = None
        if self.vmdir.exists():
            shutil.rmtree(self.vmdir, ignore_errors=True)
            removed["vm_dir"] = str(self.vmdir)
        removed["workspace"] = ("scratch disk: an unlinked file only QEMU (and a read-only fd "
                                "of the supervisor's) held, freed with them")
        if self._trace_calls:
            removed["file_audit"] = {"events": self.trace_events, "dropped": self.trace_dropped}

    def _leftovers(self) -> dict[str, list[str]]:
        left: dict[str, list[str]] = {"processes": [], "cgroups": [], "state": []}
        if self.cg is not None:
            left["cgroups"] = [p for p in self.cg.paths if os.path.isdir(p)]
        if self.proc is not None and self.proc.poll() is None:
            left["processes"].append(str(self.proc.pid))
        for p in (self.vmdir, self.record_path):
            if p.exists():
                left["state"].append(str(p))
        return left


def _text(value: str) -> str:
    """A guest string, cut (``to_record`` cuts again, with a mark) and encodable."""
    cut = value[: MAX_PATH + 1]
    try:
        cut.encode()
    except UnicodeEncodeError:  # lone surrogates
        cut = cut.encode("utf-8", "replace").decode()
    return cut


def _walls_digest(cfg: dict[str, Any], payload: bytes) -> str:
    """The guest's walls as sent at first boot (the clock aside): a restore checks
    that its plan asks for the very walls the restored guest holds."""
    # (the clock and the entropy seed differ at every boot: they are no wall)
    body = json.dumps({k: v for k, v in cfg.items() if k not in ("time", "seed")},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(body.encode() + b"\0" + payload).hexdigest()


def _check_restorable(ckpt: Checkpoint, shape: dict[str, Any], walls: str) -> None:
    """A saved VM loads only into the same VM (image, accel, RAM, vCPUs, disk, no
    NIC), and only under a plan asking for the walls its guest already holds."""
    saved = ckpt.details.get("shape") or {}
    diff = sorted(k for k in shape if saved.get(k) != shape[k])
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} (here {shape[k]!r})" for k in diff)
        raise SnapshotError(f"microvm: the checkpoint was made for another VM: {what}",
                            rule="snapshot.restore")  # fmt: skip
    if ckpt.details.get("walls_sha256") != walls:
        raise SnapshotError(
            "microvm: the policy's in-guest walls (Landlock, seccomp, cgroup, rlimits, audit) "
            "differ from those the saved guest applied at its first boot, and a restored "
            "guest is not configured again: restore it under the policy it was made with",
            rule="snapshot.restore")  # fmt: skip


def _conforms(i: MicrovmInstance, p: MicrovmProcess) -> tuple[Instance, Process]:
    """Never called: mypy checks here that both classes satisfy the protocols."""
    return i, p
