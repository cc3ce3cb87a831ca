"""The purpose-built guest kernel: Debian's kernel source, configured from
``guest-kernel.config`` and built once into the cache.

Why build one: Debian's cloud kernel spends most of a cold boot under TCG
on things a one-task VM never uses (decompressing 14 MB, ACPI, modules and
an initramfs to load them, dozens of subsystems).  This kernel has the
virtio devices, ext4, Landlock, seccomp and the cgroups built in, and boots
straight from the read-only root image (``root=/dev/vda``) into the agent.
It is also newer (6.12: Landlock ABI 6 instead of 6.1's 2).

Where it comes from: ``apt-get download linux-source-6.12`` (Debian's
sources, with Debian's patches), unpacked into a scratch directory of the
cache — nothing is installed on the host and its ``/boot`` is never
touched.  ``make allnoconfig KCONFIG_ALLCONFIG=guest-kernel.config`` turns
on exactly the listed options; the result is checked line by line, because
Kconfig silently drops an option whose dependencies are unmet, and a
kernel without, say, Landlock must never be booted as if it had it.

The result is the uncompressed ``vmlinux`` (stripped, ~18 MB), booted
through its PVH entry point: QEMU, Firecracker and Cloud Hypervisor all load
it directly, and the guest skips decompressing itself (~0.1 s under TCG).

Built once per (config, source version), by ``glassroom microvm prepare``
(about 3 minutes on 2 cores); the scratch tree is removed afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..._errors import BackendUnavailable

SOURCE_PACKAGE = "linux-source-6.12"
CONFIG = Path(__file__).with_name("guest-kernel.config")
#: What ``make bzImage`` needs beyond a C compiler (Debian package names).
BUILD_DEPS = ("make", "gcc", "flex", "bison", "bc", "libelf-dev", "libssl-dev", "xz-utils")
_TOOLS = ("make", "gcc", "flex", "bison", "bc", "xz", "strip")


@dataclass(frozen=True)
class Built:
    vmlinux: Path
    release: str
    source_version: str


def _unavailable(what: str) -> BackendUnavailable:
    return BackendUnavailable(f"microvm: {what}", rule="backend.microvm")


def config_digest() -> str:
    return hashlib.sha256(CONFIG.read_bytes()).hexdigest()[:12]


def wanted_options() -> dict[str, str]:
    """``{CONFIG_X: "y" | "n" | '"value"' | number}`` from the fragment."""
    out: dict[str, str] = {}
    for raw in CONFIG.read_text().splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


def unmet(dot_config: str) -> list[str]:
    """The fragment's lines that the generated ``.config`` does not hold."""
    have: dict[str, str] = {}
    for line in dot_config.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            have[key] = value
    bad = []
    for key, value in wanted_options().items():
        got = have.get(key, "n")
        if got != value:
            bad.append(f"{key}={value} (got {got})")
    return bad


def _root(cache: Path) -> Path:
    return cache / "kernel-built" / config_digest()


def find(cache: Path) -> Built | None:
    """The kernel built for this config, if any (newest source version)."""
    root = _root(cache)
    found = sorted(root.glob("*/vmlinux-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    k = found[-1]
    return Built(k, k.name.removeprefix("vmlinux-"), k.parent.name)


def _candidate_version() -> str:
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", SOURCE_PACKAGE],
                       capture_output=True, text=True, check=False)  # fmt: skip
    for line in r.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise _unavailable(f"apt-cache knows no {SOURCE_PACKAGE} (apt-get update?)")


def _check_tools() -> None:
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if not Path("/usr/include/gelf.h").exists():
        missing.append("libelf-dev")
    if missing:
        raise _unavailable(
            f"building the guest kernel needs {', '.join(missing)}: "
            f"apt-get install {' '.join(BUILD_DEPS)} (or GLASSROOM_MICROVM_KERNEL=stock)"
        )


def _run(argv: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        r = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                           check=False)  # fmt: skip
    if r.returncode != 0:
        tail = log.read_bytes()[-600:].decode(errors="replace")
        raise _unavailable(f"guest kernel build failed ({argv[0]} exited {r.returncode}; "
                           f"log {log}):\n{tail}")  # fmt: skip


def build(cache: Path, jobs: int | None = None) -> Built:
    """Build (or find) the kernel for this config and the current source version.

    One builder at a time (an flock beside the builds): a second ``prepare``
    waits, then finds the result.  Scratch trees a killed build left behind
    are removed first."""
    version = _candidate_version()
    root = _root(cache)
    root.mkdir(parents=True, exist_ok=True)
    from .image import lock_file

    with lock_file(root / ".lock"):
        existing = sorted((root / version).glob("vmlinux-*"))
        if existing:
            return Built(existing[-1], existing[-1].name.removeprefix("vmlinux-"), version)
        for stale in root.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _check_tools()
        return _build(root, version, jobs)


def _build(root: Path, version: str, jobs: int | None) -> Built:
    dest_dir = root / version
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    log = root / "build.log"
    log.write_bytes(b"")
    try:
        _run(["apt-get", "download", "-q", f"{SOURCE_PACKAGE}={version}"], scratch, log)
        debs = sorted(scratch.glob(f"{SOURCE_PACKAGE}_*.deb"))
        if not debs:
            raise _unavailable(f"apt-get download {SOURCE_PACKAGE} left no .deb (log {log})")
        # The .deb holds one tarball (usr/src/linux-source-X.tar.xz): unpack it
        # without installing the package.
        _run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x --wildcards '
              "'*/linux-source-*.tar.xz'", "sh", str(debs[0])], scratch, log)  # fmt: skip
        tarballs = sorted(scratch.rglob("linux-source-*.tar.xz"))
        if not tarballs:
            raise _unavailable(f"{debs[0].name} held no linux-source tarball")
        _run(["tar", "-xJf", str(tarballs[0])], scratch, log)
        debs[0].unlink()
        tarballs[0].unlink()
        src = next(p for p in scratch.iterdir() if p.is_dir() and p.name.startswith("linux-"))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(scratch),
            "LANG": "C",
            # Fixed build identity: the same source and config give the same banner.
            "KBUILD_BUILD_USER": "glassroom",
            "KBUILD_BUILD_HOST": "glassroom",
            "KBUILD_BUILD_TIMESTAMP": f"debian {version}",
        }
        _run(["make", "-s", "allnoconfig", f"KCONFIG_ALLCONFIG={CONFIG}"], src, log, env)
        bad = unmet((src / ".config").read_text())
        if bad:
            raise _unavailable(
                "the guest kernel config does not hold (an option's dependencies are "
                f"unmet in {SOURCE_PACKAGE} {version}): {', '.join(bad)}"
            )
        n = jobs or (os.cpu_count() or 1) + 1
        _run(["make", "-s", f"-j{n}", "vmlinux"], src, log, env)
        release = subprocess.run(["make", "-s", "kernelrelease"], cwd=src, env=env,
                                 capture_output=True, text=True,
                                 check=True).stdout.strip()  # fmt: skip
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"vmlinux-{release}"
        tmp = dest_dir / f".vmlinux.tmp{os.getpid()}"
        _run(["strip", "--strip-all", "-o", str(tmp), "vmlinux"], src, log, env)
        shutil.copyfile(src / ".config", dest_dir / "config")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        return Built(dest, release, version)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def prune(cache: Path, keep: Built) -> list[str]:
    """Remove kernels of other configs or source versions (``microvm prepare`` only)."""
    gone = []
    base = cache / "kernel-built"
    for d in base.glob("*/*"):
        if d.is_dir() and d != keep.vmlinux.parent and not d.name.startswith(".build-"):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(f"kernel-built/{d.parent.name}/{d.name}")
    return gone
