"""runsc discovery, platform choice and the OCI bundle for the ``gvisor`` tier.

The plan means the same on gVisor as on ``namespaces``; only the mechanism
differs, and where it does the reason is written here:

* **Visible paths.** The bundle's root is an empty, read-only directory;
  the plan's read paths are read-only binds, its write paths read-write
  binds, ``/dev/shm`` is a tmpfs, ``/tmp`` and ``/workspace`` are binds of
  the sandbox's scratch disk (see ``spec_mounts``).  runsc always adds
  ``/sys``: an empty read-only tmpfs covers it.
* **Tools allowlist.** Landlock does not exist inside gVisor
  (``landlock_create_ruleset`` returns ENOSYS), but gVisor honours
  ``noexec``.  Every bind and tmpfs is ``noexec``; each allowed tool (its
  resolved file) and its ELF loader is then bound again on top of itself
  *without* ``noexec``.  execve of anything else fails with EACCES, from a
  shell too, exactly as Landlock's EXECUTE rule makes it fail.  The init
  itself is the compiled one (``INIT_BIN_INSIDE``, static: no loader, no
  /usr; it runs only as the container's pid 1) or the Python one, started
  through its interpreter's loader (``init_argv``).
* **Identity.** The container process is uid/gid 1000 inside the sentry.
  That uid exists only in gVisor's kernel: the sentry itself runs as host
  uid 65534 in a new user namespace (runsc does this whenever it is
  started as root), so no sandboxed code ever runs as a host uid at all.
  The gofer (runsc's file proxy) runs as host root, chrooted to the bundle
  root and under runsc's own seccomp filter: it is part of the trusted
  runsc, like bubblewrap on the namespaces tier.
* **Seccomp.** The namespaces tier's deny-list is loaded by the init inside
  the sentry as well (gVisor implements seccomp-bpf for its processes), so
  ptrace, mount, unshare(CLONE_NEWUSER), TIOCSTI... fail the same way.
* **A compatibility shim, not a wall.** Debian's runsc (20221219) rejects
  the AT_NO_AUTOMOUNT flag in ``statx``/``newfstatat`` with EINVAL, which
  coreutils 9 always passes (so ``ls`` fails).  A 20-line preload library
  (``COMPAT_SHIM_C``, built once with the host's ``cc``) drops that flag,
  which means nothing under gVisor (it has no automounts).  The init puts
  it in ``LD_PRELOAD`` of every command; it is mapped, never executed, so
  the tools allowlist is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .. import _config
from .._errors import BackendUnavailable, PlanError
from ..audit._events import syscalls_for
from ..plan import EGRESS_DIR_INSIDE, LaunchPlan, Mount
from ..policy._template import HOST_USR_INSIDE, INIT_ENV_UNDER_TEMPLATE

INIT_DIR_INSIDE = "/.glassroom"
#: Where the compiled init (``_sys/agent``, static; run as ``--stream``) is bound,
#: read-only and executable, when it runs (``GLASSROOM_INIT``, as on namespaces).
INIT_BIN_INSIDE = "/.glassroom-init"
PYTHON_FOR_INIT = "/usr/bin/python3"
#: Every runsc call has a timeout: a wedged runsc (kvm on PVM) must never hang us.
PROBE_TIMEOUT_S = 10.0
PLATFORMS = ("systrap", "ptrace", "kvm")
#: Syscalls whose trace feeds the audit log (and the pids-limit counter) at
#: ``[audit] level = "actions"``; the other levels add ``syscalls_for(level)``.
STRACE_SYSCALLS = (
    "execve", "execveat", "open", "openat", "creat", "socket", "connect", "sendto", "sendmsg",
    "fork", "vfork", "clone", "clone3",
)  # fmt: skip
#: Also traced at files/syscalls: they tell each process's cwd, so a relative
#: path of a call without a dirfd (``rename("a", "b")``) is logged absolute.
STRACE_CWD = ("chdir", "fchdir")
#: runsc refuses to boot when ``--strace-syscalls`` names a syscall its strace
#: table lacks (``enabling strace: syscall "X" not found``), so the names are
#: probed once per runsc binary (:func:`strace_unknown`) and the unknown ones
#: dropped (and listed in the sandbox's walls).  Debian's runsc 20221219 lacks
#: ``openat2`` and ``fchmodat2`` (its sentry answers both with ENOSYS, so no
#: access is missed) and ``faccessat2`` (implemented: at level ``syscalls`` an
#: access check made with it is not logged on that runsc).
#: Also dropped when the probe cannot tell (a run that fails for another reason).
STRACE_MAYBE_UNKNOWN = ("openat2", "fchmodat2", "faccessat2")
_STRACE_NOT_FOUND = re.compile(r'enabling strace: syscall \\?"(\w+)\\?" not found')
#: Files the stream-mode init needs inside (copied to the state dir).
INIT_FILES = ("sandbox_init.py", "landlock.py", "init_stream.py", "init_net.py")


def runsc_path() -> str:
    """runsc on PATH (a newer one wins), else Debian's; BackendUnavailable if none.

    ``GLASSROOM_RUNSC`` (supervisor-side) names one binary explicitly.
    """
    forced = os.environ.get("GLASSROOM_RUNSC")
    if forced is not None:
        if not os.access(forced, os.X_OK):
            raise BackendUnavailable(f"gvisor: runsc not found at GLASSROOM_RUNSC={forced}",
                                     rule="backend.gvisor")  # fmt: skip
        return forced
    path = shutil.which("runsc") or next(
        (p for p in ("/usr/bin/runsc", "/usr/sbin/runsc") if os.access(p, os.X_OK)), None
    )
    if not path:
        raise BackendUnavailable(
            "gvisor: runsc is not installed (apt-get install runsc)", rule="backend.gvisor"
        )
    return path


@functools.lru_cache(maxsize=4)
def _runsc_info(path: str, _mtime: int) -> tuple[str, frozenset[str]]:
    """(version line, platforms this runsc knows), from its own help text."""
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S, check=False).stdout  # fmt: skip
        flags = subprocess.run([path, "flags"], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"gvisor: runsc does not answer: {exc}",
                                 rule="backend.gvisor") from None  # fmt: skip
    text = flags.stdout + flags.stderr
    known = frozenset(p for p in PLATFORMS if p in text.split("-platform", 1)[-1][:300])
    return (ver.splitlines() or ["runsc (unknown version)"])[0].strip(), known


def runsc_info() -> tuple[str, str, frozenset[str]]:
    path = runsc_path()
    version, known = _runsc_info(path, int(os.stat(path).st_mtime))
    return path, version, known


def strace_syscalls(level: str) -> tuple[str, ...]:
    """Every name ``--strace-syscalls`` gets at ``level`` (before dropping unknown ones)."""
    if level == "actions":
        return STRACE_SYSCALLS
    return tuple(dict.fromkeys((*STRACE_SYSCALLS, *syscalls_for(level), *STRACE_CWD)))


def strace_unknown(platform: str) -> frozenset[str]:
    """The names of ``strace_syscalls("syscalls")`` this runsc's strace does not know."""
    path = runsc_path()
    return _strace_unknown(path, int(os.stat(path).st_mtime), platform)


@functools.lru_cache(maxsize=4)
def _strace_unknown(path: str, _mtime: int, platform: str) -> frozenset[str]:
    """Boot ``runsc do true`` with the whole list; drop each name it reports unknown.

    One run when runsc knows every name, one more per unknown name (about
    0.1 s each).  If a run fails for another reason, the names some runsc
    lacks (``STRACE_MAYBE_UNKNOWN``) are dropped as well: the sandbox then
    starts, or reports its own failure.
    """
    wanted = list(strace_syscalls("syscalls"))
    unknown: set[str] = set()
    for _ in range(len(wanted)):
        ok, text = _probe_strace(path, platform, wanted)
        if ok:
            break
        m = _STRACE_NOT_FOUND.search(text)
        if m is None or m.group(1) not in wanted:
            unknown |= set(STRACE_MAYBE_UNKNOWN) & set(wanted)
            break
        unknown.add(m.group(1))
        wanted.remove(m.group(1))
    return frozenset(unknown)


def _probe_strace(path: str, platform: str, names: list[str]) -> tuple[bool, str]:
    """(booted fine, the boot log) of ``runsc do true`` tracing ``names``."""
    import signal
    import tempfile

    root = tempfile.mkdtemp(prefix="glassroom-runsc-probe-")
    log = os.path.join(root, "boot.log")
    argv = [path, "--root", os.path.join(root, "state"), f"--platform={platform}",
            "--network=none", "--ignore-cgroups", f"--debug-log={log}", "--debug-command=boot",
            "--strace", "--strace-syscalls=" + ",".join(names), "do", "true"]  # fmt: skip
    code: int | None = None
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True,
                             cwd="/")  # fmt: skip
        try:
            code = p.wait(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with open(log, errors="replace") as f:
            return code == 0, f.read(1 << 20)
    except OSError:
        return code == 0, ""
    finally:
        shutil.rmtree(root, ignore_errors=True)


def platform_refusal(name: str) -> str | None:
    """Why ``name`` cannot work on this host (without trying it), or None."""
    if name == "kvm":
        from .._sys import probe

        kind, detail = probe.kvm()
        if kind != "real":
            return (
                f"platform kvm needs real KVM; here /dev/kvm is {kind} ({detail}), "
                "where runsc --platform=kvm hangs"
            )
    return None


def choose_platform() -> str:
    """systrap where this runsc has it, else ptrace; kvm only when asked and real.

    ``GLASSROOM_GVISOR_PLATFORM`` (a supervisor-side variable) picks one
    explicitly; a platform that cannot work is refused, never swapped.
    """
    _path, version, known = runsc_info()
    wanted = os.environ.get("GLASSROOM_GVISOR_PLATFORM", "").strip()
    if wanted:
        if wanted not in known:
            raise BackendUnavailable(
                f"gvisor: platform {wanted!r} is not supported by {version} "
                f"(it knows {', '.join(sorted(known)) or 'none'})",
                rule="backend.gvisor",
            )
        why = platform_refusal(wanted)
        if why:
            raise BackendUnavailable(f"gvisor: {why}", rule="backend.gvisor")
        return wanted
    for name in ("systrap", "ptrace"):
        if name in known:
            return name
    raise BackendUnavailable(f"gvisor: {version} offers neither systrap nor ptrace",
                             rule="backend.gvisor")  # fmt: skip


COMPAT_SHIM = "gvisor-compat.so"
COMPAT_SHIM_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
/* runsc 20221219 rejects AT_NO_AUTOMOUNT (EINVAL); gVisor has no automounts. */
int statx(int fd, const char *p, int fl, unsigned int m, struct statx *b) {
    return syscall(SYS_statx, fd, p, fl & ~AT_NO_AUTOMOUNT, m, b);
}
int fstatat(int fd, const char *p, struct stat *b, int fl) {
    return syscall(SYS_newfstatat, fd, p, b, fl & ~AT_NO_AUTOMOUNT);
}
int fstatat64(int fd, const char *p, struct stat64 *b, int fl) {
    return syscall(SYS_newfstatat, fd, p, b, fl & ~AT_NO_AUTOMOUNT);
}
"""


def _build_shim(dest: Path) -> bool:
    """Compile the compat shim into ``dest``; False when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    src = dest / "gvisor-compat.c"
    src.write_text(COMPAT_SHIM_C)
    res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(dest / COMPAT_SHIM), str(src)],
                         capture_output=True, timeout=60, check=False)  # fmt: skip
    return res.returncode == 0


def check_plan(plan: LaunchPlan, *, compiled: bool = False) -> None:
    """Rules this tier cannot honour are refused at compile time, by name.

    ``compiled``: the init is the static ``glassroom-init --stream``, which
    needs nothing of the sandbox's /usr."""
    if plan.root is not None or compiled:  # a template: the init's python3 is the host's
        return
    if not any(
        r.access == "read" and (r.path == "/usr" or PYTHON_FOR_INIT.startswith(r.path + "/"))
        for r in plan.fs_rules
    ):
        raise PlanError(
            "filesystem.read: the gvisor tier runs glassroom's Python init with the sandbox's "
            f"own {PYTHON_FOR_INIT}, so it must be visible; add /usr to filesystem.read "
            "(the compiled init needs none of it: `glassroom init build`)",
            rule="filesystem.read",
        )


@functools.lru_cache(maxsize=1)
def _init_exe() -> tuple[str, str]:
    from ..policy._compile import _elf_interpreter

    real = os.path.realpath(PYTHON_FOR_INIT)
    return real, _elf_interpreter(real) or ""


def init_loader() -> str:
    """The ELF loader of the init's interpreter: the one executable the policy may not list.

    gVisor applies ``noexec`` to the container's first process too, so the
    init's python3 (readable, but executable only if the policy allows it)
    is started *through its loader*, which maps it like a library.  The
    loader is therefore always executable on this tier; on the namespaces
    tier it is executable whenever any ELF tool is allowed (the usual case).
    """
    return _init_exe()[1]


def compiled_argv() -> list[str]:
    """How the compiled init starts: static, so no loader and no /usr."""
    return [INIT_BIN_INSIDE, "--stream"]


def init_argv(launch: str, template: bool = False) -> list[str]:
    """How the Python init starts.  With a template as ``/`` the host's /usr is bound
    at HOST_USR_INSIDE (no exec but its loader): the init's python3 is mapped by
    the host's loader with the host's library dir, so it needs nothing of the
    template's libc (as on the namespaces tier)."""
    real, loader = _init_exe()
    if not loader:
        raise BackendUnavailable(f"gvisor: cannot find the ELF loader of {real}",
                                 rule="backend.gvisor")  # fmt: skip
    if template:
        if not (real.startswith("/usr/") and loader.startswith("/usr/")):
            raise BackendUnavailable(f"gvisor: the init's {real} and {loader} must be under "
                                     "/usr to run a template", rule="template")  # fmt: skip
        libdir = os.path.dirname(loader)
        return [_hidden(loader), "--library-path", _hidden(libdir), _hidden(real),
                "-I", "-S", "-c", launch]  # fmt: skip
    return [loader, real, "-I", "-S", "-c", launch]


def _hidden(host_usr_path: str) -> str:
    """A host /usr path as the sandbox sees it under a template."""
    return HOST_USR_INSIDE + host_usr_path.removeprefix("/usr")


def install_init(state: Path) -> Path:
    """The stream-mode init's files, copied where runsc's gofer can read them."""
    src = Path(__file__).resolve().parent.parent / "_sys"
    dest = state / "gvisor" / "init"
    dest.mkdir(parents=True, exist_ok=True, mode=0o755)
    stamp = dest / ".stamp"
    digest = hashlib.sha256(
        b"".join((src / n).read_bytes() for n in INIT_FILES) + COMPAT_SHIM_C.encode()
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return dest
    for name in INIT_FILES:
        (dest / name).write_bytes((src / name).read_bytes())
    _build_shim(dest)
    from .namespaces import _identity_files

    for name, content in _identity_files().items():
        (dest / name).write_text(content)
    subprocess.run([PYTHON_FOR_INIT, "-I", "-m", "compileall", "-q", str(dest)],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for root, dirs, files in os.walk(dest):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    stamp.write_text(digest)
    return dest


def _tmpfs(target: str, size: int | None, mode: int | None, *, ro: bool = False) -> dict[str, Any]:
    opts = ["nosuid", "nodev", "noexec", f"mode={mode if mode is not None else 0o755:o}",
            f"uid={_config.INSIDE_UID}", f"gid={_config.INSIDE_GID}"]  # fmt: skip
    if size:
        opts.append(f"size={size}")
    if ro:
        opts.append("ro")
    return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": opts}


def _bind(source: str, target: str, *, rw: bool = False, exe: bool = False) -> dict[str, Any]:
    opts = ["rbind", "rw" if rw else "ro", "nosuid", "nodev"]
    if not exe:
        opts.append("noexec")
    return {"destination": target, "type": "bind", "source": source, "options": opts}


def spec_mounts(plan: LaunchPlan, init_dir: Path, scratch_dirs: dict[str, str] | None = None,
                gates: dict[str, str] | None = None, boot_id: Path | None = None,
                init_bin: Path | None = None,
                ) -> tuple[list[dict[str, Any]], list[Mount]]:  # fmt: skip
    """OCI mounts for the plan, plus the plan entries realised in the root dir itself.

    ``init_bin``: the compiled init, bound read-only (and executable) at
    ``INIT_BIN_INSIDE``; it is static, so neither the Python init's loader
    nor (under a template) the host's /usr at HOST_USR_INSIDE is bound.

    ``scratch_dirs``: the host dirs (on the sandbox's scratch disk) behind
    each ``scratch`` mount.  A gVisor tmpfs lives in the sentry's memory,
    charged to the sandbox's cgroup like the task's own, so the files are
    bound from a host disk instead (the gofer serves them; writes go to the
    host file, whose page cache is reclaimable).  Without them: refused.
    """
    mounts: list[dict[str, Any]] = []
    in_root: list[Mount] = []
    for m in plan.mounts:
        if m.kind == "scratch":
            if scratch_dirs is None or m.target not in scratch_dirs:
                raise PlanError(f"{m.rule}: gvisor has no scratch disk for {m.target}",
                                rule="resources.disk_mib")  # fmt: skip
            mounts.append(_bind(scratch_dirs[m.target], m.target, rw=True))
        elif m.kind == "ro-bind":
            mounts.append(_bind(str(m.source), m.target))
        elif m.kind == "bind":
            # A writable host dir is only ever bound through its write gate
            # (backends/_gates.py): protected names, setuid bits, ownership.
            if gates is None or m.target not in gates:
                raise PlanError(f"{m.rule}: gvisor has no write gate for {m.target}",
                                rule="filesystem.protected")  # fmt: skip
            mounts.append(_bind(gates[m.target], m.target, rw=True))
        elif m.kind == "tmpfs":
            mounts.append(_tmpfs(m.target, m.size_bytes, m.mode))
        elif m.kind == "proc":
            mounts.append({"destination": m.target, "type": "proc", "source": "proc",
                           "options": ["nosuid", "nodev", "noexec"]})  # fmt: skip
            if boot_id is not None:
                # gVisor's /proc has no boot_id; the sandbox's own, as on the
                # namespaces tier (a new one per boot, the same after a restore).
                mounts.append(_bind(str(boot_id), f"{m.target}/sys/kernel/random/boot_id"))
        elif m.kind == "dev":
            continue  # runsc's own minimal /dev (null, zero, full, random, tty, pts, shm)
        elif m.kind in ("symlink", "dir", "file"):
            in_root.append(m)
        else:
            raise PlanError(f"mounts: gvisor cannot realise mount kind {m.kind!r} at {m.target}",
                            rule=m.rule)  # fmt: skip
    # Executable: exactly the allowed tools and their loader (see the module docstring),
    # plus what starts the init: the compiled one, or the Python one's loader (``init_argv``).
    init_exe = set() if init_bin is not None else {init_loader()}
    if plan.root is None:
        for path in sorted({t.path for t in plan.tools} | set(plan.loaders) | init_exe):
            mounts.append(_bind(path, path, exe=True))
    else:  # the tools are the template's; the Python init's loader is the host's, hidden
        for path in sorted({t.path for t in plan.tools} | set(plan.loaders)):
            mounts.append(_bind(os.path.join(plan.root, path.lstrip("/")), path, exe=True))
        if init_bin is None:
            mounts.append(_bind("/usr", HOST_USR_INSIDE))
            mounts.append(_bind(init_loader(), _hidden(init_loader()), exe=True))
    if init_bin is not None:
        mounts.append(_bind(str(init_bin), INIT_BIN_INSIDE, exe=True))
    if plan.network.host_dir:  # the egress proxy's socket and CA (runsc --host-uds=open)
        mounts.append(_bind(plan.network.host_dir, EGRESS_DIR_INSIDE))
    mounts.append(_tmpfs("/sys", 4096, 0o555, ro=True))
    # runsc's /dev also has the sentry's fuse and net/tun: the task gets the
    # same minimal /dev as on the other tiers (docs/backends.md).
    mounts.append(_tmpfs("/dev/net", 4096, 0o555, ro=True))
    mounts.append(_bind(str(init_dir), INIT_DIR_INSIDE))
    if plan.root is not None:
        etc = Path(plan.root) / "etc"
        for name in ("passwd", "group"):  # the sandbox's uid 1000 is named by glassroom
            if (etc / name).is_file() or not os.path.lexists(etc):
                mounts.append(_bind(str(init_dir / name), f"/etc/{name}"))
    elif not any(r.path in ("/etc", "/etc/passwd") for r in plan.fs_rules):
        mounts.append(_bind(str(init_dir / "passwd"), "/etc/passwd"))
        mounts.append(_bind(str(init_dir / "group"), "/etc/group"))
    return mounts, in_root


def _make_root(root: Path, mounts: list[dict[str, Any]], in_root: list[Mount]) -> None:
    """An empty root holding only mount points (and the plan's links and dirs)."""
    binds: list[str] = []
    for m in mounts:
        target = m["destination"]
        if any(target == b or target.startswith(b.rstrip("/") + "/") for b in binds):
            continue  # inside an earlier bind: the host side provides it
        dest = root / target.lstrip("/")
        src = m.get("source", "")
        if m["type"] == "bind" and os.path.isfile(src):
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.touch()
        else:
            dest.mkdir(parents=True, exist_ok=True)
        if m["type"] == "bind":
            binds.append(target)
    for entry in in_root:
        dest = root / entry.target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind == "symlink" and not dest.is_symlink():
            dest.symlink_to(str(entry.source))
        elif entry.kind == "dir":
            dest.mkdir(exist_ok=True)
        elif entry.kind == "file":
            dest.write_text(str(entry.source or ""))
    for dirpath, dirnames, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)


def bundle(plan: LaunchPlan, state: Path, init_dir: Path, argv: list[str],
           own_dir: Path, extra_gids: tuple[int, ...] = (),
           scratch_dirs: dict[str, str] | None = None,
           gates: dict[str, str] | None = None, boot_id: str = "",
           init_bin: Path | None = None) -> Path:  # fmt: skip
    """The OCI bundle for ``plan``, built once per plan content and reused.

    The bundle holds nothing per sandbox (its root is read-only), so every
    sandbox of the same policy shares it; the per-sandbox state is runsc's
    ``--root`` dir, which teardown removes.  A plan with a per-sandbox part
    (the egress dir) gets its bundle in ``own_dir``, removed with it.
    """
    own = bool(plan.network.host_dir or scratch_dirs or gates)  # a per-sandbox part: its own bundle
    boot_file = None
    if own and boot_id:  # only a bundle of its own can hold a per-sandbox boot_id
        own_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        boot_file = own_dir / "boot_id"
        boot_file.write_text(boot_id + "\n")
        boot_file.chmod(0o444)
    mounts, in_root = spec_mounts(plan, init_dir, scratch_dirs, gates, boot_file, init_bin)
    lim = plan.limits
    py_tpl = plan.root is not None and init_bin is None
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {
                "uid": _config.INSIDE_UID,
                "gid": _config.INSIDE_GID,
                "additionalGids": list(extra_gids),
            },
            "args": argv,
            # under a template: the Python init's own C locale and TZ rule
            # (policy/_template.py); the compiled init reads no locale or zone file
            "env": [f"{k}={v}" for k, v in INIT_ENV_UNDER_TEMPLATE] if py_tpl else [],
            "cwd": plan.workspace,
            "capabilities": {},
            "noNewPrivileges": True,
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                {"type": "RLIMIT_NPROC", "hard": lim.pids, "soft": lim.pids},
            ],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        },
    }
    text = json.dumps(spec, indent=1, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    base = own_dir if own else state / "gvisor" / "bundles"
    dest = base / ("bundle" if own else digest)
    if (dest / "config.json").exists():
        return dest
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = base / f".{digest}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rootfs").mkdir(parents=True)
    _make_root(tmp / "rootfs", mounts, in_root)
    (tmp / "config.json").write_text(text)
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, dest)
    except OSError:  # another supervisor made it first: same content
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def probe_platforms() -> dict[str, str]:
    """For ``glassroom doctor``: each platform this runsc knows, and whether it works.

    kvm on PVM is refused without trying (it hangs).  The others run
    ``runsc do true`` under a timeout, with a private ``--root`` and no
    cgroups.  On a timeout the whole process group (runsc, gofer, sentry) is
    killed, and the ``/tmp/runsc-do*`` dirs a killed ``runsc do`` leaves are
    removed: a probe never leaves anything behind.
    """
    import glob
    import signal
    import tempfile

    try:
        path, _version, known = runsc_info()
    except BackendUnavailable as exc:
        return {"runsc": str(exc)}
    out: dict[str, str] = {}
    for name in PLATFORMS:
        if name not in known:
            continue
        why = platform_refusal(name)
        if why:
            out[name] = f"refused: {why}"
            continue
        root = tempfile.mkdtemp(prefix="glassroom-runsc-probe-")
        before = set(glob.glob("/tmp/runsc-do*"))
        argv = [path, "--root", root, f"--platform={name}", "--network=none",
                "--ignore-cgroups", "do", "true"]  # fmt: skip
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            _o, err = p.communicate(timeout=PROBE_TIMEOUT_S)
            text = " ".join(err.decode(errors="replace").split())[:160]
            out[name] = "works" if p.returncode == 0 else f"fails: {text}"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            out[name] = f"fails: no answer in {PROBE_TIMEOUT_S:g}s (killed)"
        finally:
            shutil.rmtree(root, ignore_errors=True)
            for left in set(glob.glob("/tmp/runsc-do*")) - before:
                shutil.rmtree(left, ignore_errors=True)
    return out
