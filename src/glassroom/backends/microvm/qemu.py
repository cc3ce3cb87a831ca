"""The QEMU driver: accel choice, the ``-M microvm`` command line, snapshots.

Accel: KVM when it is real.  Under PVM (this kind of host) or without
KVM, TCG — full emulation — but only when allowed explicitly with
``GLASSROOM_MICROVM_ALLOW_TCG=1``; the audit log and ``doctor`` then say
"emulated — test only".  Otherwise the backend is unavailable (exit 125).

Snapshots: a template VM is booted cold once per (image, memory, vCPUs),
its agent answers, and its state is saved with ``migrate`` to
``<cache>/snapshots/``.  A task VM then starts with ``-incoming fd:N``
from that file: a booted, idle VM that has not yet mounted its scratch disk
(a blank one of the same size in the template; each task's is a fresh ext4).

Checkpoints of one sandbox reuse that machinery over the VM's monitor:
``save_state`` (stop, ``migrate`` to a file glassroom opened), and for the
restore ``-incoming fd:N``, ``await_incoming`` and ``cont``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ... import _config
from ..._errors import BackendUnavailable, WallError
from ..._sys import probe
from ...guest import protocol
from . import image as _image
from .image import Image, cache_dir

ALLOW_TCG_ENV = "GLASSROOM_MICROVM_ALLOW_TCG"
EMULATED = "emulated — test only"
#: Guest RAM beyond the policy's memory: the guest kernel and the agent.
#: The task's files are on a virtio-blk scratch disk, not in RAM; the task
#: itself (its page cache included) is capped at memory_mib by the guest's
#: cgroup, so this is not the task's to use.
RAM_OVERHEAD_MIB = 128
BOOT_TIMEOUT_S = 60.0
#: Host memory QEMU may use beyond the guest's RAM (TCG code cache, devices).
VMM_OVERHEAD_MIB = 256
#: QEMU's threads (vCPUs, I/O, RCU, migration) in its host pids cgroup.
VMM_PIDS = 64
#: Part of every snapshot's name: a changed command line needs new snapshots.
ARGV_VERSION = 7
#: The guest's network with a NIC: its address, and the proxy's (guestfwd).
GUEST_NET = "10.0.2.0/24"
GUEST_ADDR = "10.0.2.15"
PROXY_ADDR = "10.0.2.100"
PROXY_PORT = 3128
PORT_NAME = "glassroom.0"
#: The virtio-blk serial the guest agent finds its scratch disk by.
SCRATCH_SERIAL = "glassroom-scratch"


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" | "tcg"
    detail: str

    @property
    def emulated(self) -> bool:
        return self.name == "tcg"


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def tcg_allowed() -> bool:
    return os.environ.get(ALLOW_TCG_ENV, "") in ("1", "yes", "true")


def choose_accel() -> Accel:
    kind, detail = probe.kvm()
    if kind == "real" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("kvm", f"KVM ({detail})")
    if tcg_allowed():
        return Accel("tcg", f"TCG, {EMULATED} (KVM {kind}: {detail}; {ALLOW_TCG_ENV}=1)")
    raise BackendUnavailable(
        f"microvm: no usable KVM here (KVM {kind}: {detail}); emulation (TCG) is for tests "
        f"only and must be allowed explicitly with {ALLOW_TCG_ENV}=1",
        rule="backend.microvm",
    )


def vm_size(memory_bytes: int, disk_bytes: int, cpus: float) -> tuple[int, int]:
    """(RAM MiB, vCPUs) of the VM for a plan's limits.

    ``disk_bytes`` does not count: the files are on the scratch disk
    (``scratch_disk``), so RAM is memory + the guest's own overhead."""
    del disk_bytes
    mib = memory_bytes // (1 << 20) + RAM_OVERHEAD_MIB
    mib = -(-mib // 64) * 64
    vcpus = max(1, min(math.ceil(cpus - 0.001), os.cpu_count() or 1))
    return mib, vcpus


def _tsc_khz() -> int:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


#: The compiled guest agent, as the built kernel's init (its name selects ``--guest``).
GUEST_AGENT_INIT = f"/.glassroom/{_image.GUEST_AGENT}"


def cmdline(image: Image, accel: Accel) -> str:
    """Trimmed: no console chatter, no delay-loop or TSC calibration, exit on panic.

    The built kernel mounts the root image itself and runs the agent's
    launcher; the stock kernel goes through the initramfs.  No
    ``init_on_free``: with it the kernel zeroes all guest RAM as it frees it
    at boot, 1.5 s of a 1152 MiB cold boot under TCG.  Both kernels zero a
    page when it is allocated (``INIT_ON_ALLOC_DEFAULT_ON``), so no process
    in the guest reads what another left, and a VM holds one task only."""
    parts = ["console=ttyS0", "quiet", "loglevel=1", "lpj=4000000", "reboot=t", "panic=-1",
             "random.trust_cpu=on", "i8042.noaux", "i8042.nokbd", "8250.nr_uarts=1",
             "cryptomgr.notests"]  # fmt: skip
    if image.direct:
        # no_timer_check: skip probing the timer interrupt through the IO-APIC
        # (30-50 ms of spinning under TCG; the VMM's timer is known to work).
        init = GUEST_AGENT_INIT if image.agent == "compiled" else "/.glassroom/init"
        parts += ["root=/dev/vda", "ro", "rootfstype=ext4", f"init={init}",
                  "no_timer_check"]  # fmt: skip
    else:
        parts.append("rdinit=/init")
        if image.agent == "compiled":  # the initramfs's /init reads it (image.INIT_SCRIPT)
            parts.append(f"glassroom_init={_image.GUEST_AGENT}")
    if accel.emulated and image.direct:
        # Without a TSC-deadline timer (TCG has none; KVM passes the host's) the
        # kernel calibrates the local APIC timer against the PIT and then
        # verifies it: 0.25 s of a TCG boot.  Under TCG the built kernel ticks
        # from the emulated PIT instead (secondary vCPUs get the tick by
        # broadcast).  Not the stock 6.1 kernel: its first exec then hangs.
        parts.append("noapictimer")
    khz = _tsc_khz()
    if khz:
        parts.append(f"tsc_early_khz={khz}")
    return " ".join(parts)


RELAY = Path(__file__).with_name("relay.py")


def relay_script() -> Path:
    """The relay QEMU execs per guest connection, where QEMU's uid can read it:
    a copy in the image cache (0755 dirs), named by content.  The package
    itself may live where that uid cannot go (a venv under /root)."""
    data = RELAY.read_bytes()
    dest = cache_dir() / f"relay-{hashlib.sha256(data).hexdigest()[:16]}.py"
    if not dest.exists():
        try:
            tmp = dest.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except OSError:  # a cache that is not ours to write: the package's copy
            return RELAY
    return dest


def claim_uid(state: Path) -> tuple[int, int]:
    """(uid, lock fd): a host uid no other running VM has, held while the fd is open.

    One uid per VM: QEMU is an ordinary host process, so two QEMUs of one uid
    could ptrace or read each other (and so could anything else of that
    uid).  Slots are flock'ed files; a crashed supervisor's locks go with it
    (its QEMUs die with it: ``--pdeathsig``)."""
    first, count = _config.vmm_uid_range()
    d = state / "vmm-uids"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    start = secrets.randbelow(count)
    for i in range(count):
        uid = first + (start + i) % count
        fd = os.open(d / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return uid, fd
    raise WallError(f"microvm: all {count} VMM uids ({first}..{first + count - 1}) are in "
                    "use (GLASSROOM_VMM_UIDS)", rule="vmm")  # fmt: skip


def argv(
    image: Image, accel: Accel, ram_mib: int, vcpus: int, chan: int, *,
    console: Path | None, incoming_fd: int | None = None, qmp: int | None = None,
    confine: bool = True, proxy_sock: str | None = None,
    run_as: tuple[int, int] | None = None, scratch_fds: tuple[int, int] | None = None,
) -> list[str]:  # fmt: skip
    """QEMU's command line.  ``chan``: the control channel, an fd QEMU inherits
    (one end of a socketpair; so is ``qmp``, the monitor, when given).
    ``run_as``: (uid, gid) QEMU runs as from its first
    instruction (glassroom as root passes a VMM uid of the VM's own), with no
    capabilities, an empty bounding set and no_new_privs, so a guest that
    escapes into QEMU holds nothing over the host.
    ``scratch_fds``: the VM's scratch disk (``/workspace``, ``/tmp``), as the
    (O_RDWR, O_RDONLY) fds QEMU inherits (it probes read-only first and takes
    from an fd set only an fd of the access mode it asks for), attached as a
    second virtio-blk disk, without QEMU's image locking: the file is unlinked
    and no other QEMU can reach it, and the lock QEMU took through its two fds
    of the set would refuse the ``cont`` after a checkpoint's migration
    ("Failed to get shared 'write' lock")."""
    qemu = qemu_binary()
    if qemu is None:
        raise BackendUnavailable("microvm: qemu-system-x86_64 is not installed "
                                 "(apt-get install qemu-system-x86)",
                                 rule="backend.microvm")  # fmt: skip
    # Dies with the supervisor (as bwrap's --die-with-parent does), so no VM runs
    # unwatched until the reaper's next pass.
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
    if run_as is not None:
        if not setpriv:
            raise WallError("microvm: setpriv (util-linux) is missing, so QEMU cannot drop "
                            "root", rule="vmm")  # fmt: skip
        uid, gid = run_as
        groups = "--clear-groups"
        kvm = os.stat("/dev/kvm") if accel.name == "kvm" else None
        # /dev/kvm is root:kvm 0660 on Debian: that group, never gid 0, and only
        # when others may not open it anyway.
        if kvm is not None and kvm.st_gid != 0 and not kvm.st_mode & 0o006:
            groups = f"--groups={kvm.st_gid}"
        # setpriv sets the death signal after changing uid (a uid change clears it).
        prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", groups, "--inh-caps=-all",
                  "--bounding-set=-all", "--no-new-privs", "--pdeathsig", "KILL", "--"]  # fmt: skip
    # The built kernel has no ACPI: its virtio-mmio devices come on the command
    # line, which QEMU appends itself when ACPI is off.
    machine = "microvm,pit=on,pic=on,rtc=on" + (",acpi=off" if image.direct else "")
    # TCG's translation cache defaults to 1 GiB: bounded to fit the VMM's cgroup.
    accel_opt = "kvm" if accel.name == "kvm" else "tcg,tb-size=64"
    args = [
        *prefix, qemu, "-M", machine, "-accel", accel_opt,
        "-cpu", "host" if accel.name == "kvm" else "max",
        "-smp", str(vcpus), "-m", f"{ram_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel),
        *(["-initrd", str(image.initrd)] if image.initrd else []),
        "-append", cmdline(image, accel),
        "-serial", f"file:{console}" if console else "none",
        "-drive", f"id=root,file={image.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        *([
            "-add-fd", f"fd={scratch_fds[0]},set=7", "-add-fd", f"fd={scratch_fds[1]},set=7",
            "-drive", "id=scratch,file=/dev/fdset/7,format=raw,if=none,discard=unmap,"
            "file.locking=off",
            "-device", f"virtio-blk-device,drive=scratch,serial={SCRATCH_SERIAL}",
        ] if scratch_fds is not None else []),
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ch0,fd={chan}",
        "-device", f"virtserialport,chardev=ch0,name={PORT_NAME}",
    ]  # fmt: skip
    if proxy_sock is None:
        args += ["-nic", "none"]
    else:
        # User networking with restrict=on: no route to the host or anywhere,
        # except the one guestfwd address, relayed to the egress proxy's socket.
        # Resolved paths: what was checked for QEMU's uid is what QEMU opens.
        relay = Path(os.path.realpath(relay_script()))
        proxy_sock = os.path.realpath(proxy_sock)
        for p in (str(relay), proxy_sock):
            if "," in p or " " in p:
                raise WallError(f"microvm: path unusable on a QEMU command line: {p}",
                                rule="network")  # fmt: skip
        args += [
            "-netdev", f"user,id=n0,restrict=on,ipv6=off,net={GUEST_NET},"
            f"guestfwd=tcp:{PROXY_ADDR}:{PROXY_PORT}-cmd:"
            f"/usr/bin/python3 -I -S {relay} {proxy_sock}",
            "-device", "virtio-net-device,netdev=n0",
        ]  # fmt: skip
    if qmp is not None:  # the monitor on an inherited fd (one end of a socketpair)
        args += ["-chardev", f"socket,id=qmp,fd={qmp}", "-mon", "chardev=qmp,mode=control"]
    if incoming_fd is not None:
        args += ["-incoming", f"fd:{incoming_fd}"]
    if confine:
        # QEMU's own seccomp filter: no obsolete syscalls, no resource control;
        # without a NIC also no exec and no setuid.  With one, slirp forks and
        # execs the proxy relay per connection, which needs both.
        relaxed = "allow" if proxy_sock else "deny"
        args += ["-sandbox", f"on,obsolete=deny,elevateprivileges={relaxed},spawn={relaxed},"
                 "resourcecontrol=deny"]  # fmt: skip
    return args


# -- snapshots ---------------------------------------------------------------------------


#: The scratch disk's size when a caller names none (the policy default).
DEFAULT_DISK_MIB = 512


def snapshot_path(image: Image, ram_mib: int, vcpus: int, accel: Accel,
                  disk_mib: int = DEFAULT_DISK_MIB) -> Path:  # fmt: skip
    """One snapshot per VM shape; the scratch disk's size is part of it (the
    guest's virtio-blk device learnt its capacity at boot)."""
    return (
        cache_dir()
        / "snapshots"
        / (f"{image.image_id}-v{ARGV_VERSION}-{accel.name}-m{ram_mib}-c{vcpus}"
           f"-d{disk_mib}{'-compiled' if image.agent == 'compiled' else ''}.vmstate")
    )


def scratch_disk(size_bytes: int, *, mkfs: bool = True) -> tuple[int, int]:
    """(O_RDWR, O_RDONLY) fds of a fresh sparse image of ``size_bytes`` for QEMU (ext4 when
    ``mkfs``; the template VM's disk needs none).  Made in the scratch dir (a
    disk: never tmpfs, which would be memory) and unlinked at once: the fd
    is the only reference, so nothing outlives the VM.  Fails closed
    (``WallError``, rule resources.disk_mib)."""
    from ..._sys import scratch

    directory = _config.scratch_dir()
    scratch.check_backing(directory)
    path = directory / f"vm-{os.getpid()}-{secrets.token_hex(6)}.img"
    if mkfs:
        scratch.make_image(path, size_bytes)
    else:
        with open(path, "xb") as f:
            f.truncate(size_bytes)
    try:
        rw = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            return rw, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(rw)
            raise
    except OSError as exc:
        raise WallError(f"resources.disk_mib: cannot open the scratch disk: {exc}",
                        rule="resources.disk_mib") from exc  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def prune_snapshots(image: Image) -> list[str]:
    """Remove snapshots of other images or command lines (``microvm prepare`` only:
    a running supervisor of another version may still be using its own)."""
    gone = []
    for old in (cache_dir() / "snapshots").glob("*.vmstate"):
        if not old.name.startswith(f"{image.image_id}-v{ARGV_VERSION}-"):
            with contextlib.suppress(OSError):
                old.unlink()
                gone.append(old.name)
    return gone


def handshake(sock: socket.socket, timeout: float) -> dict[str, object]:
    """Send hello, return the agent's ready frame (the one exchange before the channel runs)."""
    sock.settimeout(timeout)
    dec = protocol.Decoder()
    end = time.monotonic() + timeout
    try:
        sock.sendall(protocol.encode({"op": "hello", "version": protocol.VERSION}))
        return _await_ready(sock, dec, end)
    except TimeoutError:
        raise WallError("microvm: the guest agent did not answer in time", rule="boot") from None
    except (OSError, protocol.FrameError) as exc:
        raise WallError(f"microvm: the control channel failed during boot: {exc}",
                        rule="boot") from None  # fmt: skip


def _await_ready(sock: socket.socket, dec: protocol.Decoder, end: float) -> dict[str, object]:
    while time.monotonic() < end:
        data = sock.recv(1 << 16)
        if not data:
            raise WallError("microvm: the guest closed the channel during boot", rule="boot")
        for header, _ in dec.feed(data):
            if header.get("op") == "ready" and header.get("version") == protocol.VERSION:
                sock.settimeout(None)
                return header
            raise WallError(f"microvm: unexpected first frame {str(header)[:80]}", rule="boot")
    raise WallError("microvm: the guest agent did not answer in time", rule="boot")


class _Qmp:
    """QMP over a connected socket: one command at a time, fds passed alongside."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.f = sock.makefile("rb")
        json.loads(self.f.readline())  # the greeting
        self.call("qmp_capabilities")

    def call(self, command: str, arguments: dict[str, object] | None = None,
             fds: tuple[int, ...] = ()) -> dict[str, object]:  # fmt: skip
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(msg).encode() + b"\n"
        if fds:  # SCM_RIGHTS in the same message, as `getfd` expects
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        while True:
            reply: dict[str, object] = json.loads(self.f.readline())
            if "return" in reply or "error" in reply:  # (events are skipped)
                return reply


# -- per-sandbox checkpoints -----------------------------------------------------------

#: Migration's default bandwidth cap (32 MiB/s) is for a network: a file takes all it can.
MIGRATE_BANDWIDTH = 1 << 40
CHECKPOINT_TIMEOUT_S = 120.0


class MigrationError(Exception):
    """QEMU refused or failed a migration step (its own words)."""


def monitor(sock: socket.socket, timeout: float = 30.0) -> _Qmp:
    """QMP on the VM's monitor socketpair (QEMU's greeting waits in the socket)."""
    return _Qmp(sock, timeout)


def _ok(qmp: _Qmp, command: str, arguments: dict[str, object] | None = None,
        fds: tuple[int, ...] = ()) -> dict[str, object]:  # fmt: skip
    reply = qmp.call(command, arguments, fds)
    if "error" in reply:
        raise MigrationError(f"{command}: {str(reply['error'])[:300]}")
    ret = reply.get("return")
    return ret if isinstance(ret, dict) else {}


def save_state(qmp: _Qmp, out: int, timeout: float = CHECKPOINT_TIMEOUT_S) -> dict[str, object]:
    """Stop the VM and migrate its whole state to the file ``out`` (an fd of ours).

    Stopped first, so the saved memory and the scratch disk copied next are
    of one instant, and the migration is one pass (no dirty pages to chase).
    The VM stays stopped afterwards (QEMU's ``postmigrate``): ``cont`` goes
    on, ``quit`` ends it.  Returns ``query-migrate``'s final figures."""
    _ok(qmp, "stop")
    _ok(qmp, "migrate-set-parameters", {"max-bandwidth": MIGRATE_BANDWIDTH})
    _ok(qmp, "getfd", {"fdname": "checkpoint"}, fds=(out,))
    _ok(qmp, "migrate", {"uri": "fd:checkpoint"})
    return _await_migration(qmp, "query-migrate", timeout)


def _await_migration(qmp: _Qmp, query: str, timeout: float) -> dict[str, object]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ret = _ok(qmp, query)
        status = ret.get("status")
        if status == "completed":
            return ret
        if status in ("failed", "cancelled"):
            raise MigrationError(f"migration {status}: {str(ret.get('error-desc', ''))[:300]}")
        time.sleep(0.005)
    raise MigrationError(f"migration did not complete in {timeout:g}s")


def await_incoming(qmp: _Qmp, timeout: float = CHECKPOINT_TIMEOUT_S) -> str:
    """Wait until QEMU has loaded an ``-incoming`` state; return its run state.

    A checkpoint was saved from a stopped VM, so it comes back ``paused``
    (the caller then sends ``cont``); the booted-idle template runs at once."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = str(_ok(qmp, "query-status").get("status"))
        if status != "inmigrate":
            if status not in ("paused", "running"):
                raise MigrationError(f"the restored VM is {status!r}")
            return status
        time.sleep(0.005)
    raise MigrationError(f"the saved state did not load in {timeout:g}s")


def cont(qmp: _Qmp) -> None:
    _ok(qmp, "cont")


def quit_vm(qmp: _Qmp) -> None:
    """Ask QEMU to exit (the caller still reaps it, and kills it if it lingers)."""
    with contextlib.suppress(OSError, ValueError, MigrationError):
        _ok(qmp, "quit")


def copy_sparse(src: int, dst: int, size: int) -> int:
    """Copy ``size`` bytes of ``src`` to ``dst``, data extents only (holes stay
    holes); returns the bytes copied.  ``copy_file_range`` where the kernel
    allows it (one filesystem), else read/write."""
    os.ftruncate(dst, size)
    pos = copied = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole past pos
                break
            raise
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        copied += _copy_range(src, dst, start, end)
        pos = end
    return copied


def _copy_range(src: int, dst: int, start: int, end: int) -> int:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = 0
        if n <= 0:  # another filesystem: plain reads and writes
            chunk = os.pread(src, min(end - pos, 1 << 20), pos)
            if not chunk:
                raise OSError(errno.EIO, "short read of the scratch disk")
            n = os.pwrite(dst, chunk, pos)
        pos += n
    return end - start


def scratch_disk_from(saved: Path, size_bytes: int) -> tuple[int, int]:
    """:func:`scratch_disk`, but holding a copy of a checkpoint's disk: the saved
    file stays as it was (a snapshot may be restored many times)."""
    from ..._sys import scratch

    if os.stat(saved).st_size != size_bytes:
        raise WallError(f"resources.disk_mib: the saved scratch disk is not {size_bytes} bytes",
                        rule="resources.disk_mib")  # fmt: skip
    directory = _config.scratch_dir()
    scratch.check_backing(directory)
    path = directory / f"vm-{os.getpid()}-{secrets.token_hex(6)}.img"
    try:
        rw = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            src = os.open(saved, os.O_RDONLY | os.O_CLOEXEC)
            try:
                copy_sparse(src, rw, size_bytes)
            finally:
                os.close(src)
            return rw, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(rw)
            raise
    except OSError as exc:
        raise WallError(f"resources.disk_mib: cannot copy the saved scratch disk: {exc}",
                        rule="resources.disk_mib") from exc  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def ensure_snapshot(image: Image, accel: Accel, ram_mib: int, vcpus: int, workdir: Path,
                    disk_mib: int = DEFAULT_DISK_MIB) -> Path:  # fmt: skip
    """The saved booted-idle state for this VM shape; made once (cold boot + migrate).

    The template VM's QEMU drops root like a task's (its own uid, no
    capabilities): the control channel and the monitor are socketpairs it
    inherits, and the state goes to a file glassroom opened for it
    (``getfd`` + ``migrate fd:``)."""
    dest = snapshot_path(image, ram_mib, vcpus, accel, disk_mib)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            return dest
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        workdir.mkdir(parents=True, exist_ok=True)
        return _make_snapshot(image, accel, ram_mib, vcpus, workdir, tmp, dest, disk_mib)


def _make_snapshot(
    image: Image, accel: Accel, ram_mib: int, vcpus: int, workdir: Path, tmp: Path, dest: Path,
    disk_mib: int,
) -> Path:
    disk = scratch_disk(disk_mib << 20, mkfs=False)  # same device, same size as a task's
    try:
        return _make_snapshot_with(image, accel, ram_mib, vcpus, workdir, tmp, dest, disk)
    finally:
        os.close(disk[0])
        os.close(disk[1])


def _make_snapshot_with(
    image: Image, accel: Accel, ram_mib: int, vcpus: int, workdir: Path, tmp: Path, dest: Path,
    disk: tuple[int, int],
) -> Path:
    conn, chan = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mon, mon_qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    uid_lock = None
    run_as = None
    if os.geteuid() == 0:
        uid, uid_lock = claim_uid(workdir.parent)
        run_as = (uid, uid)
    try:
        proc = subprocess.Popen(
            argv(image, accel, ram_mib, vcpus, chan.fileno(), console=None,
                 qmp=mon_qemu.fileno(), confine=False, run_as=run_as, scratch_fds=disk),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={}, close_fds=True, pass_fds=(chan.fileno(), mon_qemu.fileno(), *disk),
        )  # fmt: skip
    except BaseException:
        for s in (conn, chan, mon, mon_qemu):
            s.close()
        os.close(out)
        if uid_lock is not None:
            os.close(uid_lock)
        raise
    chan.close()
    mon_qemu.close()
    record = _template_record(workdir, proc.pid, [tmp])
    try:
        handshake(conn, BOOT_TIMEOUT_S)
        qmp = _Qmp(mon, 10.0)
        res = qmp.call("getfd", {"fdname": "snapshot"}, fds=(out,))
        # Migrated while running (idle: it converges at once), so the
        # restored VM starts running by itself.
        if "error" not in res:
            res = qmp.call("migrate", {"uri": "fd:snapshot"})
        if "error" in res:
            raise WallError(f"microvm: snapshot failed: {res}", rule="snapshot")
        end = time.monotonic() + 120
        while time.monotonic() < end:
            ret = qmp.call("query-migrate").get("return")
            status = ret.get("status") if isinstance(ret, dict) else None
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise WallError(f"microvm: snapshot migration {status}", rule="snapshot")
            time.sleep(0.05)
        else:
            raise WallError("microvm: snapshot did not complete", rule="snapshot")
        os.fsync(out)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        for s in (conn, mon):
            s.close()
        os.close(out)
        if uid_lock is not None:
            os.close(uid_lock)  # QEMU is gone
        for p in (tmp, record):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return dest


def _template_record(workdir: Path, pid: int, paths: list[Path]) -> Path:
    """A reaper record for the template VM, in case this supervisor dies meanwhile."""
    from ..._sys import proc as _proc

    rec_dir = workdir.parent / "sandboxes"
    rec_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    me = os.getpid()
    rec = {
        "sandbox_id": f"microvm-template-{pid}",
        "backend": "microvm",
        "supervisor": {"pid": me, "start": _proc.process_start_time(me)},
        "pids": [{"pid": pid, "start": _proc.process_start_time(pid)}],
        "cgroup": None,
        "paths": [str(p) for p in paths],
        "created": time.time(),
    }
    path = rec_dir / f"microvm-template-{pid}.json"
    path.write_text(json.dumps(rec))
    return path


def status() -> str:
    """The line ``doctor`` shows for the microvm tier."""
    if qemu_binary() is None:
        return "unavailable: qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    kind, _detail = probe.kvm()
    if kind == "real" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "ready"
    if tcg_allowed():
        return f"ready ({EMULATED}: TCG, KVM is {kind})"
    return (f"unavailable: KVM is {kind}; emulation (TCG) is test only: "
            f"set {ALLOW_TCG_ENV}=1 to allow it")  # fmt: skip
