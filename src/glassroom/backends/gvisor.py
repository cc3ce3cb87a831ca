"""The ``gvisor`` backend (risk "medium"): the plan under runsc, gVisor's user-space kernel.

Construction order, and why:

1. The reaper record is written first, naming the per-sandbox dir, so a
   crashed supervisor leaves nothing the reaper cannot find.
2. cgroups are made on the host (``_sys.cgroups``, as on ``namespaces``)
   and ``runsc run`` is started by a one-line ``sh`` that first moves
   itself into them: the sentry, the gofer and every stub are born inside
   the limits.  runsc's own cgroup handling is off (``--ignore-cgroups``):
   glassroom alone creates and removes them.
3. ``runsc run`` gets the OCI bundle (``_gvisor_spec``: read-only root,
   the plan's binds, noexec everywhere but the allowed tools, tmpfs
   workspace, ``--network=none``) with a private ``--root`` state dir, and
   execs glassroom's init inside in *stream* mode: the compiled static
   ``glassroom-init --stream`` (``_sys/agent/stream.c``) when it is built
   (``GLASSROOM_INIT``, as on namespaces), else ``_sys/init_stream.py``.
   The control channel is the container's stdin/stdout, framed.
4. The init loads the seccomp programs and rlimits, and reports ready.
5. runsc's ``--strace`` (exec/open/connect/fork, plus every file call of
   ``[audit] level`` ``files``/``syscalls``) is written, one JSON record a
   line, to a FIFO the supervisor reads: exec, file and connect events go to
   the audit log (file and exec ones through ``audit/_events``, the schema
   every tier shares), and failed forks (EAGAIN from ``RLIMIT_NPROC``) count
   as pids-limit hits.

Teardown does not use ``runsc delete --force`` (about 1.4 s): it kills
every process in the sandbox's cgroups (freeze, SIGKILL, thaw), which ends
the sentry, the gofer and runsc itself; the sentry's mounts lived in its
own mount namespace and vanish with it; then it removes the per-sandbox
dir (runsc's ``--root`` state and the trace FIFO) and the cgroups.  The
FIFO is read to its end only once every process is gone and before destroy
returns, so every traced event of the sandbox is in the log by then.

Everything that comes out of the sandbox (frames, replies, trace lines) is
untrusted: sizes are bounded and replies are checked against a schema.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import marshal
import os
import posixpath
import queue
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .. import _config
from .._errors import BackendUnavailable, SandboxClosed, SnapshotError, WallError
from .._sys import cgroups, proc, scratch, seccomp
from ..audit import _events
from ..plan import EGRESS_DIR_INSIDE, PROXY_PORT_INSIDE, LaunchPlan
from . import _gvisor_spec as spec
from ._channel import (
    MAX_REQUEST,
    UNANSWERED_KILL_S,
    ProtocolViolation,
    RequestTooLarge,
    end_unanswered,
)
from ._channel import parse_reply as _parse_reply
from ._failures import exec_message, path_error
from ._files import FileOps, FileOpStalled
from ._gates import Gates
from ._lifecycle import InstanceBase, started
from .base import (
    Checkpoint,
    EventSink,
    ExecRequest,
    ExecResult,
    pty_size,
    resize_message,
)

START_TIMEOUT_S = 15.0
#: ``runsc checkpoint`` writes the sentry's whole memory: allow for a full one.
CHECKPOINT_TIMEOUT_S = 120.0
#: What a checkpoint's directory holds: runsc's own image, and the scratch disk.
MEMORY_IMAGE = "checkpoint.img"
DISK_IMAGE = "scratch.qcow2"
REPLY_TIMEOUT_S = 10.0
#: The sentry, the gofer and runsc itself live in the sandbox's memory
#: cgroup next to the workload: this much is added to memory (the files are
#: on a scratch disk, not in the sentry's memory: ``_sys/scratch.py``).
#: Measured: they hold ~22 MiB idle (runsc 20221219, ptrace platform), so a
#: task gets at most ~27 MiB beyond resources.memory_mib (docs/backends.md
#: promises at most 32).  Over the cap the host OOM killer takes the sentry:
#: the whole sandbox dies, and the supervisor reports resources.memory_mib.
SENTRY_OVERHEAD_BYTES = 48 << 20
#: Host tasks (sentry threads, gofer, stubs) are not sandbox processes; the
#: policy's ``pids`` is enforced inside by RLIMIT_NPROC.  This is a backstop.
HOST_PIDS_BACKSTOP = 4096
MAX_JSON = 64 * 1024
MAX_DATA = 64 * 1024
MAX_EVENTS = 1_000_000  # as on namespaces (_sys/tracewatch.py)
_K_JSON, _K_OUT, _K_ERR = ord("J"), ord("O"), ord("E")
_K_MSG, _K_IN, _K_CLOSE = ord("M"), ord("I"), ord("C")
_OPS = {"ready", "started", "exit", "error", "fatal", "statfs"}
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (int,), "pid": (int,), "code": (int, type(None)), "signal": (int, type(None)),
    "errno": (int,), "error": (str,), "wall": (str,), "landlock_abi": (int,),
    "used": (int,), "total": (int,),
}  # fmt: skip
_LAUNCH = f"import sys;sys.path.insert(0,{spec.INIT_DIR_INSIDE!r});import init_stream as m;m.main()"


def parse_reply(raw: bytes) -> dict[str, Any]:
    """Validate one JSON reply of the (untrusted) init; ProtocolViolation if off-schema."""
    return _parse_reply(raw, ops=_OPS, fields=_FIELD_TYPES, max_len=MAX_JSON)


class GvisorBackend:
    name: ClassVar[str] = "gvisor"
    risks: ClassVar[Sequence[str]] = ("low", "medium")

    def start(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> GvisorInstance:
        inst = GvisorInstance(plan, sandbox_id, on_event)
        return started(inst, inst.build)

    def restore(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink, src: Path,
                checkpoint: Checkpoint) -> GvisorInstance:  # fmt: skip
        """``runsc restore`` of ``src`` (see :meth:`GvisorInstance.checkpoint`) in walls
        built from ``plan`` as :meth:`start` builds them, under ``sandbox_id``."""
        inst = GvisorInstance(plan, sandbox_id, on_event)
        return started(inst, lambda: inst.build(restore=src, saved=checkpoint))


class _Req:
    """One request's routing slot: control replies go to ``q``, data to ``on_data``."""

    def __init__(self, on_data: Callable[[int, bytes], None] | None) -> None:
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.on_data = on_data


class GvisorInstance(InstanceBase, FileOps):
    """One running sandbox: runsc + the stream-mode init + cgroups."""

    def __init__(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> None:
        super().__init__(plan, sandbox_id, on_event)
        self.sbdir = self.state / "gvisor" / "run" / sandbox_id
        self._lock = threading.Lock()
        # Reentrant: a checkpoint holds it throughout (nothing new may reach the
        # init while it is saved) and sends on the restored channel itself.
        self._send_lock = threading.RLock()
        self._reqs: dict[int, _Req] = {}
        self._reqs_lock = threading.Lock()
        self._next_id = 1
        #: The latest requests that got their last reply (exit, error, statfs):
        #: any frame for one of them after that is a lie, logged (``_dispatch``).
        self._ended: dict[int, None] = {}
        self._closed = False
        self._ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._tracer: Tracer | None = None
        self._disk: scratch.ScratchMount | None = None
        self.platform = ""
        #: What ``--strace-syscalls`` names, and what the level wanted but runsc lacks.
        self.strace_syscalls: tuple[str, ...] = spec.STRACE_SYSCALLS
        self.strace_missing: tuple[str, ...] = ()
        self._gates = Gates(plan, sandbox_id, on_event, gvisor=True)
        self._gate_denied = 0  # by the gates of the runs before a checkpoint --leave-running
        self._proxied = False
        self._egress_gid: int | None = None
        self._bundle: Path | None = None
        #: Set by a checkpoint that goes on: the reader takes the next runsc from
        #: it when the saved one's stdout ends (None: there is none, stop).
        self._handover: queue.Queue[subprocess.Popen[bytes] | None] | None = None
        #: Set by a checkpoint that stops the sandbox (a pause): why it ended.
        self._checkpointed = False
        self._ckpt_lock = threading.Lock()
        #: The compiled init this sandbox runs (None: the Python one).
        self._init_bin: Path | None = None

    # -- construction ------------------------------------------------------

    def build(self, restore: Path | None = None, saved: Checkpoint | None = None) -> None:
        """Start the sandbox: ``runsc run`` of a fresh init, or, given ``restore`` (a
        checkpoint's directory, integrity-checked by the caller), ``runsc restore`` of
        the saved one.  Every wall is built the same way in both cases."""
        if not _config.is_root():
            # Rootless runsc drops the sentry's own user namespace and uid 65534.
            raise BackendUnavailable(
                "gvisor: glassroom must run as root to start runsc (rootless runsc "
                "would run the sandbox as the caller's own uid)",
                rule="backend.gvisor",
            )
        self.platform = spec.choose_platform()
        from .namespaces import choose_init

        # The compiled init (``glassroom-init --stream``, static) or the Python one
        # (``_sys/init_stream.py``): GLASSROOM_INIT, as on namespaces (fail closed).
        init_bin = choose_init(self.state) if saved is None else _saved_init(saved, self.state)
        self.walls["init"] = "compiled" if init_bin is not None else "python"
        self._init_bin = init_bin
        spec.check_plan(self.plan, compiled=init_bin is not None)
        _path, version, _known = spec.runsc_info()
        if saved is not None:
            _check_saved(saved, version, self.platform)
            # The restored init still runs (and may answer) the requests of its
            # first life: their ids are never handed out again here.
            self._next_id = max(1, min(int(saved.details.get("next_request_id", 1)), 1 << 30))
        level = self.plan.audit_level
        if level != "actions":
            unknown = spec.strace_unknown(self.platform)
            wanted = spec.strace_syscalls(level)
            self.strace_syscalls = tuple(n for n in wanted if n not in unknown)
            self.strace_missing = tuple(n for n in wanted if n in unknown)
        init_dir = spec.install_init(self.state)
        self._write_record()
        self.sbdir.mkdir(parents=True, mode=0o700)
        fifo = self.sbdir / "trace"
        os.mkfifo(fifo, 0o600)
        # O_RDWR: the FIFO never reads as EOF while runsc has not opened it yet.
        trace_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # fewer stalls of the sentry on a full FIFO
            fcntl.fcntl(trace_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        self._tracer = Tracer(trace_fd, self.on_event, self.sandbox_id, self.plan)
        self._tracer.on_overflow = self._audit_overflow
        lim = self.plan.limits
        mem = lim.memory_bytes + SENTRY_OVERHEAD_BYTES
        self.cg = cgroups.CgroupSet.create(
            self.sandbox_id,
            cgroups.CgroupLimits(memory_bytes=mem, pids=HOST_PIDS_BACKSTOP, cpus=lim.cpus),
            parent=_config.cgroup_parent(),
        )
        self.walls["cgroups"] = {
            "paths": list(self.cg.paths), "memory_bytes": mem, "cpus": lim.cpus,
            "host_pids_backstop": HOST_PIDS_BACKSTOP,
        }  # fmt: skip
        if init_bin is not None:
            argv = spec.compiled_argv()
        else:
            argv = spec.init_argv(_LAUNCH, template=self.plan.root is not None)
        net = self.plan.network
        self._proxied = net.mode == "proxy" and bool(net.host_dir)
        extra_gids: tuple[int, ...] = ()
        if self._proxied:
            extra_gids = (_open_egress_to_group(Path(str(net.host_dir))),)
            was = saved.details.get("egress_gid", extra_gids[0]) if saved else extra_gids[0]
            if was != extra_gids[0]:
                # The saved processes keep the supplementary gid they were started with.
                raise SnapshotError(
                    "gvisor: the egress dir's group changed since the checkpoint "
                    f"({was} -> {extra_gids[0]}): the restored "
                    "processes could not reach the proxy", rule="snapshot.state")  # fmt: skip
        self._egress_gid = extra_gids[0] if extra_gids else None
        scratch_dirs = self._scratch(restore)
        if self._gates.needed:  # writable host dirs: through their gates only
            self._write_record()
            self.walls["write_gate"] = self._gates.start()
        # The same boot after a restore (its memory is that boot's), a new one otherwise.
        self._boot_id = str(saved.details.get("boot_id", "")) if saved is not None else ""
        self._boot_id = self._boot_id or str(uuid.uuid4())
        self._bundle = spec.bundle(self.plan, self.state, init_dir, argv, self.sbdir, extra_gids,
                                   scratch_dirs, self._gates.staging, self._boot_id,
                                   init_bin)  # fmt: skip
        t0 = time.monotonic()
        if restore is None:
            self.proc = self._launch("run", "--bundle", str(self._bundle), self.sandbox_id)
        else:
            # Armed at once: everything traced from here on is the sandbox's own
            # (its init's start-up was in its first life).
            self._tracer.arm()
            self.proc = self._launch("restore", "--bundle", str(self._bundle),
                                     "--image-path", str(restore), self.sandbox_id)  # fmt: skip
        self._write_record()
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"glassroom-{self.sandbox_id}")  # fmt: skip
        self._reader.start()
        self._tracer.start()
        shim = init_dir / spec.COMPAT_SHIM
        preload = f"{spec.INIT_DIR_INSIDE}/{spec.COMPAT_SHIM}" if shim.exists() else ""
        if restore is None:
            self._configure(preload)
            self._tracer.arm()
        else:
            self._await_restored()
        self._settle()
        self.walls.update({
            "runsc": version,
            "platform": self.platform,
            "kernel": "gVisor sentry (user-space), host uid 65534 in its own user namespace",
            "uid_inside": _config.INSIDE_UID,
            "capabilities": "none",
            "no_new_privs": True,
            "seccomp": {"profile": self.plan.seccomp_profile, "loaded_by": "init, in the sentry"},
            "compat": {"preload": preload or "missing (no C compiler): ls may fail with EINVAL"},
            "mounts": [f"{m.kind} {m.target}" for m in self.plan.mounts],
            "tools": {"executable": sorted({t.path for t in self.plan.tools}
                                           | set(self.plan.loaders)),
                      "how": "noexec on every mount, allowed tools re-bound executable"},
            "network": "runsc --network=none (loopback only)" + (
                f"; proxy on 127.0.0.1:{PROXY_PORT_INSIDE} via the egress socket "
                "(--host-uds=open)" if self._proxied else ""),
            "rlimits": {"RLIMIT_FSIZE": lim.disk_bytes, "RLIMIT_CORE": 0,
                        "RLIMIT_NOFILE": 1024, "RLIMIT_NPROC": lim.pids},
            "audit": "runsc --strace: " + ",".join(self.strace_syscalls),
        })  # fmt: skip
        if saved is not None:
            # The seccomp programs, rlimits and no_new_privs are the saved tasks' own
            # (the sentry restores them with the processes); mounts, network,
            # cgroups, gates and the tracer are this start's, built from the plan.
            self.walls["start"] = {
                "how": "runsc restore", "ms": round((time.monotonic() - t0) * 1000, 1),
                "from": {k: saved.details[k] for k in ("sandbox_id", "runsc", "platform")
                         if k in saved.details},
                "seccomp_and_rlimits": "restored with the saved processes (set by the init "
                                       "in their first life)",
            }  # fmt: skip
        else:
            self.walls["start"] = {"how": "runsc run"}
        if level != "actions":
            self.walls["file_audit"] = {
                "level": level,
                "how": "runsc --strace: the sentry's record of each call's exit (observe only)",
                "syscalls": sorted(set(self.strace_syscalls) & set(_events.syscalls_for(level))),
                "not_traceable": sorted(self.strace_missing),
            }

    def _runsc(self, *command: str) -> list[str]:
        """runsc with this sandbox's global flags: the same for run, restore and checkpoint
        (a restored sentry is configured by these flags, not by the image)."""
        fifo = self.sbdir / "trace"
        return [
            spec.runsc_path(), "--root", str(self.sbdir / "state"), f"--platform={self.platform}",
            "--network=none", "--ignore-cgroups",
            *(["--host-uds=open"] if self._proxied else []),
            "--strace", "--strace-syscalls=" + ",".join(self.strace_syscalls),
            # --debug: the sentry then logs each call its seccomp filter refused
            # (Tracer: the setuid/setgid modes' deny records); about 10 lines per
            # process started, no measurable cost (docs/backends.md).
            "--debug", f"--debug-log={fifo}", "--debug-log-format=json", "--debug-command=boot",
            *command,
        ]  # fmt: skip

    def _launch(self, *command: str) -> subprocess.Popen[bytes]:
        """``runsc COMMAND``, born in the sandbox's cgroups; its stdio is the channel."""
        assert self.cg is not None
        procs = [os.path.join(p, "cgroup.procs") for p in self.cg.paths]
        # Born in the cgroups: the shell moves itself, then becomes runsc.
        script = 'for f in "$@"; do echo $$ > "$f" || exit 125; done; exec ' + shlex.join(
            self._runsc(*command)
        )
        # The channel is a pair of sockets, not pipes: inside gVisor, code of the
        # sandbox running as the init's uid can reopen the init's pipes through
        # /proc/1/fd (gVisor lets it, non-dumpable or not) and read the host's
        # frames or write forged ones; a socket cannot be opened by path (ENXIO).
        host_in, init_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host_out, init_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            init_in.shutdown(socket.SHUT_WR)  # one way each, as the pipes were
            host_in.shutdown(socket.SHUT_RD)
            init_out.shutdown(socket.SHUT_RD)
            host_out.shutdown(socket.SHUT_WR)
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh", *procs],
                stdin=init_in.fileno(), stdout=init_out.fileno(), stderr=subprocess.PIPE,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/", close_fds=True,
                start_new_session=True,
            )  # fmt: skip
        except BaseException:
            host_in.close()
            host_out.close()
            raise
        finally:
            init_in.close()
            init_out.close()
        proc.stdin = os.fdopen(host_in.detach(), "wb")
        proc.stdout = os.fdopen(host_out.detach(), "rb")
        return proc

    def _configure(self, preload: str) -> None:
        """Send a fresh init its walls (seccomp, rlimits, the proxy bridge); wait for ready."""
        lim = self.plan.limits
        self._send(_K_MSG, 0, marshal.dumps({
            "op": "config",
            # The whole profile, setuid/setgid modes included: this runsc reports
            # success for a chmod its gofer refused, so the sentry must say EPERM.
            "seccomp": [seccomp.compile_bpf(self.plan.seccomp_profile)],
            "preload": preload,
            **({"forward": {"port": PROXY_PORT_INSIDE,
                            "socket": f"{EGRESS_DIR_INSIDE}/proxy.sock"}} if self._proxied else {}),
            "rlimits": {"RLIMIT_FSIZE": lim.disk_bytes, "RLIMIT_CORE": 0,
                        "RLIMIT_NOFILE": 1024, "RLIMIT_NPROC": lim.pids},
        }))  # fmt: skip
        try:
            ready = self._ready.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise WallError("gvisor: the sandbox did not start in time", rule="gvisor") from None
        if ready["op"] == "closed":
            raise WallError(f"gvisor: runsc failed: {self._stderr()}", rule="gvisor")
        if ready["op"] == "fatal":
            wall = str(ready.get("wall", "init"))
            raise WallError(f"{wall}: {ready.get('error', 'failed')}", rule=wall)
        if ready["op"] != "ready":
            raise WallError(f"init: unexpected first reply {ready['op']!r}", rule="init")

    def _await_restored(self) -> None:
        """The restored init answers on the new channel (a statfs of the workspace).

        It was configured in its first life and never says ``ready`` again; an
        answer to a request proves the restore finished and the stream is in step.
        """
        rid, req = self._request({"op": "statfs", "path": self.plan.workspace})
        try:
            msg = req.q.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            raise WallError("gvisor: the restored sandbox did not answer in time",
                            rule="gvisor") from None  # fmt: skip
        finally:
            self._forget(rid)
        if msg["op"] == "closed":
            raise WallError(f"gvisor: runsc restore failed: {self._stderr()}", rule="gvisor")
        if msg["op"] != "statfs":
            raise WallError(f"init: unexpected reply {msg['op']!r} after restore", rule="init")

    def _settle(self) -> None:
        """The gofer holds its binds of the gates and the disk now: none stay on the host."""
        self._gates.detach()
        if self._disk is not None:
            self._disk.detach_soon()

    def _scratch(self, restore: Path | None = None) -> dict[str, str]:
        """/workspace and /tmp: dirs of one ext4 scratch disk of disk_mib, bound in.

        Not runsc's tmpfs (sentry memory, charged to the cgroup like the
        task's own) nor ``--overlay2`` (it overlays the root or every mount,
        and its filestore, even on a host dir, has no size cap in this runsc:
        disk_mib would not hold): a loop-mounted image on the host, served by
        the gofer with ``--file-access-mounts=shared`` (the default: no sentry
        page cache for it).  The dirs belong to the uid the sentry's task has.

        ``restore``: the disk is the one saved there (``DISK_IMAGE``), block
        for block: the restored gofer re-opens the saved sandbox's files by
        path and checks each one's size, so they must be exactly as saved.
        """
        lim = self.plan.limits
        targets = {m.target: m.mode or 0o755 for m in self.plan.mounts if m.kind == "scratch"}
        names = {t: t.strip("/").replace("/", "_") for t in targets}
        raw = _unpack_disk(restore / DISK_IMAGE, self.sandbox_id) if restore else None
        try:
            self._disk = scratch.ScratchMount.create(
                _config.scratch_dir(), self.sandbox_id, lim.disk_bytes,
                (_config.INSIDE_UID, _config.INSIDE_GID),
                {names[t]: mode for t, mode in targets.items()}, root_only=True, source=raw,
            )  # fmt: skip
        finally:
            if raw is not None:
                with contextlib.suppress(FileNotFoundError):
                    raw.unlink()
        self.walls["workspace"] = {
            "kind": "ext4 scratch disk (loop device) bound through the gofer; detached "
                    "from the host once the sandbox holds it",
            "holds": sorted(targets), "disk_bytes": lim.disk_bytes,
            "counts_in": "resources.disk_mib (host page cache, reclaimable)",
            **({"from": "the checkpoint's copy (e2image)"} if restore else {}),
        }  # fmt: skip
        return {t: self._disk.path(names[t]) for t in targets}

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return "no output"
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        if self.proc.poll() is None:
            return "runsc did not answer"
        data = self.proc.stderr.read(4096).decode(errors="replace").strip()
        return " ".join(data.split())[:400] or f"exit status {self.proc.returncode}"

    def _write_record(self) -> None:
        self._save_record(
            "gvisor", [self.proc.pid if self.proc else None],
            cgroup={"name": self.sandbox_id, "parent": _config.cgroup_parent()},
            gates=self._gates.dirs(),  # unmounted and rmdir'ed, never deleted through
            paths=[str(self.sbdir)]
            + ([self.plan.network.host_dir] if self.plan.network.host_dir else []),
            # The scratch disk's host mount, until the gofer holds its own.
            scratch=[str(self._disk.mountpoint)] if self._disk is not None else [],
        )  # fmt: skip

    # -- the channel ---------------------------------------------------------

    def _send(self, kind: int, rid: int, payload: bytes) -> None:
        if self.proc is None or self.proc.stdin is None or self._closed:
            raise SandboxClosed("the sandbox is no longer running")
        head = bytes((kind,)) + rid.to_bytes(4, "big") + len(payload).to_bytes(4, "big")
        try:
            with self._send_lock:
                self.proc.stdin.write(head + payload)
                self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise SandboxClosed(f"the sandbox is no longer running ({exc})") from None

    def _new_req(self, on_data: Callable[[int, bytes], None] | None = None) -> tuple[int, _Req]:
        with self._reqs_lock:
            if self._closed or self._destroyed is not None:
                raise self._closed_error()
            rid = self._next_id
            self._next_id += 1
            req = _Req(on_data)
            self._reqs[rid] = req
            return rid, req

    def _forget(self, rid: int) -> None:
        with self._reqs_lock:
            self._reqs.pop(rid, None)

    def _request(
        self, msg: dict[str, Any], on_data: Callable[[int, bytes], None] | None = None
    ) -> tuple[int, _Req]:
        rid, req = self._new_req(on_data)
        msg["id"] = rid
        data = marshal.dumps(msg)
        if len(data) > MAX_REQUEST:
            # Both inits stop on a message over their bound (the stream cannot
            # be resynchronized): refused here, nothing sent, and the init runs
            # on; answered as the init answers an op it cannot start (E2BIG).
            exc = RequestTooLarge(str(msg.get("op")), len(data), MAX_REQUEST)
            req.q.put({"op": "error", "id": rid, "errno": errno.E2BIG, "error": str(exc)})
            return rid, req
        try:
            self._send(_K_MSG, 0, data)
        except SandboxClosed:
            self._forget(rid)
            raise self._closed_error() from None
        return rid, req

    def _anomaly(self, what: str) -> None:
        self._violation(what)

    def _violation(self, what: str) -> None:
        self.on_event("anomaly", {"reason": "protocol violation by sandbox init", "detail": what},
                      "deny", "init.protocol")  # fmt: skip

    def _read_loop(self) -> None:
        """Route frames and enforce the deadline until the sandbox ends (fail closed)."""
        reason = "sandbox exited"
        buf = bytearray()  # one stream across a checkpoint that goes on (see _handover)
        try:
            p = self.proc
            while p is not None:
                reason = self._pump(p, buf)
                p = self._next_runsc(reason, p)
        except Exception as exc:
            reason = f"supervisor error: {type(exc).__name__}"
            self._violation(f"reader stopped: {exc!r}")
            self.kill()
        if self._checkpointed and reason == "sandbox exited":
            reason = "checkpointed: its processes were saved and stopped"
        self.dead_reason = reason
        with self._reqs_lock:
            self._closed = True
            waiters = list(self._reqs.values())
            self._reqs.clear()
        closed = {"op": "closed", "reason": reason}
        self._ready.put(closed)
        for r in waiters:
            r.q.put(closed)

    def _next_runsc(self, reason: str, old: subprocess.Popen[bytes]
                    ) -> subprocess.Popen[bytes] | None:  # fmt: skip
        """After the saved runsc's stdout ended: the restored one, if a checkpoint
        with ``leave_running`` is under way (the init's frames go on there, from
        exactly where they stopped: the old pipe was read to its end)."""
        handover = self._handover
        if reason != "sandbox exited" or handover is None:
            return None
        try:
            nxt = handover.get(timeout=CHECKPOINT_TIMEOUT_S + START_TIMEOUT_S)
        except queue.Empty:
            return None
        if nxt is not None and old.stdout is not None:
            with contextlib.suppress(OSError):
                old.stdout.close()
        return nxt

    def _pump(self, p: subprocess.Popen[bytes], buf: bytearray) -> str:
        assert p.stdout is not None
        fd = p.stdout.fileno()
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                said = self._expired()
                self.kill()
                return said
            r, _, _ = select.select([fd], [], [], min(remaining, 3600))
            if not r:
                continue
            chunk = os.read(fd, 1 << 17)
            if not chunk:
                return "sandbox exited"
            buf += chunk
            while len(buf) >= 9:
                kind, rid = buf[0], int.from_bytes(buf[1:5], "big")
                n = int.from_bytes(buf[5:9], "big")
                if kind not in (_K_JSON, _K_OUT, _K_ERR) or n > (MAX_JSON if kind == _K_JSON
                                                                  else MAX_DATA):  # fmt: skip
                    self._violation(f"bad frame kind {kind} / length {n}")
                    self.kill()
                    return "protocol violation"
                if len(buf) < 9 + n:
                    break
                payload = bytes(buf[9 : 9 + n])
                del buf[: 9 + n]
                try:
                    self._dispatch(kind, rid, payload)
                except ProtocolViolation as exc:
                    self._violation(str(exc))
                    self.kill()
                    return "protocol violation"

    def _dispatch(self, kind: int, rid: int, payload: bytes) -> None:
        if kind != _K_JSON:
            if rid <= 0 or rid >= self._next_id:
                raise ProtocolViolation(f"output for unknown request id {rid}")
            if rid in self._ended:  # logged and dropped, as on the other tiers
                self._violation(f"output for request {rid} after its end")
                return
            with self._reqs_lock:
                req = self._reqs.get(rid)
            if req is not None and req.on_data is not None:
                req.on_data(kind, payload)
            return  # a request we stopped listening to (timed out, capped)
        msg = parse_reply(payload)
        if msg["op"] in ("ready", "fatal") and "id" not in msg:
            self._ready.put(msg)
            return
        mid = msg.get("id")
        if mid in self._ended:
            self._violation(f"{msg['op']!r} reply for request {mid} after its end")
            return
        with self._reqs_lock:
            req = self._reqs.get(mid) if isinstance(mid, int) else None
        if req is None:
            if not isinstance(mid, int) or mid <= 0 or mid >= self._next_id:
                raise ProtocolViolation(f"reply for unknown request id {mid!r}")
            return
        if msg["op"] in ("exit", "error", "statfs") and isinstance(mid, int):
            self._ended[mid] = None
            if len(self._ended) > 4096:  # bounded: the oldest are forgotten
                del self._ended[next(iter(self._ended))]
        req.q.put(msg)

    # -- commands -------------------------------------------------------------

    def spawn(self, req: ExecRequest) -> GvisorProcess:
        p = GvisorProcess(self, req)
        p.start()
        return p

    def exec(self, req: ExecRequest) -> ExecResult:
        p = self.spawn(req)
        if p.result is None:
            if req.stdin:
                with contextlib.suppress(BrokenPipeError):
                    p.write_stdin(req.stdin)
            p.close_stdin()
        res = p.wait(req.timeout_s) if req.timeout_s else p.wait()
        if res is None:
            p.signal(int(signal.SIGKILL))
            p.timed_out = True
            res = p.wait(UNANSWERED_KILL_S)
            if res is None:  # the init is stopped (SIGSTOP from a command) or lying
                self._unanswered(req.timeout_s)
                res = p.wait()
        assert res is not None
        return res

    def _unanswered(self, timeout_s: float | None) -> None:
        end_unanswered(self, timeout_s)

    def cgroup_stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.cg is not None:
            with contextlib.suppress(OSError):
                out = self.cg.stats()
        # The host pids cgroup counts runsc's threads, not sandbox processes:
        # the pids limit is RLIMIT_NPROC inside, and its hits are failed forks.
        out["pids_max_hits"] = self._tracer.fork_eagain() if self._tracer else 0
        return out

    def workspace_usage(self) -> tuple[int, int] | None:
        """(used, total) bytes of the workspace tmpfs, as the init's statvfs sees it."""
        try:
            rid, req = self._request({"op": "statfs", "path": self.plan.workspace})
        except SandboxClosed:
            return None
        try:
            msg = req.q.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            return None
        finally:
            self._forget(rid)
        if msg["op"] != "statfs":
            return None
        return int(msg["used"]), int(msg["total"])

    # -- files ------------------------------------------------------------------

    def _file_op(self, kind: str, path: str, *, data: bytes | None = None,
                 max_bytes: int = 0, mode: int = 0o644) -> bytes:  # fmt: skip
        if not path.startswith("/"):
            path = f"{self.plan.workspace}/{path}"
        out = bytearray()
        cap = max_bytes if kind == "read" else 64 << 20

        moved = [0]  # bytes relayed so far: a long read is not a stalled one

        def on_data(_kind: int, chunk: bytes) -> None:
            moved[0] += len(chunk)
            if len(out) < cap:
                out.extend(chunk[: cap - len(out)])

        msg = {"op": "file", "kind": kind, "path": path, "max": max_bytes, "mode": mode,
               "max_output": cap}  # fmt: skip
        rid, req = self._request(msg, on_data)
        try:
            if kind == "write":
                view = memoryview(data or b"")
                for i in range(0, len(view), MAX_DATA):
                    self._send(_K_IN, rid, bytes(view[i : i + MAX_DATA]))
                self._send(_K_CLOSE, rid, b"")
            first = self._file_reply(req.q, kind, path)  # bounded: FILE_OP_TIMEOUT_S
            if first["op"] == "closed":
                raise self._closed_error()
            if first["op"] == "error":
                raise path_error(kind, path, int(first["errno"]), str(first["error"]))
            done = self._file_reply(req.q, kind, path, progress=lambda: moved[0],
                                    size=len(data or b""))  # fmt: skip
            if done["op"] == "closed":
                raise self._closed_error()
            code = done.get("code") or 0
            if code:
                raise path_error(kind, path, int(code), os.strerror(int(code)))
        except SandboxClosed:
            raise self._closed_error() from None
        except FileOpStalled:  # its child, if it got one, goes too
            with contextlib.suppress(SandboxClosed):
                self._send(_K_MSG, 0, marshal.dumps({"op": "signal", "target": rid,
                                                     "sig": int(signal.SIGKILL)}))  # fmt: skip
            raise
        finally:
            self._forget(rid)
        return bytes(out)

    # -- checkpoint ---------------------------------------------------------------

    def checkpoint(self, dest: Path, *, leave_running: bool) -> Checkpoint:
        """``runsc checkpoint`` of the whole sandbox into ``dest``, and a copy of its disk.

        The saved runsc stops.  Its gofer re-opens the sandbox's files by path
        on restore (and checks their sizes), so the scratch disk is saved with
        it: its loop device is held open here before the sentry stops (else
        autoclear would free it with the last mount), and once every process of
        the sandbox is gone and the filesystem released (flushed), ``e2image
        -Qa`` copies its used blocks.  The sandbox itself never writes blocks,
        only files through the gofer: the copy is the filesystem as the kernel
        wrote it.

        ``leave_running``: runsc 20221219's own ``--leave-running`` is a
        checkpoint, a destroy and a restore run inside ``runsc checkpoint``:
        the restored sandbox would get that command's stdio, not this
        instance's channel, and its gofer would look for the disk's host
        mount, detached since the start.  So the same three steps are done
        here: after the copy, ``runsc restore`` of the image into this same
        instance (same id, cgroups, trace FIFO and request ids, a new disk
        from the copy, new write gates).  The init's stream goes on where it
        stopped, so host-side handles of running processes keep working.

        Without ``leave_running`` (a pause) the sandbox's processes are saved
        and gone; the host-side handles of processes spawned before end as
        the sandbox closes (result: SIGKILL, ``SandboxClosed`` for new calls);
        the processes themselves go on in whatever is restored from ``dest``.

        Known limit (runsc 20221219): a connection open through the egress
        proxy (``--host-uds=open``) cannot be saved: ``runsc checkpoint``
        fails with ``encoding error at object transport.connectionedEndpoint
        ...: runtime error: invalid memory address or nil pointer
        dereference`` and the sentry exits.  That is raised as
        ``SnapshotError`` (``snapshot.memory``) saying the sandbox ended; it is
        not detectable from the host beforehand (the host holds no socket for
        it by then).
        """
        with self._ckpt_lock:
            if self._destroyed is not None or not self.alive():
                raise SnapshotError(f"gvisor: sandbox {self.sandbox_id} is not running",
                                    rule="snapshot.state")  # fmt: skip
            if self._disk is None or not self._disk.device:
                raise SnapshotError("gvisor: the sandbox has no scratch disk to save",
                                    rule="snapshot.state")  # fmt: skip
            with self._send_lock:  # nothing new reaches the init while it is saved
                return self._checkpoint(dest, leave_running)

    def _checkpoint(self, dest: Path, leave_running: bool) -> Checkpoint:
        assert self.proc is not None and self._disk is not None
        t0 = time.monotonic()
        self._drain_stdin()
        old, disk = self.proc, self._disk
        argv = self._runsc("checkpoint", "--image-path", str(dest), self.sandbox_id)
        try:
            held = os.open(disk.device, os.O_RDONLY | os.O_CLOEXEC)  # it outlives its mounts
        except OSError as exc:
            raise SnapshotError(f"gvisor: cannot hold the scratch disk {disk.device}: {exc}",
                                rule="snapshot.memory") from exc  # fmt: skip
        handover: queue.Queue[subprocess.Popen[bytes] | None] = queue.Queue()
        self._handover = handover if leave_running else None
        try:
            try:
                res = subprocess.run(argv, capture_output=True, timeout=CHECKPOINT_TIMEOUT_S,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/",
                                     check=False)  # fmt: skip
            except subprocess.TimeoutExpired:
                self.kill()  # half-saved: it must not go on as if nothing happened
                raise SnapshotError(f"gvisor: runsc checkpoint did not finish in "
                                    f"{CHECKPOINT_TIMEOUT_S:g}s; the sandbox was killed",
                                    rule="snapshot.memory") from None  # fmt: skip
            if res.returncode != 0:
                # A Go panic's first line is the reason; the stack trace after it is not.
                text = res.stderr.decode(errors="replace").strip()
                err = " ".join(text.splitlines()[0].split())[:600] if text else "no output"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    old.wait(timeout=1.0)  # a sentry that failed its save may be ending
                ended = "" if self.alive() else "; the sandbox ended with it"
                if "transport.connectionedEndpoint" in err:
                    # Seen with a connection open through the egress proxy (the
                    # in-sandbox bridge's Unix socket, --host-uds=open): runsc
                    # 20221219 cannot encode it, and its sentry then exits.
                    err = ("runsc cannot save an open connection through the egress proxy "
                           f"(a connected Unix socket): {err[:300]}")
                raise SnapshotError(f"gvisor: runsc checkpoint failed (exit {res.returncode}): "
                                    f"{err}{ended}", rule="snapshot.memory")  # fmt: skip
            t_saved = time.monotonic()
            self._checkpointed = not leave_running
            with self._reqs_lock:
                next_id = self._next_id  # every id the saved init has seen is below it
            flushed = self._await_stopped(old, disk.device)
            self._save_disk(disk.device, dest)
        except BaseException:
            handover.put(None)  # if its stream ends, nothing follows it
            self._handover = None
            raise
        finally:
            os.close(held)  # the old disk's loop device detaches (autoclear) and is freed
        t_copied = time.monotonic()
        _path, version, _known = spec.runsc_info()
        mem_img, disk_img = dest / MEMORY_IMAGE, dest / DISK_IMAGE
        details: dict[str, Any] = {
            "sandbox_id": self.sandbox_id, "runsc": version, "platform": self.platform,
            "command": shlex.join(["runsc", "checkpoint", "--image-path", str(dest),
                                   self.sandbox_id]),
            "checkpoint_ms": round((t_saved - t0) * 1000, 1),
            "disk_copy_ms": round((t_copied - t_saved) * 1000, 1),
            "memory_image_bytes": mem_img.stat().st_size,
            "disk_image_bytes": disk_img.stat().st_size,
            "disk": f"e2image -Qa of the scratch disk ({self.plan.limits.disk_bytes} bytes), "
                    + flushed,
            "next_request_id": next_id, "egress_gid": self._egress_gid,
            "leave_running": leave_running, "boot_id": self._boot_id,
            # the restore runs the very init that was saved (its binary by path)
            "init": self.walls.get("init", "python"),
            **({"init_binary": self._init_bin.name} if self._init_bin is not None else {}),
        }  # fmt: skip
        if leave_running:
            for f in (old.stdin, old.stderr):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()
            details["restart_ms"] = self._relaunch(dest, handover)
        files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
        details["bytes"] = sum((dest / f).stat().st_size for f in files)
        details["ms"] = round((time.monotonic() - t0) * 1000, 1)
        return Checkpoint(tier="gvisor", memory=True, files=files, details=details)

    def _drain_stdin(self) -> None:
        """Wait until the init has read all that was sent to it.

        Bytes left in the pipe would be lost with the saved runsc, and the
        restored init's stream would then start mid-frame; what it has read is
        in its memory, saved with it.
        """
        assert self.proc is not None and self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        end = time.monotonic() + REPLY_TIMEOUT_S
        while True:
            left = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)
            if left == 0:
                return
            if time.monotonic() > end:
                raise SnapshotError(f"gvisor: the sandbox's init left {left} bytes of its input "
                                    f"unread for {REPLY_TIMEOUT_S:g}s: not saved mid-stream",
                                    rule="snapshot.state")  # fmt: skip
            time.sleep(0.002)

    def _await_stopped(self, old: subprocess.Popen[bytes], device: str) -> str:
        """Wait for the saved sandbox's runsc, sentry and gofer to exit and the disk's
        filesystem to be released (unmounting flushes it); returns how it was flushed.

        A sandbox started on this host while this one's disk was still mounted
        on the host holds a copy of that mount in its own mount namespaces, so
        the filesystem may stay mounted there: then ``sync()`` writes it out
        (nothing writes to it any more: its only writer, this gofer, is gone).
        """
        with contextlib.suppress(subprocess.TimeoutExpired):
            old.wait(timeout=START_TIMEOUT_S)
        assert self.cg is not None
        end = time.monotonic() + 5.0
        while self.cg.pids() and time.monotonic() < end:
            time.sleep(0.005)
        if self.cg.pids():  # the saved sentry or gofer lingers: it has nothing left to do
            with contextlib.suppress(OSError, WallError):
                self.cg.kill_all(timeout=5.0)
        end = time.monotonic() + 2.0
        while True:
            try:
                fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise SnapshotError(f"gvisor: cannot reach the scratch disk {device}: {exc}",
                                        rule="snapshot.memory") from exc  # fmt: skip
                if time.monotonic() > end:
                    os.sync()
                    return "synced (still mounted in another sandbox's namespace)"
                time.sleep(0.002)
                continue
            os.close(fd)
            return "after its last unmount"

    def _save_disk(self, device: str, dest: Path) -> None:
        """The disk's used blocks, compact (QCOW2: a sparse raw file would count, be
        hashed and be stored at its full ``disk_mib``)."""
        res = subprocess.run([_e2image(), "-Qa", device, str(dest / DISK_IMAGE)],
                             capture_output=True, timeout=CHECKPOINT_TIMEOUT_S, check=False,
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
        if res.returncode != 0:
            err = " ".join(res.stderr.decode(errors="replace").split())[-400:]
            raise SnapshotError(f"gvisor: e2image could not copy the scratch disk: {err}",
                                rule="snapshot.memory")  # fmt: skip

    def _relaunch(self, image: Path,
                  handover: queue.Queue[subprocess.Popen[bytes] | None]) -> float:  # fmt: skip
        """``runsc restore`` of what was just saved, into this instance (``leave_running``)."""
        t0 = time.monotonic()
        try:
            if self._disk is not None:
                self._disk.detach()  # long done (at the start); its name is free again
            self._scratch(image)
            if self._gates.needed:  # the saved gofer's gates ended with it
                self._gate_denied += int(self._gates.close().get("denied", 0))
                self._gates = Gates(self.plan, self.sandbox_id, self.on_event, gvisor=True)
                self.walls["write_gate"] = self._gates.start()
            assert self._bundle is not None
            self.proc = self._launch("restore", "--bundle", str(self._bundle),
                                     "--image-path", str(image), self.sandbox_id)  # fmt: skip
            self._write_record()
            handover.put(self.proc)
            self._await_restored()  # answered: the reader is on the new runsc's stdout
            self._handover = None  # so a later end of the sandbox is just that
            self._settle()
        except (WallError, SandboxClosed, OSError) as exc:
            handover.put(None)  # the reader stops at the end of whichever stream it reads
            self._handover = None
            self.kill()
            raise SnapshotError(f"gvisor: the sandbox was saved but did not go on: {exc}",
                                rule="snapshot.state") from exc  # fmt: skip
        ms = round((time.monotonic() - t0) * 1000, 1)
        self.walls["start"] = {"how": "runsc restore (checkpoint with leave_running)", "ms": ms}
        return ms

    def freeze(self) -> None:
        raise SnapshotError(
            "gvisor: this tier pauses by checkpoint (runsc checkpoint, then runsc restore), "
            "not by freezing in place: a frozen sentry would hold all its memory",
            rule="snapshot.freeze")  # fmt: skip

    def thaw(self) -> None:
        raise SnapshotError("gvisor: this tier pauses by checkpoint, so there is nothing to thaw",
                            rule="snapshot.freeze")  # fmt: skip

    # -- teardown -----------------------------------------------------------

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.dead_reason is None

    def _audit_overflow(self) -> None:
        """Kill from another thread: the tracer's own thread must keep draining."""
        threading.Thread(target=self.kill, name=f"audit-kill-{self.sandbox_id}",
                         daemon=True).start()  # fmt: skip

    def kill(self) -> None:
        """SIGKILL everything in the sandbox's cgroups: runsc, its gofer, the sentry, stubs."""
        self._gates.abort()  # a stuck gate request would make the kill wait (_gates.py)
        with self._lock:
            if self.cg is not None:
                with contextlib.suppress(OSError, WallError):
                    self.cg.kill_all(timeout=5.0)
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.proc.kill()  # not yet in the cgroups (the sh was still moving)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)

    def _teardown(self, removed: dict[str, Any]) -> None:
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()
            removed["processes"] = {"runsc": self.proc.pid, "how": "cgroup SIGKILL"}
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        if self._tracer is not None:
            # runsc, the sentry and the gofer are gone (kill() waited for the
            # cgroups to empty): nothing writes the FIFO any more, and every
            # record the sentry wrote is in it.  stop() reads it to the end and
            # hands each event to the log before destroy returns.
            self._tracer.stop()
            removed["tracer"] = {"events": self._tracer.events}
        if self.cg is not None:
            with contextlib.suppress(WallError):
                removed["cgroups"] = self.cg.remove()
        if self.sbdir.exists():
            shutil.rmtree(self.sbdir, ignore_errors=True)
            removed["runsc_state"] = str(self.sbdir)
        if self._disk is not None:
            self._disk.detach()  # if the start failed before the sandbox took it
            removed["workspace"] = ("ext4 scratch disk, unlinked and detached from the host: "
                                    "freed (loop device and all) with the sandbox's mounts")
        removed["mounts"] = "the sentry's private mount namespace, gone with the sentry"
        if self._gates.needed:
            removed["write_gate"] = self._gates.close()
            if self._gate_denied:
                removed["write_gate"]["denied"] += self._gate_denied

    def _leftovers(self) -> dict[str, list[str]]:
        left: dict[str, list[str]] = {"processes": [], "cgroups": [], "mounts": [], "state": []}
        if self.proc is not None and proc.process_start_time(self.proc.pid) is not None:
            left["processes"].append(str(self.proc.pid))
        if self.cg is not None:
            left["cgroups"] = [p for p in self.cg.paths if os.path.isdir(p)]
        # runsc's own cgroups (named after the container id) must not exist either.
        for ctl in _cgroup_roots():
            cand = os.path.join(ctl, self.sandbox_id)
            if os.path.isdir(cand):
                left["cgroups"].append(cand)
        left["mounts"] = [m for m in proc.mounts_under("/")
                          if self.sandbox_id in m or str(self.sbdir) in m]  # fmt: skip
        for p in (self.sbdir, self.record_path):
            if p.exists():
                left["state"].append(str(p))
        return left


def _check_saved(saved: Checkpoint, version: str, platform: str) -> None:
    """Refuse, before anything starts, a checkpoint this runsc cannot restore."""
    if saved.tier != "gvisor" or not saved.memory:
        raise SnapshotError(f"gvisor: cannot restore a {saved.tier} checkpoint"
                            f"{'' if saved.memory else ' without memory'}",
                            rule="snapshot.memory")  # fmt: skip
    missing = [f for f in (MEMORY_IMAGE, DISK_IMAGE) if f not in saved.files]
    if missing:
        raise SnapshotError(f"gvisor: the checkpoint lacks {', '.join(missing)}",
                            rule="snapshot.memory")  # fmt: skip
    made_by = saved.details.get("runsc")
    if made_by != version:  # runsc restores only images of its own build
        raise SnapshotError(f"gvisor: the checkpoint was made by {made_by}, this is {version}",
                            rule="snapshot.memory")  # fmt: skip


def _saved_init(saved: Checkpoint, state: Path) -> Path | None:
    """The init a checkpoint's processes run: the same on restore (its gofer re-opens
    the saved files by path), whatever ``GLASSROOM_INIT`` says now.  A checkpoint
    from before the compiled init names none: the Python one."""
    from .._sys import agent_build

    if saved.details.get("init", "python") != "compiled":
        return None
    name = str(saved.details.get("init_binary", ""))
    path = agent_build.locate(name, state)
    if path is None:
        raise SnapshotError(f"gvisor: the checkpoint runs the compiled init {name!r}, which is "
                            "not built here (the sources changed since?)",
                            rule="snapshot.state")  # fmt: skip
    return path


def _e2image() -> str:
    found = shutil.which("e2image", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise SnapshotError("gvisor: e2image (e2fsprogs) is not installed, so the scratch "
                            "disk cannot be saved with the memory",
                            rule="snapshot.memory")  # fmt: skip
    return found


def _unpack_disk(image: Path, sandbox_id: str) -> Path:
    """A raw image (sparse) of a saved disk, next to where the new one is made."""
    directory = _config.scratch_dir()
    scratch.check_backing(directory)
    raw = directory / f".{sandbox_id}.restore.img"
    with contextlib.suppress(FileNotFoundError):
        raw.unlink()
    res = subprocess.run([_e2image(), "-r", str(image), str(raw)], capture_output=True,
                         timeout=CHECKPOINT_TIMEOUT_S, check=False,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            raw.unlink()
        err = " ".join(res.stderr.decode(errors="replace").split())[-400:]
        raise SnapshotError(f"gvisor: e2image could not unpack the saved disk: {err}",
                            rule="snapshot.memory")  # fmt: skip
    return raw


def _open_egress_to_group(egress: Path) -> int:
    """Let the sandbox reach its egress socket through the sentry's permission check.

    The egress dir and socket belong to the host uid the namespaces tier
    runs as (65534) with owner-only modes.  Inside gVisor the process is
    uid 1000, and the sentry checks the host owner it sees, so the dir gets
    the owner's bits for its group too, and the container process gets
    that gid as a supplementary group.  Host-side, this reaches exactly the
    same principal (the sandbox ids) as on the namespaces tier.
    """
    st = egress.stat()
    for path in (egress, *egress.iterdir()):
        mode = path.stat().st_mode & 0o777
        os.chmod(path, mode | ((mode & 0o700) >> 3))
    return st.st_gid


def _cgroup_roots() -> list[str]:
    try:
        return [e.path for e in os.scandir("/sys/fs/cgroup") if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


class GvisorProcess:
    """A command in a gVisor sandbox (see :class:`base.Process`); ``exec`` waits on one."""

    def __init__(self, inst: GvisorInstance, req: ExecRequest) -> None:
        self._inst = inst
        self.req = req
        self.pid = 0
        self.started = time.monotonic()
        self.events: list[tuple[str, bytes]] = []
        self.result: ExecResult | None = None
        self.timed_out = False
        self._cond = threading.Condition()
        self._rid = 0
        self._out = bytearray()
        self._err = bytearray()
        self._budget = req.max_output_bytes
        self._truncated = False
        self._stdin_open = True
        self._on_exit: list[Callable[[ExecResult], None]] = []

    def start(self) -> None:
        msg: dict[str, Any] = {"op": "exec", "argv": list(self.req.argv),
                               "env": dict(self.req.env), "cwd": self.req.cwd,
                               "max_output": self.req.max_output_bytes}  # fmt: skip
        if self.req.pty is not None:  # made inside the container (init_stream.py)
            msg["pty"] = list(pty_size(*self.req.pty))
        self._rid, req = self._inst._request(msg, self._on_data)
        limit = self.req.timeout_s
        try:  # an init stopped before its "started" would hold this forever
            first = req.q.get(timeout=limit + UNANSWERED_KILL_S if limit else None)
        except queue.Empty:
            self._inst._unanswered(limit)
            first = req.q.get()  # "closed": the kill ends the channel
        if first["op"] == "closed":
            self._inst._forget(self._rid)
            raise self._inst._closed_error()
        if first["op"] == "error":
            self._inst._forget(self._rid)
            err = int(first["errno"])
            stderr = exec_message(self.req.argv[0], err, str(first["error"])).encode()
            self.events.append(("stderr", stderr))
            self._finish(ExecResult(
                exit_code=126 if err == errno.EACCES else 127, signal=None, stdout=b"",
                stderr=stderr, duration_ms=(time.monotonic() - self.started) * 1000,
                truncated=False, exec_errno=err, exec_error=str(first["error"]),
            ))  # fmt: skip
            return
        self.pid = int(first.get("pid", 0))
        name = f"glassroom-proc-{self._inst.sandbox_id}-{self._rid}"
        threading.Thread(target=self._await_exit, args=(req,), daemon=True, name=name).start()

    def _on_data(self, kind: int, chunk: bytes) -> None:
        """Called on the reader thread, in stream order: bounded by the output cap."""
        if self._truncated:
            return
        if len(chunk) > self._budget:
            chunk, self._truncated = chunk[: self._budget], True
        self._budget -= len(chunk)
        name = "stderr" if kind != _K_OUT else "stdout" if self.req.pty is None else "pty"
        (self._out if kind == _K_OUT else self._err).extend(chunk)
        with self._cond:
            if chunk:
                self.events.append((name, chunk))
            self._cond.notify_all()
        if self._truncated:
            # Not from this (reader) thread: if the init is blocked writing to us
            # while our pipe to it is full, a send here would deadlock both.
            msg = marshal.dumps({"op": "close_output", "target": self._rid})
            threading.Thread(target=self._send_quietly, args=(msg,), daemon=True).start()

    def _send_quietly(self, msg: bytes) -> None:
        with contextlib.suppress(SandboxClosed):
            self._inst._send(_K_MSG, 0, msg)

    def _await_exit(self, req: _Req) -> None:
        msg = req.q.get()
        self._inst._forget(self._rid)
        closed = msg["op"] == "closed"
        sig = int(signal.SIGKILL) if closed else msg.get("signal")
        code = None if closed else msg.get("code")
        limits = ["output"] if self._truncated else []
        by_deadline = closed and self._inst.killed_by_deadline
        if by_deadline:
            limits.append("max_runtime")
        self._finish(ExecResult(
            exit_code=128 + sig if sig else int(code or 0), signal=sig,
            stdout=bytes(self._out), stderr=bytes(self._err),
            duration_ms=(time.monotonic() - self.started) * 1000, truncated=self._truncated,
            timed_out=self.timed_out or by_deadline, limits_hit=limits,
        ))  # fmt: skip

    def _finish(self, res: ExecResult) -> None:
        with self._cond:
            self.result = res
            callbacks = list(self._on_exit)
            self._cond.notify_all()
        for cb in callbacks:
            cb(res)

    def on_exit(self, callback: Callable[[ExecResult], None]) -> None:
        with self._cond:
            done = self.result
            if done is None:
                self._on_exit.append(callback)
        if done is not None:
            callback(done)

    def events_since(self, index: int, timeout: float) -> tuple[list[tuple[str, bytes]], int, bool]:
        with self._cond:
            if len(self.events) <= index and self.result is None:
                self._cond.wait(timeout)
            new = self.events[index:]
            done = self.result is not None and len(self.events) == index + len(new)
            return new, index + len(new), done

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.result is None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return self.result

    def signal(self, sig: int) -> None:
        if self.result is not None or not self._rid:
            return
        if sig == signal.SIGKILL and self.req.timeout_s:
            self.timed_out = self.timed_out or (
                time.monotonic() - self.started >= self.req.timeout_s
            )
        with contextlib.suppress(SandboxClosed):
            self._inst._send(_K_MSG, 0, marshal.dumps({"op": "signal", "target": self._rid,
                                                      "sig": int(sig)}))  # fmt: skip

    def write_stdin(self, data: bytes) -> None:
        if not self._stdin_open or self.result is not None:
            raise BrokenPipeError(errno.EPIPE, "stdin is closed")
        view = memoryview(data)
        try:
            for i in range(0, len(view), MAX_DATA):
                self._inst._send(_K_IN, self._rid, bytes(view[i : i + MAX_DATA]))
        except SandboxClosed:
            raise BrokenPipeError(errno.EPIPE, "the sandbox is gone") from None

    def close_stdin(self) -> None:
        if self._stdin_open:
            self._stdin_open = False
            with contextlib.suppress(SandboxClosed):
                self._inst._send(_K_CLOSE, self._rid, b"")

    def resize(self, rows: int, cols: int) -> None:
        msg = resize_message(
            self.req.pty is not None, self.pid, self.result is None, self._rid, rows, cols
        )
        if msg is None:
            return
        with contextlib.suppress(SandboxClosed):
            self._inst._send(_K_MSG, 0, marshal.dumps(msg))


# -- runsc's strace -> audit events ---------------------------------------------
#
# runsc writes its debug log with ``--debug-log-format=json``: one JSON object
# per line, so a newline in a path (or in a task name) is escaped and can never
# start a forged line.  Each strace exit message reads
#   [tgid: tid] NAME X call(args) = RET (0xRET) [errno=N (text)] (duration)
# where NAME is the task's name: at most 15 characters, chosen by sandboxed
# code (prctl(PR_SET_NAME)), so it may itself contain " X call(".  The real
# marker is the last " X " / " E " that can follow such a name (what follows
# the real one is the call's name and a fixed first argument, never " X ").
# The tail after the arguments is the sentry's own text and anchored at the end.

_HEAD = re.compile(r"\[\s*(\d+):\s*(\d+)\] ")
#: The sentry's own debug line for a call its seccomp filter refused (the
#: filter glassroom's init installed in the sandbox): a fixed text and numbers
#: only.  Debug lines are never read as strace records (those are level info).
_SECCOMP_DENIED = re.compile(r"\[\s*(\d+):\s*(\d+)\] Syscall (\d+): denied by seccomp")
_TAIL = re.compile(
    r"(\w+)\((.*)\) = (-?\d+) \(0x[0-9a-f]+\)(?: errno=(\d+) \([^)]*\))? \([^)]*\)", re.S
)
#: TASK_COMM_LEN - 1: the longest task name the sentry prints.
COMM_MAX = 15
_ADDR = re.compile(r"\{Family: (\w+), Addr: ([^,]*), Port: (\d+)")
_RESTART = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
            516: "ERESTART_RESTARTBLOCK"}  # fmt: skip

# Argument layouts of the traced file calls, as runsc prints them (captured
# from runsc 20221219, see tests/unit/test_gvisor_trace.py).  A path is printed
# raw after its address; a dirfd as ``AT_FDCWD <cwd>``, ``0xN <its path>`` or
# ``0xN (bad FD)``; a second dirfd as a bare number.  Paths are sandbox-chosen
# text: where two of them could be split differently, the split only changes
# the (bounded) path strings of that one record, never its call or result.
_A = r"0x[0-9a-f]+"  # an address (of a path, a buffer, an array)
_N = _A  # a number: a dirfd, flags, a length, a uid
_DIRFD = rf"(?P<dfd>AT_FDCWD|{_N})(?: (?P<base>.*?))?"
_MODE = r"(?P<mode>0o[0-7]+|0x[0-9a-f]+)"
_FLAGS = r"(?P<flags>[A-Za-z0-9_|]+)"
_STRUCT = r"(?: \{[^{}]*\})?"
_QUOTED = r'(?: "(?:[^"\\]|\\.)*"(?:\.\.\.)?)?'
_P = rf"{_A} (?P<path>.*)"
_P_LAZY = rf"{_A} (?P<path>.*?)"
_FILE_ARGS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.S)
    for name, pattern in {
        "open": rf"{_P}, {_FLAGS}, {_MODE}",
        "openat": rf"{_DIRFD}, {_P}, {_FLAGS}, {_MODE}",
        "creat": rf"{_P}, {_MODE}",
        "unlink": _P,
        "unlinkat": rf"{_DIRFD}, {_P}, (?P<at>{_N})",
        "rename": rf"{_P_LAZY}, {_A} (?P<path2>.*)",
        "renameat": rf"{_DIRFD}, {_P_LAZY}, (?P<dfd2>AT_FDCWD|{_N}), {_A} (?P<path2>.*)",
        "renameat2": rf"{_DIRFD}, {_P_LAZY}, (?P<dfd2>AT_FDCWD|{_N}), {_A} (?P<path2>.*), {_N}",
        "chmod": rf"{_P}, {_MODE}",
        "fchmodat": rf"{_DIRFD}, {_P}, {_MODE}",
        "fchmodat2": rf"{_DIRFD}, {_P}, {_MODE}, {_N}",
        "link": rf"{_P_LAZY}, {_A} (?P<path2>.*)",
        "linkat": rf"{_DIRFD}, {_P_LAZY}, (?P<dfd2>AT_FDCWD|{_N}), {_A} (?P<path2>.*), {_N}",
        # symlink(target, linkpath): the new link is the path, its target path2.
        "symlink": rf"{_A} (?P<path2>.*?), {_P}",
        "symlinkat": rf"{_A} (?P<path2>.*?), {_DIRFD}, {_P}",
        "mkdir": rf"{_P}, {_MODE}",
        "mkdirat": rf"{_DIRFD}, {_P}, {_MODE}",
        "rmdir": _P,
        "truncate": rf"{_P}, {_N}",
        "chown": rf"{_P}, {_N}, {_N}",
        "lchown": rf"{_P}, {_N}, {_N}",
        "fchownat": rf"{_DIRFD}, {_P}, {_N}, {_N}, {_N}",
        "stat": rf"{_P}, {_A}{_STRUCT}",
        "lstat": rf"{_P}, {_A}{_STRUCT}",
        "newfstatat": rf"{_DIRFD}, {_P}, {_A}{_STRUCT}, {_N}",
        "statx": rf"{_DIRFD}, {_P}, {_N}, {_N}, {_A}{_STRUCT}",
        "access": rf"{_P}, (?:0o[0-7]+|{_N})",
        "faccessat": rf"{_DIRFD}, {_P}, (?:0o[0-7]+|{_N})(?:, {_N})?",
        "faccessat2": rf"{_DIRFD}, {_P}, (?:0o[0-7]+|{_N}), {_N}",
        "readlink": rf"{_P_LAZY}, {_A}{_QUOTED}, {_N}",
        "readlinkat": rf"{_DIRFD}, {_P_LAZY}, {_A}{_QUOTED}, {_N}",
        "chdir": _P,
    }.items()
}
#: execve(0xADDR PATH, 0xADDR [argv...], 0xADDR [env...]): the env is never parsed.
_EXECVE = re.compile(rf"{_A} (?P<path>.*?), {_A} \[", re.S)
_EXECVEAT = re.compile(rf"{_DIRFD}, {_A} (?P<path>.*?), {_A} \[", re.S)
#: One Go-quoted argv string (``%q``), maybe cut (``"..."...``), then ", " or "]".
_GO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"(?:\.\.\.)?(, |\])', re.S)
_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)", re.S)
_GO_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
#: Open flag names as runsc prints them -> their (x86-64) bits, for ``_events.open_flags``.
_O_BITS = {
    "O_RDONLY": 0, "O_WRONLY": 0o1, "O_RDWR": 0o2, "O_CREAT": 0o100, "O_EXCL": 0o200,
    "O_NOCTTY": 0o400, "O_TRUNC": 0o1000, "O_APPEND": 0o2000, "O_NONBLOCK": 0o4000,
    "O_DSYNC": 0o10000, "O_ASYNC": 0o20000, "FASYNC": 0o20000, "O_DIRECT": 0o40000,
    "O_LARGEFILE": 0o100000, "O_DIRECTORY": 0o200000, "O_NOFOLLOW": 0o400000,
    "O_NOATIME": 0o1000000, "O_CLOEXEC": 0o2000000, "O_SYNC": 0o4010000,
    "O_PATH": 0o10000000, "O_TMPFILE": 0o20200000,
}  # fmt: skip
# The x86-64 values above document runsc's output; what _events.open_flags
# reads are this machine's own (they differ on arm64).
_O_BITS = {name: getattr(os, name, bits) for name, bits in _O_BITS.items()}
_O_CREAT, _O_TMPFILE = 0o100, 0o20200000
_AT_FDCWD = 0xFFFFFF9C
_AT_REMOVEDIR = 0x200
_FORKS = ("fork", "vfork", "clone", "clone3")
#: At level ``actions``: opens are traced, and logged when they write or are refused.
_ACTION_OPENS = ("open", "openat", "creat")
#: Traced at files/syscalls to follow each process's cwd (``spec.STRACE_CWD``).
_CWD_CALLS = ("chdir", "fchdir")
Record = tuple[str, dict[str, Any], str, "str | None"]


def split_exit(msg: str) -> tuple[int, str, str, str, int, int] | None:
    """``(pid, name, call, args, ret, errno)`` of one strace exit message, else None."""
    head = _HEAD.match(msg)
    if head is None:
        return None
    rest = msg[head.end() :]
    cut = next((i for i in range(min(COMM_MAX, len(rest)), -1, -1)
                if rest.startswith((" X ", " E "), i)), -1)  # fmt: skip
    if cut < 0 or rest[cut + 1] != "X":
        return None
    m = _TAIL.fullmatch(rest, cut + 3)
    if m is None:
        return None
    call, args, ret, err = m.groups()
    return int(head.group(1)), rest[:cut], call, args, int(ret), int(err) if err else 0


def open_flags(text: str) -> int:
    """``O_WRONLY|O_CREAT|0x8000`` (runsc's rendering) -> the numeric flags."""
    value = 0
    for part in text.split("|"):
        if part.startswith("0x"):
            with contextlib.suppress(ValueError):
                value |= int(part, 16)
        else:
            value |= _O_BITS.get(part, 0)
    return value


def _is_cwd(dfd: str) -> bool:
    return dfd == "AT_FDCWD" or int(dfd, 16) & 0xFFFFFFFF == _AT_FDCWD


def _join(base: str, path: str) -> str:
    return base if not path else base.rstrip("/") + "/" + path


def _resolve(path: str, dfd: str | None, base: str | None, cwd: str | None) -> str:
    """A relative path made absolute, as the ptrace tier makes it.

    Against its dirfd's path as runsc printed it (``AT_FDCWD <cwd>``,
    ``0x3 <dir>``), else against the caller's cwd as last seen (calls without
    a dirfd); left relative when that is unknown.  A dirfd whose path runsc
    could not name is named: ``<fd 3>/name``.
    """
    if path.startswith("/"):
        return path
    if base is not None and base.startswith("/"):
        return _join(base, path)
    if dfd is None or _is_cwd(dfd):
        return _join(cwd, path) if cwd else path
    if not path and base:
        return base  # e.g. fstat via newfstatat(fd, "", AT_EMPTY_PATH) of a pipe
    return f"<fd {int(dfd, 16) & 0xFFFFFFFF}>/{path}"


def file_raw(call: str, args: str, cwd: str | None = None) -> tuple[dict[str, Any], str | None]:
    """The raw dict (``audit/_events``) of one traced file call's arguments,
    and the caller's cwd if the line shows it (an ``AT_FDCWD <cwd>`` dirfd).

    ``cwd`` is the caller's cwd as last seen, for relative paths of calls
    without a dirfd.  A layout that does not parse still gives a record (the
    call happened and its result is known): with the path ``?``.
    """
    raw: dict[str, Any] = {"syscall": call}
    pattern = _FILE_ARGS.get(call)
    m = pattern.fullmatch(args) if pattern is not None else None
    if m is None:
        raw["path"] = "?"
        if call == "creat":
            raw["flags"] = "O_WRONLY|O_CREAT|O_TRUNC"
        return raw, None
    g = m.groupdict()
    dfd, base = g.get("dfd"), g.get("base")
    seen = base if dfd == "AT_FDCWD" and base and base.startswith("/") else None
    cwd = seen or cwd
    raw["path"] = _resolve(g["path"], dfd, base, cwd)
    if g.get("path2") is not None:
        path2, dfd2 = g["path2"], g.get("dfd2")
        if dfd2 is not None and dfd is not None and dfd2 == dfd:
            path2 = _resolve(path2, dfd, base, cwd)  # the same dir as the first path
        else:
            path2 = _resolve(path2, dfd2, None, cwd)
        raw["path2"] = path2
    flags = 0
    if g.get("flags") is not None:
        flags = open_flags(g["flags"])
        raw["flags"] = _events.open_flags(flags)
    elif call == "creat":
        flags = 0o1101
        raw["flags"] = "O_WRONLY|O_CREAT|O_TRUNC"
    if g.get("at") is not None and int(g["at"], 16) & _AT_REMOVEDIR:
        raw["flags"] = "AT_REMOVEDIR"
    if g.get("mode") is not None:
        creates = bool(flags & _O_CREAT) or flags & _O_TMPFILE == _O_TMPFILE
        takes_mode = call not in ("open", "openat") or creates
        if takes_mode:
            with contextlib.suppress(ValueError):
                raw["mode"] = oct(int(g["mode"], 0) & 0o7777)
    return raw, seen


def _unquote(text: str) -> str:
    """The value of one Go ``%q`` string body (``\\x`` escapes are bytes)."""
    out = bytearray()
    pos = 0
    for m in _GO_ESCAPE.finditer(text):
        out += text[pos : m.start()].encode("utf-8", "replace")
        esc = m.group(1)
        if esc[0] == "x" and len(esc) == 3:
            out.append(int(esc[1:], 16))
        elif esc[0] in "uU" and len(esc) > 1:
            cp = int(esc[1:], 16)
            ok = cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF
            out += (chr(cp) if ok else "\ufffd").encode()
        elif len(esc) == 3:
            out.append(int(esc, 8) & 0xFF)
        else:
            out += _GO_SIMPLE.get(esc, esc).encode("utf-8", "replace")
        pos = m.end()
    out += text[pos:].encode("utf-8", "replace")
    return out.decode("utf-8", "replace")


def go_strings(text: str, start: int) -> list[str]:
    """The strings of the Go-quoted array opening at ``text[start - 1] == "["``.

    Exactly one array is read (an execve's argv); what follows it (the
    environment) is never looked at.
    """
    out: list[str] = []
    pos = start
    while len(out) < _events.MAX_ARGV:
        m = _GO_STRING.match(text, pos)
        if m is None:
            break
        out.append(_unquote(m.group(1)[: 4 * _events.MAX_ARG]))
        pos = m.end()
        if m.group(2) == "]":
            break
    return out


def exec_raw(call: str, args: str, cwd: str | None = None) -> dict[str, Any]:
    """The raw dict of one exec: path and argv (bounded); the environment is not read."""
    m = (_EXECVEAT if call == "execveat" else _EXECVE).match(args)
    if m is None:
        return {"syscall": call, "path": "?", "argv": []}
    g = m.groupdict()
    path = _resolve(g["path"], g.get("dfd"), g.get("base"), cwd)
    return {"syscall": call, "path": path, "argv": go_strings(args, m.end())}


def errno_name(err: int) -> str:
    return errno.errorcode.get(err) or _RESTART.get(err) or str(err)


class Tracer:
    """Reads runsc's ``--strace`` records from the FIFO and turns them into audit events.

    The records are written by the sentry (trusted runsc), but their content
    is shaped by sandboxed code (paths, argv, task names), so lines are
    bounded and parsed defensively; the environment of an execve is never
    recorded.  Events go out in the order the lines arrive, one batch per
    chunk read (``on_event.many`` if the sink has it: one fsync per batch).

    At level ``actions``: exec, opens for writing or refused, network
    attempts.  At ``files``/``syscalls``: every traced file call and exec
    through the one schema (``audit/_events.to_record``), from the moment the
    init reported ready (:meth:`arm`): glassroom's own init starting up is
    not the sandbox's activity (the namespaces tier attaches at that point too).
    """

    def __init__(self, fd: int, on_event: EventSink, sandbox_id: str, plan: LaunchPlan) -> None:
        self.fd = fd
        proxied = plan.network.mode == "proxy"
        #: As on namespaces: with a proxy, a direct attempt bypasses it.
        self.net_rule = "network.direct" if proxied else plan.network.rule
        self.net_reason = ("no route: the only way out is the egress proxy" if proxied
                           else "no network: loopback only")  # fmt: skip
        self.on_event = on_event
        #: Set by the instance: kills the sandbox when the event budget is spent.
        self.on_overflow: Callable[[], None] | None = None
        self.sandbox_id = sandbox_id
        self.level = plan.audit_level if plan.audit_level in _events.LEVELS else "actions"
        self._watched = frozenset(_events.syscalls_for(self.level))
        self._armed = self.level == "actions"
        self._many: Callable[[list[Record]], None] | None = getattr(on_event, "many", None)
        self._batch: list[Record] = []
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"glassroom-trace-{sandbox_id}")  # fmt: skip
        self._eagain = 0
        self.events = 0
        self._sockets: dict[tuple[int, int], str] = {}
        self._ppid: dict[int, int] = {}
        self._comm: dict[int, str] = {}
        #: Each process's cwd as last seen (AT_FDCWD dirfds, chdir, fchdir, fork).
        self._cwd: dict[int, str] = {}
        #: Syscall number -> (name, entry) of the profile's entries that carry a
        #: rule (setuid/setgid modes): refused inside the sentry by seccomp, before
        #: strace sees the call, so their record comes from the debug line.
        self._refusals: dict[int, tuple[str, seccomp.DenyEntry]] = {}
        for entry in seccomp.notify_entries(plan.seccomp_profile):
            for name in entry.syscalls:
                nr = seccomp.syscall_number(name)
                if nr >= 0:
                    self._refusals.setdefault(nr, (name, entry))

    def start(self) -> None:
        self._thread.start()

    def arm(self) -> None:
        """From now on file and exec calls are logged (level files/syscalls).

        Everything the init did before it reported ready is already in the
        FIFO (a record is written when its call returns), so it is read and
        dropped here first.
        """
        with self._lock:
            self._drain_locked()
            self._armed = True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.fd, self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self.fd in r:
                self.drain()

    def drain(self) -> None:
        """Parse everything the FIFO holds now (also called before limits are judged)."""
        with self._lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self._buf += chunk
            while (nl := self._buf.find(b"\n")) >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if b" X " in line or b"denied by seccomp" in line:
                    try:
                        self._line(line)
                    except Exception as exc:  # a parser bug must not stop the audit
                        why = f"unparseable strace record ({type(exc).__name__})"
                        self._emit(("anomaly", {"reason": why}, "info", "audit"))
            if len(self._buf) > (1 << 20):  # one absurd line: drop it (the rest is no JSON)
                self._buf.clear()
            self._flush()

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        with contextlib.suppress(Exception):  # the audit log reports its own errors
            if self._many is not None:
                self._many(batch)
            else:
                for event, details, decision, rule in batch:
                    self.on_event(event, details, decision, rule)

    def fork_eagain(self) -> int:
        self.drain()
        return self._eagain

    def stop(self) -> None:
        """Log every record still in the FIFO, then stop (the sandbox is dead by now)."""
        self.drain()
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.close(self._wake_r)
        with contextlib.suppress(OSError):
            os.close(self._wake_w)

    def _emit(self, record: Record) -> None:
        self.events += 1
        if self.events == MAX_EVENTS:
            # Fail closed, as on namespaces: a task must not outrun its audit.
            why = f"more than {MAX_EVENTS} traced events: the audit budget is spent"
            self._batch.append(("anomaly", {"reason": why, "action": "sandbox killed"},
                                "deny", "audit.level"))  # fmt: skip
            if self.on_overflow is not None:
                self.on_overflow()
        elif self.events < MAX_EVENTS:
            self._batch.append(record)

    def _seccomp_denied(self, msg: str) -> None:
        """A ``deny`` record for a call the sentry's seccomp filter refused, when the
        profile names a rule for it (as the namespaces tier's listener reports it)."""
        m = _SECCOMP_DENIED.fullmatch(msg)
        if m is None:
            return
        known = self._refusals.get(int(m.group(3)))
        if known is None:
            return
        name, entry = known
        self._emit(("blocked", {"action": name, "syscall": name, "pid": int(m.group(1)),
                                "reason": entry.reason, "source": "runsc seccomp"},
                    "deny", str(entry.rule)))  # fmt: skip

    def _net_event(self, details: dict[str, Any]) -> None:
        details["source"] = "runsc strace"
        self._emit(("network.direct", details, "deny", self.net_rule))

    def _line(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
            msg, level = obj.get("msg"), obj.get("level")
        except (ValueError, AttributeError, RecursionError):
            return
        if not isinstance(msg, str):
            return
        if level == "debug":
            self._seccomp_denied(msg)
            return
        parsed = split_exit(msg)
        if parsed is None:
            return
        pid, comm, call, args, ret, err = parsed
        if len(self._comm) > 4096:
            self._comm.clear()
        self._comm[pid] = comm
        if call in _FORKS:
            if err == errno.EAGAIN:
                self._eagain += 1
            elif not err and ret > 0 and "CLONE_THREAD" not in args:
                if len(self._ppid) > 4096:
                    self._ppid.clear()
                self._ppid[ret] = pid
                if pid in self._cwd:
                    self._set_cwd(ret, self._cwd[pid])
        elif call in _CWD_CALLS:
            if self._armed and call in self._watched:  # logged at level syscalls
                self._file(call, args, pid, err)  # (with the cwd before it)
            if not err:
                self._chdir(call, args, pid)
        elif call == "socket":
            self._socket(args, pid, -1 if err else ret)
        elif call in ("connect", "sendto", "sendmsg"):
            self._net(call, args, pid, errno_name(err) if err else "ok")
        elif not self._armed:
            return  # glassroom's init starting up (files/syscalls only; see arm())
        elif call in _events.EXEC_SYSCALLS:
            self._exec(call, args, pid, comm, err)
        elif call in self._watched or (self.level == "actions" and call in _ACTION_OPENS):
            self._file(call, args, pid, err)

    def _set_cwd(self, pid: int, cwd: str) -> None:
        if len(self._cwd) > 4096:
            self._cwd.clear()
        self._cwd[pid] = cwd[: _events.MAX_PATH]

    def _chdir(self, call: str, args: str, pid: int) -> None:
        """Follow a successful chdir/fchdir, to make later relative paths absolute."""
        if call == "fchdir":
            m = re.fullmatch(r"0x[0-9a-f]+ (/.*)", args, re.S)
            new = m.group(1) if m else None
        else:
            raw, _seen = file_raw("chdir", args, self._cwd.get(pid))
            new = posixpath.normpath(raw["path"]) if raw["path"].startswith("/") else None
        if new is None:
            self._cwd.pop(pid, None)
        else:
            self._set_cwd(pid, new)

    def _file(self, call: str, args: str, pid: int, err: int) -> None:
        raw, seen = file_raw(call, args, self._cwd.get(pid))
        if seen:
            self._set_cwd(pid, seen)
        raw["pid"] = pid
        raw["result"] = errno_name(err) if err else "ok"
        record = _events.to_record(raw, "runsc strace")
        if self.level == "actions":  # today's subset: opens that write, and refusals
            writing = _events.writes("open", str(raw.get("flags", "")))
            if record[2] != "deny" and not (writing and not err):
                return
        self._emit(record)

    def _exec(self, call: str, args: str, pid: int, comm: str, err: int) -> None:
        raw = exec_raw(call, args, self._cwd.get(pid))
        raw["pid"] = pid
        raw["result"] = errno_name(err) if err else "ok"
        ppid = self._ppid.get(pid)
        if ppid is not None:
            raw["ppid"] = ppid
        # The parent's name; before its fork's return is seen, the caller's own
        # name before the exec (inherited from that parent at the fork).
        raw["parent"] = self._comm.get(ppid, comm) if ppid is not None else comm
        self._emit(_events.to_record(raw, "runsc strace"))

    def _socket(self, args: str, pid: int, fd: int) -> None:
        """Remember each socket's type (for the protocol of later attempts); log raw ones."""
        if fd < 0:
            return
        parts = [p.strip() for p in args.split(",")]
        family = parts[0] if parts else ""
        kind = parts[1].split("|")[0] if len(parts) > 1 else ""
        proto = {"SOCK_STREAM": "tcp", "SOCK_DGRAM": "udp"}.get(kind, kind.lower())
        if len(self._sockets) > 4096:
            self._sockets.clear()
        self._sockets[(pid, fd)] = proto
        if family == "AF_PACKET" or kind == "SOCK_RAW":
            what = "packet socket" if family == "AF_PACKET" else "raw socket"
            self._net_event({"syscall": "socket", "what": what, "pid": pid,
                             "destination": what, "reason": self.net_reason})  # fmt: skip

    def _net(self, call: str, args: str, pid: int, result: str) -> None:
        am = _ADDR.search(args)
        if not am:
            return
        family, addr, port = am.groups()
        if family not in ("AF_INET", "AF_INET6") or addr.startswith(("127.", "::1")):
            return  # Unix sockets and the sandbox's own loopback are not egress
        fm = re.match(r"0x([0-9a-f]+) ", args)
        proto = self._sockets.get((pid, int(fm.group(1), 16)), "unknown") if fm else "unknown"
        inet6 = family == "AF_INET6"
        self._net_event({
            "syscall": call, "family": "inet6" if inet6 else "inet", "address": addr,
            "port": int(port), "protocol": proto, "pid": pid, "result": result,
            "destination": f"[{addr}]:{port}" if inet6 else f"{addr}:{port}",
            "reason": self.net_reason,
        })  # fmt: skip
