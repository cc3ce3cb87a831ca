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
   execs glassroom's init inside in *stream* mode (``_sys/init_stream``):
   the control channel is the container's stdin/stdout, framed.
4. The init loads the seccomp programs and rlimits, and reports ready.
5. runsc's ``--strace`` (limited to exec/open/connect/fork) is written to
   a FIFO the supervisor reads: exec, open and connect events go to the
   audit log, and failed forks (EAGAIN from ``RLIMIT_NPROC``) count as
   pids-limit hits.

Teardown does not use ``runsc delete --force`` (about 1.4 s): it kills
every process in the sandbox's cgroups (freeze, SIGKILL, thaw), which ends
the sentry, the gofer and runsc itself; the sentry's mounts lived in its
own mount namespace and vanish with it; then it removes the per-sandbox
dir (runsc's ``--root`` state and the trace FIFO) and the cgroups.

Everything that comes out of the sandbox (frames, replies, trace lines) is
untrusted: sizes are bounded and replies are checked against a schema.
"""

from __future__ import annotations

import contextlib
import errno
import json
import marshal
import os
import queue
import re
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from .. import _config
from .._errors import BackendUnavailable, SandboxClosed, WallError
from .._sys import cgroups, proc, seccomp
from ..plan import EGRESS_DIR_INSIDE, PROXY_PORT_INSIDE, LaunchPlan
from . import _gvisor_spec as spec
from ._channel import ProtocolViolation
from ._channel import parse_reply as _parse_reply
from ._files import FileOps
from .base import EventSink, ExecRequest, ExecResult, Receipt

START_TIMEOUT_S = 15.0
REPLY_TIMEOUT_S = 10.0
#: The sentry, the gofer and runsc itself live in the sandbox's memory
#: cgroup next to the workload: this much is added to memory + disk.
SENTRY_OVERHEAD_BYTES = 128 << 20
#: Host tasks (sentry threads, gofer, stubs) are not sandbox processes; the
#: policy's ``pids`` is enforced inside by RLIMIT_NPROC.  This is a backstop.
HOST_PIDS_BACKSTOP = 4096
MAX_JSON = 64 * 1024
MAX_DATA = 64 * 1024
MAX_EVENTS = 20000
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
        try:
            inst.build()
        except BaseException:
            inst.destroy()
            raise
        return inst


class _Req:
    """One request's routing slot: control replies go to ``q``, data to ``on_data``."""

    def __init__(self, on_data: Callable[[int, bytes], None] | None) -> None:
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.on_data = on_data


class GvisorInstance(FileOps):
    """One running sandbox: runsc + the stream-mode init + cgroups."""

    def __init__(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> None:
        self.plan = plan
        self.sandbox_id = sandbox_id
        self.on_event = on_event
        self.walls: dict[str, Any] = {}
        self.state = _config.state_dir()
        self.record_path = self.state / "sandboxes" / f"{sandbox_id}.json"
        self.sbdir = self.state / "gvisor" / "run" / sandbox_id
        self.cg: cgroups.CgroupSet | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.deadline = time.monotonic() + plan.limits.max_runtime_s
        self.dead_reason: str | None = None
        self.killed_by_deadline = False
        self._destroyed: Receipt | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._reqs: dict[int, _Req] = {}
        self._reqs_lock = threading.Lock()
        self._next_id = 1
        self._closed = False
        self._ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._tracer: Tracer | None = None
        self.platform = ""

    # -- construction ------------------------------------------------------

    def build(self) -> None:
        runsc = spec.runsc_path()
        if not _config.is_root():
            # Rootless runsc drops the sentry's own user namespace and uid 65534.
            raise BackendUnavailable(
                "gvisor: glassroom must run as root to start runsc (rootless runsc "
                "would run the sandbox as the caller's own uid)",
                rule="backend.gvisor",
            )
        self.platform = spec.choose_platform()
        spec.check_plan(self.plan)
        init_dir = spec.install_init(self.state)
        self._write_record()
        self.sbdir.mkdir(parents=True, mode=0o700)
        fifo = self.sbdir / "trace"
        os.mkfifo(fifo, 0o600)
        # O_RDWR: the FIFO never reads as EOF while runsc has not opened it yet.
        self._tracer = Tracer(os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC),
                              self.on_event, self.sandbox_id, self.plan)  # fmt: skip
        lim = self.plan.limits
        mem = lim.memory_bytes + lim.disk_bytes + SENTRY_OVERHEAD_BYTES
        self.cg = cgroups.CgroupSet.create(
            self.sandbox_id,
            cgroups.CgroupLimits(memory_bytes=mem, pids=HOST_PIDS_BACKSTOP, cpus=lim.cpus),
            parent=_config.cgroup_parent(),
        )
        self.walls["cgroups"] = {
            "paths": list(self.cg.paths), "memory_bytes": mem, "cpus": lim.cpus,
            "host_pids_backstop": HOST_PIDS_BACKSTOP,
        }  # fmt: skip
        argv = spec.init_argv(_LAUNCH)
        net = self.plan.network
        proxied = net.mode == "proxy" and bool(net.host_dir)
        extra_gids: tuple[int, ...] = ()
        if proxied:
            extra_gids = (_open_egress_to_group(Path(str(net.host_dir))),)
        bundle = spec.bundle(self.plan, self.state, init_dir, argv, self.sbdir, extra_gids)
        runsc_argv = [
            runsc, "--root", str(self.sbdir / "state"), f"--platform={self.platform}",
            "--network=none", "--ignore-cgroups",
            *(["--host-uds=open"] if proxied else []),
            "--strace", "--strace-syscalls=" + ",".join(spec.STRACE_SYSCALLS),
            f"--debug-log={fifo}", "--debug-command=boot",
            "run", "--bundle", str(bundle), self.sandbox_id,
        ]  # fmt: skip
        procs = [os.path.join(p, "cgroup.procs") for p in self.cg.paths]
        # Born in the cgroups: the shell moves itself, then becomes runsc.
        script = 'for f in "$@"; do echo $$ > "$f" || exit 125; done; exec ' + shlex.join(
            runsc_argv
        )
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", script, "sh", *procs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/", close_fds=True,
            start_new_session=True,
        )  # fmt: skip
        self._write_record()
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"glassroom-{self.sandbox_id}")  # fmt: skip
        self._reader.start()
        self._tracer.start()
        shim = init_dir / spec.COMPAT_SHIM
        preload = f"{spec.INIT_DIR_INSIDE}/{spec.COMPAT_SHIM}" if shim.exists() else ""
        self._send(_K_MSG, 0, marshal.dumps({
            "op": "config", "seccomp": [seccomp.compile_bpf(self.plan.seccomp_profile)],
            "preload": preload,
            **({"forward": {"port": PROXY_PORT_INSIDE,
                            "socket": f"{EGRESS_DIR_INSIDE}/proxy.sock"}} if proxied else {}),
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
        _path, version, _known = spec.runsc_info()
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
                "(--host-uds=open)" if proxied else ""),
            "rlimits": {"RLIMIT_FSIZE": lim.disk_bytes, "RLIMIT_CORE": 0,
                        "RLIMIT_NOFILE": 1024, "RLIMIT_NPROC": lim.pids},
            "audit": "runsc --strace: " + ",".join(spec.STRACE_SYSCALLS),
        })  # fmt: skip

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
        """What the reaper needs if this supervisor dies without cleaning up."""
        sup = os.getpid()
        pids = []
        if self.proc is not None:
            pids.append({"pid": self.proc.pid, "start": proc.process_start_time(self.proc.pid)})
        rec = {
            "sandbox_id": self.sandbox_id,
            "backend": "gvisor",
            "supervisor": {"pid": sup, "start": proc.process_start_time(sup)},
            "pids": pids,
            "cgroup": {"name": self.sandbox_id, "parent": _config.cgroup_parent()},
            "paths": [str(self.sbdir)]
            + ([self.plan.network.host_dir] if self.plan.network.host_dir else []),
            "created": time.time(),
        }
        self.record_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.record_path)

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
        try:
            self._send(_K_MSG, 0, marshal.dumps(msg))
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
        try:
            reason = self._pump()
        except Exception as exc:
            reason = f"supervisor error: {type(exc).__name__}"
            self._violation(f"reader stopped: {exc!r}")
            self.kill()
        self.dead_reason = reason
        with self._reqs_lock:
            self._closed = True
            waiters = list(self._reqs.values())
            self._reqs.clear()
        closed = {"op": "closed", "reason": reason}
        self._ready.put(closed)
        for r in waiters:
            r.q.put(closed)

    def _pump(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.killed_by_deadline = True
                self.on_event("anomaly", {"reason": "max runtime exceeded; sandbox killed",
                                          "max_runtime_s": self.plan.limits.max_runtime_s},
                              "deny", "resources.max_runtime_s")  # fmt: skip
                self.kill()
                return "max_runtime exceeded"
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
        with self._reqs_lock:
            req = self._reqs.get(mid) if isinstance(mid, int) else None
        if req is None:
            if not isinstance(mid, int) or mid <= 0 or mid >= self._next_id:
                raise ProtocolViolation(f"reply for unknown request id {mid!r}")
            return
        req.q.put(msg)

    def _closed_error(self) -> SandboxClosed:
        if self.killed_by_deadline:
            return SandboxClosed(
                f"sandbox {self.sandbox_id} was killed at its max runtime "
                f"({self.plan.limits.max_runtime_s:g}s)",
                rule="resources.max_runtime_s",
            )
        return SandboxClosed(f"sandbox {self.sandbox_id} is no longer running ({self.dead_reason})")

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
            res = p.wait()
        assert res is not None
        return res

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
        from .namespaces import _path_error

        if not path.startswith("/"):
            path = f"{self.plan.workspace}/{path}"
        out = bytearray()
        cap = max_bytes if kind == "read" else 64 << 20

        def on_data(_kind: int, chunk: bytes) -> None:
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
            first = req.q.get()
            if first["op"] == "closed":
                raise self._closed_error()
            if first["op"] == "error":
                raise _path_error(kind, path, int(first["errno"]), str(first["error"]))
            done = req.q.get()
            if done["op"] == "closed":
                raise self._closed_error()
            code = done.get("code") or 0
            if code:
                raise _path_error(kind, path, int(code), os.strerror(int(code)))
        except SandboxClosed:
            raise self._closed_error() from None
        finally:
            self._forget(rid)
        return bytes(out)

    # -- teardown -----------------------------------------------------------

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.dead_reason is None

    def kill(self) -> None:
        """SIGKILL everything in the sandbox's cgroups: runsc, its gofer, the sentry, stubs."""
        with self._lock:
            if self.cg is not None:
                with contextlib.suppress(OSError, WallError):
                    self.cg.kill_all(timeout=5.0)
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.proc.kill()  # not yet in the cgroups (the sh was still moving)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)

    def destroy(self) -> Receipt:
        if self._destroyed is not None:
            return self._destroyed
        removed: dict[str, Any] = {}
        self.kill()
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                with contextlib.suppress(OSError):
                    if f is not None:
                        f.close()
            removed["processes"] = {"runsc": self.proc.pid, "how": "cgroup SIGKILL"}
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        if self._tracer is not None:
            self._tracer.stop()
        if self.cg is not None:
            with contextlib.suppress(WallError):
                removed["cgroups"] = self.cg.remove()
        if self.sbdir.exists():
            shutil.rmtree(self.sbdir, ignore_errors=True)
            removed["runsc_state"] = str(self.sbdir)
        removed["workspace"] = "tmpfs in the sentry's memory, freed with it"
        removed["mounts"] = "the sentry's private mount namespace, gone with the sentry"
        if self.record_path.exists():
            self.record_path.unlink()
            removed["state"] = str(self.record_path)
        self._destroyed = Receipt(self.sandbox_id, removed, self._leftovers())
        return self._destroyed

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
        msg = {"op": "exec", "argv": list(self.req.argv), "env": dict(self.req.env),
               "cwd": self.req.cwd, "max_output": self.req.max_output_bytes}  # fmt: skip
        self._rid, req = self._inst._request(msg, self._on_data)
        first = req.q.get()
        if first["op"] == "closed":
            self._inst._forget(self._rid)
            raise self._inst._closed_error()
        if first["op"] == "error":
            from .namespaces import _exec_message

            self._inst._forget(self._rid)
            err = int(first["errno"])
            stderr = _exec_message(self.req.argv[0], first).encode()
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
        name = "stdout" if kind == _K_OUT else "stderr"
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


# -- runsc's strace -> audit events ---------------------------------------------

_LINE = re.compile(
    r"\] \[\s*(\d+):\s*(\d+)\] (\S*) X (\w+)\((.*)\) = (-?\d+) \(0x[0-9a-f]+\)"
    r"(?: errno=(\d+) \([^)]*\))? \([^)]*\)\s*$"
)
_PATH_ARG = re.compile(r"0x[0-9a-f]+ ([^,]*), (O_[A-Z0-9_|x]+|0x[0-9a-f]+)")
#: execve(0xADDR PATH, 0xADDR [argv...], 0xADDR [env...]): the env is never parsed.
_EXEC_ARGS = re.compile(r"^0x[0-9a-f]+ (.*?), 0x[0-9a-f]+ \[")
_ADDR = re.compile(r"\{Family: (\w+), Addr: ([^,]*), Port: (\d+)")
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")


class Tracer:
    """Reads runsc's ``--strace`` lines from the FIFO and turns them into audit events.

    The lines are written by the sentry (trusted runsc), but their content
    is shaped by sandboxed code (paths, argv), so lines are bounded and
    parsed defensively; the environment of an execve is never recorded.
    """

    def __init__(self, fd: int, on_event: EventSink, sandbox_id: str, plan: LaunchPlan) -> None:
        self.fd = fd
        proxied = plan.network.mode == "proxy"
        #: As on namespaces: with a proxy, a direct attempt bypasses it.
        self.net_rule = "network.direct" if proxied else plan.network.rule
        self.net_reason = ("no route: the only way out is the egress proxy" if proxied
                           else "no network: loopback only")  # fmt: skip
        self.on_event = on_event
        self.sandbox_id = sandbox_id
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"glassroom-trace-{sandbox_id}")  # fmt: skip
        self._eagain = 0
        self._events = 0
        self._sockets: dict[tuple[int, int], str] = {}

    def start(self) -> None:
        self._thread.start()

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
                    if b"strace.go" in line and b" X " in line:
                        self._line(line.decode(errors="replace"))
                if len(self._buf) > (1 << 20):  # one absurd line: drop it
                    self._buf.clear()

    def fork_eagain(self) -> int:
        self.drain()
        return self._eagain

    def stop(self) -> None:
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

    def _emit(self, event: str, details: dict[str, Any], decision: str, rule: str | None) -> None:
        self._events += 1
        if self._events == MAX_EVENTS:
            self.on_event("anomaly", {"reason": f"more than {MAX_EVENTS} traced events; "
                                      "the rest are not logged"}, "info", "audit")  # fmt: skip
        if self._events < MAX_EVENTS:
            details["source"] = "runsc strace"
            self.on_event(event, details, decision, rule)

    def _line(self, line: str) -> None:
        m = _LINE.search(line)
        if not m:
            return
        _tid, pid, comm, call, args, ret, err_s = m.groups()
        err = int(err_s) if err_s else 0
        result = errno.errorcode.get(err, str(err)) if err else "ok"
        if call in ("fork", "vfork", "clone", "clone3"):
            if err == errno.EAGAIN:
                self._eagain += 1
        elif call in ("execve", "execveat"):
            self._exec(call, args, int(pid), comm, err, result)
        elif call in ("open", "openat", "creat"):
            pm = _PATH_ARG.search(args)
            if not pm:
                return
            path, flags = pm.group(1)[:1024], pm.group(2)
            writing = call == "creat" or any(f in flags for f in _WRITE_FLAGS)
            if err in (errno.EACCES, errno.EPERM, errno.EROFS):
                rule = "filesystem.write" if writing else "filesystem.read"
                self._emit("file.open", {"path": path, "flags": flags, "pid": int(pid),
                                         "comm": comm, "result": result}, "deny", rule)  # fmt: skip
            elif writing and not err:
                self._emit("file.open", {"path": path, "flags": flags, "pid": int(pid),
                                         "comm": comm, "result": "ok"}, "allow", None)  # fmt: skip
        elif call == "socket":
            self._socket(args, int(pid), -1 if err_s else int(ret))
        elif call in ("connect", "sendto", "sendmsg"):
            self._net(call, args, int(pid), result)

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
            self._emit("network.direct", {"syscall": "socket", "what": what, "pid": pid,
                                          "destination": what, "reason": self.net_reason},
                       "deny", self.net_rule)  # fmt: skip

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
        self._emit("network.direct", {
            "syscall": call, "family": "inet6" if inet6 else "inet", "address": addr,
            "port": int(port), "protocol": proto, "pid": pid, "result": result,
            "destination": f"[{addr}]:{port}" if inet6 else f"{addr}:{port}",
            "reason": self.net_reason,
        }, "deny", self.net_rule)  # fmt: skip

    def _exec(self, call: str, args: str, pid: int, comm: str, err: int, result: str) -> None:
        if call == "execveat":  # skip the dirfd argument
            args = args.partition(", ")[2]
        pm = _EXEC_ARGS.match(args)
        path = pm.group(1)[:1024] if pm else ""
        argv: list[str] = []
        if pm:  # decode exactly one array, the argv (the env after it holds secrets)
            with contextlib.suppress(ValueError):
                val, _end = json.JSONDecoder().raw_decode(args, pm.end() - 1)
                if isinstance(val, list):
                    argv = [str(a)[:1024] for a in val[:256]]
        deny = err in (errno.EACCES, errno.EPERM)
        self._emit("exec", {"path": path, "argv": argv, "pid": pid, "parent": comm,
                            "result": result},
                   "deny" if deny else ("allow" if not err else "info"),
                   "tools.allow" if deny else None)  # fmt: skip
