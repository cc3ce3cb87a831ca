"""The ``namespaces`` backend (risk "low"): bubblewrap + seccomp + Landlock + cgroups.

Construction order, and why:

1. cgroups are made on the host first, so limits exist before any code runs.
2. ``bwrap`` builds user/mount/pid/net/ipc/uts/cgroup namespaces and a new
   empty root holding only the plan's mounts, loads the seccomp filter,
   drops every capability and sets no_new_privs.  It reports the sandbox's
   pid 1 on ``--info-fd`` and then *waits* on ``--block-fd``.
3. The supervisor moves that pid into the cgroups, then unblocks bwrap; so
   every process of the sandbox is born inside its limits.
4. bwrap execs the in-sandbox init, which applies Landlock (it cannot come
   earlier: Landlock forbids mount changes) and rlimits, then reports ready.

Any failure on the way kills what exists and raises ``WallError`` naming
the wall: the sandbox never runs half-built.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import queue
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from .. import _config, _reach
from .._errors import (
    BackendUnavailable,
    SandboxClosed,
    SnapshotError,
    WallError,
)
from .._sys import cgroups, netwatch, proc, scratch, seccomp, tracewatch
from ..plan import EGRESS_DIR_INSIDE, PROXY_PORT_INSIDE, LaunchPlan, Mount
from ..policy._template import HOST_USR_INSIDE, INIT_ENV_UNDER_TEMPLATE
from ._channel import (
    UNANSWERED_KILL_S,
    Channel,
    ProtocolViolation,
    RequestTooLarge,
    close_quietly,
    end_unanswered,
    release_quietly,
)
from ._failures import exec_message, path_error
from ._files import FileOps, FileOpStalled
from ._gates import Gates
from ._lifecycle import InstanceBase, started
from .base import Checkpoint, EventSink, ExecRequest, ExecResult

if TYPE_CHECKING:
    from ._spawn import NamespacesProcess

INIT_FILES = ("sandbox_init.py", "landlock.py", "init_net.py", "tracer.py")
INIT_DIR_INSIDE = "/.glassroom"
#: Where the compiled init (``_sys/agent``, static) is bound, read-only, and run.
INIT_BIN_INSIDE = "/.glassroom-init"
PYTHON_FOR_INIT = "/usr/bin/python3"
INIT_CHOICES = ("auto", "compiled", "python")
START_TIMEOUT_S = 10.0
EXIT_GRACE_S = 0.1


def _bwrap() -> str:
    path = shutil.which("bwrap")
    if not path:
        raise BackendUnavailable(
            "namespaces: bubblewrap (bwrap) is not installed; apt-get install bubblewrap",
            rule="backend.namespaces",
        )
    return path


def choose_init(state: Path) -> Path | None:
    """The compiled init to run, or None for the Python one (``GLASSROOM_INIT``).

    ``auto`` (the default): the compiled init if it was built from the
    current sources (``glassroom init build``, scripts/setup.sh), else the
    Python init.  ``compiled``: that one or a WallError (fail closed: never
    silently the other).  ``python``: the Python init.  Which one ran is in
    the sandbox's walls (``init``), so in its ``sandbox.created`` record."""
    from .._sys import agent_build

    want = os.environ.get("GLASSROOM_INIT", "auto").strip().lower() or "auto"
    if want not in INIT_CHOICES:
        raise WallError(f"init: GLASSROOM_INIT={want!r} is not one of {', '.join(INIT_CHOICES)}",
                        rule="init")  # fmt: skip
    if want == "python":
        return None
    found = agent_build.find(state)
    if found is None and want == "compiled":
        raise WallError(
            "init: GLASSROOM_INIT=compiled but the compiled init is not built for these sources "
            f"(looked in {state / 'agent'} and {_config.init_build_dir()}); build it with "
            "`glassroom init build`, which needs gcc and libc6-dev",
            rule="init",
        )
    return found


def install_init(state: Path) -> Path:
    """Copy the init script where the unprivileged sandbox user can read it.

    The package may live under /root (not readable by the sandbox uid), so
    the two stdlib-only files are copied to the state dir once per content.
    """
    src = Path(__file__).resolve().parent.parent / "_sys"
    dest = state / "init"
    dest.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chmod(state, 0o755)
    os.chmod(dest, 0o755)
    for name in INIT_FILES:
        data = (src / name).read_bytes()
        target = dest / name
        if not target.exists() or target.read_bytes() != data:
            # pid + thread: a server starts sandboxes from many threads at once
            tmp = dest / f".{name}.{os.getpid()}.{threading.get_ident()}"
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
    _precompile(dest)
    for name, content in _identity_files().items():
        target = dest / name
        if not target.exists() or target.read_text() != content:
            target.write_text(content)
            os.chmod(target, 0o644)
    return dest


def _precompile(dest: Path) -> None:
    """Byte-compile the init with the sandbox's own interpreter, once per content.

    The init dir is read-only inside, so without this every sandbox start
    would compile the init from source (a few ms on each start).
    """
    stamp = dest / ".compiled"
    digest = "".join(str((dest / n).stat().st_mtime_ns) for n in INIT_FILES)
    if stamp.exists() and stamp.read_text() == digest:
        return
    subprocess.run(
        [PYTHON_FOR_INIT, "-I", "-m", "compileall", "-q", str(dest)],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for root, dirs, files in os.walk(dest):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    stamp.write_text(digest)


def _identity_files() -> dict[str, str]:
    uid, gid = _config.INSIDE_UID, _config.INSIDE_GID
    return {
        "passwd": (
            f"agent:x:{uid}:{gid}:agent:/workspace:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        ),
        "group": f"agent:x:{gid}:\nnogroup:x:65534:\n",
    }


def _mount_args(m: Mount, scratch_dirs: dict[str, str] | None = None,
                gates: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    if m.kind == "scratch":
        if scratch_dirs is not None:  # a dir on the sandbox's own scratch disk
            return ["--bind", scratch_dirs[m.target], m.target]
        # Unprivileged glassroom has no loop device: a tmpfs, whose pages count
        # inside resources.memory_mib (see NamespacesInstance._scratch).
        m = Mount("tmpfs", m.target, m.rule, size_bytes=m.size_bytes, mode=m.mode)
    if m.kind == "ro-bind":
        return ["--ro-bind", str(m.source), m.target]
    if m.kind == "tree-bind":  # a template build's own copy (templates/_build.py): no gate
        return ["--bind", str(m.source), m.target]
    if m.kind == "bind":
        # A writable host dir is only ever bound through its write gate (_gates.py).
        if gates is None or m.target not in gates:
            raise WallError(f"filesystem.protected: no write gate for {m.target}",
                            rule="filesystem.protected")  # fmt: skip
        return ["--bind", gates[m.target], m.target]
    if m.kind == "tmpfs":
        args = ["--size", str(m.size_bytes)] if m.size_bytes else []
        if m.mode is not None:
            args = ["--perms", f"{m.mode:o}", *args]
        return [*args, "--tmpfs", m.target]
    if m.kind == "proc":
        return ["--proc", m.target]
    if m.kind == "dev":
        return ["--dev", m.target]
    if m.kind == "symlink":
        return ["--symlink", str(m.source), m.target]
    if m.kind == "dir":
        return ["--dir", m.target]
    raise WallError(f"mounts: unsupported mount kind {m.kind!r} for {m.target}", rule=m.rule)


def bwrap_argv(plan: LaunchPlan, init_dir: Path, fds: dict[str, int],
               scratch_dirs: dict[str, str] | None = None,
               gates: dict[str, str] | None = None,
               init_bin: Path | None = None) -> list[str]:  # fmt: skip
    """bwrap's argv; ``init_bin``: the compiled init (static: it needs no /usr),
    else the Python init is run by the host's /usr/bin/python3."""
    argv = [
        _bwrap(),
        "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
        "--unshare-uts", "--unshare-cgroup",
        "--disable-userns",
        "--die-with-parent", "--new-session",
        "--cap-drop", "ALL",
        "--uid", str(_config.INSIDE_UID), "--gid", str(_config.INSIDE_GID),
        "--hostname", "sandbox",
        "--clearenv",
        "--info-fd", str(fds["info"]),
        "--block-fd", str(fds["block"]),
        "--seccomp", str(fds["seccomp"]),
    ]  # fmt: skip
    for m in plan.mounts:
        argv += _mount_args(m, scratch_dirs, gates)
        if m.kind == "proc" and "boot_id" in fds:
            # The host's boot id names the host (and its every boot): the sandbox
            # gets one of its own, as a VM would.  A resumed sandbox keeps its
            # own; a new sandbox from a files-only snapshot gets a new one.
            argv += ["--ro-bind-data", str(fds["boot_id"]), f"{m.target}/sys/kernel/random/boot_id"]
    argv += ["--ro-bind", str(init_dir), INIT_DIR_INSIDE]
    if init_bin is not None:
        argv += ["--ro-bind", str(init_bin), INIT_BIN_INSIDE]
    if plan.root is not None:
        return argv + _template_tail(plan, init_dir, compiled=init_bin is not None)
    if not Path("/etc/passwd").exists() or not any(
        r.path in ("/etc", "/etc/passwd") for r in plan.fs_rules
    ):
        argv += [
            "--ro-bind", str(init_dir / "passwd"), "/etc/passwd",
            "--ro-bind", str(init_dir / "group"), "/etc/group",
        ]  # fmt: skip
    if init_bin is None and not any(
        r.path == "/usr" or PYTHON_FOR_INIT.startswith(r.path + "/") for r in plan.fs_rules
    ):
        # The init's interpreter must exist inside even when the policy hides
        # /usr; it is bound but NOT given a Landlock read rule, so sandboxed
        # code cannot read it (the init imports everything before Landlock).
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in ("lib", "lib64", "bin"):
            if os.path.islink("/" + name):
                argv += ["--symlink", os.readlink("/" + name), "/" + name]
    if plan.network.host_dir:  # the egress proxy's socket and CA (see docs/network.md)
        argv += ["--ro-bind", plan.network.host_dir, EGRESS_DIR_INSIDE]
    argv += ["--remount-ro", "/", "--chdir", plan.workspace]
    if init_bin is not None:
        return [*argv, "--", INIT_BIN_INSIDE]
    # A one-line launcher, so the init itself loads from its cached .pyc.
    launch = f"import sys;sys.path.insert(0,{INIT_DIR_INSIDE!r});import sandbox_init as m;m.main()"
    argv += ["--", PYTHON_FOR_INIT, "-I", "-S", "-c", launch]
    return argv


def _template_tail(plan: LaunchPlan, init_dir: Path, *, compiled: bool = False) -> list[str]:
    """The rest of bwrap's argv when a template is the sandbox's ``/``.

    The init is the host's Python, but the template's ``/usr`` and libc are
    not the host's: so the host's /usr is bound at a hidden path with no
    Landlock rule (the task can neither read nor run it, as with a hidden
    /usr above), and the init is started through the host's own dynamic
    loader with the host's library dir, so it needs nothing of the template.
    ``--library-path`` is the loader's option, not an env variable: the
    commands the init starts do not inherit it.

    The compiled init (``compiled``) is static: none of the host's /usr is
    bound at all, and it reads no locale or zone file."""
    assert plan.root is not None
    root = Path(plan.root)
    argv: list[str] = []
    etc = root / "etc"
    if (etc / "passwd").is_file() or not os.path.lexists(etc):
        # The sandbox's user, uid 1000 "agent", is named by glassroom, not the image.
        argv += ["--ro-bind", str(init_dir / "passwd"), "/etc/passwd"]
        if (etc / "group").is_file() or not os.path.lexists(etc):
            argv += ["--ro-bind", str(init_dir / "group"), "/etc/group"]
    if compiled:
        if plan.network.host_dir:
            argv += ["--ro-bind", plan.network.host_dir, EGRESS_DIR_INSIDE]
        return [*argv, "--remount-ro", "/", "--chdir", plan.workspace, "--", INIT_BIN_INSIDE]
    host_usr = HOST_USR_INSIDE
    argv += ["--ro-bind", "/usr", host_usr]
    # glibc and Python would read the template's locale files and
    # /etc/localtime (binary formats the image controls) while the init starts,
    # before any wall is up: the C locale and a TZ rule need no file.  The
    # commands the init starts get the plan's env, not these.
    for k, v in INIT_ENV_UNDER_TEMPLATE:
        argv += ["--setenv", k, v]
    if plan.network.host_dir:
        argv += ["--ro-bind", plan.network.host_dir, EGRESS_DIR_INSIDE]
    argv += ["--remount-ro", "/", "--chdir", plan.workspace]
    real = os.path.realpath(PYTHON_FOR_INIT)
    if not real.startswith("/usr/"):
        raise WallError(f"template: the init's interpreter {real} is not under /usr",
                        rule="template")  # fmt: skip
    libdir, loader = _host_loader()
    launch = f"import sys;sys.path.insert(0,{INIT_DIR_INSIDE!r});import sandbox_init as m;m.main()"
    return [
        *argv, "--", host_usr + loader.removeprefix("/usr"), "--library-path",
        host_usr + libdir.removeprefix("/usr"), host_usr + real.removeprefix("/usr"),
        "-I", "-S", "-c", launch,
    ]  # fmt: skip


def _host_loader() -> tuple[str, str]:
    """(the host's library dir, its dynamic loader), both under /usr."""
    from ..policy._compile import _elf_interpreter

    loader = _elf_interpreter(os.path.realpath(PYTHON_FOR_INIT))
    if not loader or not loader.startswith("/usr/"):
        raise WallError(f"template: the host's loader ({loader}) is not under /usr",
                        rule="template")  # fmt: skip
    return os.path.dirname(loader), loader


def _identity_inside(plan: LaunchPlan) -> list[str]:
    """The identity files the sandbox has: always without a template; with one,
    those it has or that glassroom binds (see _template_tail)."""
    if plan.root is None:
        return ["/etc/passwd", "/etc/group"]
    etc = Path(plan.root) / "etc"
    return [f"/etc/{n}" for n in ("passwd", "group")
            if (etc / n).is_file() or not os.path.lexists(etc)]  # fmt: skip


def init_config(plan: LaunchPlan) -> dict[str, Any]:
    read = [r.path for r in plan.fs_rules if r.access == "read"] + _identity_inside(plan)
    write = [r.path for r in plan.fs_rules if r.access == "write"]
    execute = sorted({t.path for t in plan.tools} | set(plan.loaders))
    lim = plan.limits
    return {
        "op": "config",
        "read": sorted(set(read)),
        "write": write,
        "execute": execute,
        "devices": ["/dev"],
        "listable": ["/"],
        "rlimits": {
            "RLIMIT_FSIZE": lim.disk_bytes,
            "RLIMIT_CORE": 0,
            "RLIMIT_NOFILE": 1024,
        },
        **_net_config(plan),
    }


def _net_config(plan: LaunchPlan) -> dict[str, Any]:
    """The proxy bridge and the direct-attempt watch, for the init (``_sys/init_net.py``)."""
    out: dict[str, Any] = {}
    if plan.network.mode == "proxy":
        out["forward"] = {"port": PROXY_PORT_INSIDE, "socket": f"{EGRESS_DIR_INSIDE}/proxy.sock"}
    # Always: besides direct network attempts it answers the profile's notify
    # entries (setuid/setgid modes: EPERM and a deny record), left out of the
    # bwrap-loaded profile for that reason (see seccomp.compile_bpf).
    out["netwatch"] = netwatch.filter_program(plan.network.watch_direct, plan.seccomp_profile)
    if plan.audit_level != "actions":  # file/exec audit (_sys/tracer.py)
        out["trace"] = tracewatch.filter_program(plan.audit_level)
    return out


class NamespacesBackend:
    name: ClassVar[str] = "namespaces"
    risks: ClassVar[Sequence[str]] = ("low",)

    def start(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> NamespacesInstance:
        inst = NamespacesInstance(plan, sandbox_id, on_event)
        return started(inst, inst.build)

    def restore(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink, src: Path,
                checkpoint: Checkpoint) -> NamespacesInstance:  # fmt: skip
        raise SnapshotError(NO_PROCESS_STATE, rule="snapshot.memory")


#: Why this tier saves no process state (docs/snapshots.md).
NO_PROCESS_STATE = (
    "the namespaces tier cannot save process state: CRIU restores neither the "
    "sandbox's Landlock domain nor its seccomp filter with a notify listener, so the "
    "processes would come back without their walls; pause() freezes them in place "
    "instead, and snapshots of this tier hold files only"
)


class NamespacesInstance(InstanceBase, FileOps):
    """One running sandbox: bwrap + init + cgroups, driven over the channel."""

    def __init__(self, plan: LaunchPlan, sandbox_id: str, on_event: EventSink) -> None:
        super().__init__(plan, sandbox_id, on_event)
        self.child_pid: int | None = None
        self.channel: Channel | None = None
        #: When freeze() stopped it (a pause), or None.
        self._frozen_at: float | None = None
        self._reader: threading.Thread | None = None
        self._pidfd: int | None = None
        self._netwatch: netwatch.NetWatch | None = None
        self._trace: tracewatch.TraceWatch | None = None
        self._said: str | None = None  # bwrap's last words, once read
        self._lock = threading.Lock()
        self._disk: scratch.ScratchMount | None = None
        self._gates = Gates(plan, sandbox_id, on_event)

    # -- construction ------------------------------------------------------

    def build(self) -> None:
        """Build the walls and start the init; if bwrap died saying why (a
        mount it could not make), that is the error, not what failed next
        (a cgroup write, the pidfd, the channel), which is only a symptom."""
        try:
            self._build()
        except Exception as exc:
            said = self._bwrap_said()
            if said:
                raise WallError(f"namespaces: bwrap failed: {said}", rule="namespaces") from exc
            raise

    def _build(self) -> None:
        init_bin = choose_init(self.state)
        init_dir = install_init(self.state)
        self.walls["init"] = "compiled" if init_bin is not None else "python"
        if _config.is_root():
            # bwrap runs as the sandbox uid and binds the init from here: a
            # 0700 dir above the state dir (any mktemp -d) stops it, and the
            # failure would otherwise surface as a cgroup error once it died.
            uid, gid = _config.sandbox_ids()
            why = _reach.blocker(init_dir / INIT_FILES[0], uid, gid)
            if why is None and init_bin is not None:
                why = _reach.blocker(init_bin, uid, gid)
            if why is not None:
                raise WallError(f"state dir {self.state} is not reachable by the sandbox: {why} "
                                "(set GLASSROOM_STATE_DIR to a dir it can search)",
                                rule="state_dir")  # fmt: skip
        if self.plan.audit_level != "actions":
            # Started first: its interpreter starts while bwrap builds the walls.
            self._trace = tracewatch.TraceWatch(
                self.plan.audit_level, self._trace_sink(), self.sandbox_id,
                program=init_dir / "tracer.py", python=PYTHON_FOR_INIT,
                compiled=init_bin,  # its --tracer mode with the compiled init
                on_fail=self._audit_failed,
                run_as=_config.sandbox_ids() if _config.is_root() else None,
            )  # fmt: skip
        self._write_record()
        lim = self.plan.limits
        # Limits exist before any process of the sandbox does.
        # The files live on a scratch disk whose page cache is reclaimable, so
        # the memory cap is exactly resources.memory_mib.
        self.cg = cgroups.CgroupSet.create(
            self.sandbox_id,
            cgroups.CgroupLimits(memory_bytes=lim.memory_bytes, pids=lim.pids, cpus=lim.cpus),
            parent=_config.cgroup_parent(),
        )
        self.walls["cgroups"] = {
            "paths": list(self.cg.paths),
            "pids": lim.pids,
            "memory_bytes": lim.memory_bytes,
            "cpus": lim.cpus,
        }
        scratch_dirs = self._scratch()
        self._write_record()
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        try:
            sec_fd = seccomp.bpf_memfd(self.plan.seccomp_profile, notify_apart=True)
        except Exception as exc:
            close_quietly(info_r, info_w, block_r, block_w)
            raise WallError(f"seccomp: cannot compile filter: {exc}", rule="seccomp") from exc
        boot_fd = os.memfd_create("boot_id", os.MFD_CLOEXEC)
        os.write(boot_fd, f"{uuid.uuid4()}\n".encode())
        os.lseek(boot_fd, 0, os.SEEK_SET)
        fds = {"info": info_w, "block": block_r, "seccomp": sec_fd, "boot_id": boot_fd}
        if self._gates.needed:  # writable host dirs: through their gates only
            self._write_record()
            self.walls["write_gate"] = self._gates.start()
        argv = bwrap_argv(self.plan, init_dir, fds, scratch_dirs, self._gates.staging, init_bin)
        argv.append(str(child_sock.fileno()))
        uid, gid = _config.sandbox_ids()
        as_root = _config.is_root()
        try:
            run_argv, as_ids = proc.as_user(argv, (uid, gid) if as_root else None)
            self.proc = subprocess.Popen(
                run_argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={},
                cwd="/",
                pass_fds=(info_w, block_r, sec_fd, boot_fd, child_sock.fileno()),
                close_fds=True,
                **as_ids,
            )
        except BaseException:
            close_quietly(info_r, block_w)
            raise
        finally:
            close_quietly(info_w, block_r, sec_fd, boot_fd)
            child_sock.close()
        try:
            info = self._read_info(info_r)
            self.child_pid = int(info["child-pid"])
            self._pidfd = os.pidfd_open(self.child_pid)  # it is blocked: alive for sure
            self._write_record()
            self.cg.add_pid(self.child_pid)
        except BaseException:
            # Never release a sandbox that is not inside its limits: kill it
            # while it is still blocked (EOF on block-fd would release it).
            # Its pid 1 must die first: killing only the outer bwrap would
            # orphan it, and the closed block-fd would then let it run.
            if self._pidfd is None:
                self._learn_child(info_r)
            self.kill()
            close_quietly(block_w)
            raise
        finally:
            close_quietly(info_r)
        os.write(block_w, b"1")
        close_quietly(block_w)
        self.walls.update({
            "namespaces": ["user", "mount", "pid", "net", "ipc", "uts", "cgroup"],
            "userns_nested": "disabled",
            "uid_map": f"inside {_config.INSIDE_UID} -> host {uid}",
            "capabilities": "none",
            "no_new_privs": True,
            "seccomp": {"profile": self.plan.seccomp_profile,
                        "rules": _profile_size(self.plan.seccomp_profile)},
            "mounts": [f"{m.kind} {m.target}" for m in self.plan.mounts],
            "network": "private netns, loopback only",
        })  # fmt: skip
        self.channel = Channel(parent_sock, self._violation)
        try:
            self.channel.send(init_config(self.plan))
        except RequestTooLarge as exc:  # a policy of very many paths
            raise WallError(f"init: {exc}", rule="init") from None
        ready = self._await_ready(parent_sock)
        self.walls["landlock"] = {
            "abi": ready["landlock_abi"],
            "tools": [t.path for t in self.plan.tools],
        }
        self.walls["rlimits"] = init_config(self.plan)["rlimits"]
        self._attach_netwatch(ready)
        self._attach_tracer()
        if self._disk is not None:  # the sandbox holds its own mounts of the disk now
            self._disk.detach_soon()
        self._gates.detach()  # likewise its binds of the gates: none stay on the host
        self._reader = threading.Thread(
            target=self._read_loop, name=f"glassroom-{self.sandbox_id}", daemon=True
        )
        self._reader.start()

    def _scratch(self) -> dict[str, str] | None:
        """/workspace and /tmp: dirs of one ext4 scratch disk of disk_mib (as root).

        Unprivileged glassroom cannot mount a loop device: the two are then
        tmpfs, whose pages are charged to the sandbox's memory cgroup and
        cannot be reclaimed, so files and memory share resources.memory_mib
        (both caps still hold; the task just cannot use both in full).  The
        walls say which; see docs/backends.md.
        """
        lim = self.plan.limits
        targets = {m.target: m.mode or 0o755 for m in self.plan.mounts if m.kind == "scratch"}
        if not targets:
            return None
        if not _config.is_root():
            self.walls["workspace"] = {
                "kind": "tmpfs (unprivileged: no loop device)",
                "counts_in": "resources.memory_mib", "disk_bytes": lim.disk_bytes,
            }  # fmt: skip
            return None
        names = {t: t.strip("/").replace("/", "_") for t in targets}
        self._disk = scratch.ScratchMount.create(
            _config.scratch_dir(), self.sandbox_id, lim.disk_bytes, _config.sandbox_ids(),
            {names[t]: mode for t, mode in targets.items()},
        )  # fmt: skip
        self.walls["workspace"] = {
            "kind": "ext4 scratch disk (loop device), private to the sandbox's mount namespace",
            "holds": sorted(targets), "disk_bytes": lim.disk_bytes,
            "counts_in": "resources.disk_mib (its page cache is reclaimable)",
        }  # fmt: skip
        return {t: self._disk.path(names[t]) for t in targets}

    def _attach_netwatch(self, ready: dict[str, Any]) -> None:
        """Take the init's seccomp listener: direct network attempts get logged."""
        fd = ready.get("netwatch_fd")
        net = self.plan.network
        self.walls["network"] = (
            f"private netns, loopback only; proxy on 127.0.0.1:{PROXY_PORT_INSIDE}"
            if net.mode == "proxy" else "private netns, loopback only"
        )  # fmt: skip
        if fd is None or self.child_pid is None:  # it also refuses setuid/setgid modes
            raise WallError("filesystem.setuid: the init installed no seccomp listener",
                            rule="filesystem.setuid")  # fmt: skip
        rule = "network.direct" if net.mode == "proxy" else net.rule

        def report(info: dict[str, Any]) -> None:
            info["reason"] = ("no route: the only way out is the egress proxy"
                              if net.mode == "proxy" else "no network: loopback only")  # fmt: skip
            self.on_event("network.direct", info, "deny", rule)

        try:
            self._netwatch = netwatch.attach(self.child_pid, fd, report, self.sandbox_id,
                                             self._refused, self.plan.seccomp_profile)
        except OSError as exc:
            why = f"network: cannot watch direct attempts: {exc}"
            raise WallError(why, rule="network") from exc
        finally:
            assert self.channel is not None
            self.channel.send({"op": "netwatch-taken", "fd": fd})
        self.walls["network_watch"] = (
            "seccomp user notification: " + ("connect, sendto, sendmsg, raw; " if
            net.watch_direct else "") + "setuid/setgid modes answered EPERM")  # fmt: skip

    def _refused(self, rule: str, details: dict[str, Any]) -> None:
        """A call the watch answered with an errno (a setuid/setgid mode)."""
        self.on_event("blocked", {"action": details.get("syscall", "?"), **details}, "deny", rule)

    def _trace_sink(self) -> Callable[[list[tracewatch.Record]], None]:
        many = getattr(self.on_event, "many", None)
        if many is not None:
            return cast("Callable[[list[tracewatch.Record]], None]", many)

        def one_by_one(batch: list[tracewatch.Record]) -> None:
            for event, details, decision, rule in batch:
                self.on_event(event, details, decision, rule)

        return one_by_one

    def _audit_failed(self, why: str) -> None:
        """Fail closed: a sandbox whose calls can no longer be logged dies."""
        if self.dead_reason is None:
            self.dead_reason = f"audit.level: {why}"
        self.kill()

    def _attach_tracer(self) -> None:
        """Seize the init before it gets any request: every command is traced."""
        if self._trace is None or self.child_pid is None:
            return
        pid = netwatch.init_host_pid(self.child_pid)
        if pid is None:
            raise WallError("audit.level: cannot find the sandbox's init to trace",
                            rule="audit.level")  # fmt: skip
        self._trace.attach(pid)
        cpus = self._trace.pin(pid, self.plan.limits.cpus)
        names = sorted(set(tracewatch.syscall_table(self.plan.audit_level).values()))
        self.walls["file_audit"] = {
            "level": self.plan.audit_level,
            "how": "ptrace on seccomp RET_TRACE (observe only; EXITKILL)",
            "tracer": self.walls["init"],
            "syscalls": names,
            "cpus": cpus,
        }

    def _learn_child(self, info_r: int) -> None:
        """On a failed start, find bwrap's child (if it exists) so kill() reaches it."""
        with contextlib.suppress(Exception):
            info = self._read_info(info_r, timeout=2.0)
            self.child_pid = int(info["child-pid"])
            self._pidfd = os.pidfd_open(self.child_pid)

    def _read_info(self, fd: int, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        buf = b""
        end = time.monotonic() + timeout
        while True:
            r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            if not r:
                raise WallError(
                    "namespaces: bwrap did not report its child in time", rule="namespaces"
                )
            chunk = os.read(fd, 4096)
            buf += chunk
            try:
                return dict(json.loads(buf))
            except ValueError:
                if not chunk:
                    raise WallError(
                        f"namespaces: bwrap failed: {self._bwrap_stderr()}", rule="namespaces"
                    ) from None

    def _bwrap_said(self) -> str:
        """bwrap's last line on stderr once it has exited, or "".

        Read once and kept: more than one failure path asks, and a second
        read of the pipe would find it empty.  A bwrap still running after a
        short wait is not the cause: it stays up as long as the sandbox does.
        """
        if self._said is not None:
            return self._said
        if self.proc is None or self.proc.stderr is None or self.proc.stderr.closed:
            return ""
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return ""
        fd, err = self.proc.stderr.fileno(), b""
        os.set_blocking(fd, False)
        end = time.monotonic() + 1.0  # bounded: a grandchild could hold the pipe open
        while len(err) < 65536 and select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        lines = err.decode(errors="replace").strip().splitlines()
        self._said = lines[-1] if lines else ""
        return self._said

    def _bwrap_stderr(self) -> str:
        assert self.proc is not None
        return self._bwrap_said() or f"exit status {self.proc.returncode}"

    def _await_ready(self, sock: socket.socket) -> dict[str, Any]:
        assert self.channel is not None
        sock.settimeout(START_TIMEOUT_S)
        try:
            msg = self.channel.recv_one()
        except (TimeoutError, OSError) as exc:
            raise WallError(f"init: no answer from the sandbox ({exc})", rule="init") from None
        except ProtocolViolation as exc:
            raise WallError(f"init: {exc}", rule="init") from None
        finally:
            sock.settimeout(None)
        if msg is None:
            raise WallError(
                f"init: sandbox exited during start: {self._bwrap_stderr()}", rule="init"
            )
        if msg["op"] == "fatal":
            wall = msg.get("wall", "init")
            raise WallError(f"{wall}: {msg.get('error', 'failed')}", rule=wall)
        if msg["op"] != "ready":
            raise WallError(f"init: unexpected first reply {msg['op']!r}", rule="init")
        return msg

    def _write_record(self) -> None:
        self._save_record(
            "namespaces", [self.proc.pid if self.proc else None, self.child_pid],
            cgroup={"name": self.sandbox_id, "parent": _config.cgroup_parent()},
            # The egress dir (proxy socket, CA cert) goes with the sandbox.
            paths=[self.plan.network.host_dir] if self.plan.network.host_dir else [],
            gates=self._gates.dirs(),  # unmounted and rmdir'ed, never deleted through
            # The scratch disk's host mount, until the sandbox holds its own.
            scratch=[str(self._disk.mountpoint)] if self._disk is not None else [],
        )  # fmt: skip

    # -- the reader thread: replies, deadline -------------------------------

    def _anomaly(self, what: str) -> None:
        self._violation(what)

    def _unanswered(self, timeout_s: float | None) -> None:
        end_unanswered(self, timeout_s)

    def _violation(self, what: str) -> None:
        self.on_event(
            "anomaly",
            {"reason": "protocol violation by sandbox init", "detail": what},
            "deny",
            "init.protocol",
        )

    def _read_loop(self) -> None:
        """Route replies and enforce the deadline until the sandbox ends.

        Whatever ends this loop (EOF, a protocol violation, an unexpected
        error) also ends the sandbox: without this thread nothing would
        enforce the deadline, so the sandbox must not outlive it.
        """
        assert self.channel is not None
        reason = "sandbox exited"
        try:
            reason = self._pump()
        except Exception as exc:  # fail closed: log it, then kill below
            reason = f"supervisor error: {type(exc).__name__}"
            self._violation(f"reader stopped: {exc!r}")
        finally:
            if self.dead_reason is None:  # an audit failure said why first
                self.dead_reason = reason
            self.kill()
            self.channel.close(reason)

    def _pump(self) -> str:
        assert self.channel is not None
        sock = self.channel.sock
        while True:
            remaining = self.deadline - time.monotonic()
            if self._frozen_at is not None:  # frozen time does not count (thaw moves it)
                remaining = max(remaining, 0.5)
            if remaining <= 0:
                return self._expired()
            try:
                r, _, _ = select.select([sock], [], [], min(remaining, 3600))
            except (OSError, ValueError):
                return "channel closed"
            if not r:
                continue
            try:
                msg = self.channel.recv_one()
            except ProtocolViolation as exc:
                self._violation(str(exc))
                return "protocol violation"
            except OSError:
                return "channel closed"
            if msg is None:
                return "sandbox exited"
            self.channel.dispatch(msg)

    # -- operations ---------------------------------------------------------

    def _request(self, msg: dict[str, Any], fds: Sequence[int]) -> tuple[int, Any]:
        if self.channel is None or self._destroyed is not None:
            raise SandboxClosed("the sandbox has been destroyed")
        rid, q = self.channel.new_request()
        msg["id"] = rid
        try:
            self.channel.send(msg, list(fds))
        except RequestTooLarge as exc:
            # Nothing reached the init, which runs on: answered here as the init
            # answers an op it cannot start (an exec: as execve's E2BIG).
            q.put({"op": "error", "id": rid, "errno": errno.E2BIG, "error": str(exc)})
        return rid, q

    def spawn(self, req: ExecRequest) -> NamespacesProcess:
        """A background process (see ``_spawn``); ``exec`` stays the fast blocking path."""
        from ._spawn import spawn

        return spawn(self, req)

    def exec(self, req: ExecRequest) -> ExecResult:
        start = time.monotonic()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        msg = {"op": "exec", "argv": list(req.argv), "env": dict(req.env), "cwd": req.cwd}
        try:
            rid, q = self._request(msg, [in_r, out_w, err_w])
        except SandboxClosed:
            close_quietly(in_r, in_w, out_r, out_w, err_r, err_w)
            raise self._closed_error() from None
        close_quietly(in_r, out_w, err_w)
        assert self.channel is not None
        try:
            try:  # an init stopped before its "started" would hold this forever
                first = q.get(timeout=req.timeout_s + UNANSWERED_KILL_S if req.timeout_s else None)
            except queue.Empty:
                self._unanswered(req.timeout_s)
                first = q.get()  # "closed": the kill ends the channel
            if first["op"] == "closed":
                raise self._closed_error()
            if first["op"] == "error":
                said = exec_message(req.argv[0], first["errno"], first["error"])
                return ExecResult(
                    exit_code=126 if first["errno"] == errno.EACCES else 127,
                    signal=None, stdout=b"", stderr=said.encode(),
                    duration_ms=(time.monotonic() - start) * 1000, truncated=False,
                    exec_errno=first["errno"], exec_error=first["error"],
                )  # fmt: skip
            return self._collect(rid, q, req, start, in_w, out_r, err_r)
        finally:
            self.channel.forget(rid)
            close_quietly(in_w, out_r, err_r)
            if self._trace is not None:  # its calls are logged before its end is
                self._trace.sync()

    def _collect(self, rid: int, q: Any, req: ExecRequest, start: float,
                 in_w: int, out_r: int, err_r: int) -> ExecResult:  # fmt: skip
        """Feed stdin, read bounded output, wait for the exit; enforce the timeout."""
        stdin = memoryview(req.stdin or b"")
        # exec() closes in_w/out_r/err_r once, at the end; here they are only
        # released (release_quietly), never closed twice.
        if not stdin:
            release_quietly(in_w)
            in_w = -1
        else:
            os.set_blocking(in_w, False)
        bufs: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}
        open_fds = {out_r, err_r}
        budget = req.max_output_bytes
        truncated = timed_out = False
        exit_msg: dict[str, Any] | None = None
        exit_seen_at = 0.0
        run_deadline = start + req.timeout_s if req.timeout_s else None
        poller = select.poll()
        for fd in open_fds:
            poller.register(fd, select.POLLIN)
        if in_w >= 0:
            poller.register(in_w, select.POLLOUT)
        while True:
            if exit_msg is None:
                with contextlib.suppress(queue.Empty):
                    exit_msg = _as_exit(q.get_nowait())
                    exit_seen_at = time.monotonic()
            now = time.monotonic()
            if exit_msg is not None and (not open_fds or now - exit_seen_at > EXIT_GRACE_S):
                break
            if run_deadline and now > run_deadline and not timed_out:
                timed_out = True
                with contextlib.suppress(SandboxClosed):
                    assert self.channel is not None
                    self.channel.send({"op": "signal", "target": rid, "sig": int(signal.SIGKILL)})
            if (timed_out and exit_msg is None and run_deadline
                    and now > run_deadline + UNANSWERED_KILL_S):  # fmt: skip
                self._unanswered(req.timeout_s)
                run_deadline = None  # once: the channel's close is the exit now
            if exit_msg is None and not open_fds and in_w < 0:
                # Only the exit is missing: block on it (bounded by the timeout).
                wait = 1.0 if run_deadline is None else max(0.0, run_deadline - now) + 0.01
                with contextlib.suppress(queue.Empty):
                    exit_msg = _as_exit(q.get(timeout=wait))
                    exit_seen_at = time.monotonic()
                continue
            wait_ms = 2 if exit_msg is not None else 50
            for fd, ev in poller.poll(wait_ms):
                if fd == in_w:
                    try:
                        n = os.write(in_w, stdin[:65536])
                        stdin = stdin[n:]
                    except OSError:
                        stdin = memoryview(b"")
                    if not stdin:
                        poller.unregister(in_w)
                        release_quietly(in_w)
                        in_w = -1
                    continue
                chunk = os.read(fd, 65536) if ev & (select.POLLIN | select.POLLHUP) else b""
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                if len(chunk) > budget:
                    chunk, truncated = chunk[:budget], True
                budget -= len(chunk)
                bufs[fd] += chunk
                if truncated:
                    # Over the output cap: stop reading; the writer gets EPIPE.
                    for f in list(open_fds):
                        poller.unregister(f)
                        release_quietly(f)
                    open_fds.clear()
                    break
        if in_w >= 0:
            release_quietly(in_w)
        sig = exit_msg.get("signal")
        code = exit_msg.get("code")
        exit_code = 128 + sig if sig else int(code or 0)
        limits = ["output"] if truncated else []
        if exit_msg.get("closed") and self.killed_by_deadline:
            limits.append("max_runtime")
        return ExecResult(
            exit_code=exit_code, signal=sig, stdout=bytes(bufs[out_r]), stderr=bytes(bufs[err_r]),
            duration_ms=(time.monotonic() - start) * 1000, truncated=truncated,
            timed_out=timed_out or bool(exit_msg.get("closed") and self.killed_by_deadline),
            limits_hit=limits,
        )  # fmt: skip

    def cgroup_stats(self) -> dict[str, int]:
        if self.cg is None:
            return {}
        try:
            return self.cg.stats()
        except OSError:
            return {}

    def workspace_usage(self) -> tuple[int, int] | None:
        """(used, total) bytes of the workspace tmpfs, seen through /proc/PID/root."""
        if not self.child_pid:
            return None
        try:
            st = os.statvfs(f"/proc/{self.child_pid}/root{self.plan.workspace}")
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        return total - st.f_bavail * st.f_frsize, total

    # -- files --------------------------------------------------------------

    def _file_op(self, kind: str, path: str, *, data: bytes | None = None,
                 max_bytes: int = 0, mode: int = 0o644) -> bytes:  # fmt: skip
        if not path.startswith("/"):
            path = f"{self.plan.workspace}/{path}"
        r, w = os.pipe2(os.O_CLOEXEC)
        give, keep = (r, w) if kind == "write" else (w, r)
        msg = {"op": "file", "kind": kind, "path": path, "max": max_bytes, "mode": mode}
        try:
            rid, q = self._request(msg, [give])
        except SandboxClosed:
            close_quietly(r, w)
            raise self._closed_error() from None
        close_quietly(give)
        out = bytearray()
        try:
            # Every wait below is bounded (FILE_OP_TIMEOUT_S): an init that never
            # answers is an anomaly and a SandboxError, not a hung caller.
            first = self._file_reply(q, kind, path)
            if first["op"] == "closed":
                raise self._closed_error()
            if first["op"] == "error":
                raise path_error(kind, path, first["errno"], first["error"])
            os.set_blocking(keep, False)
            if kind == "write":
                view = memoryview(data or b"")
                try:
                    while view:
                        try:
                            view = view[os.write(keep, view[: 1 << 16]) :]
                        except BlockingIOError:
                            self._file_ready(keep, kind, path, write=True)
                except BrokenPipeError:
                    pass
                release_quietly(keep)  # EOF for the reader; closed once, below
            else:
                while True:
                    try:
                        chunk = os.read(keep, 1 << 16)
                    except BlockingIOError:
                        self._file_ready(keep, kind, path, write=False)
                        continue
                    if not chunk:
                        break
                    out += chunk
            done = self._file_reply(q, kind, path)
            if done["op"] == "closed":
                raise self._closed_error()
            code = done.get("code") or 0
            if code:
                raise path_error(kind, path, code, os.strerror(code))
        except FileOpStalled:
            if self.channel is not None:  # its child, if it got one, goes too
                with contextlib.suppress(SandboxClosed):
                    self.channel.send({"op": "signal", "target": rid, "sig": int(signal.SIGKILL)})
            raise
        finally:
            close_quietly(keep)
        return bytes(out)

    # -- pause ----------------------------------------------------------------

    def checkpoint(self, dest: Path, *, leave_running: bool) -> Checkpoint:
        raise SnapshotError(NO_PROCESS_STATE, rule="snapshot.memory")

    def freeze(self) -> None:
        """The cgroup freezer stops every task of the sandbox where it stands."""
        if self.cg is None:
            raise SnapshotError(
                "namespaces: this sandbox has no cgroups (glassroom is not root here), "
                "so it cannot be frozen; pause(memory=False) keeps its files",
                rule="snapshot.freeze",
            )
        self._frozen_at = time.monotonic()
        try:
            self.cg.freeze()
        except WallError as exc:
            self._frozen_at = None
            raise SnapshotError(f"namespaces: {exc}", rule="snapshot.freeze") from None

    def thaw(self) -> None:
        """Run again; the time spent frozen is added to the max-runtime deadline."""
        if self.cg is not None:
            self.cg.thaw()
        if self._frozen_at is not None:
            self.deadline += time.monotonic() - self._frozen_at
            self._frozen_at = None

    # -- teardown -----------------------------------------------------------

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.dead_reason is None

    def kill(self) -> None:
        """SIGKILL the sandbox's pid 1: the kernel then kills its whole pid namespace.

        The outer bwrap is left to reap pid 1 and exit by itself (killing it
        first would leave pid 1 a zombie of the host's init); it is killed
        only if it does not exit promptly.
        """
        self._gates.abort()  # a stuck gate request would make the kill wait (_gates.py)
        with self._lock:
            if self._pidfd is not None:
                # Through a pidfd: a recycled pid can never be hit.
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            if self._frozen_at is not None and self.cg is not None:
                # A frozen task dies only once thawed (v1 freezer); the signal is
                # already pending, so it wakes only to die.
                with contextlib.suppress(OSError, WallError):
                    self.cg.thaw()
                self._frozen_at = None
            if self.proc is not None and self.proc.poll() is None:
                try:
                    proc.wait_exit(self.proc, 2.0 if self.child_pid else 0)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(OSError):
                        self.proc.kill()
            if self.cg is not None:
                # A survivor shows up in the receipt's leftovers; kill() itself
                # must not raise (it runs on the deadline thread too).
                with contextlib.suppress(OSError, WallError):
                    self.cg.kill_all(timeout=5.0)

    def _teardown(self, removed: dict[str, Any]) -> None:
        if self.proc is not None:
            try:
                proc.wait_exit(self.proc, 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
            if self.proc.stderr:
                self.proc.stderr.close()
            removed["processes"] = {"bwrap": self.proc.pid, "sandbox_pid1": self.child_pid}
        if self.channel is not None:
            self.channel.close("destroyed")
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        with self._lock:  # kill() may run on another thread (deadline, audit failure)
            if self._pidfd is not None:
                close_quietly(self._pidfd)
                self._pidfd = None
        if self._netwatch is not None:
            self._netwatch.stop()
        if self._trace is not None:  # its last reports are logged before we return
            self._trace.close()
            removed["tracer"] = {"events": self._trace.events}
        if self.cg is not None:
            removed["cgroups"] = self.cg.remove()
        if self._disk is not None:
            self._disk.detach()  # if the start failed before the sandbox took it
            removed["workspace"] = ("ext4 scratch disk, unlinked and detached from the host: "
                                    "freed (loop device and all) with the mount namespace")
        else:
            removed["workspace"] = "tmpfs in the sandbox's mount namespace, freed with it"
        removed["mounts"] = "private mount namespace, released when its last process exited"
        if self._gates.needed:
            removed["write_gate"] = self._gates.close()

    def _leftovers(self) -> dict[str, list[str]]:
        left: dict[str, list[str]] = {"processes": [], "cgroups": [], "mounts": [], "state": []}
        for pid in (self.proc.pid if self.proc else None, self.child_pid):
            if pid and proc.process_start_time(pid) is not None:
                left["processes"].append(str(pid))
        if self.cg is not None:
            left["cgroups"] = [p for p in self.cg.paths if os.path.isdir(p)]
        left["mounts"] = proc.mounts_under(f"/proc/{self.child_pid}/") if self.child_pid else []
        left["mounts"] += [m for m in proc.mounts_under("/") if self.sandbox_id in m]
        if self.record_path.exists():
            left["state"].append(str(self.record_path))
        return left


@functools.lru_cache(maxsize=8)
def _profile_size(name: str) -> int:
    return len(seccomp.load_profile(name))


def _as_exit(msg: dict[str, Any]) -> dict[str, Any]:
    """A "closed" wake-up means the whole sandbox died: report it as SIGKILL."""
    if msg["op"] == "closed":
        return {"op": "exit", "code": None, "signal": int(signal.SIGKILL), "closed": True}
    return msg
