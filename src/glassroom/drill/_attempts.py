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
    ctx = Ctx(canary, secret, env_name, env_value, srv.getsockname()[1], hits,
              shutil.which(tool, path="/usr/bin:/bin") or f"/usr/bin/{tool}")  # fmt: skip

    def cleanup() -> None:
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
    ]
