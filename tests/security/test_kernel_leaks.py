"""The task's /dev is minimal and the kernel's log and addresses stay the kernel's.

Issue 13, item 4: in the microVM guest the task (uid 1000) could read
``/dev/kmsg``, kernel addresses included.  The guest agent now covers the
devtmpfs with a minimal /dev once it holds its virtio-serial port, and sets
``dmesg_restrict=1`` and ``kptr_restrict=2`` at boot.  The same probes run
on every tier.  Outcomes are exact errnos; none of these is seen by the
supervisor (they fail inside the sandbox's kernel), so there is no audit
record to check.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from glassroom import Sandbox
from glassroom.drill._attempts import DEV_ALLOWED, DEV_KNOWN

POLICY = {"tools": {"allow": ["python3", "sh", "head"]}}

PROBE = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
what = sys.argv[1]
def err(f):
    try:
        f(); return 'OK'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
if what == 'null':
    print(err(lambda: os.read(os.open('/dev/null', os.O_RDONLY), 1)))
elif what == 'kmsg':
    print(err(lambda: os.open('/dev/kmsg', os.O_RDONLY)))
elif what == 'syslog':
    buf = ctypes.create_string_buffer(4096)
    r = libc.klogctl(3, buf, len(buf))  # SYSLOG_ACTION_READ_ALL, as dmesg(1) does
    print('OK' if r >= 0 else errno.errorcode.get(ctypes.get_errno(), '?'))
elif what == 'syslog-size':
    r = libc.klogctl(10, None, 0)  # SYSLOG_ACTION_SIZE_BUFFER
    print('OK' if r >= 0 else errno.errorcode.get(ctypes.get_errno(), '?'))
elif what == 'kallsyms':
    try:
        addrs = [line.split()[0] for line in open('/proc/kallsyms')]
        print('zeros' if addrs and not any(a.strip('0') for a in addrs) else 'ADDRESSES')
    except OSError as e:
        print(errno.errorcode.get(e.errno, '?'))
elif what == 'dev':
    print(' '.join(sorted(os.listdir('/dev'))))
elif what == 'port':
    names = set()
    for base in ('/sys/class/virtio-ports', '/dev/virtio-ports'):
        try:
            names.update(os.listdir(base))
        except OSError:
            pass
    names |= {'vport0p1', 'vport1p1', 'vport2p1', 'hvc0'}
    outs = set()
    for d in ('/dev', '/dev/virtio-ports', '/run/glassroom-dev'):
        for n in sorted(names):
            outs.add(err(lambda: os.open(d + '/' + n, os.O_RDWR)))
    print(' '.join(sorted(outs)))
elif what == 'sysctl':
    for n in ('dmesg_restrict', 'kptr_restrict'):
        print(n, open('/proc/sys/kernel/' + n).read().strip())
"""


def _probe(sb: Any, what: str) -> str:
    res = sb.run(["python3", "-c", PROBE, what])
    assert res.exit_code == 0, res.stderr[-300:]
    return str(res.stdout.strip())


def test_dev_null_works(make_sandbox: Callable[..., Any]) -> None:
    assert _probe(make_sandbox(POLICY), "null") == "OK"


def test_kmsg_is_absent(make_sandbox: Callable[..., Any]) -> None:
    assert _probe(make_sandbox(POLICY), "kmsg") == "ENOENT"


def test_dmesg_syscall_refused(make_sandbox: Callable[..., Any]) -> None:
    """syslog(2) is what dmesg(1) falls back to without /dev/kmsg."""
    sb = make_sandbox(POLICY)
    assert _probe(sb, "syslog") == "EPERM"
    assert _probe(sb, "syslog-size") == "EPERM"


def test_boot_id_is_the_sandboxs_own(make_sandbox: Callable[..., Any], backend: str) -> None:
    """The host's boot id names the host and its boot: each sandbox has its own
    (gVisor 20221219 has no such file of its own: glassroom binds one in)."""
    host = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    a, b = make_sandbox(POLICY), make_sandbox(POLICY)
    ida = a.run(["head", "/proc/sys/kernel/random/boot_id"])
    idb = b.run(["head", "/proc/sys/kernel/random/boot_id"])
    assert ida.exit_code == 0 and len(ida.stdout.strip()) == 36  # harmless: readable, a uuid
    assert host not in ida.stdout + idb.stdout  # the host's is not there
    assert ida.stdout != idb.stdout
    # Nor can it be made to say something else.
    w = a.run(["sh", "-c", "echo 00000000-0000-0000-0000-000000000000 > "
                           "/proc/sys/kernel/random/boot_id"])  # fmt: skip
    assert w.exit_code != 0
    assert a.run(["head", "/proc/sys/kernel/random/boot_id"]).stdout == ida.stdout


def test_kallsyms_shows_no_addresses(make_sandbox: Callable[..., Any], backend: str) -> None:
    got = _probe(make_sandbox(POLICY), "kallsyms")
    # gVisor has no /proc/kallsyms at all; a Linux kernel shows zeros to the task.
    assert got == ("ENOENT" if backend == "gvisor" else "zeros")


def test_dev_is_minimal(make_sandbox: Callable[..., Any], backend: str) -> None:
    names = set(_probe(make_sandbox(POLICY), "dev").split())
    extra = names - DEV_ALLOWED
    known = {"namespaces": {"core"}, "gvisor": {"fuse", "net"}, "microvm": set()}[backend]
    assert extra == known, (extra, {n: DEV_KNOWN.get(n) for n in extra})
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm"} <= names


def test_agent_port_not_openable(make_sandbox: Callable[..., Any]) -> None:
    """The guest agent's virtio-serial port has no name the task can open."""
    assert _probe(make_sandbox(POLICY), "port") in ("ENOENT", "EACCES", "EACCES ENOENT")


def test_guest_sysctls_restrict(tmp_path: Path) -> None:
    """The guest's own kernel (the other tiers share the host's sysctls)."""
    with Sandbox(POLICY, backend="microvm", audit_log=tmp_path / "audit.jsonl") as sb:
        out = _probe(sb, "sysctl").splitlines()
    assert out == ["dmesg_restrict 1", "kptr_restrict 2"]


def test_dmesg_tool_fails(tmp_path: Path) -> None:
    """dmesg(1) itself, where the host has it to allow (the guest image has none):
    no /dev/kmsg, then syslog(2) refused."""
    for backend in ("namespaces", "gvisor"):
        with Sandbox({"tools": {"allow": ["dmesg", "sh"]}}, backend=backend,
                     audit_log=tmp_path / "audit.jsonl") as sb:  # fmt: skip
            res = sb.run(["dmesg"])
        assert res.exit_code == 1, (backend, res.exit_code, res.stdout[:200])
        assert "Operation not permitted" in res.stderr, (backend, res.stderr)
        assert res.stdout == ""


def test_two_sandboxes_draw_different_random_bytes(
    make_sandbox: Callable[..., Any], backend: str
) -> None:
    """Every microVM starts from one booted-idle snapshot, RNG state included:
    the host sends each guest fresh entropy and the agent reseeds the kernel's
    CRNG, so two sandboxes (and a restored one) never share random numbers."""
    draw = ["python3", "-c", "import os; print(os.urandom(16).hex())"]
    a, b = make_sandbox(POLICY), make_sandbox(POLICY)
    ra, rb = a.run(draw), b.run(draw)
    assert ra.exit_code == 0 and len(ra.stdout.strip()) == 32, ra.stderr
    assert ra.stdout != rb.stdout
