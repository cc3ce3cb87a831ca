"""The escape attempts, each with its harmless twin.

An attempt passes when the twin WORKS (so the wall is not simply breaking
everything) and the attack is BLOCKED with the expected, exact outcome.
Attacks are small Python or shell programs run inside a fresh sandbox;
they print ``ERR <errno name>`` or ``OK`` so outcomes are unmistakable.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PY_ERRNO = (
    "import errno,sys\n"
    "def run(f):\n"
    "    try:\n"
    "        f(); print('OK')\n"
    "    except OSError as e:\n"
    "        print('ERR', errno.errorcode.get(e.errno, e.errno))\n"
)

LIBC = "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"


def py_call(body: str) -> list[str]:
    """python3 -c that runs ``body`` (an expression raising OSError) under ``run``."""
    return ["python3", "-c", PY_ERRNO + "run(lambda: " + body + ")"]


def py_libc(call: str) -> list[str]:
    """A raw libc call whose -1 return becomes ``ERR <errno>``."""
    code = (
        "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"r = {call}\n"
        "print('OK' if r != -1 else 'ERR ' + errno.errorcode.get(ctypes.get_errno(), '?'))\n"
    )
    return ["python3", "-c", code]


@dataclass
class Ctx:
    """What an attempt may use: host-side canaries and servers the drill set up."""

    canary_path: str
    canary_secret: str
    env_canary_name: str
    env_canary_value: str
    tcp_port: int
    tcp_hits: list[int]
    not_allowed_tool: str
    supervisor_pid: int = field(default_factory=os.getpid)
    #: A host repository the writable-dir attempts get as ``filesystem.write``.
    repo: str = ""


@dataclass
class Attempt:
    name: str
    what: str
    twin: list[str]
    attack: list[str]
    #: (twin_result, attack_result, ctx) -> (twin_ok, blocked, detail)
    judge: Callable[[Any, Any, Ctx], tuple[bool, bool, str]]
    #: The audit rule that must appear on a blocked record, if the supervisor sees it.
    rule: str | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    same_sandbox: bool = False
    #: ``NetworkOptions`` for the sandboxes (the network attempts' hosts map).
    network: Any = None
    #: The backends the attempt applies to (empty: every one).
    tiers: tuple[str, ...] = ()


def _ok(res: Any) -> bool:
    return bool(res.exit_code == 0)


def _said(res: Any, word: str) -> bool:
    return word in res.stdout


def expect_err(*names: str) -> Callable[[Any, Any, Ctx], tuple[bool, bool, str]]:
    def judge(twin: Any, attack: Any, _ctx: Ctx) -> tuple[bool, bool, str]:
        got = attack.stdout.strip() or attack.stderr.strip()[:80]
        blocked = any(_said(attack, f"ERR {n}") for n in names)
        return _ok(twin) and _said(twin, "OK"), blocked, got

    return judge


#: Memory attempts: a disk far larger than memory, so a cap of memory + disk
#: (files and memory in one tmpfs-charged cgroup) would let the attack live.
MEM_POLICY = {"resources": {"memory_mib": 128, "disk_mib": 256, "pids": 32}}
MEM_MIB = 128


def py_hold(mib: int, *, fill: bool = False) -> list[str]:
    """Hold ``mib`` MiB of touched memory (after filling the disk, if ``fill``)."""
    code = (
        "import errno\n"
        + ("n = 0\n"
           "try:\n"
           "    with open('/workspace/fill', 'wb') as f:\n"
           "        while True:\n"
           "            f.write(b'f' * (1 << 20)); f.flush(); n += 1\n"
           "except OSError as e:\n"
           "    print('filled', n, errno.errorcode.get(e.errno, e.errno), flush=True)\n"
           if fill else "")
        + f"x = [bytearray(1 << 20) for _ in range({mib})]\n"
        "print('held', len(x), flush=True)\n"
    )  # fmt: skip
    return ["python3", "-c", code]


def _held(twin: Any, attack: Any, fill: bool) -> tuple[bool, bool, str]:
    filled = not fill or ("ENOSPC" in twin.stdout and "ENOSPC" in attack.stdout)
    return (
        _ok(twin) and _said(twin, "held") and filled,
        attack.signal == 9 and not _said(attack, "held") and filled,
        f"signal {attack.signal}; {attack.stdout.strip()[:60]}",
    )


#: What a task's /dev may hold on every tier (bwrap --dev, runsc, the guest's
#: minimal /dev), and the tier-specific names that are known and harmless.
DEV_ALLOWED = {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
               "fd", "stdin", "stdout", "stderr"}  # fmt: skip
DEV_KNOWN = {
    "core": "namespaces: bwrap's link to /proc/kcore, which the task cannot open",
    "fuse": "gvisor: the sentry's own FUSE device (not the host's); mounting needs "
            "CAP_SYS_ADMIN, which the task lacks",
    "net": "gvisor: emptied by glassroom (runsc's net/tun hidden under a read-only tmpfs)",
}
KERNEL_LEAKS = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def err(f):
    try:
        f(); return 'OPENED'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
out = ['kmsg=' + err(lambda: os.close(os.open('/dev/kmsg', os.O_RDONLY)))]
buf = ctypes.create_string_buffer(1 << 14)
r = libc.klogctl(3, buf, len(buf))  # SYSLOG_ACTION_READ_ALL: what dmesg does
out.append('syslog=' + (errno.errorcode.get(ctypes.get_errno(), '?') if r < 0 else 'READ'))
try:
    addrs = [line.split()[0] for line in open('/proc/kallsyms')]
    out.append('kallsyms=' + ('zeros' if not any(a.strip('0') for a in addrs) else 'ADDRESSES'))
except OSError as e:
    out.append('kallsyms=' + errno.errorcode.get(e.errno, '?'))
ports = set()
for base in ('/sys/class/virtio-ports', '/dev/virtio-ports'):
    try:
        ports.update(os.listdir(base))
    except OSError:
        pass
names = sorted(ports | {'vport0p1', 'vport1p1', 'vport2p1', 'hvc0', 'vda', 'vdb', 'mem',
                        'kmem', 'port', 'console', 'ttyS0', 'vsock', 'loop0', 'fuse0'})
opened = []
for d in ('/dev', '/dev/virtio-ports', '/run/glassroom-dev'):
    for n in names:
        if err(lambda: os.close(os.open(d + '/' + n, os.O_RDWR))) == 'OPENED':
            opened.append(d + '/' + n)
out.append('opened=' + (','.join(opened) or 'none'))
print(' '.join(out))
"""


def _kernel_leaks(twin: Any, attack: Any, _ctx: Ctx) -> tuple[bool, bool, str]:
    said = dict(w.split("=", 1) for w in attack.stdout.split() if "=" in w)
    blocked = (
        said.get("kmsg") in ("ENOENT", "EACCES")
        and said.get("syslog") == "EPERM"
        and said.get("kallsyms") in ("zeros", "ENOENT", "EACCES")
        and said.get("opened") == "none"
    )
    return _ok(twin) and _said(twin, "OK"), blocked, attack.stdout.strip()[:120]


DEV_LIST = r"""
import os, sys
extra = sorted(set(os.listdir('/dev')) - set(sys.argv[1].split(',')))
pts = sorted(n for n in os.listdir('/dev/pts') if n != 'ptmx' and not n.isdigit())
print('extra=' + (','.join(extra) or 'none'), 'pts=' + (','.join(pts) or 'none'))
"""


def _dev_minimal(twin: Any, attack: Any, _ctx: Ctx) -> tuple[bool, bool, str]:
    said = dict(w.split("=", 1) for w in attack.stdout.split() if "=" in w)
    extra = [n for n in said.get("extra", "?").split(",") if n != "none"]
    return (
        _ok(twin) and _said(twin, "OK"),
        "extra" in said and all(n in DEV_KNOWN for n in extra) and said.get("pts") == "none",
        attack.stdout.strip()[:120],
    )


def _make_repo() -> str:
    """A small git-like repository in /var/tmp (``/tmp`` is the sandbox's own), writable
    by the sandbox uid: the writable-dir attempts' ``filesystem.write``."""
    import tempfile

    from .. import _config
    from .._sys import fusegate

    if fusegate.available() is not None:
        return ""  # no write gate here: filesystem.write cannot start at all
    root = tempfile.mkdtemp(prefix="glassroom-drill-repo-", dir="/var/tmp")
    os.chmod(root, 0o755)
    repo = os.path.join(root, "repo")
    os.makedirs(os.path.join(repo, ".git", "hooks"))
    with open(os.path.join(repo, ".git", "config"), "w") as f:
        f.write("[core]\n\tbare = false\n")
    with open(os.path.join(repo, "f"), "w") as f:
        f.write("#!/bin/sh\n")
    uid, gid = _config.sandbox_ids()
    for dirpath, dirs, files in os.walk(repo):
        os.chown(dirpath, uid, gid)
        for n in dirs + files:
            os.chown(os.path.join(dirpath, n), uid, gid)
    return repo


PROTECTED_ATTACK = r"""
import errno, os, sys
os.chdir(sys.argv[1])
def err(f):
    try:
        f(); return 'OK'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print(' '.join([
    'hook=' + err(lambda: open('.git/hooks/post-checkout', 'w').write('evil')),
    'config=' + err(lambda: open('.git/config', 'a').write('[core]\n\tfsmonitor = evil\n')),
    'envrc=' + err(lambda: open('.envrc', 'w').write('evil')),
    'workflows=' + err(lambda: os.makedirs('.github/workflows')),
    'deep=' + err(lambda: (os.makedirs('a/b', exist_ok=True), open('a/b/.bashrc', 'w'))),
    'rename=' + err(lambda: (open('x', 'w').write('evil'), os.rename('x', '.git/hooks/pre-push'))),
    'link=' + err(lambda: os.link('.git/config', 'alias')),
]))
"""


def _protected(twin: Any, attack: Any, ctx: Ctx) -> tuple[bool, bool, str]:
    said = dict(w.split("=", 1) for w in attack.stdout.split() if "=" in w)
    with open(os.path.join(ctx.repo, ".git", "config")) as f:
        config_kept = "fsmonitor" not in f.read()
    untouched = config_kept and not any(os.path.lexists(os.path.join(ctx.repo, n)) for n in (
        ".git/hooks/post-checkout", ".envrc", ".github/workflows", "a/b/.bashrc", "alias"))
    blocked = len(said) == 7 and set(said.values()) == {"EACCES"} and untouched
    return _ok(twin) and _said(twin, "OK"), blocked, attack.stdout.strip()[:120]


def _setuid_host(twin: Any, attack: Any, ctx: Ctx) -> tuple[bool, bool, str]:
    plain = not os.stat(os.path.join(ctx.repo, "f")).st_mode & 0o6000
    got = " ".join(attack.stdout.split())
    return _said(twin, "OK"), got == "ERR EPERM ERR EPERM ERR EPERM" and plain, got


def setup_ctx(tmpdir: str, allowed: set[str]) -> tuple[Ctx, Callable[[], None]]:
    """Plant the canaries and start the host TCP server; returns a cleanup."""
    secret = "glsr-canary-" + secrets.token_hex(8)
    canary = os.path.join(tmpdir, "canary.txt")
    with open(canary, "w") as f:
        f.write(secret)
    os.chmod(tmpdir, 0o755)
    os.chmod(canary, 0o644)
    env_name = "GLASSROOM_DRILL_CANARY_TOKEN"
    env_value = "glsr-env-canary-" + secrets.token_hex(8)
    os.environ[env_name] = env_value
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            hits.append(1)
            conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    tool = next(
        (t for t in ("perl", "gzip", "tar", "base64", "nproc", "whoami", "hostname")
         if t not in allowed and shutil.which(t, path="/usr/bin:/bin")),
        "perl",
    )  # fmt: skip
    repo = _make_repo()
    ctx = Ctx(canary, secret, env_name, env_value, srv.getsockname()[1], hits,
              shutil.which(tool, path="/usr/bin:/bin") or f"/usr/bin/{tool}",
              repo=repo)  # fmt: skip

    def cleanup() -> None:
        if repo:
            shutil.rmtree(os.path.dirname(repo), ignore_errors=True)
        stop.set()
        th.join(timeout=2)
        srv.close()
        os.environ.pop(env_name, None)

    return ctx, cleanup


def attempts(ctx: Ctx) -> list[Attempt]:
    c = ctx
    small = {"resources": {"memory_mib": 128, "disk_mib": 32, "pids": 32}}
    return [
        Attempt(
            "write-outside",
            "write a file outside the allowed paths",
            py_call("open('/workspace/ok.txt','w').write('x')"),
            py_call("open('/usr/glassroom-drill-escape','w').write('x')"),
            lambda t, a, x: (
                _said(t, "OK"),
                (_said(a, "ERR EROFS") or _said(a, "ERR EACCES"))
                and not os.path.exists("/usr/glassroom-drill-escape"),
                a.stdout.strip(),
            ),
        ),  # fmt: skip
        Attempt(
            "read-canary",
            "read a host file planted outside the policy",
            ["sh", "-c", "cat /usr/lib/os-release >/dev/null && echo OK"],
            ["sh", "-c", f"cat {c.canary_path} /proc/1/root{c.canary_path} 2>&1; echo done"],
            lambda t, a, x: (
                _said(t, "OK"),
                x.canary_secret not in a.stdout + a.stderr,
                a.stdout.strip()[:80],
            ),
        ),  # fmt: skip
        Attempt(
            "exec-not-allowed",
            "run a tool that is not in tools.allow",
            ["ls", "/workspace"],
            [c.not_allowed_tool, "--version"],
            lambda t, a, x: (
                _ok(t),
                a.exit_code == 126 and any(b.rule == "tools.allow" for b in a.blocked),
                f"exit {a.exit_code}: {a.stderr.strip()[:60]}",
            ),
            rule="tools.allow",
        ),  # fmt: skip
        Attempt(
            "exec-via-memfd",
            "copy a non-allowed tool into a memfd and exec it from there",
            ["python3", "-c", PY_ERRNO + "import os\n"
             "def f():\n"
             "    try:  # MFD_NOEXEC_SEAL (Linux >= 6.3)\n"
             "        fd = os.memfd_create('ok', os.MFD_CLOEXEC | 8)\n"
             "    except OSError:  # older kernels and gVisor: shared memory in /dev/shm\n"
             "        fd = os.open('/dev/shm/ok', os.O_RDWR | os.O_CREAT, 0o600)\n"
             "    os.write(fd, b'x')\n"
             "run(f)\n"],
            ["python3", "-c", PY_ERRNO + "import os\n"
             "def f():\n"
             "    fd = os.memfd_create('evil', 0)\n"
             f"    os.write(fd, open({c.not_allowed_tool!r}, 'rb').read())\n"
             "    os.execv('/proc/self/fd/%d' % fd, ['evil', '--version'])\n"
             "run(f)\n"],
            lambda t, a, x: (
                _said(t, "OK"),
                _said(a, "ERR EPERM") and "coreutils" not in a.stdout.lower(),
                a.stdout.strip()[-60:],
            ),
        ),  # fmt: skip
        Attempt(
            "exec-from-shell",
            "exec a non-allowed tool from an allowed shell",
            ["sh", "-c", "ls / >/dev/null && echo OK"],
            ["sh", "-c", f"{c.not_allowed_tool} --version; echo rc=$?"],
            lambda t, a, x: (_said(t, "OK"), _said(a, "rc=126"), a.stdout.strip()[-20:]),
        ),  # fmt: skip
        Attempt(
            "connect-host-tcp",
            "connect to a TCP server on the host's 127.0.0.1",
            [
                "python3",
                "-c",
                "import socket;s=socket.socket();s.bind(('127.0.0.1',0));s.listen();"
                "c=socket.create_connection(s.getsockname());print('OK')",
            ],
            py_call(
                f"__import__('socket').create_connection(('127.0.0.1',{c.tcp_port}),timeout=2)"
            ),
            lambda t, a, x: (
                _said(t, "OK"),
                _said(a, "ERR ECONNREFUSED") and not x.tcp_hits,
                a.stdout.strip(),
            ),
        ),  # fmt: skip
        Attempt(
            "credential-not-injected",
            "read a credential that wasn't injected (supervisor env, host files)",
            # Twin: the one credential the policy injects is readable.
            ["sh", "-c", 'test "$GIVEN" = yes && test -s /run/glassroom/secrets/given && echo OK'],
            ["sh", "-c", "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; "
             "grep -rs . /run /workspace /tmp 2>/dev/null; echo done"],
            lambda t, a, x: (
                _said(t, "OK"),
                x.env_canary_value not in a.stdout and x.env_canary_name not in a.stdout
                and x.canary_secret not in a.stdout,
                "env, /proc/*/environ, /run, /tmp clean",
            ),
            policy={"credentials": [{"name": "given", "source": "broker"}]},
        ),  # fmt: skip
        Attempt(
            "fork-bomb",
            "fork without bound",
            [
                "python3",
                "-c",
                "import os\nfor _ in range(4):\n  p=os.fork()\n  "
                "(os._exit(0) if p==0 else os.waitpid(p,0))\nprint('OK')",
            ],
            [
                "python3",
                "-c",
                "import os,time\nn=0\ntry:\n  for _ in range(500):\n    "
                "p=os.fork()\n    if p==0: time.sleep(3); os._exit(0)\n    n+=1\n"
                "except OSError as e: print('ERR', e.errno, n)\n",
            ],
            lambda t, a, x: (_said(t, "OK"), _said(a, "ERR 11"), a.stdout.strip()),
            rule="resources.pids",
            policy=small,
        ),  # fmt: skip
        Attempt(
            "memory-bomb",
            "allocate memory without bound",
            ["python3", "-c", "b=bytearray(32<<20);print('OK')"],
            [
                "python3",
                "-c",
                "x=[]\nfor _ in range(64): x.append(bytearray(64<<20))\nprint('survived')",
            ],
            lambda t, a, x: (
                _said(t, "OK"),
                a.signal == 9 and not _said(a, "survived"),
                f"signal {a.signal}",
            ),
            rule="resources.memory_mib",
            policy=small,
        ),  # fmt: skip
        Attempt(
            "disk-fill",
            "fill the workspace",
            ["sh", "-c", "head -c 1048576 /dev/zero > /workspace/a && echo OK"],
            py_call("[open('/workspace/f%d' % i,'wb').write(b'0'*(8<<20)) for i in range(64)]"),
            lambda t, a, x: (_said(t, "OK"), _said(a, "ERR ENOSPC"), a.stdout.strip()),
            rule="resources.disk_mib",
            policy=small,
        ),  # fmt: skip
        Attempt(
            "output-flood",
            "flood stdout",
            ["echo", "OK"],
            ["python3", "-c", "import sys\nwhile True: sys.stdout.write('y'*65536)"],
            lambda t, a, x: (
                _said(t, "OK"),
                a.truncated and len(a.stdout_bytes) <= 65536,
                f"kept {len(a.stdout_bytes)} bytes, truncated={a.truncated}",
            ),
            rule="resources.max_output_bytes",
            policy={"resources": {"max_output_bytes": 65536}},
        ),  # fmt: skip
        Attempt(
            "sleep-past-runtime",
            "run past the max runtime",
            ["sh", "-c", "sleep 0.1; echo OK"],
            ["sleep", "30"],
            lambda t, a, x: (_said(t, "OK"), a.timed_out and a.signal == 9, f"signal {a.signal}"),
            rule="resources.max_runtime_s",
            policy={"resources": {"max_runtime_s": 2}},
        ),  # fmt: skip
        Attempt(
            "leftover-state",
            "leave a file for the next sandbox",
            ["sh", "-c", "test -f /workspace/left && test -f /tmp/left && echo OK"],
            ["sh", "-c", "ls /workspace/left /tmp/left 2>&1; echo done"],
            lambda t, a, x: (
                _said(t, "OK"),
                "No such file" in a.stdout and "/workspace/left\n" not in a.stdout,
                a.stdout.strip()[:80],
            ),
            same_sandbox=True,
        ),  # fmt: skip
        Attempt(
            "symlink-out",
            "follow a symlink out of the workspace",
            [
                "sh",
                "-c",
                "echo hi > /workspace/t && ln -s /workspace/t /workspace/l && cat /workspace/l && echo OK",
            ],
            [
                "sh",
                "-c",
                f"ln -s {c.canary_path} /workspace/s; ln -s /proc/1/root/etc /workspace/e; "
                "cat /workspace/s 2>&1; ls /workspace/e/shadow 2>&1; echo done",
            ],
            lambda t, a, x: (
                _said(t, "OK"),
                x.canary_secret not in a.stdout and "No such file" in a.stdout,
                a.stdout.strip()[:80],
            ),
        ),  # fmt: skip
        Attempt(
            "hardlink-out",
            "hardlink a file from outside the workspace",
            py_call(
                "__import__('os').link('/workspace/a','/workspace/b') if open('/workspace/a','w') else 0"
            ),
            py_call("__import__('os').link('/usr/bin/python3','/workspace/py')"),
            expect_err("EXDEV", "EPERM", "EACCES"),
        ),  # fmt: skip
        Attempt(
            "proc-root",
            "reach the host through /proc/1/root and /proc/self/root",
            [
                "sh",
                "-c",
                "echo x > /workspace/p && cat /proc/self/root/workspace/p >/dev/null && echo OK",
            ],
            [
                "sh",
                "-c",
                f"cat /proc/1/root{c.canary_path} /proc/self/root{c.canary_path} 2>&1; "
                "ls /proc/1/root/root /proc/1/root/home 2>&1; echo done",
            ],
            lambda t, a, x: (
                _said(t, "OK"),
                x.canary_secret not in a.stdout and "No such file" in a.stdout,
                a.stdout.strip()[:80],
            ),
        ),  # fmt: skip
        Attempt(
            "ptrace-host",
            "ptrace the supervisor's pid",
            py_libc("libc.getpid()"),
            py_libc(f"libc.ptrace(16, {c.supervisor_pid}, 0, 0)"),  # PTRACE_ATTACH
            expect_err("EPERM"),
        ),  # fmt: skip
        Attempt(
            "mount",
            "mount a filesystem",
            py_libc("libc.getuid()"),
            py_libc("libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)"),
            expect_err("EPERM"),
        ),  # fmt: skip
        Attempt(
            "unshare-userns",
            "unshare -U to regain capabilities",
            py_libc("libc.getgid()"),
            py_libc("libc.unshare(0x10000000)"),  # CLONE_NEWUSER
            expect_err("EPERM"),
        ),  # fmt: skip
        Attempt(
            "tiocsti",
            "inject keystrokes into the terminal (TIOCSTI)",
            py_libc("libc.ioctl(1, 0x5401, ctypes.create_string_buffer(64)) if False else 0"),
            py_libc("libc.ioctl(0, 0x5412, ctypes.c_char_p(b'x'))"),
            expect_err("EPERM"),
        ),  # fmt: skip
        Attempt(
            "memory-past-cap",
            "hold memory_mib + 64 MiB when disk_mib is larger still",
            py_hold(MEM_MIB - 48),
            py_hold(MEM_MIB + 64),
            lambda t, a, x: _held(t, a, fill=False),
            rule="resources.memory_mib",
            policy=MEM_POLICY,
        ),  # fmt: skip
        Attempt(
            "memory-after-disk-fill",
            "fill disk_mib of files, then hold memory_mib + 64 MiB",
            py_hold(MEM_MIB - 48, fill=True),
            py_hold(MEM_MIB + 64, fill=True),
            lambda t, a, x: _held(t, a, fill=True),
            rule="resources.memory_mib",
            policy=MEM_POLICY,
        ),  # fmt: skip
        Attempt(
            "kernel-log",
            "read the kernel log (/dev/kmsg, dmesg), kernel addresses, the agent's port",
            ["sh", "-c", "head -c 16 /dev/null && head -c 16 /dev/zero >/dev/null && echo OK"],
            ["python3", "-c", KERNEL_LEAKS],
            _kernel_leaks,
        ),  # fmt: skip
        Attempt(
            "dev-minimal",
            "find device nodes beyond the minimal /dev",
            ["sh", "-c", "head -c 8 /dev/urandom >/dev/null && echo OK"],
            ["python3", "-c", DEV_LIST, ",".join(sorted(DEV_ALLOWED))],
            _dev_minimal,
        ),  # fmt: skip
        Attempt(
            "write-protected-names",
            "plant a git hook, core.fsmonitor, .envrc, CI workflow, nested .bashrc in a "
            "writable repo (created, renamed onto, hard-linked)",
            ["python3", "-c", f"open({c.repo + '/notes.txt'!r}, 'w').write('ok'); print('OK')"],
            ["python3", "-c", PROTECTED_ATTACK, c.repo],
            _protected,
            rule="filesystem.protected",
            policy={"filesystem": {"write": [c.repo]}} if c.repo else {},
            # the microVM tier shares no host dir; without root there is no write gate
            tiers=("namespaces", "gvisor") if c.repo else ("none",),
        ),  # fmt: skip
        Attempt(
            "setuid-host-file",
            "make a setuid/setgid file in a writable host dir (chmod, open mode, fchmod)",
            ["python3", "-c", f"import os; os.chmod({c.repo + '/f'!r}, 0o755); print('OK')"],
            ["python3", "-c", PY_ERRNO + "import os\n"
             f"p = {c.repo + '/f'!r}\n"
             "run(lambda: os.chmod(p, 0o4755))\n"
             "run(lambda: os.open(p + '2', os.O_CREAT | os.O_WRONLY, 0o2755))\n"
             "run(lambda: os.fchmod(os.open(p, os.O_RDONLY), 0o6755))\n"],
            _setuid_host,
            rule="filesystem.setuid",
            policy={"filesystem": {"write": [c.repo]}} if c.repo else {},
            tiers=("namespaces", "gvisor") if c.repo else ("none",),
        ),  # fmt: skip
        Attempt(
            "setuid-workspace",
            "make a setuid file in /workspace (chmod 4755)",
            py_call("(open('/workspace/s', 'w'), __import__('os').chmod('/workspace/s', 0o755))"),
            py_call("(open('/workspace/s', 'w'), __import__('os').chmod('/workspace/s', 0o4755))"),
            expect_err("EPERM"),
            rule="filesystem.setuid",
        ),  # fmt: skip
    ]
